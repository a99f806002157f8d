"""Many messages at the same moment, through the local host: of one user on every provider, of many
users in one webhook.

Every message that passes verification reaches the bot exactly once: a storage conflict between
concurrent webhooks is the relay's own business, never answered to the provider (for every
provider a 4xx is permanent, and Twilio does not retry at all). One webhook's burst is bounded,
however many users it carries.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from devstack.channels import DEV_VALUES, webhooks
from devstack.procs import wait_until
from relay.channels import generic
from tests.relay.conftest import PROVIDERS

CONCURRENT = 50
PROVIDERS_AT_ONCE = 4
"""Providers whose 50 messages arrive together: 200 webhooks at one moment is what this claim needs, and all eight
channels at once (400) only measures how many connections Azurite takes on a 2-core machine."""
USERS = {"twilio": "+15550900001", "whatsapp": "15550900002", "messagebird": "+15550900003",
         "bird": "+15550900004", "generic": "user-0900005"}
USERS["vonage"] = "whatsapp:15550900006"
USERS["line"] = webhooks.line_user("user-0900006")
USERS["telegram"] = "5550900006"


def post_together(hooks: list[webhooks.Webhook]) -> list[requests.Response]:
    """POST every webhook at the same moment, each on its own connection."""
    barrier = threading.Barrier(len(hooks))

    def post(hook: webhooks.Webhook) -> requests.Response:
        with requests.Session() as session:
            barrier.wait()
            return session.post(hook.url, data=hook.body, headers=hook.headers, timeout=120)

    with ThreadPoolExecutor(len(hooks)) as pool:
        return list(pool.map(post, hooks))


def test_fifty_concurrent_messages_of_one_user_each_reach_the_bot_once(relay_stack):
    """On every provider, several providers at the same moment: 50 different messages of one user each, all at once."""
    stack = relay_stack()
    texts = {provider: [f"message {n} from {provider}" for n in range(CONCURRENT)] for provider in PROVIDERS}
    answers = []
    for first in range(0, len(PROVIDERS), PROVIDERS_AT_ONCE):
        together = PROVIDERS[first:first + PROVIDERS_AT_ONCE]
        answers += post_together([webhooks.build(provider, DEV_VALUES, stack.host.url, sender=USERS[provider],
                                                 text=text) for provider in together for text in texts[provider]])
    refused = [(a.status_code, a.text[:200]) for a in answers if a.status_code != 200]
    assert not refused, refused

    def at_bot(provider: str) -> list[str]:
        record = stack.record(provider, USERS[provider])
        return stack.user_messages_at_bot(record.conversation_id) if record and record.conversation_id else []

    for provider in PROVIDERS:
        key = stack.record(provider, USERS[provider]).key
        # The outbox empties only after each message was posted (or found posted): a repeat would be at the bot then.
        wait_until(lambda p=provider, k=key: len(at_bot(p)) >= CONCURRENT and not stack.store.outbox.list_messages(k),
                   timeout=90, what=f"{CONCURRENT} {provider} messages at the bot")
        counts = collections.Counter(at_bot(provider))
        assert counts == collections.Counter(texts[provider]), {t: n for t, n in counts.items() if n != 1}


def signed_generic(messages: list[dict]) -> tuple[bytes, dict[str, str]]:
    """A Standard Webhooks call of the generic channel carrying `messages`."""
    body = json.dumps({"messages": messages}).encode()
    key = generic.secret_key(DEV_VALUES["GENERIC_WEBHOOK_SECRET"])
    headers = generic.standard_headers(key, f"msg_{uuid.uuid4().hex}", body, timestamp=int(time.time()))
    return body, {"Content-Type": "application/json", **headers}


def test_one_webhook_carrying_a_hundred_users_is_answered_within_one_burst(relay_stack):
    """Its users are stored and worked side by side, and one burst bounds the relaying: users whose turn comes
    later are left to the poller, so the provider's answer does not grow with the number of users."""
    burst = 3.0
    stack = relay_stack(burst=str(burst))
    users = [f"user-0901{n:03d}" for n in range(100)]
    body, headers = signed_generic([{"id": f"msg_{uuid.uuid4().hex}", "user": {"id": user}, "text": f"hi from {user}"}
                                    for user in users])

    started = time.monotonic()
    answer = requests.post(f"{stack.host.url}/api/channels/generic", data=body, headers=headers, timeout=120)
    took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    # One burst after another (the reply, the late reply, a quiet poll: about 2 s each) took minutes;
    # storing is a few writes per user, and the relaying stops starting users when the burst is over.
    assert took < burst + 15, f"the webhook took {took:.1f} s"
    for user in users:
        assert stack.wait_for_replies("generic", user, 1, timeout=60)[0] == f"You said: hi from {user}"
