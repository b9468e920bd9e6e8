"""The schema of the store: its migrations, applied in order and counted in
``PRAGMA user_version``, and the views per audience they create.

A migration is never edited once released: add a new one instead. The views are defined
once each, below, and placed in the migrations that (re-)create them; a view's text is
what SQLite keeps in ``sqlite_master``, so a released view's constant keeps its text to the
character (tests/test_store_states.py pins every migration's digest). A later version of a
view that a migration re-creates is a new constant; the one it replaces is kept, for the
migration that first created it.
"""

from __future__ import annotations

from pxsgate.store.jsonpaths import (
    ANCHORS_SHA256,
    CHANGE_DISTANCE,
    CHANGE_INTERVAL_DAYS,
    CHANGE_SCORE_DIFFERENCE,
    ENTRY_CODE,
    ENTRY_VALUE,
    ERROR_MESSAGE,
    EXIT_CODE,
    MODEL_VERSION,
    PXS_SCORE,
    RESULTS,
    SELECTION_REASON,
    SELECTION_RULE,
    STUDY_DATETIME,
    WEIGHTS_SHA256,
    doc,
    stage,
)

# Each view's columns are laid out at these indents: its text is kept as written.
_COLUMN = "\n           "  # a column of the SELECT list
_MORE = "\n                  "  # the second line of a stage duration
_LAST = "\n                 "  # its third


def _stage_seconds(later: str, earlier: str, name: str) -> str:
    """Seconds from one stage of the result document to a later one (3 decimals)."""
    return (f"round((julianday({doc(stage(later))}){_MORE}- julianday({doc(stage(earlier))}))"
            f" * 86400,{_LAST}3) AS {name}")


def _change(path: str, name: str) -> str:
    """A field of the result's change entry (its code 'pxs.change')."""
    return (f"(SELECT json_extract(e.value, '{path}')\n"
            f"              FROM json_each(r.document, '{RESULTS}') e\n"
            f"             WHERE json_extract(e.value, '{ENTRY_CODE}') = 'pxs.change')"
            f" AS {name}")


_CURRENT = "\n    FROM results r WHERE r.current = 1;"

# radiologist_view: who, which study, its score and flags (migration 3).
RADIOLOGIST_VIEW = (
    "CREATE VIEW radiologist_view AS\n"
    "    SELECT r.patient_id AS patient_id,"
    f"{_COLUMN}r.accession_number AS accession_number,"
    f"{_COLUMN}{doc(STUDY_DATETIME)} AS study_time,"
    f"{_COLUMN}r.study_instance_uid AS study_instance_uid,"
    f"{_COLUMN}r.status AS status,"
    f"{_COLUMN}{PXS_SCORE} AS pxs_score,"
    f"{_COLUMN}r.flags AS flags,"
    f"{_COLUMN}r.created_at AS scored_at"
    f"{_CURRENT}"
)

