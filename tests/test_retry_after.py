"""Retry-After is read in one place (relay/retry_after.py) for Direct Line and the providers alike."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

import pytest

from relay.retry_after import retry_after_seconds

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("header", "seconds"), [
    ("7", 7.0),
    ("0.5", 0.5),
    ("-3", 0.0),  # never a negative wait
    (None, None),
    ("", None),
    ("soon", None),  # unreadable counts as absent
    ("nan", None),
])
def test_retry_after_in_seconds(header, seconds):
    assert retry_after_seconds(header, now=NOW) == seconds


def test_retry_after_as_an_http_date_is_the_time_until_then():
    in_two_minutes = email.utils.formatdate(NOW.timestamp() + 120, usegmt=True)
    assert retry_after_seconds(in_two_minutes, now=NOW) == 120
    a_minute_ago = email.utils.formatdate(NOW.timestamp() - 60, usegmt=True)
    assert retry_after_seconds(a_minute_ago, now=NOW) == 0.0


def test_a_cap_bounds_the_wait():
    assert retry_after_seconds("86400", now=NOW, cap=30) == 30
    assert retry_after_seconds("inf", now=NOW, cap=30) == 30
    assert retry_after_seconds("86400", now=NOW) == 86400
