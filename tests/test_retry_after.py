"""Retry-After is read in one place (relay/retry_after.py) for Direct Line and the providers alike."""

from __future__ import annotations

import email.utils
import time

import pytest

from relay.retry_after import retry_after_seconds


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
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_an_http_date_is_the_time_until_then():
    in_two_minutes = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 <= retry_after_seconds(in_two_minutes) <= 120
    a_minute_ago = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_seconds(a_minute_ago) == 0.0


def test_a_cap_bounds_the_wait():
    assert retry_after_seconds("86400", cap=30) == 30
    assert retry_after_seconds("inf", cap=30) == 30
    assert retry_after_seconds("86400") == 86400
