"""QIDO-RS and WADO-RS request grammar, as pure functions tested without files.

- ``parse_qido``: query parameters → ``QidoQuery`` (matching keys as keywords or hex tags,
  UID lists, ``includefield``, ``fuzzymatching``, ``limit``/``offset``);
- ``matches`` / ``search``: PS3.4 C.2.2.2 attribute matching over flat records (one
  ``Dataset`` per study, series or instance holding the attributes of its level and above);
- ``response``: the attributes a search answers for one record;
- ``parse_frame_list``, ``negotiate_frames``, ``parse_viewport``: WADO-RS parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from wsi_server.errors import BadRequest

Level = Literal["study", "series", "instance"]
MAX_LIMIT = 10_000
MAX_FRAMES = 512
"""Most frames one WADO-RS frames request may list (a viewer asks for a screenful)."""

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MEDIA_TYPE_OF_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
DEFAULT_SYNTAX_OF_MEDIA_TYPE = {
    "image/jpeg": JPEG_BASELINE,
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "application/octet-stream": EXPLICIT_LE,
}

# PS3.18 Tables 10.6.3-3 to -5: what each level answers by default (plus the UIDs of the
# levels above, which clients use to walk the tree).
DEFAULT_ATTRIBUTES: dict[Level, tuple[str, ...]] = {
    "study": (
        "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
        "InstanceAvailability", "ModalitiesInStudy", "ReferringPhysicianName",
        "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "series": (
        "SpecificCharacterSet", "Modality", "SeriesDescription", "RetrieveURL",
        "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
        "StudyInstanceUID",
    ),
    "instance": (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
        "RetrieveURL", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
        "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID",
    ),
}
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
_LIST_VRS = {"UI", "CS", "AE"}  # comma lists mean "any of" for these
_CASE_INSENSITIVE_VRS = {"PN"}
_RANGE_VRS = {"DA", "TM", "DT"}
_NUMERIC_VRS = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD", "UV", "SV"}


@dataclass(frozen=True)
class Match:
    tag: int
    vr: str
    values: tuple[str, ...]
    """Values to match (any of); ``("",)`` is universal matching."""


@dataclass(frozen=True)
class QidoQuery:
    matches: tuple[Match, ...] = ()
    include: frozenset[int] = frozenset()
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0


def attribute_tag(key: str) -> int:
    """The tag of a query key given as a keyword (``PatientID``) or hex tag (``00100020``)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        tag = int(key, 16)
        try:
            dictionary_VR(tag)
        except KeyError:
            raise BadRequest(f"unknown attribute tag {key}") from None
        return tag
    if "." in key:
        raise BadRequest(f"attribute {key}: matching on sequence items is not supported")
    found = tag_for_keyword(key)
    if found is None:
        raise BadRequest(f"unknown attribute {key!r} (give a DICOM keyword or an 8-digit tag)")
    return int(found)


def _int_param(name: str, raw: str, low: int, high: int) -> int:
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def parse_qido(params: Iterable[tuple[str, str]]) -> QidoQuery:
    """A QIDO-RS query from its parameters (in order, keys may repeat)."""
    values: dict[int, list[str]] = {}
    include: set[int] = set()
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    for key, raw in params:
        if key == "includefield":
            for part in raw.split(","):
                part = part.strip()
                if part == "all":
                    include_all = True
                elif part:
                    include.add(attribute_tag(part))
        elif key == "limit":
            limit = _int_param("limit", raw, 1, MAX_LIMIT)
        elif key == "offset":
            offset = _int_param("offset", raw, 0, 10**9)
        elif key == "fuzzymatching":
            if raw not in ("true", "false"):
                raise BadRequest("fuzzymatching must be true or false")
            fuzzy = raw == "true"
        elif key in _CONTROL:
            continue
        else:
            values.setdefault(attribute_tag(key), []).append(raw)
    matches = []
    for tag, raws in values.items():
        vr = dictionary_VR(tag)
        if vr == "SQ":
            raise BadRequest(f"attribute {keyword_for_tag(tag)}: sequence matching is not "
                             "supported")
        split: list[str] = []
        for raw in raws:
            split += [v.strip() for v in raw.split(",")] if vr in _LIST_VRS else [raw]
        if vr in _RANGE_VRS:
            for v in split:
                _check_range(v, vr)
        matches.append(Match(tag, vr, tuple(split)))
    return QidoQuery(tuple(matches), frozenset(include), include_all, fuzzy, limit, offset)


def _check_range(value: str, vr: str) -> None:
    pattern = {"DA": r"\d{8}", "TM": r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?",
               "DT": r"\d{4,14}(\.\d{1,6})?([+-]\d{4})?"}[vr]
    parts = value.split("-") if vr != "DT" or value.count("-") == 1 else [value]
    if len(parts) <= 2 and all(p == "" or re.fullmatch(pattern, p) for p in parts):
        return
    raise BadRequest(f"malformed {vr} value or range: {value!r}")


def _wildcard(pattern: str, flags: int = 0) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body + r"\Z", flags | re.DOTALL)


