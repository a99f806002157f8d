"""Table Storage: the relay's only state between invocations.

One module per table; each owns its table's name, row layout, entity mapping and queries, and its
docstring describes the layout. Every name starts with `RELAY_TABLE_PREFIX`:

    {prefix}conversations    conversations.py  conversation records and their leases
    {prefix}duepolls         due_polls.py      the due index: which conversations want polling and when
    {prefix}inbound          outbox.py         dedupe rows and the outbox of messages for Direct Line
    {prefix}deadletters      dead_letters.py   what a provider or Direct Line refused, with the reason
    {prefix}webchatsessions  sessions.py       Web Chat sessions of the token server, the tokens they hold,
                                               and the index of when each is refreshed
    {prefix}ratelimits       rate_limits.py    fixed-window counters per client address (hashed)
    {prefix}keys             tables.py         the secret of the keyed hashes that keys are made of

`tables.py` holds the connection and what every table shares (table creation, error translation,
keys derived from ids, JSON properties); `sweep.py` is the clean-up across all of them.

Every conditional write uses the entity's ETag: a conflicting update is re-applied on fresh data or
raised as ConcurrencyConflict, never silently overwritten.
"""

from __future__ import annotations

import functools

from relay.clock import SYSTEM_CLOCK, Clock
from relay.settings import StorageSettings, get_settings
from relay.store.conversations import Conversations
from relay.store.dead_letters import DeadLetters
from relay.store.due_polls import DuePolls
from relay.store.outbox import Outbox
from relay.store.rate_limits import RateLimits
from relay.store.sessions import WebChatSessions
from relay.store.tables import Tables, table_service_client

__all__ = ["RelayStore", "get_store"]


class RelayStore:
    """Every table the relay and the token server read and write, on one connection: `store.conversations`,
    `store.due_polls`, `store.outbox`, `store.dead_letters`, `store.sessions`, `store.rate_limits`.

    `clock` gives every time a method is not told (`now=`): what is written and what "due" or "expired" means."""

    def __init__(self, tables: Tables, *, clock: Clock = SYSTEM_CLOCK):
        self.tables = tables
        self.clock = clock
        self.due_polls = DuePolls(tables, clock=clock)
        self.conversations = Conversations(tables, due_polls=self.due_polls, clock=clock)
        self.dead_letters = DeadLetters(tables, clock=clock)
        self.outbox = Outbox(tables, dead_letters=self.dead_letters, clock=clock)
        self.sessions = WebChatSessions(tables, clock=clock)
        self.rate_limits = RateLimits(tables, clock=clock)

    @classmethod
    def from_settings(cls, storage: StorageSettings, *, clock: Clock = SYSTEM_CLOCK, **client_options) -> RelayStore:
        """The store on the account and table prefix of `storage`, on `clock`; `client_options` go to the SDK client."""
        return cls(Tables(table_service_client(storage, **client_options), prefix=storage.table_prefix), clock=clock)

    def __repr__(self) -> str:
        return f"RelayStore(account={self.tables.service.account_name!r}, prefix={self.tables.prefix!r})"


@functools.lru_cache(maxsize=1)
def get_store() -> RelayStore:
    """The process's store on the app settings and the system clock (one pooled connection for every invocation)."""
    return RelayStore.from_settings(get_settings().storage, clock=SYSTEM_CLOCK)
