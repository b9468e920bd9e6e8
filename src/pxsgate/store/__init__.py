"""The SQLite store: instances with their senders, studies, selection decisions, results.

One file under ``storage.data-dir``, in WAL mode so readers (``pxsgate results``, other
processes) never block the service's writer. The schema is versioned with
``PRAGMA user_version``; :data:`MIGRATIONS` are applied in order at open and never edited
once released (add a new one instead).

:class:`Store` is one connection (connection.py: opening, migrating, the ``transaction``
guard of every write, keys made with the store's secret) with one part per concern, in
data-flow order:

- schema.py: the migrations, and the views per audience they create;
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
]


class Store(InstancesMixin, JobsMixin, ResultsMixin, PriorsMixin, OutboxMixin, QueriesMixin,
            AccessMixin, StoreBase):
    """Async access to the SQLite file. One connection; aiosqlite serialises its use."""