def _actual_values(record: Dataset, tag: int) -> list[str]:
    elem = record.get(tag)
    if elem is None or elem.value is None or elem.value == "":
        return []
    value = elem.value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _match_one(wanted: str, actual: str, vr: str, fuzzy: bool) -> bool:
    if vr == "UI":
        return wanted == actual
    if vr in _RANGE_VRS:
        if "-" in wanted and (vr != "DT" or wanted.count("-") == 1):
            low, high = wanted.split("-", 1)
            key = actual[: max(len(low), len(high))] if vr != "TM" else actual
            return (not low or key >= low) and (not high or key[: len(high)] <= high)
        return actual.startswith(wanted) if vr == "TM" else actual == wanted
    if vr in _NUMERIC_VRS:
        try:
            return float(wanted) == float(actual)
        except ValueError:
            return False
    if vr in _CASE_INSENSITIVE_VRS:
        if _wildcard(wanted, re.IGNORECASE).match(actual):
            return True
        if fuzzy:  # any name component that starts with the given text
            parts = [p for p in re.split(r"[\^= ]", actual) if p]
            word = wanted.rstrip("*").lower()
            return bool(word) and any(p.lower().startswith(word) for p in parts)
        return False
    if "*" in wanted or "?" in wanted:
        return bool(_wildcard(wanted).match(actual))
    return wanted == actual


def matches(record: Dataset, query: QidoQuery) -> bool:
    """Whether a record satisfies every matching key of the query."""
    for m in query.matches:
        if all(v in ("", "*") for v in m.values):
            continue  # universal matching
        actual = _actual_values(record, m.tag)
        if not any(_match_one(w, a, m.vr, query.fuzzy) for w in m.values for a in actual):
            return False
    return True


def search(records: Sequence[Dataset], query: QidoQuery) -> list[Dataset]:
    """The matching records, after ``offset``, at most ``limit``."""
    found = [r for r in records if matches(r, query)]
    end = None if query.limit is None else query.offset + query.limit
    return found[query.offset : end]


def response(record: Dataset, query: QidoQuery, level: Level) -> Dataset:
    """The attributes answered for a matching record: the level's defaults, the matching
    keys, and the included fields (every attribute of the record with ``all``)."""
    if query.include_all:
        return record
    out = Dataset()
    wanted = {int(tag_for_keyword(k) or 0) for k in DEFAULT_ATTRIBUTES[level]}
    wanted |= {m.tag for m in query.matches} | set(query.include)
    for tag in sorted(wanted):
        if tag in record:
            out[tag] = record[tag]
    return out


# -- WADO-RS ----------------------------------------------------------------------------
def parse_frame_list(raw: str, frame_count: int) -> list[int]:
    """1-based frame numbers of a ``{frames}`` path segment, as 0-based indices."""
    parts = raw.split(",")
    if len(parts) > MAX_FRAMES:
        raise BadRequest(f"at most {MAX_FRAMES} frames per request")
    out = []
    for part in parts:
        part = part.strip()
        if not part.isdigit() or len(part) > 9:
            raise BadRequest("frame numbers must be positive integers separated by commas")
        number = int(part)
        if not 1 <= number <= frame_count:
            raise BadRequest(f"frame number {number} is outside 1 to {frame_count}")
        out.append(number - 1)
    return out


@dataclass(frozen=True)
class AcceptItem:
    media_type: str
    params: dict[str, str]
    q: float


def parse_accept(header: str) -> list[AcceptItem]:
    """Accept header entries, by decreasing quality (stable for ties)."""
    items = []
    for chunk in _split_outside_quotes(header, ","):
        fields = _split_outside_quotes(chunk, ";")
        media = fields[0].strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        for f in fields[1:]:
            name, _, value = f.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        items.append(AcceptItem(media, params, q))
    return sorted((i for i in items if i.q > 0), key=lambda i: -i.q)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return out


@dataclass(frozen=True)
class FrameAnswer:
    syntax: str
    part_type: str
    """Content-Type of each part (or of the whole answer when not multipart)."""
    multipart: bool


def negotiate_frames(accept: str, native: str, available: Sequence[str]) -> FrameAnswer | None:
    """What to answer a frames request with, or None (406): the first acceptable entry of
    the Accept header that one of the ``available`` transfer syntaxes satisfies."""
    native_media = MEDIA_TYPE_OF_SYNTAX.get(native, "application/octet-stream")

    def part(syntax: str, media: str) -> str:
        return f"{media}; transfer-syntax={syntax}"

    items = parse_accept(accept) if accept.strip() else []
    if not items:
        return FrameAnswer(native, part(native, "application/octet-stream"), True)
    for item in items:
        multipart = item.media_type == "multipart/related"
        if item.media_type in ("*/*", "multipart/*"):
            return FrameAnswer(native, part(native, native_media), True)
        media = item.params.get("type", "application/octet-stream").lower() if multipart \
            else item.media_type
        asked = item.params.get("transfer-syntax")
        if media in ("*/*", "image/*"):
            if media == "*/*" or native_media.startswith("image/"):
                return FrameAnswer(native, part(native, native_media), multipart)
            continue
        if media == "application/octet-stream":
            if asked == "*":
                return FrameAnswer(native, part(native, media), multipart)
            syntax = asked or EXPLICIT_LE
        else:
            default = DEFAULT_SYNTAX_OF_MEDIA_TYPE.get(media)
            if default is None:
                continue
            syntax = native if asked == "*" else (asked or default)
            if MEDIA_TYPE_OF_SYNTAX.get(syntax) != media:
                continue
        if syntax in available:
            return FrameAnswer(syntax, part(syntax, media), multipart)
    return None


def parse_viewport(raw: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` of a rendered request (the cropping form is not supported)."""
    if raw is None:
        return None
    parts = raw.split(",")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 8192 for p in parts):
        raise BadRequest("viewport must be 'width,height' with each from 1 to 8192")
    return int(parts[0]), int(parts[1])


def rendered_format(accept: str) -> str | None:
    """``jpeg`` or ``png`` for a rendered request's Accept header; None when neither."""
    items = parse_accept(accept) if accept.strip() else []
    if not items:
        return "jpeg"
    for item in items:
        if item.media_type in ("image/jpeg", "image/*", "*/*"):
            return "jpeg"
        if item.media_type == "image/png":
            return "png"
    return None
