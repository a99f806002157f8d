"""Retry-After, read in this one place for every HTTP dependency (Direct Line, the providers).

The header holds seconds or an HTTP date (RFC 9110); either becomes seconds from now, never negative
and at most `cap`. A value that is neither counts as no header at all.
"""

from __future__ import annotations

import email.utils
import math
from datetime import datetime

__all__ = ["retry_after_seconds"]


def retry_after_seconds(value: str | None, *, now: datetime, cap: float = math.inf) -> float | None:
    """The wait a Retry-After header asks for, in seconds from `now` within [0, cap]; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now.timestamp()
        except (TypeError, ValueError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap)
