"""What ``pxsgate trace`` and ``pxsgate status`` print: one study's whole story, and a
one-screen summary of the service for a sysadmin.

The text builders are pure (data in, text out); :func:`gather_summary` reads the store
(read-only queries) and the data directory's file system.

PHI: ``status`` names studies by the key the logs use (a keyed hash of the UID) and never
prints PatientID, names or accession numbers; error texts are pxsgate's own, which carry
no paths, UIDs or receivers' answers. ``trace`` is about one study the operator named; it
prints the patient's ID, accession number and study date only when asked (``phi=True``);
selection reasons quote the header values the rules matched (descriptions, view).
"""

from __future__ import annotations

import copy
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pxsgate import sopclass
from pxsgate.records import DeliveryState, Status
from pxsgate.results import CHANGE_CODE, pxs_entries
from pxsgate.store import Store

UID_TAIL = 12  # characters of a UID shown where the whole one would be too long
REDACTED = "[redacted: --phi to show]"
_STAGE_ORDER = ("received", "released", "ready", "inference-started", "inferred", "stored")


# --- small formatters ---------------------------------------------------------------------


def uid_tail(uid: str, n: int = UID_TAIL) -> str:
    """The last ``n`` characters of a UID, marked as a tail when it is longer."""
    return uid if len(uid) <= n else "…" + uid[-n:]


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover (the loop returns)


def human_duration(seconds: float) -> str:
    """1.2 s as ``1.20 s``, 0.05 s as ``50 ms``, longer spans in minutes, hours, days."""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 1:
        return f"{sign}{s * 1000:.0f} ms"
    if s < 60:
        return f"{sign}{s:.2f} s"
    if s < 3600:
        return f"{sign}{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{sign}{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{sign}{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 timestamp as stored (with offset); None when absent or unreadable."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def short_time(text: str | None) -> str:
    """A stored timestamp as ``YYYY-MM-DD HH:MM:SS`` (its own local time)."""
    return (text or "-")[:19].replace("T", " ")


def truncate(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sop_class_name(uid: str) -> str:
    """The SOP class's name from the DICOM dictionary, else "SOP class <UID>"."""
    name = sopclass.name(uid)
    return name if name != uid else f"SOP class {uid}"


# --- trace: one study ---------------------------------------------------------------------


def redact_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of :meth:`Store.study_detail`'s answer without the patient's ID, accession
    number and study date (wherever the ID or accession appear in its text)."""
    out: dict[str, Any] = copy.deepcopy(dict(detail))
    secrets = _identifiers(detail)

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return _scrub_text(value, secrets)
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return value

    out = scrub(out)
    result = out.get("result")
    if isinstance(result, dict):
        if "patientId" in result:
            result["patientId"] = REDACTED
        if "accessionNumber" in result:
            result["accessionNumber"] = REDACTED
        block = result.get("pxsgate")
        if isinstance(block, dict) and block.get("studyDateTime"):
            block["studyDateTime"] = REDACTED
        for entry in result.get("results") or []:
            found = entry.get("change") if isinstance(entry, dict) else None
            if isinstance(found, dict) and found.get("priorStudyDate"):
                found["priorStudyDate"] = REDACTED
    return out


def _scrub_text(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each secret replaced where it stands alone (not inside a longer token:
    a short ID must not mangle a UID or a timestamp that happens to contain it)."""
    for secret in secrets:
        text = re.sub(rf"(?<![\w.]){re.escape(secret)}(?![\w.])", REDACTED, text)
    return text


def _identifiers(detail: Mapping[str, Any]) -> list[str]:
    """The patient ID and accession number of the study's result, longest first (so that
    one containing the other is replaced whole)."""
    result = detail.get("result") or {}
    found = {str(result.get(k) or "") for k in ("patientId", "accessionNumber")}
    return sorted((s for s in found if len(s) >= 2), key=len, reverse=True)


def _stage_timeline(result: Mapping[str, Any]) -> list[tuple[str, str, float | None]]:
    """(stage, timestamp, seconds since the previous stage) in time order. The result's
    ``createdAt`` is when inference started (for SUCCEEDED and FAILED results)."""
    block = result.get("pxsgate") or {}
    stages: dict[str, str] = {k: v for k, v in (block.get("stages") or {}).items() if v}
    if result.get("status") in (Status.SUCCEEDED, Status.FAILED) and result.get("createdAt"):
        stages.setdefault("inference-started", str(result["createdAt"]))
    order = {name: i for i, name in enumerate(_STAGE_ORDER)}
    named = sorted(stages.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[1]))
    out: list[tuple[str, str, float | None]] = []
    previous: datetime | None = None
    for name, stamp in named:
        at = parse_time(stamp)
        delta = (at - previous).total_seconds() if at and previous else None
        out.append((name, stamp, delta))
        previous = at or previous
    return out


