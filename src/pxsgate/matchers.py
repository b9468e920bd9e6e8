"""The selection rule language: declarative conditions over DICOM header tags.

A condition is YAML data, never an evaluated expression. A leaf names one tag and one or more
tests, all of which must hold::

    {tag: SeriesDescription, contains-token: AP}
    {tag: "(0018,5101)", one-of: [AP, PA]}
    {tag: "(0019,xx10)", private-creator: "HOSPITAL EXAM", equals: XCHEST1V}
    {tag: ExposureIndex, ge: 100, lt: 2000}
    {tag: DerivationDescription, missing: true}

Conditions combine with ``all: [...]``, ``any: [...]`` and ``not: {...}``.

Tests (a multi-valued element such as ImageType matches when any of its values does):

``equals`` / ``one-of``
    the value, trimmed, equals the given one (or one of the list), ignoring case; a number
    given in the rule compares numerically ("1.0" equals 1).
``contains-token``
    the value's words (runs of letters and digits, case-insensitive) contain the given word
    or phrase, or one of a list: ``AP`` matches "CHEST AP PORT" and "ap_supine", not
    "CAPTURE".
``regex``
    ``re.search`` over the value, as written (``(?i)`` for case-insensitive).
``exists`` / ``missing``
    the element is present with a non-empty value / absent or empty (``true``), or the
    reverse (``false``).
``gt``, ``ge``, ``lt``, ``le``
    numeric comparison; a value that is not a number does not match.

Tags are keywords from the DICOM dictionary or numbers ``(gggg,eeee)``. A private tag is
addressed by its private creator, as PS3.5 7.8.1 intends: ``(0019,xx10)`` with
``private-creator: NAME`` finds the block NAME reserved in group 0019 (whatever block
number the modality gave it) and element 10 in it.

Every evaluation returns whether it matched and a sentence saying why, which the rules
stage stores with each decision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydicom import DataElement, Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from pxsgate.errors import ConfigError

_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)?$")
_WORD_RE = re.compile(r"[A-Z0-9]+")
_COMPARE_OPS = ("gt", "ge", "lt", "le")
_LEAF_OPS = ("equals", "one-of", "contains-token", "regex", "exists", "missing", *_COMPARE_OPS)
_MAX_SHOWN = 64  # characters of a tag value quoted in a reason


def words(text: str) -> tuple[str, ...]:
    """Upper-case words of ``text``: runs of letters and digits ("ap_supine" -> AP, SUPINE)."""
    return tuple(_WORD_RE.findall(text.upper()))


def _contains_phrase(haystack: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return n > 0 and any(haystack[i:i + n] == phrase for i in range(len(haystack) - n + 1))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _quote(values: Sequence[str]) -> str:
    text = "\\".join(values)
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


@dataclass(frozen=True)
class TagRef:
    """Where a rule looks: a dictionary tag, or an element in a private creator's block."""

    text: str  # as written in the rule, for reasons and errors
    group: int
    element: int  # for a private tag: the offset in its block (0x00-0xFF)
    private_creator: str | None = None

    @classmethod
    def parse(cls, tag: Any, private_creator: Any, path: str) -> TagRef:
        if not isinstance(tag, str) or not tag.strip():
            raise ConfigError(f"{path}.tag", f"must be a keyword or (gggg,eeee); got {tag!r}")
        text = tag.strip()
        creator = None
        if private_creator is not None:
            if not isinstance(private_creator, str) or not private_creator.strip():
                raise ConfigError(f"{path}.private-creator", "must be a non-empty string")
            creator = private_creator.strip()
        match = _TAG_RE.match(text)
        if match is None:
            number = tag_for_keyword(text)
            if number is None:
                raise ConfigError(f"{path}.tag", f"{text!r} is not a DICOM keyword or a tag "
                                  "number like (0008,103E)")
            if creator is not None:
                raise ConfigError(f"{path}.private-creator",
                                  "only a private tag number, like (0019,xx10), has a creator")
            return cls(text, number >> 16, number & 0xFFFF)
        group = int(match.group(1), 16)
        element_text = match.group(2).upper()
        if creator is not None:
            if group % 2 == 0:
                raise ConfigError(f"{path}.tag", f"group {group:04X} is not private (odd)")
            if not re.fullmatch(r"(XX|[0-9A-F]{2})[0-9A-F]{2}", element_text):
                raise ConfigError(f"{path}.tag", "a private element is written xxEE or BBEE")
            return cls(text, group, int(element_text[2:], 16), creator)
        if "X" in element_text:
            raise ConfigError(f"{path}.private-creator", f"{text} needs its private creator")
        if group % 2 == 1 and int(element_text, 16) >= 0x1000:
            raise ConfigError(f"{path}.private-creator",
                              f"{text} is a private element: name its private creator")
        return cls(text, group, int(element_text, 16))

    def element_of(self, ds: Dataset) -> DataElement | None:
        if self.group == 0x0002:  # File Meta Information (TransferSyntaxUID, ...)
            meta = getattr(ds, "file_meta", None)
            return None if meta is None else meta.get((self.group, self.element))
        if self.private_creator is None:
            return ds.get((self.group, self.element))
        try:
            return ds.private_block(self.group, self.private_creator)[self.element]
        except KeyError:  # no block reserved by that creator, or no such element in it
            return None

    def values(self, ds: Dataset) -> list[str]:
        """The element's values as trimmed strings; empty when absent or empty."""
        try:
            elem = self.element_of(ds)
            return [] if elem is None else element_values(elem.value)
        except Exception:
            # A value pydicom cannot convert (a US of odd length raises
            # BytesLengthException, an Exception subclass; so can any element of a private
            # block it scans): it matches nothing, and a rule never crashes a study.
            return []


