"""Inbound media behind the provider's credentials (WhatsApp media ids, Twilio MediaUrls): the adapter
downloads the bytes the user sent from the simulator, and classifies failures for the relay."""

from __future__ import annotations

import base64

import pytest

from relay.channels.base import Media
from relay.errors import ProviderRejected, ProviderUnavailable
from tests.channels.conftest import make_adapter

PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # binary, every byte value, ~10 KB
USERS = {"whatsapp": "15550001", "twilio": "whatsapp:+15550001"}
WRONG_CREDENTIALS = {"whatsapp": {"WHATSAPP_ACCESS_TOKEN": "not-the-token"}, "twilio": {"TWILIO_AUTH_TOKEN": "wrong"}}


def api_base(sim, provider: str) -> dict[str, str]:
    return {"WHATSAPP_API_BASE": f"{sim.url}/v21.0"} if provider == "whatsapp" else {"TWILIO_API_BASE": sim.url}


def sent_media(sim, fake_relay, provider: str, content: bytes = PHOTO, content_type: str = "image/png") -> Media:
    """The media item of a message the user sends through the simulator, as the relay's adapter parses it."""
    url = f"data:{content_type};base64," + base64.b64encode(content).decode()
    sim.send_inbound(provider, USERS[provider], "look", media=[{"url": url, "contentType": content_type}])
    [(_, request, _)] = fake_relay.received
    [message] = make_adapter(provider, api_base(sim, provider)).parse(request)
    [media] = message.media
    return media


@pytest.mark.parametrize("provider", list(USERS))
def test_the_user_sent_bytes_are_fetched_with_the_providers_credentials(sim, fake_relay, provider):
    media = sent_media(sim, fake_relay, provider)
    assert media.protected  # the bot could not open this URL itself
    fetched = make_adapter(provider, api_base(sim, provider)).fetch_media(media, max_bytes=1_000_000)
    assert fetched.content == PHOTO
    assert fetched.content_type == "image/png"
    assert fetched.name.endswith(".png")


@pytest.mark.parametrize("provider", list(USERS))
def test_wrong_credentials_are_a_permanent_failure(sim, fake_relay, provider):
    media = sent_media(sim, fake_relay, provider)
    adapter = make_adapter(provider, {**api_base(sim, provider), **WRONG_CREDENTIALS[provider]})
    with pytest.raises(ProviderRejected) as caught:
        adapter.fetch_media(media, max_bytes=1_000_000)
    assert "401" in str(caught.value)
    assert next(iter(WRONG_CREDENTIALS[provider].values())) not in str(caught.value)


@pytest.mark.parametrize("provider", list(USERS))
def test_a_provider_outage_is_transient(sim, fake_relay, provider):
    media = sent_media(sim, fake_relay, provider)
    sim.fail_next(provider, 503, retry_after=7)
    adapter = make_adapter(provider, api_base(sim, provider))
    with pytest.raises(ProviderUnavailable) as caught:
        adapter.fetch_media(media, max_bytes=1_000_000)
    assert caught.value.retry_after == 7
    assert adapter.fetch_media(media, max_bytes=1_000_000).content == PHOTO  # and it works once the provider is back


@pytest.mark.parametrize("provider", list(USERS))
def test_a_file_over_the_limit_is_refused_for_good(sim, fake_relay, provider):
    media = sent_media(sim, fake_relay, provider)
    adapter = make_adapter(provider, api_base(sim, provider))
    with pytest.raises(ProviderRejected) as caught:
        adapter.fetch_media(media, max_bytes=len(PHOTO) - 1)
    assert caught.value.reason == "MediaTooLarge"
    assert adapter.fetch_media(media, max_bytes=len(PHOTO)).content == PHOTO


@pytest.mark.parametrize("provider", list(USERS))
def test_media_the_provider_no_longer_has_is_a_permanent_failure(sim, fake_relay, provider):
    media = sent_media(sim, fake_relay, provider)
    gone = Media(url=media.url.rsplit("/", 1)[0] + ("/999999999" if provider == "whatsapp" else "/MEgone"),
                 content_type=media.content_type, protected=True)
    with pytest.raises(ProviderRejected) as caught:
        make_adapter(provider, api_base(sim, provider)).fetch_media(gone, max_bytes=1_000_000)
    assert "404" in str(caught.value)


def test_twilio_credentials_go_only_to_twilios_api_host(sim, fake_relay):
    media = sent_media(sim, fake_relay, "twilio")
    elsewhere = make_adapter("twilio", {"TWILIO_API_BASE": "https://api.twilio.com"})
    [(_, request, _)] = fake_relay.received
    [message] = elsewhere.parse(request)
    assert not message.media[0].protected  # not Twilio's host: left to the bot as a plain link
    with pytest.raises(ProviderRejected):
        elsewhere.fetch_media(media, max_bytes=1_000_000)


@pytest.mark.parametrize("provider", ["messagebird", "bird", "generic"])
def test_public_media_urls_are_left_as_links(sim, fake_relay, provider):
    sim.send_inbound(provider, "+15550003", "look", media=[{"url": "https://cdn.example/photo.jpg"}])
    [(_, _, [message])] = fake_relay.received
    assert [(m.url, m.protected) for m in message.media] == [("https://cdn.example/photo.jpg", False)]
    with pytest.raises(ProviderRejected):
        make_adapter(provider).fetch_media(message.media[0], max_bytes=1_000_000)
