"""Fixtures of the reliability tests: the end-to-end relay stack on an Azurite that may be restarted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.procs import Azurite
from tests.relay.conftest import relay_stack  # noqa: F401 - the end-to-end stack fixture, reused here


@pytest.fixture
def own_azurite(tmp_path) -> Iterator[Azurite]:
    """An Azurite these tests may stop and start again: its data on disk, its ports kept."""
    with Azurite(location=tmp_path / "azurite", log_path=tmp_path / "azurite.log") as azurite:
        yield azurite


@pytest.fixture
def storage_connection_string(own_azurite) -> str:
    """Here the relay stack stores in `own_azurite`, not in the session's in-memory one."""
    return own_azurite.connection_string