def element_values(value: Any) -> list[str]:
    if isinstance(value, DicomSequence):
        # Not matched by value; a sequence with items exists (for exists/missing).
        return [f"(sequence of {len(value)} item(s))"] if len(value) else []
    if value is None:
        return []
    if isinstance(value, bytes):
        # A private element read without its dictionary (VR UN): its bytes are the text.
        value = value.decode("latin-1").replace("\x00", " ").split("\\")
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [text for v in items if (text := str(v).strip())]


class Condition(Protocol):
    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        """Whether ``ds`` matches, and why (or why not), in words."""


@dataclass(frozen=True)
class Leaf:
    tag: TagRef
    tests: tuple[tuple[str, Any], ...]  # (operator, operand) pairs, all must hold

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        values = self.tag.values(ds)
        for op, operand in self.tests:
            ok, why = _test(self.tag.text, values, op, operand)
            if not ok:
                return False, why
        return True, why


def _test(name: str, values: list[str], op: str, operand: Any) -> tuple[bool, str]:
    shown = f"{name} {_quote(values)}" if values else f"{name} (missing)"
    if op == "exists":
        ok = bool(values) == operand
        return ok, f"{name} {'exists' if values else 'is missing'}"
    if op == "missing":
        ok = (not values) == operand
        return ok, f"{name} {'is missing' if not values else 'exists'}"
    if op in ("equals", "one-of"):
        wanted: tuple[str | float, ...] = operand
        for v in values:
            for w in wanted:
                if _equal(v, w):
                    return True, f"{name} is {_quote([v])}"
        target = ", ".join(f"{w:g}" if isinstance(w, float) else w for w in wanted)
        return False, f"{shown} is not {'one of ' if op == 'one-of' else ''}{target}"
    if op == "contains-token":
        phrases: tuple[tuple[str, ...], ...] = operand
        for v in values:
            found = words(v)
            for phrase in phrases:
                if _contains_phrase(found, phrase):
                    return True, f"{name} {_quote([v])} names {' '.join(phrase)}"
        return False, f"{shown} names none of {', '.join(' '.join(p) for p in phrases)}"
    if op == "regex":
        pattern: re.Pattern[str] = operand
        for v in values:
            if pattern.search(v):
                return True, f"{name} {_quote([v])} matches /{pattern.pattern}/"
        return False, f"{shown} does not match /{pattern.pattern}/"
    # gt / ge / lt / le
    limit: float = operand
    symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op]
    for v in values:
        number = _number(v)
        if number is not None and _compare(number, op, limit):
            return True, f"{name} {v} {symbol} {limit:g}"
    return False, f"{shown} is not {symbol} {limit:g}"


def _equal(value: str, wanted: str | float) -> bool:
    if isinstance(wanted, float):
        number = _number(value)
        return number is not None and number == wanted
    return value.upper() == wanted.upper()


def _compare(value: float, op: str, limit: float) -> bool:
    return {"gt": value > limit, "ge": value >= limit, "lt": value < limit,
            "le": value <= limit}[op]


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        reasons = []
        for part in self.parts:
            ok, why = part.evaluate(ds)
            if not ok:
                return False, why
            reasons.append(why)
        return True, "; ".join(reasons)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        reasons = []
        for part in self.parts:
            ok, why = part.evaluate(ds)
            if ok:
                return True, why
            reasons.append(why)
        return False, "; ".join(reasons) if len(reasons) <= 2 else f"{reasons[0]}; ..."


@dataclass(frozen=True)
class Not:
    part: Condition

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        ok, why = self.part.evaluate(ds)
        return not ok, why


