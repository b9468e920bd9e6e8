"""The store's schema on PostgreSQL: the same tables, columns, indexes and views under the
same names as on SQLite (schema.py), with PostgreSQL's types, the result document as JSONB
with a GIN index, and SQLite's functions that the views and queries use.

The version is counted like SQLite's ``PRAGMA user_version``, in ``meta``
('schema-version'), and the steps have the same numbers: PostgreSQL came with step 10, so
:data:`PG_BASELINE` makes a new database at version 10 at once, and every later step is
written for both dialects (a migration added to schema.MIGRATIONS adds its PostgreSQL
twin to :data:`PG_MIGRATIONS` under the same number). Nodes starting together on a new
database take turns (an advisory lock held for the migration's transaction).
"""

from __future__ import annotations

from pxsgate.store.db import translate
from pxsgate.store.schema import RADIOLOGIST_VIEW, RESEARCHER_VIEW, SUPPORT_VIEW

PG_BASELINE_VERSION = 10

# SQLite's functions, as the store's SQL uses them (jsonpaths: '$.a.b' paths only).
PG_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION json_extract(doc jsonb, path text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT doc #>> string_to_array(substr(path, 3), '.') $$;
CREATE OR REPLACE FUNCTION json_number(doc jsonb, path text) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT CASE jsonb_typeof(doc #> string_to_array(substr(path, 3), '.'))
                 WHEN 'number'
                 THEN (doc #>> string_to_array(substr(path, 3), '.'))::double precision
                 END $$;
CREATE OR REPLACE FUNCTION json_integer(doc jsonb, path text) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT CASE jsonb_typeof(doc #> string_to_array(substr(path, 3), '.'))
                 WHEN 'number'
                 THEN (doc #>> string_to_array(substr(path, 3), '.'))::numeric::bigint
                 END $$;
CREATE OR REPLACE FUNCTION json_each(doc jsonb, path text) RETURNS TABLE (value jsonb)
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT e FROM jsonb_array_elements(
              CASE jsonb_typeof(doc #> string_to_array(substr(path, 3), '.'))
              WHEN 'array' THEN doc #> string_to_array(substr(path, 3), '.')
              ELSE '[]'::jsonb END) e $$;
CREATE OR REPLACE FUNCTION julianday(t text) RETURNS double precision
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
    AS $$ SELECT extract(epoch FROM t::timestamptz)::double precision / 86400
                 + 2440587.5 $$;
CREATE OR REPLACE FUNCTION strftime(fmt text, t text) RETURNS text
    LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF fmt <> '%Y-%m-%dT%H:%M:%fZ' THEN
        RAISE EXCEPTION 'strftime: only the store''s UTC format is defined, not %', fmt;
    END IF;
    RETURN to_char(t::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');
END $$;
CREATE OR REPLACE FUNCTION round(x double precision, n integer) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT round(x::numeric, n)::double precision $$;
CREATE OR REPLACE FUNCTION pxs_concat(acc text, v text, sep text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN v IS NULL THEN acc WHEN acc IS NULL THEN v
                      ELSE acc || sep || v END $$;
CREATE OR REPLACE FUNCTION pxs_concat(acc text, v text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT pxs_concat(acc, v, ',') $$;
CREATE OR REPLACE AGGREGATE group_concat(text) (SFUNC = pxs_concat, STYPE = text);
CREATE OR REPLACE AGGREGATE group_concat(text, text) (SFUNC = pxs_concat, STYPE = text);
CREATE OR REPLACE FUNCTION pxs_json_array(a anycompatiblearray) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT coalesce(array_to_json(a)::text, '[]') $$;
CREATE OR REPLACE AGGREGATE json_group_array(anycompatible)
    (SFUNC = array_append, STYPE = anycompatiblearray, FINALFUNC = pxs_json_array,
     INITCOND = '{}');
CREATE OR REPLACE FUNCTION pxs_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only';
END $$;
"""

# The tables as SQLite has them at version 10 (schema.py's steps 1-10 in one), in
# PostgreSQL's types: REAL is double precision, INTEGER bigint where it counts bytes,
# BLOB bytea, the document JSONB; tables read in insertion order have a rowid.
_TABLES = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);

CREATE TABLE instances (
    sop_instance_uid    text PRIMARY KEY,
    study_instance_uid  text NOT NULL,
    series_instance_uid text NOT NULL,
    sop_class_uid       text NOT NULL,
    transfer_syntax_uid text NOT NULL,
    path                text NOT NULL,
    size                bigint NOT NULL,
    sha256              text NOT NULL,
    calling_ae          text NOT NULL,
    peer_address        text NOT NULL,
    association_id      text NOT NULL,
    received_at         text NOT NULL,
    receive_count       integer NOT NULL DEFAULT 1,
    called_ae           text NOT NULL DEFAULT '',
    removed_at          text,
    kind                text NOT NULL DEFAULT 'image',
    node                text NOT NULL DEFAULT ''
);
CREATE INDEX instances_study ON instances (study_instance_uid);
CREATE INDEX instances_path ON instances (path);

CREATE TABLE studies (
    study_instance_uid text PRIMARY KEY,
    state              text NOT NULL,
    reason             text NOT NULL DEFAULT '',
    first_received_at  text NOT NULL,
    last_received_at   text NOT NULL,
    released_at        text,
    ready_at           text,
    updated_at         text NOT NULL,
    deadline           double precision,
    settle_seconds     double precision,
    outcome            text NOT NULL DEFAULT '',
    attempts           integer NOT NULL DEFAULT 0,
    finished_at        double precision,
    purged_at          text,
    node               text NOT NULL DEFAULT ''
);
CREATE INDEX studies_state ON studies (state);
CREATE INDEX studies_finished ON studies (finished_at) WHERE purged_at IS NULL;
CREATE INDEX studies_node_state ON studies (node, state);

CREATE TABLE decisions (
    rowid              bigint GENERATED BY DEFAULT AS IDENTITY,
    study_instance_uid text NOT NULL,
    sop_instance_uid   text,
    selected           integer NOT NULL,
    rule               text NOT NULL,
    reason             text NOT NULL,
    decided_at         text NOT NULL
);
CREATE INDEX decisions_study ON decisions (study_instance_uid);

CREATE TABLE results (
    id                 text PRIMARY KEY,
    rowid              bigint GENERATED BY DEFAULT AS IDENTITY UNIQUE,
    study_instance_uid text NOT NULL,
    patient_id         text NOT NULL,
    accession_number   text NOT NULL,
    model_id           text NOT NULL,
    status             text NOT NULL,
    created_at         text NOT NULL,
    document           jsonb NOT NULL,
    flags              text NOT NULL DEFAULT '',
    current            integer NOT NULL DEFAULT 1,
    created_utc        text NOT NULL DEFAULT '',
    patient_key        text NOT NULL DEFAULT ''
);
CREATE INDEX results_study ON results (study_instance_uid);
CREATE INDEX results_patient ON results (patient_id);
CREATE INDEX results_accession ON results (accession_number);
CREATE INDEX results_model ON results (model_id);
CREATE INDEX results_status ON results (status);
CREATE INDEX results_created ON results (created_at);
CREATE INDEX results_current ON results (study_instance_uid, current);
CREATE INDEX results_flagged ON results (flags) WHERE flags != '';
CREATE INDEX results_created_utc ON results (created_utc);
CREATE INDEX results_patient_key ON results (patient_key);
CREATE INDEX results_worklist ON results ((flags != ''), created_utc) WHERE current = 1;
-- Ad-hoc queries on the document: WHERE document @> '{"status": "FAILED"}' and the like.
CREATE INDEX results_document ON results USING gin (document jsonb_path_ops);

CREATE TABLE deliveries (
    id              text PRIMARY KEY,
    result_id       text NOT NULL REFERENCES results (id),
    exporter        text NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    last_error      text NOT NULL DEFAULT '',
    created_at      text NOT NULL,
    updated_at      text NOT NULL,
    delivered_at    text,
    lease_node      text NOT NULL DEFAULT '',
    lease_until     double precision NOT NULL DEFAULT 0
);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_result ON deliveries (result_id);

CREATE TABLE embedding_vectors (
    id     bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    vector bytea NOT NULL
);
CREATE TABLE embeddings (
    result_id           text NOT NULL REFERENCES results (id),
    sop_instance_uid    text NOT NULL,
    series_instance_uid text NOT NULL,
    study_instance_uid  text NOT NULL,
    patient_key         text NOT NULL,
    study_time          text NOT NULL,
    headline            integer NOT NULL,
    score               double precision NOT NULL,
    weights_sha256      text NOT NULL,
    anchors_sha256      text NOT NULL,
    dim                 integer NOT NULL,
    vector_id           bigint NOT NULL REFERENCES embedding_vectors (id),
    PRIMARY KEY (result_id, sop_instance_uid)
);
CREATE INDEX embeddings_prior ON embeddings (patient_key, weights_sha256, study_time)
    WHERE headline = 1;

CREATE TABLE made_instances (
    sop_instance_uid    text PRIMARY KEY,
    sop_class_uid       text NOT NULL,
    series_instance_uid text NOT NULL,
    study_instance_uid  text NOT NULL,
    result_id           text NOT NULL,
    exporter            text NOT NULL,
    instance_number     integer NOT NULL,
    created_at          text NOT NULL,
    UNIQUE (result_id, exporter),
    UNIQUE (study_instance_uid, exporter, instance_number)
);

CREATE TABLE receptions (
    rowid              bigint GENERATED BY DEFAULT AS IDENTITY,
    sop_instance_uid   text NOT NULL,
    study_instance_uid text NOT NULL,
    association_id     text NOT NULL,
    calling_ae         text NOT NULL,
    called_ae          text NOT NULL,
    peer_address       text NOT NULL,
    received_at        text NOT NULL,
    outcome            text NOT NULL
);
CREATE INDEX receptions_study ON receptions (study_instance_uid);

CREATE TABLE instance_moves (
    sop_instance_uid   text NOT NULL,
    from_study_uid     text NOT NULL,
    to_study_uid       text NOT NULL,
    patient_changed    integer NOT NULL,
    moved_at           text NOT NULL
);
CREATE INDEX instance_moves_from ON instance_moves (from_study_uid);
CREATE INDEX instance_moves_to ON instance_moves (to_study_uid);

CREATE TABLE health_probe (
    id integer PRIMARY KEY CHECK (id = 1),
    at text NOT NULL
);

CREATE TABLE fetched_priors (
    study_instance_uid  text NOT NULL,
    weights_sha256      text NOT NULL,
    sop_instance_uid    text NOT NULL,
    series_instance_uid text NOT NULL,
    patient_key         text NOT NULL,
    study_time          text NOT NULL,
    study_datetime      text,
    score               double precision NOT NULL,
    anchors_sha256      text NOT NULL,
    dim                 integer NOT NULL,
    vector_id           bigint NOT NULL REFERENCES embedding_vectors (id),
    source              text NOT NULL,
    fetched_at          text NOT NULL,
    PRIMARY KEY (study_instance_uid, weights_sha256)
);
CREATE INDEX fetched_priors_patient
    ON fetched_priors (patient_key, weights_sha256, study_time);

CREATE TABLE users (
    name          text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('viewer', 'reviewer', 'operator')),
    password_hash text NOT NULL,
    created_at    text NOT NULL,
    disabled      integer NOT NULL DEFAULT 0
);

CREATE TABLE sessions (
    id         text PRIMARY KEY,
    user_name  text NOT NULL,
    created_at text NOT NULL,
    expires    double precision NOT NULL,
    last_seen  double precision NOT NULL,
    csrf       text NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_name);

CREATE TABLE audit (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_time   text NOT NULL,
    user_name    text NOT NULL,
    role         text NOT NULL,
    action       text NOT NULL,
    outcome      integer NOT NULL CHECK (outcome IN (0, 4, 8, 12)),
    study_key    text NOT NULL DEFAULT '',
    peer_address text NOT NULL DEFAULT '',
    detail       text NOT NULL DEFAULT ''
);
CREATE INDEX audit_time ON audit (event_time);
CREATE INDEX audit_user ON audit (user_name, event_time);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION pxs_append_only();
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION pxs_append_only();

CREATE TABLE reviews (
    id                 bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    result_id          text NOT NULL REFERENCES results (id),
    study_instance_uid text NOT NULL,
    reviewer           text NOT NULL,
    verdict            text NOT NULL CHECK (verdict IN
        ('confirmed', 'wrong-image-used', 'wrong-patient', 'not-a-valid-exam')),
    comment            text NOT NULL DEFAULT '',
    created_at         text NOT NULL
);
CREATE INDEX reviews_study ON reviews (study_instance_uid);
CREATE INDEX reviews_result ON reviews (result_id);
"""

# The views per audience: SQLite's latest text, in PostgreSQL's dialect.
_VIEWS = "\n\n".join(translate(v, placeholders=False)
                     for v in (RADIOLOGIST_VIEW, RESEARCHER_VIEW, SUPPORT_VIEW))

PG_BASELINE = f"{_TABLES}\n{_VIEWS}\n"

# Steps after the baseline, by number (schema.MIGRATIONS' twins).
PG_MIGRATIONS: dict[int, str] = {}

# Tables in an order that satisfies their references (store copy).
TABLES_IN_ORDER: tuple[str, ...] = (
    "meta", "instances", "studies", "decisions", "results", "deliveries",
    "embedding_vectors", "embeddings", "made_instances", "receptions", "instance_moves",
    "health_probe", "fetched_priors", "users", "sessions", "audit", "reviews",
)
