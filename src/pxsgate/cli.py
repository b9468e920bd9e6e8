"""The ``pxsgate`` command line; the only place that maps exceptions to exit codes.

Exit codes: 0 success, 1 a runtime failure (the demo's outcomes differ, a file could not be
scored), 2 a usage or configuration error (the message names the key path).

Each command imports what it needs when it runs: the commands that read the store
(``results``, ``status``, ``trace``, ``outbox list``) answer in ~0.13 s on 2 cores, without
pydicom, numpy, torch, aiohttp, structlog or the web UI (issue 24; benchmarks/cli.py times
them, tests/test_cli_imports.py holds what they import).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pxsgate import __version__
from pxsgate.config import RESULT_STATUSES, Config, load_config, resolve_config_path
from pxsgate.errors import ConfigError, PxsgateError
from pxsgate.records import ROLES, DeliveryState, Status, now_iso, parse_since
from pxsgate.ui.passwords import MIN_PASSWORD_LENGTH  # it imports the standard library only

if TYPE_CHECKING:
    from pxsgate.store import Store

R = TypeVar("R")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $PXSGATE_CONFIG or config/pxsgate.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pxsgate", description="DICOM gateway for the PXS score model.")
    parser.add_argument("--version", action="version", version=f"pxsgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway in the foreground")
    _add_config(p)

    p = sub.add_parser("demo", help="run the whole system on a synthetic feed and exit")
    _add_config(p)
    p.add_argument("--data-dir", type=Path, help="keep the demo's data here (default: temp)")

    p = sub.add_parser("check-config", help="validate a config file")
    _add_config(p)

    p = sub.add_parser("results", help="query stored results")
    _add_config(p)
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    p.add_argument("--study-uid")
    p.add_argument("--patient-id")
    p.add_argument("--accession")
    p.add_argument("--status", choices=[s.value for s in RESULT_STATUSES])
    p.add_argument("--model", metavar="ID", help="model id, e.g. PxsScore-0.1")
    p.add_argument("--since", metavar="WHEN", type=_since,
                   help="created at or after this ISO 8601 date or date-time (local time "
                   "unless it has an offset), e.g. 2026-11-26 or 2026-11-26T08:00+01:00")
    p.add_argument("--flagged", action="store_true", help="only results with review flags")
    p.add_argument("--history", action="store_true",
                   help="every result, not only each study's current one")
    p.add_argument("--limit", type=int, help="only the latest N results (still oldest first)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON array of result documents")
    fmt.add_argument("--csv", action="store_true", help="one CSV row per result")

    p = sub.add_parser("export-dataset", help="the de-identified researcher view as CSV: "
                       "one row per study's current result, by patient hash then study "
                       "date, with the change since the patient's prior image")
    _add_config(p)
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    p.add_argument("--out", type=Path, metavar="FILE.csv", help="write here (default: stdout)")
    p.add_argument("--since", metavar="WHEN", type=_since,
                   help="results created at or after this ISO "
                   "8601 date or date-time (as for results --since)")
    p.add_argument("--model", metavar="ID", help="model id, e.g. PxsScore-0.1")
    p.add_argument("--exclude-rejected", action="store_true",
                   help="leave out studies whose latest review (web UI) is wrong-image-used, "
                   "wrong-patient or not-a-valid-exam")

    p = sub.add_parser("outbox", help="deliveries of results to the exporters")
    outbox_sub = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    for action, text in (("list", "list deliveries (newest last)"),
                         ("retry", "make deliveries due now with fresh tries: the dead ones "
                          "by default, or those named by id (even delivered ones)")):
        q = outbox_sub.add_parser(action, help=text)
        _add_config(q)
        q.add_argument("--data-dir", type=Path, help="override storage.data-dir")
        q.add_argument("--exporter", metavar="NAME")
        q.add_argument("--state", choices=[s.value for s in DeliveryState],
                       default=None if action == "list" else DeliveryState.DEAD.value)
        if action == "list":
            q.add_argument("--limit", type=int)
            q.add_argument("--json", action="store_true")
        else:
            q.add_argument("ids", nargs="*", metavar="ID", help="delivery ids")

    p = sub.add_parser("rules", help="selection rules")
    rules_sub = p.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    p = rules_sub.add_parser(
        "test", help="dry-run the selection rules over a folder of DICOM files (headers only)")
    _add_config(p)
    p.add_argument("folder", type=Path)
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")

    p = sub.add_parser("score", help="score DICOM (or 8-bit PNG/JPEG) files offline, "
                       "with the service's model, anchors and preprocessing")
    _add_config(p)
    p.add_argument("files", nargs="+", type=Path)

    p = sub.add_parser("anchors", help="the anchor pool of normal radiographs")
    anchors_sub = p.add_subparsers(dest="anchors_command", required=True, metavar="ACTION")
    p = anchors_sub.add_parser(
        "build", help="embed a folder of normal radiographs once into an anchors file "
        "(then set model.anchors to that file)")
    _add_config(p)
    p.add_argument("folder", type=Path, help="normal radiographs: DICOM, 8-bit PNG or JPEG")
    p.add_argument("-o", "--output", type=Path, required=True, help="the anchors file to write")

    p = sub.add_parser("model", help="the model itself")
    model_sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = model_sub.add_parser(
        "export", help="write a Triton Inference Server model repository entry for the "
        "configured weights (model file and config.pbtxt with a dynamic batcher)")
    _add_config(p)
    p.add_argument("--out", type=Path, required=True,
                   help="the model repository (the entry is OUT/<model.triton.model-name>)")
    p.add_argument("--format", choices=("onnx", "torchscript", "python"), default="onnx",
                   help="onnx: Triton's onnxruntime backend (default); torchscript: its "
                   "pytorch backend; python: its python backend (torch in the stub's Python)")

    p = sub.add_parser("status", help="one screen for a sysadmin: the running service's "
                       "health (GET /healthz) and figures from the store (no PHI)")
    _add_config(p)
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    p.add_argument("--json", action="store_true", help="the health and the figures as JSON")

    p = sub.add_parser("trace", help="the whole story of one study: associations, "
                       "instances, selection, timings per stage, result, deliveries")
    _add_config(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    p.add_argument("--json", action="store_true", help="the study's detail as JSON")
    p.add_argument("--phi", action="store_true",
                   help="also show the patient ID, accession number and study date")

    p = sub.add_parser("priors", help="priors from the PACS (change over time)")
    priors_sub = p.add_subparsers(dest="priors_command", required=True, metavar="ACTION")
    p = priors_sub.add_parser(
        "backfill", help="results stored without a change (priors enabled late): fetch "
        "their patients' priors from the PACS and store them again with the change")
    _add_config(p)
    p.add_argument("--since", type=_since, metavar="DATE",
                   help="only results created at or after this ISO 8601 date or date-time")
    p.add_argument("--deliver", action="store_true",
                   help="queue the updated results for the exporters (default: store only)")

    p = sub.add_parser("store", help="the store itself: copy a SQLite store to PostgreSQL")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = store_sub.add_parser(
        "copy", help="copy a SQLite store (the service stopped) into an empty PostgreSQL "
        "database, then point storage.database at it")
    _add_config(q)
    q.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH",
                   help="the SQLite store, e.g. sqlite:/var/lib/pxsgate/pxsgate.sqlite3")
    q.add_argument("--to", dest="target", required=True, metavar="URL",
                   help="postgresql://user@host:5432/pxsgate (the password from "
                   "--password-file, or PGPASSWORD / PGPASSFILE / ~/.pgpass)")
    q.add_argument("--password-file", type=Path, metavar="FILE",
                   help="a file holding the PostgreSQL user's password")

    p = sub.add_parser("users", help="the web UI's users (/ui/ on the HTTP port)")
    users_sub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = users_sub.add_parser(
        "add", help="add a user; the password is read from the terminal (twice), or as one "
        f"line from stdin; at least {MIN_PASSWORD_LENGTH} characters")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--role", required=True, choices=ROLES,
                   help="viewer: de-identified pages; reviewer: identifiers, reviews; "
                   "operator: also retries and forced completions")
    for action, text in (("list", "list the users"),
                         ("remove", "remove a user (its audit entries and reviews stay)"),
                         ("disable", "keep the user, but refuse its logins"),
                         ("enable", "allow a disabled user's logins again")):
        q = users_sub.add_parser(action, help=text)
        if action != "list":
            q.add_argument("name", metavar="NAME")
        else:
            q.add_argument("--json", action="store_true")
    for q in users_sub.choices.values():
        _add_config(q)
        q.add_argument("--data-dir", type=Path, help="override storage.data-dir")

    p = sub.add_parser("audit", help="the web UI's audit trail: logins, views of "
                       "identifiers, reviews, refusals (oldest first)")
    _add_config(p)
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    p.add_argument("--since", metavar="WHEN", type=_since,
                   help="entries at or after this ISO 8601 date or date-time")
    p.add_argument("--user", metavar="NAME", help="only this user's entries")
    p.add_argument("--limit", type=int, metavar="N", help="only the latest N entries")
    p.add_argument("--json", action="store_true",
                   help="a JSON array, each entry with its PS3.15 audit message fields")

    p = sub.add_parser("evaluate", help="validate the stored scores against an outcomes CSV: "
                       "ROC AUC with a bootstrap CI, sensitivity/specificity, roc.png "
                       "(needs pip install 'pxsgate[evaluate]')")
    _add_config(p)
    p.add_argument("--outcomes", type=Path, required=True, metavar="FILE.csv",
                   help="CSV: accession_number and/or study_instance_uid, outcome (1/0), "
                   "optional time (ISO 8601)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="write evaluation.json and roc.png here (default: .)")
    p.add_argument("--window-days", type=float, metavar="D",
                   help="positive only if the outcome's time is within D days after the study")
    p.add_argument("--thresholds", metavar="T,T,...",
                   help="score thresholds for sensitivity/specificity, e.g. 4,6")
    p.add_argument("--rounds", type=int, default=2000, help="bootstrap rounds (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--exclude-rejected", action="store_true",
                   help="leave out studies whose latest review (web UI) is wrong-image-used, "
                   "wrong-patient or not-a-valid-exam")
    p.add_argument("--data-dir", type=Path, help="override storage.data-dir")
    return parser


# The commands that only read (or, outbox retry, mark) the store: their config is loaded
# without the checks that need pydicom (config.load_config), which they never use.
_STORE_COMMANDS = frozenset({"results", "status", "trace", "outbox", "export-dataset",
                             "users", "audit"})


def _config(args: argparse.Namespace) -> Config:
    path = resolve_config_path(args.config)
    if args.config is None and not path.exists():
        return Config()  # no file anywhere: the built-in defaults, as documented
    return load_config(path, skip_dicom_checks=args.command in _STORE_COMMANDS)


def _one_shot_process() -> None:
    """This process runs one short command, then exits: no cyclic garbage collection in
    it. Its passes over every object of every imported module, during the imports and at
    exit, are ~20 ms of the ~0.13 s a read-only command takes on 2 cores; what these
    commands make is freed by reference counting. gc.freeze at exit (an atexit handler runs
    before the interpreter's last collections) leaves those collections nothing to walk."""
    import atexit
    import gc

    gc.disable()
    atexit.register(gc.freeze)


def main(argv: Sequence[str] | None = None) -> int:
    """The program (``pxsgate`` and ``python -m pxsgate`` call it without ``argv``), or a
    command run from Python with ``argv``: then the caller's process is left as it was."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in _STORE_COMMANDS:
        _one_shot_process()
    try:
        config = _config(args)
        handler = _COMMANDS[args.command]
        code = handler(args, config)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
        return code
    except BrokenPipeError:
        # `pxsgate results | head -1`: the reader has gone. Exit quietly, as the Python docs'
        # recipe does (signal module, "Note on SIGPIPE"): stdout to /dev/null, so that the
        # interpreter's own flush at exit cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except ConfigError as exc:
        print(f"pxsgate: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PxsgateError as exc:
        print(f"pxsgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run(coro: Any) -> Any:
    import asyncio

    try:
        import uvloop  # optional: a faster event loop where it is installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    print(f"{resolve_config_path(args.config)}: ok "
          f"(AE titles {', '.join(t.ae_title for t in config.dicom.scp.ae_titles)}, "
          f"port {config.dicom.scp.port}, data in {config.storage.data_dir})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    """Run the gateway until SIGTERM or SIGINT (graceful, exit 0; a second SIGINT exits
    130 at once, which loses nothing acknowledged: it is all on disk), or until the service
    finds itself unable to go on (exit 1, so that systemd restarts it). See
    pxsgate.service.serve."""
    from pxsgate.log import configure_logging

    configure_logging(config.logging.format, config.logging.level,
                      include_phi=config.logging.include_phi)
    # multiprocessing's resource tracker (a process of its own, started with the decode
    # pool, that inherits these -W options) warns in plain text about the semaphores a
    # killed service left behind, which it then cleans up: nothing an operator can act on,
    # and not a JSON line. The service's own stop or crash is logged already.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    try:
        return _serve(config, resolve_config_path(args.config))
    finally:
        # The loop has closed and restored the default handlers; a SIGHUP in the moment
        # before the process exits must not turn a clean stop into exit 129.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _serve(config: Config, path: Path) -> int:
    """serve()'s outcome as an exit code; a start-up error goes up to main()."""
    from pxsgate.service.serve import serve  # torch loads here, not for check-config/results

    outcome = _run(serve(config, path, force_exit=_forced_exit))
    if outcome.fatal:
        print(f"pxsgate: {outcome.fatal}; stopped so that it is restarted", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _forced_exit() -> NoReturn:
    """A second SIGINT during the graceful stop: exit at once, skipping the clean-up."""
    os._exit(EXIT_INTERRUPTED)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.log import configure_logging
    from pxsgate.tools.demo import run_demo

    configure_logging("console", "warning", sys.stderr)  # stdout is the demo's report
    return int(_run(run_demo(config, sys.stdout, data_dir=args.data_dir)))


def _store_path(args: argparse.Namespace, config: Config) -> Store:
    """The store the one-shot commands read: storage.database's PostgreSQL database, or
    SQLite's file under the data-dir (which must exist: they never create one)."""
    from pxsgate.store import store_for

    if args.data_dir is not None:
        config = dataclasses.replace(config, storage=dataclasses.replace(
            config.storage, data_dir=args.data_dir))
    if config.database_url is None and not config.db_path.exists():
        raise PxsgateError(f"no store at {config.db_path} (is storage.data-dir right?)")
    return store_for(config)


def _since(value: str) -> str:
    """``--since``: an ISO 8601 date or date-time, as the store compares it (a bad value is
    argparse's usage error, exit 2)."""
    try:
        return parse_since(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_results(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.store import ResultFilter

    db = _store_path(args, config)
    flt = ResultFilter(study_uid=args.study_uid, patient_id=args.patient_id,
                       accession=args.accession, status=args.status, model=args.model,
                       since=args.since, flagged=args.flagged, history=args.history,
                       limit=args.limit)
    docs = _with_store(db, lambda store: store.results(flt))
    if args.json:
        json.dump(docs, sys.stdout, indent=2)
        print()
    elif args.csv:
        _print_csv(docs)
    else:
        _print_table(docs)
    return EXIT_OK


def _with_store(store: Store, use: Callable[[Store], Awaitable[R]]) -> R:
    """Open the store, ``use`` it, close it: the one-shot commands' access. On asyncio's
    own loop: uvloop (``_run``) is for the service; here its import would cost more than
    it saves."""
    import asyncio

    async def run() -> R:
        await store.open()
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_outbox(args: argparse.Namespace, config: Config) -> int:
    db = _store_path(args, config)
    if args.outbox_command == "retry":
        state = None if args.ids else args.state
        count = _with_store(db, lambda store: store.retry_deliveries(
            now_iso(), time.time(), state=state, exporter=args.exporter, ids=args.ids))
        print(f"{count} deliver{'y' if count == 1 else 'ies'} due now "
              "(the running service picks them up within seconds)")
        return EXIT_OK
    rows = _with_store(db, lambda store: store.deliveries(
        state=args.state, exporter=args.exporter, limit=args.limit))
    if args.json:
        json.dump([dataclasses.asdict(d) for d in rows], sys.stdout, indent=2)
        print()
        return EXIT_OK
    table = [["delivery", "exporter", "state", "tries", "updated", "last error"]]
    table += [[d.id, d.exporter, d.state, str(d.attempts), d.updated_at[:19], d.last_error]
              for d in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    print(f"({len(rows)} deliver{'y' if len(rows) == 1 else 'ies'})")
    return EXIT_OK


def _row(doc: dict[str, Any]) -> list[str]:
    from pxsgate.results import pxs_entries  # the scores, not the pxs.change entry

    scores = ",".join(r["value"] for r in pxs_entries(doc))
    detail = scores if doc["status"] == Status.SUCCEEDED else doc["errorMessage"]
    flags = " ".join(doc.get("pxsgate", {}).get("flags", [])) or "-"
    return [doc["createdAt"][:19], doc["status"], doc["patientId"], doc["accessionNumber"],
            doc["studyInstanceUid"], flags, detail]


_HEADER = ["created", "status", "patient", "accession", "study uid", "flags",
           "score (headline first) / reason"]


def _print_table(docs: list[dict[str, Any]]) -> None:
    rows = [_HEADER] + [_row(d) for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    print(f"({len(docs)} result(s))")


def _print_csv(docs: list[dict[str, Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(_HEADER)
    writer.writerows(_row(d) for d in docs)


def cmd_export_dataset(args: argparse.Namespace, config: Config) -> int:
    """researcher_view as CSV (de-identified: patient hash, study date, scores, change since
    the prior image, model, timings). Prints nothing else but a row count on stderr."""
    db = _store_path(args, config)
    names, rows = _with_store(db, lambda store: store.researcher_rows(
        since=args.since, model=args.model, exclude_rejected=args.exclude_rejected))
    if args.out is None:
        _write_dataset(sys.stdout, names, rows)
        return EXIT_OK
    try:
        with args.out.open("w", newline="", encoding="utf-8") as handle:
            _write_dataset(handle, names, rows)
    except OSError as exc:
        raise PxsgateError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    print(f"wrote {len(rows)} row(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


def _write_dataset(out: Any, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    writer = csv.writer(out)
    writer.writerow(names)
    writer.writerows(rows)


def cmd_score(args: argparse.Namespace, config: Config) -> int:
    import numpy as np

    from pxsgate.infer import load_scorer
    from pxsgate.log import configure_logging
    from pxsgate.preprocess import load_model_image

    configure_logging(config.logging.format, "warning")
    jpeg = config.preprocess.jpeg_roundtrip
    scorer = load_scorer(config.model, jpeg_roundtrip=jpeg)
    out: list[dict[str, Any]] = []
    ready: list[tuple[dict[str, Any], Any]] = []
    for path in args.files:
        entry: dict[str, Any] = {"file": str(path)}
        out.append(entry)
        try:
            ready.append((entry, load_model_image(path, jpeg_roundtrip=jpeg)))
        except PxsgateError as exc:
            entry["error"] = str(exc)
    size = config.model.batch.max_size
    for i in range(0, len(ready), size):
        chunk = ready[i : i + size]
        try:
            values = scorer.score_batch(np.stack([image for _, image in chunk]))
        except PxsgateError as exc:
            for entry, _ in chunk:
                entry["error"] = str(exc)
            continue
        for (entry, _), value in zip(chunk, values, strict=True):
            entry["value"] = value
            entry["model"] = scorer.info.block()
    json.dump(out, sys.stdout, indent=2)
    print()
    return EXIT_FAILURE if any("error" in entry for entry in out) else EXIT_OK


def cmd_anchors(args: argparse.Namespace, config: Config) -> int:
    from dataclasses import replace

    from pxsgate.anchors import save_anchor_file
    from pxsgate.infer import PxsScorer
    from pxsgate.log import configure_logging

    configure_logging(config.logging.format, "warning")
    if not args.folder.is_dir():
        raise PxsgateError(f"{args.folder} is not a folder")
    # The anchors are always embedded in fp32; nothing to compile for a one-off.
    model = replace(config.model, anchors=str(args.folder), precision="fp32", compile="none")
    scorer = PxsScorer.load(model, jpeg_roundtrip=config.preprocess.jpeg_roundtrip)
    save_anchor_file(scorer.anchors, args.output)
    print(f"wrote {args.output}: {len(scorer.anchors)} anchors from {args.folder}, "
          f"weights sha256 {scorer.info.weights_sha256}, "
          f"anchors sha256 {scorer.anchors.sha256}")
    return EXIT_OK


def cmd_model(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.log import configure_logging
    from pxsgate.triton.export import export_model

    configure_logging(config.logging.format, "warning")
    exported = export_model(config.model, args.out, args.format)
    print(f"wrote {exported.entry} ({args.format}: {exported.model_file.name}, "
          f"config.pbtxt), weights sha256 {exported.weights_sha256}")
    return EXIT_OK


def cmd_rules(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.rules import dry_run

    if not args.folder.exists():
        raise PxsgateError(f"{args.folder} does not exist")
    run = dry_run(args.folder, config.selection)
    if args.json:
        json.dump(_dry_run_json(run), sys.stdout, indent=2)
        print()
        return EXIT_OK
    for study_uid, (headers, decision) in run.studies.items():
        verdict = "CANDIDATE" if decision.candidate else "skipped"
        flags = f"  flags: {' '.join(decision.flags)}" if decision.flags else ""
        print(f"study {study_uid}  {verdict}  [{decision.rule}] {decision.reason}{flags}")
        names = {h.instance.sop_instance_uid: h.instance.path.name for h in headers}
        for d in decision.images:
            mark = "->" if d.selected else "  "
            print(f"  {mark} {names.get(d.sop_instance_uid, d.sop_instance_uid):<32} "
                  f"[{d.rule}] {d.reason}")
    for path, why in run.skipped_files:
        print(f"not DICOM: {path}: {why}")
    s = run.summary()
    print(f"{s['studies']} studies, {s['candidate_studies']} with model input "
          f"(yield {s['yield']:.0%}); {s['selected_images']} of {s['images']} images "
          f"selected; {s['flagged_studies']} flagged; {s['non_dicom_files']} non-DICOM files")
    return EXIT_OK


def _dry_run_json(run: Any) -> dict[str, Any]:
    return {
        "summary": run.summary(),
        "studies": [
            {"studyInstanceUid": uid, "candidate": d.candidate, "rule": d.rule,
             "reason": d.reason, "flags": list(d.flags),
             "images": [{"file": str(next(h.instance.path for h in headers
                                          if h.instance.sop_instance_uid == i.sop_instance_uid)),
                         "sopInstanceUid": i.sop_instance_uid, "selected": i.selected,
                         "rule": i.rule, "reason": i.reason} for i in d.images]}
            for uid, (headers, d) in run.studies.items()
        ],
        "nonDicomFiles": [{"file": p, "reason": why} for p, why in run.skipped_files],
    }


def _health(config: Config, timeout: float = 2.0) -> tuple[dict[str, Any] | None, str]:
    """The running service's /healthz, or None and why not."""
    if config.http.port == 0:
        return None, "http.port is 0"
    import urllib.error
    import urllib.request

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        config.http.host, config.http.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.http.port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503: unhealthy, and says why in its body
        body = exc.read()
    except (OSError, ValueError) as exc:
        return None, f"{url}: {getattr(exc, 'reason', exc)}"
    try:
        report = json.loads(body)
    except ValueError:
        return None, f"{url} answered something that is not JSON"
    if not isinstance(report, dict):
        return None, f"{url} answered something that is not a health report"
    return report, ""


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.tools.report import gather_summary, status_text

    db = _store_path(args, config)
    data_dir = args.data_dir or config.storage.data_dir
    health, why = _health(config)
    summary = _with_store(db, lambda store: gather_summary(
        store, data_dir, min_free_mb=config.storage.min_free_mb,
        max_spool_gb=config.storage.max_spool_gb))
    if health is None:
        summary["unreachable"] = why
    if args.json:
        json.dump({"service": health, "store": summary}, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(status_text(health, summary))
    return EXIT_FAILURE if health is not None and not health.get("ok") else EXIT_OK


def cmd_trace(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.tools.report import redact_detail, trace_text

    db = _store_path(args, config)

    async def find(store: Store) -> dict[str, Any] | None:
        uid = await store.find_study(args.study_uid)  # a UID, or the key in the logs
        detail = await store.study_detail(uid) if uid is not None else None
        if detail is not None and uid is not None:
            detail["study"]["key"] = store.study_label_hashed(uid)
        return detail

    detail = _with_store(db, find)
    if detail is None:
        print(f"pxsgate trace: no study {args.study_uid} in the store", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        json.dump(detail if args.phi else redact_detail(detail), sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(trace_text(detail, phi=args.phi))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.tools import evaluate

    try:
        evaluate.require_extras()  # scikit-learn, matplotlib: the optional extra
        thresholds = evaluate.parse_thresholds(args.thresholds)
        store = _store_path(args, config)
        db = store if store.shared else store.path
        report = evaluate.evaluate(db, args.outcomes, args.out, window_days=args.window_days,
                                   thresholds=thresholds, rounds=args.rounds, seed=args.seed,
                                   exclude_rejected=args.exclude_rejected)
    except evaluate.EvaluationInputError as exc:
        print(f"pxsgate evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(evaluate.summary_text(report, args.out))
    return EXIT_OK


def cmd_priors(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.log import configure_logging
    from pxsgate.tools.backfill import backfill

    configure_logging(config.logging.format, "warning", sys.stderr,
                      include_phi=config.logging.include_phi)
    tally = _run(backfill(config, since=args.since, deliver=args.deliver, out=sys.stderr))
    print(f"{tally.results} results without a change: {tally.changed} stored again with "
          f"it ({tally.fetched} priors fetched from the PACS), {tally.no_prior} without a "
          f"prior, {tally.superseded} rescored meanwhile")
    return EXIT_OK


def cmd_store(args: argparse.Namespace, config: Config) -> int:
    from pxsgate.config import _check_database, redact_url
    from pxsgate.tools.storecopy import copy_store

    if not args.source.startswith("sqlite:"):
        print("pxsgate: --from must be sqlite:PATH", file=sys.stderr)
        return EXIT_USAGE
    if (problem := _check_database(args.target)) is not None or args.target == "sqlite":
        print(f"pxsgate: --to {problem or 'must be a PostgreSQL URL'}", file=sys.stderr)
        return EXIT_USAGE
    password = None
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    copied = _run(copy_store(Path(args.source.removeprefix("sqlite:")), args.target,
                             password=password, node=config.node_name,
                             progress=lambda t, n: print(f"  {t}: {n}", file=sys.stderr)))
    print(f"copied {copied.total} rows ({copied.rows.get('results', 0)} results) into "
          f"{redact_url(args.target)}; set storage.database to it and keep "
          f"storage.node-name: {config.node_name}")
    return EXIT_OK


USER_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"


def _read_password() -> str:
    """From the terminal (asked twice, not echoed), else one line from stdin."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise _UsageError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


class _UsageError(Exception):
    pass


def cmd_users(args: argparse.Namespace, config: Config) -> int:
    import getpass
    import re

    from pxsgate.ui.audit import Action, Auditor, Outcome
    from pxsgate.ui.passwords import hash_password

    db = _store_path(args, config)
    command = args.users_command
    if command == "list":
        users = _with_store(db, lambda store: store.users())
        if args.json:
            json.dump([{"name": u.name, "role": u.role, "createdAt": u.created_at,
                        "disabled": u.disabled} for u in users], sys.stdout, indent=2)
            print()
            return EXIT_OK
        for u in users:
            print(f"{u.name:<24} {u.role:<9} {u.created_at[:19]}"
                  f"{'  (disabled)' if u.disabled else ''}")
        print(f"({len(users)} user(s))")
        return EXIT_OK
    name = args.name
    if command == "add":
        if not re.fullmatch(USER_NAME_RE, name):
            print("pxsgate users: a name is 1-64 letters, digits, '.', '_', '@' or '-'",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            password = _read_password()
        except _UsageError as exc:
            print(f"pxsgate users: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if len(password) < MIN_PASSWORD_LENGTH:
            print(f"pxsgate users: the password has {len(password)} characters, fewer than "
                  f"{MIN_PASSWORD_LENGTH}", file=sys.stderr)
            return EXIT_USAGE
        hashed = hash_password(password)
    operator = f"{getpass.getuser()}@cli"

    async def change(store: Store) -> bool:
        if command == "add":
            done = await store.add_user(name, args.role, hashed, now_iso())
            action, detail = Action.USER_ADDED, f"{name} as {args.role}"
        elif command == "remove":
            done = await store.remove_user(name)
            action, detail = Action.USER_REMOVED, name
        else:
            done = await store.set_user_disabled(name, command == "disable")
            action = Action.USER_DISABLED if command == "disable" else Action.USER_ENABLED
            detail = name
        if done:
            await Auditor(store).record(action, Outcome.SUCCESS, user=operator, role="cli",
                                        peer="local", detail=detail)
        return done

    if not _with_store(db, change):
        why = "exists already" if command == "add" else "is no user"
        print(f"pxsgate users: {name!r} {why}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{name}: {'added as ' + args.role if command == 'add' else command + 'd'}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, config: Config) -> int:
    from datetime import datetime

    from pxsgate.store import audit_time
    from pxsgate.ui.audit import ps315

    db = _store_path(args, config)
    since = audit_time(datetime.fromisoformat(args.since)) if args.since else None
    entries = _with_store(db, lambda store: store.audit_entries(
        since_utc=since, user=args.user, limit=args.limit))
    if args.json:
        json.dump([ps315(e) for e in entries], sys.stdout, indent=2)
        print()
        return EXIT_OK
    for e in entries:
        print(f"{e.event_time}  {e.user_name:<16} {e.role or '-':<9} {e.action:<14} "
              f"{e.outcome:>2}  {e.study_key or '-':<12}  {e.peer_address:<15}  {e.detail}")
    print(f"({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")
    return EXIT_OK


_COMMANDS = {
    "rules": cmd_rules,
    "model": cmd_model,
    "priors": cmd_priors,
    "store": cmd_store,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "check-config": cmd_check_config,
    "results": cmd_results,
    "export-dataset": cmd_export_dataset,
    "outbox": cmd_outbox,
    "score": cmd_score,
    "anchors": cmd_anchors,
    "status": cmd_status,
    "trace": cmd_trace,
    "evaluate": cmd_evaluate,
    "users": cmd_users,
    "audit": cmd_audit,
}
