"""The store: instances with their senders, studies, selection decisions, results.

By default one SQLite file under ``storage.data-dir``, in WAL mode so readers (``pxsgate
results``, other processes) never block the service's writer; or a PostgreSQL database
(``storage.database``) that several gateways share. The schema is versioned
(SQLite's ``PRAGMA user_version``); :data:`MIGRATIONS` are applied in order at open and
never edited once released (add a new one instead, with its PostgreSQL twin).

:class:`Store` is one connection (connection.py: opening, migrating, the ``transaction``
guard of every write, keys made with the store's secret) with one part per concern, in
data-flow order:

- schema.py: the migrations, and the views per audience they create;
- schema_pg.py: the same schema on PostgreSQL;
- jsonpaths.py: where the result document's fields are, for the SQL that reads them;
- instances.py: indexing each received instance, its receptions and moves (receive);
- jobs.py: each study's job and its state machine (records.TRANSITIONS), retention;
- results.py: selection decisions, result documents, embeddings and prior images;
- priors.py: priors fetched from the PACS, embedded and kept apart from results;
- outbox.py: the deliveries of each result, and the objects made for exporters;
- queries.py: the reads of ``pxsgate status`` and ``pxsgate evaluate``;
- access.py: the web UI's users, sessions, audit trail and reviews.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pxsgate.errors import StoreError
from pxsgate.records import DONE_STATES, ROLES, UNFINISHED_STATES, DeliveryState
from pxsgate.store.access import (
    AUDIT_OUTCOMES,
    VERDICTS,
    AccessMixin,
    AuditEntry,
    Review,
    Session,
    User,
    WorklistFilter,
    WorklistRow,
    audit_time,
)
from pxsgate.store.connection import StoreBase
from pxsgate.store.instances import InstancesMixin
from pxsgate.store.jobs import JobsMixin, PendingStudy, StudyRow
from pxsgate.store.outbox import Delivery, MadeInstance, OutboxMixin, delivery_id
from pxsgate.store.priors import FetchedPrior, PriorsMixin, ResultWithoutChange
from pxsgate.store.queries import QueriesMixin
from pxsgate.store.results import (
    PRIOR_IMAGE_SQL,
    UTC_FORMAT,
    ImageEmbedding,
    ResultFilter,
    ResultsMixin,
    ResultTransaction,
    StudyEmbeddings,
)
from pxsgate.store.schema import MIGRATIONS

if TYPE_CHECKING:
    from pxsgate.config import Config
    from pxsgate.service.failpoints import Failpoints

__all__ = [
    "AUDIT_OUTCOMES",
    "DONE_STATES",
    "MIGRATIONS",
    "PRIOR_IMAGE_SQL",
    "ROLES",
    "UNFINISHED_STATES",
    "UTC_FORMAT",
    "VERDICTS",
    "AuditEntry",
    "Delivery",
    "DeliveryState",
    "FetchedPrior",
    "ImageEmbedding",
    "MadeInstance",
    "PendingStudy",
    "ResultFilter",
    "ResultTransaction",
    "ResultWithoutChange",
    "Review",
    "Session",
    "Store",
    "StudyEmbeddings",
    "StudyRow",
    "User",
    "WorklistFilter",
    "WorklistRow",
    "audit_time",
    "delivery_id",
    "store_for",
]


class Store(InstancesMixin, JobsMixin, ResultsMixin, PriorsMixin, OutboxMixin, QueriesMixin,
            AccessMixin, StoreBase):
    """Async access to the SQLite file. One connection; aiosqlite serialises its use."""


def store_for(config: Config, failpoints: Failpoints | None = None) -> Store:
    """The store ``config`` names (not opened): SQLite's file under storage.data-dir, or
    the PostgreSQL database of storage.database, as this node (storage.node-name)."""
    password = None
    if (f := config.storage.database_password_file) is not None:
        try:
            password = f.read_text().strip()
        except OSError as exc:
            raise StoreError(f"cannot read storage.database-password-file {f}: "
                             f"{exc.strerror or exc}") from exc
    store = Store(config.db_path, failpoints, url=config.database_url, password=password,
                  node=config.node_name)
    store.delivery_lease_seconds = config.storage.delivery_lease_seconds
    return store