def _group_associations(receptions: Sequence[Mapping[str, Any]]
                        ) -> list[tuple[tuple[str, str, str, str], list[Mapping[str, Any]]]]:
    """Receptions by the association that brought them (id, calling, called, peer), in the
    order they arrived: an instance sent again on another association is under both. Ids
    restart with the service, hence the whole key."""
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for rec in sorted(receptions, key=lambda r: str(r.get("received_at") or "")):
        key = (str(rec.get("association_id") or "?"), str(rec.get("calling_ae") or ""),
               str(rec.get("called_ae") or ""), str(rec.get("peer_address") or ""))
        groups.setdefault(key, []).append(rec)
    return list(groups.items())


# How a reception is described in the trace, by Indexed.outcome.
_RECEPTION = {"new": "", "changed": " (changed: new bytes, re-opened the study)",
              "duplicate": " (again: the same bytes, study left as it was)",
              "revived": " (again: the same bytes, file kept again)",
              "attached": " (indexed; does not re-open the study)"}
_KIND = {"other": ", not an image", "own": ", made by pxsgate"}


def trace_text(detail: Mapping[str, Any], *, phi: bool = False) -> str:
    """One study's story, from :meth:`Store.study_detail`: its job, the associations that
    brought its images, the selection decisions, the timings per stage, the result (and
    earlier ones), the deliveries. Without ``phi`` no PatientID, accession or study date."""
    lines: list[str] = []
    add = lines.append
    study: Mapping[str, Any] = detail.get("study") or {}
    result: Mapping[str, Any] | None = detail.get("result")
    instances: Sequence[Mapping[str, Any]] = detail.get("instances") or []
    decisions: Sequence[Mapping[str, Any]] = detail.get("decisions") or []
    uid = str(study.get("study_instance_uid") or (result or {}).get("studyInstanceUid", "?"))

    add(f"study {uid}")
    if study.get("key"):
        add(f"  key {study['key']} (how the logs name this study)")
    state = str(study.get("state") or "?")
    outcome = f", outcome {study['outcome']}" if study.get("outcome") else ""
    add(f"  job: {state}{outcome}, {study.get('attempts', 0)} inference tr"
        f"{'y' if study.get('attempts') == 1 else 'ies'} this round"
        + (f"; reason: {truncate(str(study['reason']), 200)}" if study.get("reason") else ""))
    if result is not None:
        if phi:
            block = result.get("pxsgate") or {}
            add(f"  patient {result.get('patientId') or '-'}, accession "
                f"{result.get('accessionNumber') or '-'}, study date/time "
                f"{block.get('studyDateTime') or '-'}")
        else:
            add("  patient, accession, study date: not shown (--phi shows them)")
    add(f"  first received {study.get('first_received_at') or '-'}, last received "
        f"{study.get('last_received_at') or '-'}")
    add(f"  released {study.get('released_at') or '-'}, ready {study.get('ready_at') or '-'},"
        f" last change {study.get('updated_at') or '-'}")

    # Associations and the instances they brought; instances numbered as they first came.
    add("")
    by_uid = {str(inst["sop_instance_uid"]): inst for inst in instances}
    receptions: Sequence[Mapping[str, Any]] = detail.get("receptions") or []
    groups = _group_associations(
        [r for r in receptions if str(r.get("sop_instance_uid")) in by_uid])
    label: dict[str, str] = {}
    for _, members in groups:
        for rec in members:
            label.setdefault(str(rec["sop_instance_uid"]), f"#{len(label) + 1}")
    for uid_ in by_uid:  # indexed without a reception row: not expected, never a KeyError
        label.setdefault(uid_, f"#{len(label) + 1}")
    add(f"associations ({len(groups)}; an instance sent again is under each that sent it)")
    if not groups:
        add("  (no instances indexed)")
    for (assoc, calling, called, peer), members in groups:
        add(f"  association {assoc}: {calling or '?'} → {called or '?'} from {peer or '?'}, "
            f"{len(members)} instance(s), first at {members[0].get('received_at') or '-'}")
        for rec in members:
            sop = str(rec["sop_instance_uid"])
            inst = by_uid[sop]
            count = int(inst.get("receive_count") or 1)
            extra = f", received {count}x" if count != 1 else ", received once"
            removed = (f", file deleted {short_time(inst['removed_at'])}"
                       if inst.get("removed_at") else "")
            add(f"    {label[sop]} {uid_tail(sop, 20)}  "
                f"{sop_class_name(str(inst.get('sop_class_uid') or ''))}"
                f"{_KIND.get(str(inst.get('kind') or ''), '')}, "
                f"{human_bytes(int(inst.get('size') or 0))}{extra} "
                f"(at {short_time(rec.get('received_at'))})"
                f"{_RECEPTION.get(str(rec.get('outcome') or ''), '')}{removed}")

    # Selection.
    add("")
    add("selection")
    study_level = [d for d in decisions if d.get("sop_instance_uid") is None]
    images = [d for d in decisions if d.get("sop_instance_uid") is not None]
    if not decisions:
        add("  (no decisions recorded yet)")
    for d in study_level:
        verdict = "CANDIDATE" if d.get("selected") else "not a candidate"
        add(f"  study: {verdict} [{d.get('rule')}] {d.get('reason')}")
    for d in images:
        sop = str(d["sop_instance_uid"])
        mark = "selected" if d.get("selected") else "excluded"
        add(f"  {label.get(sop, uid_tail(sop, 20)):>4} {mark:<8} [{d.get('rule')}] "
            f"{d.get('reason')}")
    if result is not None:
        flags = (result.get("pxsgate") or {}).get("flags") or []
        if flags:
            add(f"  flags: {' '.join(flags)}")

    if result is None:
        add("")
        add("result: none yet")
    else:
        _trace_result(lines, result, label, phi)

    history: Sequence[Mapping[str, Any]] = detail.get("history") or []
    if history:
        add("")
        add(f"earlier results ({len(history)}, oldest first)")
        for h in history:
            flags = f"  flags: {h['flags']}" if h.get("flags") else ""
            add(f"  {short_time(h.get('created_at'))}  {h.get('status')}  {h.get('id')}{flags}")

    deliveries: Sequence[Mapping[str, Any]] = detail.get("deliveries") or []
    add("")
    add(f"deliveries ({len(deliveries)})")
    if not deliveries:
        add("  (none: no exporter wanted this result)")
    current = result.get("id") if result else None
    for o in deliveries:
        which = "" if o.get("result_id") == current else f" (earlier result {o.get('result_id')})"
        tries = int(o.get("attempts") or 0)
        when = (f", delivered {o['delivered_at']}" if o.get("delivered_at")
                else f", last change {o.get('updated_at') or '-'}")
        add(f"  {o.get('exporter')}: {o.get('state')}, {tries} tr{'y' if tries == 1 else 'ies'}"
            f"{when}{which}  [{o.get('id')}]")
        if o.get("last_error"):
            add(f"      last error: {truncate(str(o['last_error']), 200)}")

    if study.get("purged_at"):
        add("")
        add(f"images deleted by retention at {study['purged_at']} (the store keeps their "
            "headers' index, decisions and results; a re-send keeps them again)")
    text = "\n".join(lines) + "\n"
    return text if phi else _scrub_text(text, _identifiers(detail))