# researcher_view, de-identified: the columns before image_scores, the start of its
# subquery, and the columns after it.
_RESEARCHER_HEAD = (
    "CREATE VIEW researcher_view AS\n"
    "    SELECT r.id AS result_id,"
    f"{_COLUMN}r.patient_key AS patient_hash,"
    f"{_COLUMN}substr({doc(STUDY_DATETIME)}, 1, 10) AS study_date,"
    f"{_COLUMN}r.status AS status,"
    f"{_COLUMN}{PXS_SCORE} AS pxs_score,"
    f"{_COLUMN}(SELECT json_group_array(CAST(json_extract(e.value, '{ENTRY_VALUE}') AS REAL))"
    f"\n              FROM json_each(r.document, '{RESULTS}') e"
)
_RESEARCHER_TAIL = (
    f"{_COLUMN}r.model_id AS model_id,"
    f"{_COLUMN}{doc(MODEL_VERSION)} AS model_version,"
    f"{_COLUMN}{doc(WEIGHTS_SHA256)} AS weights_sha256,"
    f"{_COLUMN}{doc(ANCHORS_SHA256)} AS anchors_sha256,"
    f"{_COLUMN}r.flags AS flags,"
    f"{_COLUMN}{_stage_seconds('stored', 'ready', 'ready_to_stored_s')},"
    f"{_COLUMN}round((julianday({doc(stage('inferred'))})"
    f"{_MORE}- julianday(r.created_at)) * 86400, 3) AS inference_s,"
    f"{_COLUMN}r.created_utc AS scored_at_utc"
)
# As migration 3 created it: image_scores took every entry of results.
_RESEARCHER_VIEW_3 = f"{_RESEARCHER_HEAD}) AS image_scores,{_RESEARCHER_TAIL}{_CURRENT}"
# Since migration 5: image_scores takes the PXS score entries only, and the change to the
# patient's prior scored image is added (no prior UIDs or dates).
RESEARCHER_VIEW = (
    f"{_RESEARCHER_HEAD}"
    f"\n             WHERE coalesce(json_extract(e.value, '{ENTRY_CODE}'),"
    " 'partners.clara.pxs.score')"
    "\n                   = 'partners.clara.pxs.score') AS image_scores,"
    f"{_RESEARCHER_TAIL},"
    f"{_COLUMN}{_change(CHANGE_DISTANCE, 'change_distance')},"
    f"{_COLUMN}{_change(CHANGE_SCORE_DIFFERENCE, 'score_change')},"
    f"{_COLUMN}{_change(CHANGE_INTERVAL_DAYS, 'interval_days')}"
    f"{_CURRENT}"
)

# support_view: what happened to a study, for whoever answers the phone. The columns from
# exit_code to deliveries_dead, in both of its versions.
_SUPPORT_BODY = (
    f"{_COLUMN}{doc(EXIT_CODE)} AS exit_code,"
    f"{_COLUMN}{doc(ERROR_MESSAGE)} AS error_message,"
    f"{_COLUMN}r.flags AS flags,"
    f"{_COLUMN}{doc(stage('received'))} AS received_at,"
    f"{_COLUMN}{_stage_seconds('ready', 'received', 'received_to_ready_s')},"
    f"{_COLUMN}{_stage_seconds('stored', 'ready', 'ready_to_stored_s')},"
    f"{_COLUMN}{_stage_seconds('stored', 'received', 'received_to_stored_s')},"
    f"{_COLUMN}(SELECT group_concat(DISTINCT i.calling_ae) FROM instances i"
    "\n             WHERE i.study_instance_uid = r.study_instance_uid) AS senders,"
    f"{_COLUMN}{doc(SELECTION_RULE)} AS study_rule,"
    f"{_COLUMN}{doc(SELECTION_REASON)} AS study_reason,"
    f"{_COLUMN}(SELECT group_concat(d.rule || ': ' || d.reason, '; ') FROM decisions d"
    "\n             WHERE d.study_instance_uid = r.study_instance_uid"
    "\n               AND d.sop_instance_uid IS NOT NULL) AS image_reasons,"
    f"{_COLUMN}(SELECT count(*) FROM deliveries o WHERE o.result_id = r.id"
    "\n               AND o.state = 'pending') AS deliveries_pending,"
    f"{_COLUMN}(SELECT count(*) FROM deliveries o WHERE o.result_id = r.id"
    "\n               AND o.state = 'dead') AS deliveries_dead,"
)
_SUPPORT_HEAD = (
    "CREATE VIEW support_view AS\n"
    "    SELECT r.id AS result_id,"
    f"{_COLUMN}r.study_instance_uid AS study_instance_uid,"
    f"{_COLUMN}r.status AS status,"
)
_SUPPORT_END = f"{_COLUMN}r.model_id AS model_id,{_COLUMN}r.created_at AS created_at"
# As migration 3 created it.
_SUPPORT_VIEW_3 = f"{_SUPPORT_HEAD}{_SUPPORT_BODY}{_SUPPORT_END}{_CURRENT}"
# Since migration 4: with the study's job, its tries, and whether its images are kept.
SUPPORT_VIEW = (
    f"{_SUPPORT_HEAD}"
    f"{_COLUMN}s.state AS job_state,"
    f"{_COLUMN}s.attempts AS attempts,"
    f"{_SUPPORT_BODY}"
    f"{_COLUMN}s.purged_at AS images_deleted_at,"
    f"{_SUPPORT_END}"
    "\n    FROM results r LEFT JOIN studies s ON s.study_instance_uid = r.study_instance_uid"
    "\n    WHERE r.current = 1;"
)

