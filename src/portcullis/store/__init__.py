"""Where Portcullis keeps state: durable (users, groups) and ephemeral (tickets, counters).

`DurableStore` is SQLAlchemy over SQLite or PostgreSQL; `EphemeralStore` has a memory and
a Redis backend chosen by `open_ephemeral(url)`, and beside it an `EventBus` (in-process,
or Redis pub/sub) that the nodes share, from `open_event_bus(url)`. All raise only
`StoreError` and its children; none ever holds a password or a token in clear.
"""

from portcullis.store.durable import (
    DurableStore,
    ShadowDeviceRecord,
    SigningKeyRecord,
    TotpRecord,
    UserRecord,
)
from portcullis.store.ephemeral import EphemeralStore, MemoryStore, RedisStore, open_ephemeral
from portcullis.store.events import EventBus, MemoryEventBus, RedisEventBus, open_event_bus
from portcullis.store.migrations import LATEST_VERSION, MIGRATIONS
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
    "TotpRecord",
    "UserRecord",
    "open_ephemeral",
    "open_event_bus",
]