def _trace_result(lines: list[str], result: Mapping[str, Any], label: Mapping[str, str],
                  phi: bool = False) -> None:
    add = lines.append
    block: Mapping[str, Any] = result.get("pxsgate") or {}
    add("")
    add("timings (the current result's stages; + is the time since the stage before)")
    timeline = _stage_timeline(result)
    if not timeline:
        add("  (no stage timestamps)")
    width = max((len(name) for name, _, _ in timeline), default=0)
    for name, stamp, delta in timeline:
        since = f"  +{human_duration(delta)}" if delta is not None else ""
        add(f"  {name:<{width}}  {stamp}{since}")
    stamps = [parse_time(s) for _, s, _ in timeline]
    if len(stamps) >= 2 and stamps[0] is not None and stamps[-1] is not None:
        add(f"  total {timeline[0][0]} → {timeline[-1][0]}: "
            f"{human_duration((stamps[-1] - stamps[0]).total_seconds())}")

    inference = block.get("inference")
    if isinstance(inference, Mapping) and inference:
        add("")
        parts = []
        if "attempts" in inference:
            parts.append(f"{inference['attempts']} attempt(s)")
        if "batchSizes" in inference:
            sizes = inference["batchSizes"]
            shown = ", ".join(str(s) for s in sizes) if isinstance(sizes, list) else str(sizes)
            parts.append(f"batch size per scored image {shown}" if shown else "no image scored")
        parts += [f"{k} {v}" for k, v in inference.items() if k not in ("attempts",
                                                                        "batchSizes")]
        add(f"inference: {'; '.join(parts)}")

    model: Mapping[str, Any] = result.get("model") or {}
    add("")
    add(f"result {result.get('id')}: {result.get('status')}, exitCode "
        f"{result.get('exitCode')}, created {result.get('createdAt')}, updated "
        f"{result.get('updatedAt')}")
    runtime = model.get("runtime") or {}
    sha = str(model.get("weightsSha256") or "")[:12]
    add(f"  model {model.get('id')}"
        + (f" on {runtime.get('device')}/{runtime.get('precision')}" if runtime else "")
        + (f", weights {sha}…" if sha else "")
        + (f", {model.get('anchorCount')} anchors" if model.get("anchorCount") else ""))
    if result.get("errorMessage"):
        add(f"  errorMessage: {truncate(str(result['errorMessage']), 300)}")
    headline = (block.get("headline") or {}).get("sopInstanceUid")
    scores = pxs_entries(result)
    batches = inference.get("batchSizes") if isinstance(inference, Mapping) else None
    if not isinstance(batches, list) or len(batches) != len(scores):
        batches = [None] * len(scores)
    for entry, batch in zip(scores, batches, strict=True):
        refs = [u for d in entry.get("derivedFrom") or [] for u in d.get("refSopInstanceUid")
                or []]
        sop = refs[0] if refs else "?"
        mark = "  (headline)" if sop == headline else ""
        size = f", batch of {batch}" if batch is not None else ""
        add(f"  score {entry.get('value')}  image {label.get(sop, '')} "
            f"{uid_tail(sop, 20)}{size}{mark}")
    if result.get("status") == Status.SUCCEEDED and not scores:
        add("  (no scores in the document)")
    for entry in result.get("results") or []:
        found = entry.get("change") if isinstance(entry, Mapping) else None
        if entry.get("code") != CHANGE_CODE or not isinstance(found, Mapping):
            continue
        prior = uid_tail(str(found.get("priorSopInstanceUid") or "?"), 20)
        when = f" of {found.get('priorStudyDate')}" if phi else ""
        diff = found.get("scoreDifference")
        shift = f"; score {diff:+.6f} since then" if isinstance(diff, int | float) else ""
        origin = " (fetched from the PACS)" if found.get("priorSource") == "pacs" else ""
        add(f"  change {entry.get('value')}: PXS distance to the patient's prior image "
            f"{prior}{origin}{when}, {found.get('intervalDays')} days before{shift}")
    lookup = block.get("priorLookup")
    if isinstance(lookup, Mapping):
        detail = f": {lookup['detail']}" if lookup.get("detail") else ""
        add(f"  prior asked of {lookup.get('source')}: {lookup.get('outcome')} "
            f"after {lookup.get('seconds')} s{detail}")
    flags = block.get("flags") or []
    add(f"  flags: {' '.join(flags) if flags else 'none'}")
    senders = block.get("senders") or []
    if senders:
        add(f"  senders: {', '.join(senders)}")