MIGRATIONS: tuple[str, ...] = (
    # 1: the walking skeleton
    """
    CREATE TABLE instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        study_instance_uid  TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        sop_class_uid       TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        path                TEXT NOT NULL,
        size                INTEGER NOT NULL,
        sha256              TEXT NOT NULL,
        calling_ae          TEXT NOT NULL,
        peer_address        TEXT NOT NULL,
        association_id      TEXT NOT NULL,
        received_at         TEXT NOT NULL,
        receive_count       INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX instances_study ON instances (study_instance_uid);

    CREATE TABLE studies (
        study_instance_uid TEXT PRIMARY KEY,
        state              TEXT NOT NULL,
        reason             TEXT NOT NULL DEFAULT '',
        first_received_at  TEXT NOT NULL,
        last_received_at   TEXT NOT NULL,
        released_at        TEXT,
        ready_at           TEXT,
        updated_at         TEXT NOT NULL
    );

    CREATE TABLE decisions (
        study_instance_uid TEXT NOT NULL,
        sop_instance_uid   TEXT,          -- NULL: the study-level decision
        selected           INTEGER NOT NULL,
        rule               TEXT NOT NULL,
        reason             TEXT NOT NULL,
        decided_at         TEXT NOT NULL
    );
    CREATE INDEX decisions_study ON decisions (study_instance_uid);

    CREATE TABLE results (
        id                 TEXT PRIMARY KEY,  -- the inference id of the document
        study_instance_uid TEXT NOT NULL,
        patient_id         TEXT NOT NULL,
        accession_number   TEXT NOT NULL,
        model_id           TEXT NOT NULL,
        status             TEXT NOT NULL,
        created_at         TEXT NOT NULL,
        document           TEXT NOT NULL CHECK (json_valid(document))
    );
    CREATE INDEX results_study ON results (study_instance_uid);
    CREATE INDEX results_patient ON results (patient_id);
    CREATE INDEX results_accession ON results (accession_number);
    CREATE INDEX results_model ON results (model_id);
    CREATE INDEX results_status ON results (status);
    CREATE INDEX results_created ON results (created_at);
    """,
    # 2: review flags, result history, study deadlines that survive a restart (issue 4)
    """
    ALTER TABLE instances ADD COLUMN called_ae TEXT NOT NULL DEFAULT '';
    ALTER TABLE results ADD COLUMN flags TEXT NOT NULL DEFAULT '';  -- space-separated
    ALTER TABLE results ADD COLUMN current INTEGER NOT NULL DEFAULT 1;
    UPDATE results SET current = 0 WHERE rowid NOT IN
        (SELECT max(rowid) FROM results GROUP BY study_instance_uid);
    CREATE INDEX results_current ON results (study_instance_uid, current);
    CREATE INDEX results_flagged ON results (flags) WHERE flags != '';
    -- When the study is ready (Unix time) if nothing more arrives; NULL once handed on.
    ALTER TABLE studies ADD COLUMN deadline REAL;
    -- The settle time that applies after the study's associations are released.
    ALTER TABLE studies ADD COLUMN settle_seconds REAL;
    CREATE INDEX studies_state ON studies (state);
    """,
    # 3: results for every audience, and the outbox (issue 6)
    f"""
    -- createdAt in UTC (YYYY-MM-DDTHH:MM:SS.SSSZ): sortable and comparable across offsets.
    ALTER TABLE results ADD COLUMN created_utc TEXT NOT NULL DEFAULT '';
    UPDATE results SET created_utc = strftime('%Y-%m-%dT%H:%M:%fZ', created_at);
    CREATE INDEX results_created_utc ON results (created_utc);
    -- Keyed hash of PatientID (HMAC-SHA256 with the store's own secret): researchers can
    -- follow a patient over time without the MRN, which a plain hash would not hide.
    ALTER TABLE results ADD COLUMN patient_key TEXT NOT NULL DEFAULT '';
    CREATE INDEX results_patient_key ON results (patient_key);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

    -- The transactional outbox: rows written in the result's own transaction, one per
    -- exporter; delivered at least once, under an id the receiver can de-duplicate on.
    CREATE TABLE deliveries (
        id              TEXT PRIMARY KEY,
        result_id       TEXT NOT NULL REFERENCES results (id),
        exporter        TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,                    -- Unix time
        last_error      TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        delivered_at    TEXT
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_result ON deliveries (result_id);

    -- Views per audience (the paper's SQL Server views), over each study's current result.
    {RADIOLOGIST_VIEW}

    {_RESEARCHER_VIEW_3}

    {_SUPPORT_VIEW_3}
    """,
    # 4: each study's job state machine, and retention (issue 7)
    f"""
    -- state: receiving -> ready -> selected -> inferring -> stored -> exported, or failed
    -- (a study that is not a candidate goes from ready to stored with a SKIPPED result).
    ALTER TABLE studies ADD COLUMN outcome TEXT NOT NULL DEFAULT '';  -- the result's status
    ALTER TABLE studies ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;  -- tries this round
    -- Unix time the study last finished: its result stored, or its last delivery settled.
    ALTER TABLE studies ADD COLUMN finished_at REAL;
    ALTER TABLE studies ADD COLUMN purged_at TEXT;  -- its spooled images were deleted
    ALTER TABLE instances ADD COLUMN removed_at TEXT;  -- its spool file was deleted
    UPDATE studies SET
        outcome = CASE state WHEN 'scored' THEN 'SUCCEEDED' WHEN 'skipped' THEN 'SKIPPED'
                             ELSE 'FAILED' END,
        state = CASE state WHEN 'failed' THEN 'failed' ELSE 'stored' END,
        finished_at = (julianday(updated_at) - 2440587.5) * 86400
    WHERE state IN ('scored', 'skipped', 'failed');
    CREATE INDEX studies_finished ON studies (finished_at) WHERE purged_at IS NULL;

    -- support_view gains the job: its state, tries, and whether its images are still kept.
    DROP VIEW support_view;
    {SUPPORT_VIEW}
    """,
    # 5: change over time: each scored image's embedding, kept with its result (issue 10)
    f"""
    -- One row per scored image of a SUCCEEDED result, written in the result's transaction.
    -- Stays when retention deletes the image: it is what later studies are compared with.
    -- The vectors have a table of their own: at 2 KB (1000 dimensions) two fill a 4 KB
    -- page, where a row with the columns below as well would take a page alone.
    CREATE TABLE embedding_vectors (
        id     INTEGER PRIMARY KEY,
        vector BLOB NOT NULL                   -- float16 little-endian, dim x 2 bytes
    );
    CREATE TABLE embeddings (
        result_id           TEXT NOT NULL REFERENCES results (id),
        sop_instance_uid    TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        study_instance_uid  TEXT NOT NULL,
        patient_key         TEXT NOT NULL,     -- results.patient_key ('' without PatientID)
        -- YYYY-MM-DDTHH:MM:SS local: pxsgate.studyDateTime (a date alone: its midnight),
        -- or the result's createdAt when the study has no valid StudyDate.
        study_time          TEXT NOT NULL,
        headline            INTEGER NOT NULL,  -- 1: the study's headline image
        score               REAL NOT NULL,     -- its PXS score
        weights_sha256      TEXT NOT NULL,     -- embeddings compare only under one weights
        anchors_sha256      TEXT NOT NULL,     -- what its score was measured against
        dim                 INTEGER NOT NULL,
        vector_id           INTEGER NOT NULL REFERENCES embedding_vectors (id),
        PRIMARY KEY (result_id, sop_instance_uid)
    );
    -- The prior lookup: a patient's headline images under one weights, by study time.
    CREATE INDEX embeddings_prior ON embeddings (patient_key, weights_sha256, study_time)
        WHERE headline = 1;

    -- researcher_view: image_scores takes only the PXS score entries, and the change to
    -- the patient's prior scored image is added, de-identified (no prior UIDs or dates).
    DROP VIEW researcher_view;
    {RESEARCHER_VIEW}
    """,
    # 6: what may re-open a study, pxsgate's own objects, every reception (issue 17)
    """
    -- Only an instance that could change what is scored re-opens a finished study:
    -- 'image' may; 'other' (a non-image SOP class: SR, KO, PR, ...) and 'own' (an object
    -- pxsgate made itself, found by its SOP Instance UID in made_instances) never do.
    ALTER TABLE instances ADD COLUMN kind TEXT NOT NULL DEFAULT 'image';

    -- Every DICOM object pxsgate made for an exporter (its SRs): recognised for certain
    -- when a router sends it back, and numbered so that a rescore's SR supersedes the
    -- earlier one (one series per study and exporter, InstanceNumber counting up, the
    -- predecessor named in PredecessorDocumentsSequence).
    CREATE TABLE made_instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        sop_class_uid       TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        study_instance_uid  TEXT NOT NULL,
        result_id           TEXT NOT NULL,
        exporter            TEXT NOT NULL,
        instance_number     INTEGER NOT NULL,
        created_at          TEXT NOT NULL,
        UNIQUE (result_id, exporter),
        UNIQUE (study_instance_uid, exporter, instance_number)
    );

    -- One row per C-STORE that was indexed: the same instance sent again, on another
    -- association or by another sender, is one more row (pxsgate trace lists them all).
    CREATE TABLE receptions (
        sop_instance_uid   TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        association_id     TEXT NOT NULL,
        calling_ae         TEXT NOT NULL,
        called_ae          TEXT NOT NULL,
        peer_address       TEXT NOT NULL,
        received_at        TEXT NOT NULL,
        outcome            TEXT NOT NULL     -- new, changed, duplicate, revived, attached
    );
    CREATE INDEX receptions_study ON receptions (study_instance_uid);

    -- An instance sent again under another study (a PACS correction moving an image to
    -- the right study or patient): both studies are scored again and flagged.
    CREATE TABLE instance_moves (
        sop_instance_uid   TEXT NOT NULL,
        from_study_uid     TEXT NOT NULL,
        to_study_uid       TEXT NOT NULL,
        patient_changed    INTEGER NOT NULL,   -- 1: its PatientID differs from before
        moved_at           TEXT NOT NULL
    );
    CREATE INDEX instance_moves_from ON instance_moves (from_study_uid);
    CREATE INDEX instance_moves_to ON instance_moves (to_study_uid);

    -- One row that /healthz rewrites: the store answers reads and can still write (a
    -- full disk fails writes while reads go on).
    CREATE TABLE health_probe (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at TEXT NOT NULL
    );
    INSERT INTO receptions
    SELECT sop_instance_uid, study_instance_uid, association_id, calling_ae, called_ae,
           peer_address, received_at, 'new'
    FROM instances;
    """,
    # 7: priors fetched from the PACS (issue 20)
    """
    -- A prior study's AP image fetched from the PACS and embedded (never a study scored:
    -- no result, no export), kept so that the patient's next studies are compared with it
    -- without asking the PACS again. Its DICOM files are deleted once embedded; the
    -- vector lives in embedding_vectors like a result's. One row per study and weights.
    CREATE TABLE fetched_priors (
        study_instance_uid  TEXT NOT NULL,
        weights_sha256      TEXT NOT NULL,
        sop_instance_uid    TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        patient_key         TEXT NOT NULL,     -- as results.patient_key
        study_time          TEXT NOT NULL,     -- as embeddings.study_time
        study_datetime      TEXT,              -- StudyDate/StudyTime as ISO text, or NULL
        score               REAL NOT NULL,
        anchors_sha256      TEXT NOT NULL,
        dim                 INTEGER NOT NULL,
        vector_id           INTEGER NOT NULL REFERENCES embedding_vectors (id),
        source              TEXT NOT NULL,     -- the PACS it came from (priors.source)
        fetched_at          TEXT NOT NULL,
        PRIMARY KEY (study_instance_uid, weights_sha256)
    );
    CREATE INDEX fetched_priors_patient
        ON fetched_priors (patient_key, weights_sha256, study_time);
    """,
    # 8: the web UI's users, sessions, audit trail and reviews (issue 22)
    """
    -- Who may log in to /ui/: a role, and a memory-hard password hash (pxsgate.ui.passwords:
    -- scrypt$N$r$p$salt$hash). Added and removed by `pxsgate users`; a disabled user keeps
    -- its row (and its name in the audit trail) but cannot log in.
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        role          TEXT NOT NULL CHECK (role IN ('viewer', 'reviewer', 'operator')),
        password_hash TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        disabled      INTEGER NOT NULL DEFAULT 0
    );

    -- A login: its id is the SHA-256 of the cookie's random token (the token itself is
    -- never stored), the CSRF token its forms carry, an absolute and an idle expiry.
    CREATE TABLE sessions (
        id         TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires    REAL NOT NULL,                -- Unix time: the absolute end
        last_seen  REAL NOT NULL,                -- Unix time: the idle timeout counts from it
        csrf       TEXT NOT NULL
    );
    CREATE INDEX sessions_user ON sessions (user_name);

    -- The audit trail, append-only (the triggers refuse UPDATE and DELETE). Its columns map
    -- onto a DICOM PS3.15 audit message: EventDateTime, ActiveParticipant (UserID, role,
    -- NetworkAccessPointID), the action (EventID / EventTypeCode / EventActionCode, see
    -- pxsgate.ui.audit), EventOutcomeIndicator (0 success, 4 minor, 8 serious, 12 major
    -- failure) and the study as ParticipantObject (its key, as the logs name it).
    CREATE TABLE audit (
        id           INTEGER PRIMARY KEY,
        event_time   TEXT NOT NULL,              -- UTC, YYYY-MM-DDTHH:MM:SS.SSSZ
        user_name    TEXT NOT NULL,              -- '?' for a name that is no user
        role         TEXT NOT NULL,              -- '' before login; 'cli' for the CLI
        action       TEXT NOT NULL,
        outcome      INTEGER NOT NULL CHECK (outcome IN (0, 4, 8, 12)),
        study_key    TEXT NOT NULL DEFAULT '',
        peer_address TEXT NOT NULL DEFAULT '',
        detail       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_time ON audit (event_time);
    CREATE INDEX audit_user ON audit (user_name, event_time);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;

    -- A reviewer's verdict on a result: added, never editing the result itself.
    CREATE TABLE reviews (
        id                 INTEGER PRIMARY KEY,
        result_id          TEXT NOT NULL REFERENCES results (id),
        study_instance_uid TEXT NOT NULL,
        reviewer           TEXT NOT NULL,
        verdict            TEXT NOT NULL CHECK (verdict IN
            ('confirmed', 'wrong-image-used', 'wrong-patient', 'not-a-valid-exam')),
        comment            TEXT NOT NULL DEFAULT '',
        created_at         TEXT NOT NULL
    );
    CREATE INDEX reviews_study ON reviews (study_instance_uid);
    CREATE INDEX reviews_result ON reviews (result_id);
    """,
    # 9: the worklist's order (issue 22): current results, flagged first, newest first
    """
    CREATE INDEX results_worklist ON results (flags != '', created_utc) WHERE current = 1;
    """,
    # 10: several gateways on one database (issue 23): who owns what, delivery leases
    """
    -- The node (storage.node-name) that received an instance and holds its file, and the
    -- node whose job a study is: only that node resumes or purges it.
    ALTER TABLE instances ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE studies ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE INDEX studies_node_state ON studies (node, state);
    -- A delivery being sent: by which node, until when (Unix time). Past lease_until
    -- another node may claim it (at least once, across nodes).
    ALTER TABLE deliveries ADD COLUMN lease_node TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    """,
)


SCHEMA_VERSION = len(MIGRATIONS)  # PRAGMA user_version of a store this pxsgate made
