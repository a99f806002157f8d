"""Users' ids in storage: any id a provider sends fits the tables, and no phone number shows in a log.

Table keys are keyed hashes of the ids (relay/store/tables.py `Tables.key_for`), so an id of any
length or character is relayed like any other, and a phone number never appears in a storage URL,
which the Azure SDK and urllib3 write to the log at DEBUG.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import pytest

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import wait_until
from relay.channels import get_adapter
from relay.channels.base import WebhookRequest
from relay.conversations import RelayContext
from relay.directline import DirectLineClient
from relay.inbound import handle_webhook
from relay.poller import poll_tick
from relay.settings import Settings
from relay.store import RelayStore
from relay.store.sweep import sweep_tables
from tests.security.conftest import PROVIDERS
from tests.security.leaks import LogCapture

PUBLIC_URL = "http://relay.test"
PHONES = {"twilio": "+15557770001", "whatsapp": "15557770002", "messagebird": "+15557770003",
          "bird": "+15557770004", "generic": "+15557770005"}
PHONES["vonage"] = "+15557770006"
PHONES["line"] = webhooks.line_user("+15557770006")  # not a number: a LINE user id, as personal as one
PHONES["telegram"] = "5557770006"  # a Telegram user id: no phone number, but as personal
DEBUG_LOGGERS = ("", "azure", "azure.core.pipeline.policies.http_logging_policy", "urllib3", "relay")


@pytest.mark.parametrize("user", ["x" * 2_000, "/" * 500], ids=["2000 characters", "500 slashes"])
def test_a_user_id_of_any_length_or_character_is_relayed(exposed_relay, user):
    answer = exposed_relay.deliver(exposed_relay.webhook("generic", user, "an id too long for any table key"))
    assert answer.status_code == 200, answer.text
    wait_until(lambda: [r["text"] for r in exposed_relay.simulator.replies("generic", user) if r["direction"] == "bot"],
               timeout=30, what="the reply to a long user id")
    replies = [r["text"] for r in exposed_relay.simulator.replies("generic", user) if r["direction"] == "bot"]
    assert replies[0] == "You said: an id too long for any table key"


@contextlib.contextmanager
def debug_logging(capture: LogCapture) -> Iterator[None]:
    """Every log record of this process at DEBUG into `capture`, the Azure SDK's request log and urllib3's included."""
    loggers = [logging.getLogger(name) for name in DEBUG_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    loggers[0].addHandler(capture)
    try:
        yield
    finally:
        loggers[0].removeHandler(capture)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def test_no_phone_number_in_any_log_line_at_debug(storage_connection_string, table_prefix, start_emulator,
                                                  start_simulator):
    emulator = start_emulator()
    simulator = start_simulator(relay_url=PUBLIC_URL)
    settings = Settings.from_environ({
        **DEV_VALUES, **simulator.api_bases(), "AzureWebJobsStorage": storage_connection_string,
        "RELAY_TABLE_PREFIX": table_prefix, "DIRECTLINE_SECRET": emulator.secret,
        "DIRECTLINE_ENDPOINT": emulator.base_url, "RELAY_PUBLIC_BASE_URL": PUBLIC_URL,
        "RELAY_BURST_POLL_SECONDS": "1"})
    ctx = RelayContext(settings=settings, store=RelayStore.from_settings(settings.storage),
                       directline=DirectLineClient(settings.directline),
                       adapter=functools.cache(lambda name: get_adapter(name, settings)))

    log = LogCapture()  # the relay's log, not the test's own requests to the simulator
    with debug_logging(log):
        for provider in PROVIDERS:  # in: the webhook stores, posts and delivers the bot's reply within its burst
            hook = webhooks.build(provider, DEV_VALUES, PUBLIC_URL, sender=PHONES[provider],
                                  text="my number is private")
            handle_webhook(ctx, provider, WebhookRequest("POST", hook.url, hook.headers, hook.body))
    for provider in PROVIDERS:  # out: a reply to each user's number
        wait_until(lambda p=provider: simulator.replies(p), timeout=30, what=f"a {provider} reply")
    with debug_logging(log):
        poll_tick(ctx)
        sweep_tables(ctx.store)

    text = log.text()
    assert "Request URL" in text and "urllib3" in text  # the storage requests were logged, with their URLs
    # Any form of a number (with or without +, URL-encoded, escaped) keeps its digits together.
    shown = [p for p in PHONES.values() if p.lstrip("+")[1:] in text]
    assert not shown, f"phone numbers in the log: {shown}"