# --- status: the service at a glance ------------------------------------------------------


def _utc_cutoff(now: float, seconds: float) -> str:
    """``now - seconds`` in the store's created_utc format (comparable as text)."""
    at = datetime.fromtimestamp(now - seconds, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


async def gather_summary(store: Store, data_dir: Path, *, min_free_mb: float = 0.0,
                         max_spool_gb: float = 0.0, now: float | None = None,
                         window_s: float = 3600.0) -> dict[str, Any]:
    """What ``pxsgate status`` shows from the store and the disk: results in the last hour
    by status, the last 5 results, FAILED results of the last hour, dead deliveries, the
    spool's size, unfinished jobs by state, free space. Read-only queries; no PHI (studies
    by UID tail, results without patient or accession)."""
    now = time.time() if now is None else now
    cutoff = _utc_cutoff(now, window_s)
    by_status = await store.results_by_status(cutoff)
    last = [{"createdAt": r[0], "study": store.study_label(str(r[1])), "status": r[2],
             "score": r[3], "rule": r[4] or "", "flags": r[5] or "", "exitCode": r[6]}
            for r in await store.last_results(5)]
    failed = [{"createdAt": r[0], "study": store.study_label(str(r[1])), "exitCode": r[2],
               "errorMessage": truncate(str(r[3] or ""), 160)}
              for r in await store.failed_results(cutoff)]
    dead = [{"id": r[0], "exporter": r[1], "attempts": int(r[2]),
             "lastError": truncate(str(r[3] or ""), 160), "updatedAt": r[4],
             "study": store.study_label(str(r[5])), "lastHour": bool(r[6])}
            for r in await store.dead_deliveries(cutoff, 5)]
    dead_last_hour = await store.dead_deliveries_since(cutoff)
    unfinished = await store.unfinished_counts()
    deliveries = await store.delivery_counts()
    spool = await store.spool_bytes()
    try:
        usage = shutil.disk_usage(data_dir)
        free: int | None = usage.free
        total: int | None = usage.total
    except OSError:
        free = total = None
    return {
        "at": datetime.fromtimestamp(now, UTC).astimezone().isoformat(timespec="seconds"),
        "windowSeconds": window_s,
        "resultsLastHour": by_status,
        "lastResults": last,
        "failedLastHour": failed,
        "deadDeliveries": dead,
        "deadDeliveriesLastHour": dead_last_hour,
        "deliveries": {k.value: deliveries.get(k, 0) for k in DeliveryState},
        "unfinishedStudies": unfinished,
        "disk": {"dataDir": str(data_dir), "spoolBytes": spool, "freeBytes": free,
                 "totalBytes": total, "minFreeMb": min_free_mb, "maxSpoolGb": max_spool_gb},
    }


def _counts(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count}" for name, count in items)


def status_text(health: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> str:
    """One screen for a sysadmin: the running service's health (``/healthz``; None when it
    could not be reached) and :func:`gather_summary`'s figures from the store."""
    lines: list[str] = []
    add = lines.append
    add(f"pxsgate status at {summary.get('at', '-')}")
    if health is None:
        why = summary.get("unreachable")
        add(f"service    not reachable{f' ({why})' if why else ''}: figures from the store")
    else:
        uptime = float(health.get("uptimeSeconds") or 0)
        now = parse_time(str(summary.get("at") or "")) or datetime.now(UTC).astimezone()
        since = (now - timedelta(seconds=uptime)).isoformat(timespec="seconds")
        model = health.get("model") or {}
        verdict = "ok" if health.get("ok") else "NOT OK"
        # A remote model (model.backend triton) says why it is down; else it is the worker.
        model_part = f"model ({model['error']})" if model.get("error") else "model worker"
        problems = [part for part, good in (("store", health.get("store")),
                                            (model_part, model.get("ok"))) if not good]
        add(f"service    {verdict}: up since {short_time(since)} ({human_duration(uptime)}),"
            f" DICOM port {health.get('dicomPort')}, model {model.get('id') or '-'}"
            + (f"; failing: {', '.join(problems)}" if problems else ""))
        add(f"queues     studies in progress {health.get('studiesInProgress', 0)}, waiting "
            f"{health.get('studiesWaiting', 0)}; inference queue "
            f"{health.get('inferenceQueue', 0)} image(s); associations "
            f"{health.get('associations', 0)}")
    unfinished: Mapping[str, int] = summary.get("unfinishedStudies") or {}
    add(f"jobs       unfinished in the store: {_counts(unfinished.items()) or 'none'}")
    stored: Mapping[str, int] = summary.get("deliveries") or {}
    if health is not None and isinstance(health.get("deliveries"), Mapping):
        live = health["deliveries"]
        add(f"deliveries pending {live.get('pending', 0)} (in flight "
            f"{live.get('inFlight', 0)}), dead {live.get('dead', 0)}, delivered "
            f"{stored.get('delivered', 0)}")
    else:
        add(f"deliveries pending {stored.get('pending', 0)}, dead {stored.get('dead', 0)}, "
            f"delivered {stored.get('delivered', 0)}")

    by_status: Mapping[str, int] = summary.get("resultsLastHour") or {}
    total = sum(by_status.values())
    order = (Status.SUCCEEDED, Status.SKIPPED, Status.FAILED)
    ranked = sorted(by_status.items(), key=lambda kv: (order.index(kv[0])
                                                        if kv[0] in order else 9, kv[0]))
    add(f"last hour  {total} result(s)" + (f": {_counts(ranked)}" if ranked else ""))
    add("")
    last: Sequence[Mapping[str, Any]] = summary.get("lastResults") or []
    add("last results (newest first)")
    if not last:
        add("  (none yet)")
    for r in last:
        if r.get("status") == Status.SUCCEEDED:
            detail = f"score {r.get('score')}"
        elif r.get("status") == Status.SKIPPED:
            detail = f"[{r.get('rule')}]"
        else:
            detail = f"exit {r.get('exitCode')}"
        flags = f"  flags: {r['flags']}" if r.get("flags") else ""
        add(f"  {short_time(r.get('createdAt'))}  {r.get('study')}  {r.get('status'):<9}  "
            f"{detail}{flags}")

    failed: Sequence[Mapping[str, Any]] = summary.get("failedLastHour") or []
    dead: Sequence[Mapping[str, Any]] = summary.get("deadDeliveries") or []
    dead_hour = int(summary.get("deadDeliveriesLastHour") or 0)
    add("")
    add(f"errors in the last hour: {len(failed)} FAILED result(s), {dead_hour} dead-lettered "
        "deliver" + ("y" if dead_hour == 1 else "ies"))
    for f in failed[:5]:
        add(f"  FAILED  {short_time(f.get('createdAt'))}  {f.get('study')}  exit "
            f"{f.get('exitCode')}: {truncate(str(f.get('errorMessage') or ''), 80)}")
    if len(failed) > 5:
        add(f"  … and {len(failed) - 5} more (pxsgate results --status FAILED)")
    if dead:
        add("  dead deliveries (latest 5, any time; pxsgate outbox list --state dead):")
    for d in dead:
        add(f"  dead    {short_time(d.get('updatedAt'))}  {d.get('study')}  "
            f"{d.get('exporter')} after {d.get('attempts')} tries: "
            f"{truncate(str(d.get('lastError') or ''), 80)}")

    disk: Mapping[str, Any] = summary.get("disk") or {}
    spool = int(disk.get("spoolBytes") or 0)
    if health is not None and health.get("spoolBytes") is not None:
        spool = int(health["spoolBytes"])
    free = disk.get("freeBytes")
    min_free = float(disk.get("minFreeMb") or 0)
    max_spool = float(disk.get("maxSpoolGb") or 0)
    add("")
    parts = [f"spool {human_bytes(spool)}"
             + (f" of max-spool-gb {max_spool:g}" if max_spool else " (max-spool-gb: none)")]
    if free is not None:
        low = float(free) < min_free * 2**20
        parts.append(f"{human_bytes(float(free))} free on {disk.get('dataDir')} "
                     f"(min-free-mb {min_free:g}{': BELOW, C-STORE refused' if low else ''})")
    else:
        parts.append(f"free space on {disk.get('dataDir')} unknown")
    if max_spool and spool >= max_spool * 2**30:
        parts.append("spool at its ceiling")
    add("disk       " + "; ".join(parts))
    return "\n".join(lines) + "\n"
