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
from dataclasses import dataclass
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
    readable = [h for h in headers if h.dataset is not None]
    patient = _study_patient(readable)
    images: list[ImageDecision] = []
    accepted_by: list[tuple[str, str]] = []
    rejected_by: Counter[str] = Counter()
    wrong_patient = False
    for h in headers:
        inst = h.instance

        def decision(selected: bool, rule: str, reason: str, h: Header = h,
                     inst: StoredInstance = inst) -> ImageDecision:
            return ImageDecision(inst.sop_instance_uid, inst.series_instance_uid, selected,
                                 rule, reason, h.acquired())

        if h.dataset is None:
            images.append(decision(False, "unreadable", f"header unreadable: {h.error}"))
            continue
        if h.text("PatientID") != patient:
            wrong_patient = True
            images.append(decision(False, FLAG_WRONG_PATIENT,
                                   "PatientID differs from the study's"))
            continue
        rule, why = first_match(cfg.study_rules, h.dataset)
        if rule is None or rule.action == "reject":
            name = rule.name if rule else "no-study-rule"
            rejected_by[name] += 1
            images.append(decision(False, name, why))
            continue
        accepted_by.append((rule.name, why))
        rule, why = first_match(cfg.image_rules, h.dataset)
        if rule is None:
            images.append(decision(False, "no-image-rule", why))
        else:
            images.append(decision(rule.action == "select", rule.name, why))
    flags = [FLAG_WRONG_PATIENT] if wrong_patient else []
    if not accepted_by:
        if not rejected_by:
            first = next(d for d in images)
            return StudyDecision(False, first.rule, f"not a candidate: {first.reason}",
                                 tuple(images), tuple(flags))
        first = next(d for d in images if d.rule in rejected_by)
        reason = f"not a candidate: {first.reason}"
        if len(rejected_by) > 1:
            summary = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in rejected_by.items())
            reason += f" (rules: {summary})"
        return StudyDecision(False, first.rule, reason, tuple(images), tuple(flags))
    chosen = [d for d in images if d.selected]
    if not chosen:
        counts = Counter(d.rule for d in images)
        summary = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())
        example = next((d for d in images if d.rule not in rejected_by
                        and d.rule not in ("unreadable", FLAG_WRONG_PATIENT)), images[0])
        return StudyDecision(False, "no-model-input", f"candidate ({accepted_by[0][0]}) but "
                             f"no image selected among {len(images)} ({summary}), e.g. "
                             f"{example.reason}", tuple(images), tuple(flags))
    if len(chosen) > 1:
        flags.append(FLAG_MULTIPLE)
    if len(chosen) > cfg.many_ap_images:
        flags.append(FLAG_MANY)
    if len(chosen) > cfg.max_images_per_study:
        # One study of hundreds of images must not hold the model while others wait: the
        # latest acquired are scored, the rest recorded as not used, and the study flagged.
        keep = {d.sop_instance_uid
                for d in latest_first(chosen)[:cfg.max_images_per_study]}
        images = [d if not d.selected or d.sop_instance_uid in keep else ImageDecision(
            d.sop_instance_uid, d.series_instance_uid, False, "over-limit",
            f"{d.reason}; not scored: only the latest {cfg.max_images_per_study} of "
            f"{len(chosen)} model input images are (selection.max-images-per-study)",
            d.acquired) for d in images]
        flags.append(FLAG_CAPPED)
        chosen = [d for d in images if d.selected]
    rule_name, why = accepted_by[0]
    return StudyDecision(True, rule_name, f"{why}; {len(chosen)} model input image(s)",
                         tuple(images), tuple(sorted(flags)))


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