def parse_condition(data: Any, path: str) -> Condition:
    """Compile a YAML condition; raise ConfigError naming the key path of any mistake."""
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(path, "a condition is a mapping: {tag: ..., <test>: ...}, "
                          "{all: [...]}, {any: [...]} or {not: {...}}")
    combinators = [k for k in ("all", "any", "not") if k in data]
    if combinators:
        if len(data) != 1:
            raise ConfigError(path, f"{combinators[0]!r} stands alone in its mapping; got "
                              f"keys {', '.join(map(str, data))}")
        key = combinators[0]
        if key == "not":
            return Not(parse_condition(data["not"], f"{path}.not"))
        items = data[key]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{path}.{key}", "must be a non-empty list of conditions")
        parts = tuple(parse_condition(c, f"{path}.{key}[{i}]") for i, c in enumerate(items))
        return AllOf(parts) if key == "all" else AnyOf(parts)
    return _parse_leaf(data, path)


def _parse_leaf(data: Mapping[str, Any], path: str) -> Leaf:
    for key in data:
        if key not in ("tag", "private-creator", *_LEAF_OPS):
            raise ConfigError(f"{path}.{key}", "unknown key (known here: all, any, not, tag, "
                              f"private-creator, {', '.join(_LEAF_OPS)})")
    if "tag" not in data:
        raise ConfigError(f"{path}.tag", "is required")
    tag = TagRef.parse(data["tag"], data.get("private-creator"), path)
    tests = tuple((op, _operand(op, data[op], f"{path}.{op}")) for op in _LEAF_OPS if op in data)
    if not tests:
        raise ConfigError(path, f"names a tag but no test ({', '.join(_LEAF_OPS)})")
    return Leaf(tag, tests)


def _operand(op: str, value: Any, path: str) -> Any:
    if op in ("exists", "missing"):
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false; got {value!r}")
        return value
    if op in _COMPARE_OPS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"must be a number; got {value!r}")
        return float(value)
    if op == "regex":
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string; got {value!r}")
        try:
            return re.compile(value)
        except re.error as exc:
            raise ConfigError(path, f"is not a valid regular expression: {exc}") from exc
    items = value if isinstance(value, list) else [value]
    if op == "equals" and isinstance(value, list):
        raise ConfigError(path, "takes one value (one-of takes a list)")
    if op == "one-of" and not isinstance(value, list):
        raise ConfigError(path, "takes a list (equals takes one value)")
    if not items:
        raise ConfigError(path, "must not be empty")
    scalars: list[str | float] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(where, f"must be a string or a number; got {item!r}")
        scalars.append(float(item) if isinstance(item, int | float) else item.strip())
    if op == "contains-token":
        phrases = tuple(words(str(s)) for s in scalars)
        if not all(phrases):
            raise ConfigError(path, "a token must contain a letter or a digit")
        return phrases
    return tuple(scalars)


Action = Literal["accept", "reject", "select", "exclude"]


@dataclass(frozen=True)
class Rule:
    """One named rule: when its condition matches, its action decides."""

    name: str
    action: Action
    when: Condition
    reason: str = ""  # optional words of the site's own, put before the computed reason

    def evaluate(self, ds: Dataset) -> tuple[bool, str]:
        ok, why = self.when.evaluate(ds)
        return ok, f"{self.reason}: {why}" if self.reason and ok else why


def parse_rules(data: Any, path: str, actions: tuple[Action, Action]) -> tuple[Rule, ...]:
    """A list of rules, each ``{name: ..., <action>: <condition>, reason: ...}``."""
    if not isinstance(data, list):
        raise ConfigError(path, f"must be a list of rules; got {type(data).__name__}")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, "a rule is a mapping: {name: ..., "
                              f"{actions[0]}|{actions[1]}: <condition>}}")
        for key in item:
            if key not in ("name", "reason", *actions):
                raise ConfigError(f"{where}.{key}", "unknown key (known here: name, reason, "
                                  f"{', '.join(actions)})")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{where}.name", "is required: letters, digits, - _ . "
                              f"(got {name!r})")
        if name in names:
            raise ConfigError(f"{where}.name", f"{name!r} is used by an earlier rule")
        names.add(name)
        given = [a for a in actions if a in item]
        if len(given) != 1:
            raise ConfigError(where, f"needs exactly one of {actions[0]}, {actions[1]}")
        reason = item.get("reason", "")
        if not isinstance(reason, str):
            raise ConfigError(f"{where}.reason", "must be a string")
        action = given[0]
        rules.append(Rule(name, action, parse_condition(item[action], f"{where}.{action}"),
                          reason))
    return tuple(rules)


def first_match(rules: Sequence[Rule], ds: Dataset) -> tuple[Rule | None, str]:
    """The first rule whose condition ``ds`` matches, and why. When none does: (None, why
    the rules that would have let it through (accept/select) did not match)."""
    misses: list[str] = []
    for rule in rules:
        ok, why = rule.evaluate(ds)
        if ok:
            return rule, why
        if rule.action in ("accept", "select"):
            misses.append(f"{rule.name}: {why}")
    return None, "; ".join(misses) if misses else "no rule matched"
