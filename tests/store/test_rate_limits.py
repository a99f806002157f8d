"""Rate-limit windows against Azurite."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from tests.store.conftest import T0, make_store


def test_rate_limit_counts_across_instances_in_a_fixed_window(storage_connection_string, table_prefix):
    stores = [make_store(storage_connection_string, table_prefix) for _ in range(4)]
    barrier = threading.Barrier(8)

    def hit(n: int):
        barrier.wait()
        return stores[n % 4].rate_limits.count_request("203.0.113.7", limit=5, window_seconds=60,
                                                       now=T0 + timedelta(seconds=10))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(hit, range(8)))
    assert sum(r.allowed for r in results) == 5
    refused = next(r for r in results if not r.allowed)
    assert refused.retry_after == pytest.approx(60)  # the window opened at the first hit
    assert stores[0].rate_limits.count_request("198.51.100.1", limit=5, now=T0 + timedelta(seconds=10)).allowed
    assert not stores[0].rate_limits.count_request("203.0.113.7", limit=5, now=T0 + timedelta(seconds=69)).allowed
    assert stores[0].rate_limits.count_request("203.0.113.7", limit=5, now=T0 + timedelta(seconds=70)).allowed
