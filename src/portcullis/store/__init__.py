"""Where Portcullis keeps state: durable (users, groups) and ephemeral (tickets, counters).

`DurableStore` is SQLAlchemy over SQLite or PostgreSQL; `EphemeralStore` has an embedded
SQLite backend (the default, shared by a node's processes), a Redis one (several nodes)
and a memory one (tests), chosen by `open_ephemeral(url)`, and beside it an `EventBus`
(the same SQLite file, Redis pub/sub, or in-process) from `open_event_bus(url)`. All raise only
`StoreError` and its children; none ever holds a password or a token in clear.
"""

from portcullis.store.durable import (
    DurableStore,
    ShadowDeviceRecord,
    SigningKeyRecord,
    TotpRecord,
    UserRecord,
)
from portcullis.store.embedded import SqliteStore
from portcullis.store.ephemeral import (
    EphemeralStore,
    MemoryStore,
    RedisStore,
    shared_between_processes,
)
from portcullis.store.events import (
    EventBus,
    MemoryEventBus,
    RedisEventBus,
    SqliteEventBus,
    open_event_bus,
)
from portcullis.store.migrations import LATEST_VERSION, MIGRATIONS
from portcullis.store.opening import open_ephemeral
from portcullis.store.sealed import RecordSeal, SealedRecords

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "DurableStore",
    "EphemeralStore",
    "EventBus",
    "MemoryEventBus",
    "MemoryStore",
    "RecordSeal",
    "RedisEventBus",
    "RedisStore",
    "SealedRecords",
    "ShadowDeviceRecord",
    "SigningKeyRecord",
    "SqliteEventBus",
    "SqliteStore",
    "TotpRecord",
    "UserRecord",
    "open_ephemeral",
    "open_event_bus",
    "shared_between_processes",
]
