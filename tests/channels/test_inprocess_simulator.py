"""The provider simulator mounted in-process answers our adapters exactly as it does over HTTP: one `respond`
behind both (provider paths, credentials, limits, injected failures, what it records)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devstack.channels import DEV_VALUES, SimulatorAdmin, load_values
from devstack.channels.server import make_server
from devstack.channels.transport import InProcessSimulator
from relay.channels import ADAPTERS
from relay.channels.base import Choice, Media, OutboundMessage
from relay.channels.common import new_session
from relay.errors import ProviderError

USERS = {"twilio": "+15550003001", "whatsapp": "15550003002", "messagebird": "conversation-1",
         "bird": "+15550003003", "generic": "user-3"}
REPLY_CONTEXTS = {"twilio": {"to": USERS["twilio"], "from": "+15005550006"}, "whatsapp": {"to": USERS["whatsapp"]},
                  "messagebird": {"conversation_id": USERS["messagebird"]},
                  "bird": {"identifier_value": USERS["bird"]}, "generic": {"user_id": USERS["generic"]}}
USERS["line"] = "U" + "3" * 32
REPLY_CONTEXTS["line"] = {"to": USERS["line"]}
LONG_TEXT = " ".join(f"word{n:03d}" for n in range(400))  # 3,199 characters: 2 Twilio messages


class Side:
    """A simulator and the adapters that reach it, with the provider values both share."""

    def __init__(self, simulator: SimulatorAdmin, session: Any):
        self.simulator = simulator
        self.session = session

    def adapter(self, provider: str, **values: str):
        return ADAPTERS[provider]({**DEV_VALUES, **self.simulator.api_bases(), **values}, session=self.session)


@pytest.fixture
def over_http() -> Iterator[Side]:
    """The HTTP server (the socket path the other channel tests use), served from a thread of this process."""
    server = make_server(0, load_values(environ={}), "http://127.0.0.1:9")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    admin = SimulatorAdmin()
    admin.url = f"http://127.0.0.1:{server.server_address[1]}"
    session = new_session()
    yield Side(admin, session)
    session.close()
    server.shutdown()
    server.server_close()


@pytest.fixture
def in_process() -> Iterator[Side]:
    with InProcessSimulator() as simulator:
        yield Side(simulator, simulator.http)


def send(side: Side, provider: str, message: OutboundMessage, **values: str) -> tuple:
    try:
        ids = side.adapter(provider, **values).send(REPLY_CONTEXTS[provider], message)
    except ProviderError as error:
        return type(error).__name__, error.parts_sent, error.parts_total, error.retry_after
    return "sent", len(ids)


def recorded(side: Side, provider: str) -> list[tuple]:
    return [(r["text"], r["actions"], [m["url"] for m in r["media"]]) for r in side.simulator.replies(provider)]


def a_reply_with_buttons(side: Side, provider: str) -> tuple:
    offered = (Choice("q-0-1", "Yes"), Choice("q-0-2", "No"))
    return send(side, provider, OutboundMessage(text="Pick one", choices=offered))


def a_picture(side: Side, provider: str) -> tuple:
    photo = Media("https://cdn.example/photo.jpg", "image/png")
    return send(side, provider, OutboundMessage(text="Look", media=(photo,)))


def wrong_credentials(side: Side, provider: str) -> tuple:
    wrong = {"twilio": {"TWILIO_AUTH_TOKEN": "wrong"}, "whatsapp": {"WHATSAPP_ACCESS_TOKEN": "wrong"},
             "messagebird": {"MESSAGEBIRD_ACCESS_KEY": "wrong"}, "bird": {"BIRD_ACCESS_KEY": "wrong"},
             "generic": {"GENERIC_CALLBACK_SECRET": "whsec_d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA=="},
             "line": {"LINE_CHANNEL_ACCESS_TOKEN": "wrong"}}[provider]
    return send(side, provider, OutboundMessage(text="hi"), **wrong)


def unavailable_then_back(side: Side, provider: str) -> tuple:
    side.simulator.fail_next(provider, 503, retry_after=2)
    first = send(side, provider, OutboundMessage(text="try me"))
    return first, send(side, provider, OutboundMessage(text="try me"))


def long_text_refused_part_way(side: Side, provider: str) -> tuple:
    side.simulator.fail_next(provider, 429, after=1, retry_after=4)
    return send(side, provider, OutboundMessage(text=LONG_TEXT))


CASES = [
    *[pytest.param(a_reply_with_buttons, provider, id=f"{provider}: a reply with suggested actions")
      for provider in USERS],
    *[pytest.param(wrong_credentials, provider, id=f"{provider}: wrong credentials are refused for good")
      for provider in USERS],
    *[pytest.param(unavailable_then_back, provider, id=f"{provider}: a 503 with Retry-After, then taken")
      for provider in USERS],
    pytest.param(a_picture, "whatsapp", id="whatsapp: a picture with a caption"),
    pytest.param(long_text_refused_part_way, "twilio", id="twilio: a long reply throttled after its first part"),
]


@pytest.mark.parametrize(("case", "provider"), CASES)
def test_the_in_process_simulator_answers_the_adapters_as_the_http_server_does(
        over_http, in_process, case: Callable[[Side, str], tuple], provider):
    through_socket = (case(over_http, provider), recorded(over_http, provider))
    in_memory = (case(in_process, provider), recorded(in_process, provider))
    assert in_memory == through_socket
