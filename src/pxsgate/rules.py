"""Selection: is a study a candidate for the model, and which of its images are model input.

The rules are data (config ``selection``, language in matchers.py, defaults in
default_rules.py). For each readable instance:

1. wrong patient: an instance whose PatientID differs from the study's (the PatientID most
   of its instances carry) is never model input, and the study is flagged ``wrong-patient``.
2. study rules, first match decides: ``accept`` or ``reject``; no match rejects. The study
   is a candidate when at least one instance is accepted.
3. image rules, first match decides: ``select`` (model input) or ``exclude``; no match
   excludes.

Review flags: ``multiple-ap-images`` (more than one input: all are scored, the latest
acquired is the headline), ``many-ap-images`` (more than ``selection.many-ap-images``
inputs: the paper's manual-review case), ``wrong-patient``. Every decision carries the rule
that made it and a reason a sysadmin can read, and is stored, so a skipped study is never a
mystery. Rules read header tags only (files are read with ``stop_before_pixels``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pxsgate.config import SelectionConfig
from pxsgate.matchers import first_match
from pxsgate.records import ImageDecision, StoredInstance, StudyDecision, latest_first

FLAG_MULTIPLE = "multiple-ap-images"
FLAG_MANY = "many-ap-images"
FLAG_WRONG_PATIENT = "wrong-patient"
FLAG_RESCORED = "rescored"
# An instance of the study was sent again under another study (a PACS correction): both
# studies are scored again and flagged; wrong-patient too when its PatientID changed.
FLAG_INSTANCE_MOVED = "instance-moved"
# A selected image whose own pixel data could not be scored (multi-frame, colour, corrupt):
# the others are scored, and the image is recorded as not used with the reason.
FLAG_IMAGE_FAILED = "image-failed"
# More model-input images than selection.max-images-per-study: only the latest are scored.
FLAG_CAPPED = "images-capped"


@dataclass(frozen=True)
class Header:
    """An instance and its header (no pixel data)."""

    instance: StoredInstance
    dataset: Dataset | None  # None: the file could not be read
    error: str = ""

    def text(self, keyword: str) -> str:
        """The element's value as text (element_text)."""
        return "" if self.dataset is None else element_text(self.dataset, keyword)

    def acquired(self) -> str:
        """Acquisition time as sortable text, from the most specific tags present."""
        for dt, date, time in (("AcquisitionDateTime", "", ""),
                               ("", "AcquisitionDate", "AcquisitionTime"),
                               ("", "ContentDate", "ContentTime"),
                               ("", "SeriesDate", "SeriesTime")):
            if dt and (value := self.text(dt)):
                return value[:21]
            if date and (value := self.text(date)):
                return f"{value}{self.text(time)}"[:21]
        return ""


def element_text(ds: Dataset, keyword: str) -> str:
    """An element's value as text; "" when absent or when its bytes cannot be read as its
    VR (a peer's malformed element must not stop the study's decision)."""
    try:
        value = ds.get(keyword, "")
        if isinstance(value, MultiValue):
            # DICOM's own encoding of several values (a PatientID "A\\B"), not Python's
            # list text "['A', 'B']", which nothing outside pxsgate would search for.
            return "\\".join(str(v).strip() for v in value)
        return "" if value is None else str(value).strip()
    except Exception:  # pydicom converts lazily: any malformed value fails here
        return ""


def select(headers: Sequence[Header], cfg: SelectionConfig) -> StudyDecision:
    """Decide a whole study: the study-level verdict, one decision per instance, flags."""
    if not headers:  # e.g. its only instance was re-sent under another study meanwhile
        return StudyDecision(False, "no-instances", "no instance is stored for this study", ())
    patient = _study_patient([h for h in headers if h.dataset is not None])
    votes = _Votes()
    images = [_decide_instance(h, cfg, patient, votes) for h in headers]
    flags = [FLAG_WRONG_PATIENT] if votes.wrong_patient else []
    if not votes.accepted_by:
        return _not_a_candidate(images, votes.rejected_by, flags)
    chosen = [d for d in images if d.selected]
    if not chosen:
        return _no_model_input(images, votes, flags)
    if len(chosen) > 1:
        flags.append(FLAG_MULTIPLE)
    if len(chosen) > cfg.many_ap_images:
        flags.append(FLAG_MANY)
    if len(chosen) > cfg.max_images_per_study:
        images = _capped(images, chosen, cfg.max_images_per_study)
        flags.append(FLAG_CAPPED)
        chosen = [d for d in images if d.selected]
    rule_name, why = votes.accepted_by[0]
    return StudyDecision(True, rule_name, f"{why}; {len(chosen)} model input image(s)",
                         tuple(images), tuple(sorted(flags)))


@dataclass
class _Votes:
    """What the study rules said of the study's instances, as select() goes through them."""

    accepted_by: list[tuple[str, str]] = field(default_factory=list)  # (rule, why)
    rejected_by: Counter[str] = field(default_factory=Counter)
    wrong_patient: bool = False


def _decide_instance(h: Header, cfg: SelectionConfig, patient: str,
                     votes: _Votes) -> ImageDecision:
    """One instance: readable, the study's patient, a candidate by the study rules, then
    selected or not by the image rules."""
    inst = h.instance

    def decision(selected: bool, rule: str, reason: str) -> ImageDecision:
        return ImageDecision(inst.sop_instance_uid, inst.series_instance_uid, selected,
                             rule, reason, h.acquired())

    if h.dataset is None:
        return decision(False, "unreadable", f"header unreadable: {h.error}")
    if h.text("PatientID") != patient:
        votes.wrong_patient = True
        return decision(False, FLAG_WRONG_PATIENT, "PatientID differs from the study's")
    rule, why = first_match(cfg.study_rules, h.dataset)
    if rule is None or rule.action == "reject":
        name = rule.name if rule else "no-study-rule"
        votes.rejected_by[name] += 1
        return decision(False, name, why)
    votes.accepted_by.append((rule.name, why))
    rule, why = first_match(cfg.image_rules, h.dataset)
    if rule is None:
        return decision(False, "no-image-rule", why)
    return decision(rule.action == "select", rule.name, why)


def could_be_selected(ds: Dataset, cfg: SelectionConfig) -> bool:
    """Whether an instance with this header could be model input, judged from its header
    alone, as it arrives (decode on arrival, pxsgate.early): the study rules accept it and
    the image rules select it, as in ``_decide_instance``. What needs the rest of the study
    (its patient, the cap on images) can only turn a True into not selected, never the
    reverse: an instance selected at ready time was always True here."""
    rule, _ = first_match(cfg.study_rules, ds)
    if rule is None or rule.action == "reject":
        return False
    rule, _ = first_match(cfg.image_rules, ds)
    return rule is not None and rule.action == "select"


def _rule_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())


def _not_a_candidate(images: Sequence[ImageDecision], rejected_by: Counter[str],
                     flags: Sequence[str]) -> StudyDecision:
    if not rejected_by:
        first = images[0]
        return StudyDecision(False, first.rule, f"not a candidate: {first.reason}",
                             tuple(images), tuple(flags))
    first = next(d for d in images if d.rule in rejected_by)
    reason = f"not a candidate: {first.reason}"
    if len(rejected_by) > 1:
        reason += f" (rules: {_rule_counts(rejected_by)})"
    return StudyDecision(False, first.rule, reason, tuple(images), tuple(flags))


def _no_model_input(images: Sequence[ImageDecision], votes: _Votes,
                    flags: Sequence[str]) -> StudyDecision:
    summary = _rule_counts(Counter(d.rule for d in images))
    example = next((d for d in images if d.rule not in votes.rejected_by
                    and d.rule not in ("unreadable", FLAG_WRONG_PATIENT)), images[0])
    return StudyDecision(False, "no-model-input", f"candidate ({votes.accepted_by[0][0]}) but "
                         f"no image selected among {len(images)} ({summary}), e.g. "
                         f"{example.reason}", tuple(images), tuple(flags))


def _capped(images: Sequence[ImageDecision], chosen: Sequence[ImageDecision],
            limit: int) -> list[ImageDecision]:
    """One study of hundreds of images must not hold the model while others wait: the
    latest acquired are scored, the rest recorded as not used (the study is flagged)."""
    keep = {d.sop_instance_uid for d in latest_first(chosen)[:limit]}
    return [d if not d.selected or d.sop_instance_uid in keep else ImageDecision(
        d.sop_instance_uid, d.series_instance_uid, False, "over-limit",
        f"{d.reason}; not scored: only the latest {limit} of "
        f"{len(chosen)} model input images are (selection.max-images-per-study)",
        d.acquired) for d in images]


def _study_patient(readable: Sequence[Header]) -> str:
    """The study's PatientID: the one most of its instances carry (ties: the earliest)."""
    counts = Counter(h.text("PatientID") for h in readable)
    if not counts:
        return ""
    top = max(counts.values())
    return next(h.text("PatientID") for h in readable if counts[h.text("PatientID")] == top)


# --- dry run over a folder (``pxsgate rules test DIR``) ------------------------------------


@dataclass(frozen=True)
class DryRun:
    """The decisions the rules would make over a folder of DICOM files."""

    studies: dict[str, tuple[list[Header], StudyDecision]]
    skipped_files: list[tuple[str, str]]  # (path, why) for files that are not DICOM

    def summary(self) -> dict[str, int | float]:
        decisions = [d for _, d in self.studies.values()]
        candidates = sum(1 for d in decisions if d.candidate)
        images = sum(len(d.images) for d in decisions)
        selected = sum(len(d.inputs) for d in decisions)
        flagged = sum(1 for d in decisions if d.flags)
        return {
            "studies": len(decisions), "candidate_studies": candidates,
            "images": images, "selected_images": selected, "flagged_studies": flagged,
            "non_dicom_files": len(self.skipped_files),
            # The paper's yield: the share of studies for which an image reaches the model.
            "yield": round(candidates / len(decisions), 4) if decisions else 0.0,
        }


def dry_run(root: Path, cfg: SelectionConfig) -> DryRun:
    """Read every file under ``root`` (headers only, no pixel decode), group by study and
    decide each study as the service would."""
    groups: dict[str, list[Header]] = {}
    skipped: list[tuple[str, str]] = []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # corrupt files fail in many ways
            why = str(exc)[:200] or type(exc).__name__
            if not isinstance(exc, InvalidDicomError):
                why = f"unreadable: {why}"
            skipped.append((str(path), why))
            continue
        study = str(ds.get("StudyInstanceUID", "") or "")
        if not study:
            skipped.append((str(path), "no StudyInstanceUID"))
            continue
        inst = StoredInstance(str(ds.get("SOPInstanceUID", "") or path.name),
                              str(ds.get("SeriesInstanceUID", "") or ""),
                              str(ds.get("SOPClassUID", "") or ""), path)
        # One header per SOP instance, as the store keeps one (a copy in the folder is the
        # same image, not a second AP film).
        group = groups.setdefault(study, [])
        group[:] = [h for h in group if h.instance.sop_instance_uid != inst.sop_instance_uid]
        group.append(Header(inst, ds))
    studies = {uid: (headers, select(headers, cfg)) for uid, headers in groups.items()}
    return DryRun(studies, skipped)
