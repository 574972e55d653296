"""Radiology reports: the reports table and the rule-based anatomy-level sentence parser.

Report text may hold patient information: nothing here logs it or puts it in an error message.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

# Sentence ends: . ! ? ; followed by space and a capital, digit or quote. "3.5 mm" has no space
# after its dot, so numbers stay whole; CT-RATE's "window; Aeration" splits at the semicolon.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9\"'(])")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")

# Section headings: a heading word and a colon, or the word alone on its line. The body of a report
# (what can hold findings) starts at the first one. Only a capitalised heading or one at a line start
# counts, so that "... the following findings: ..." inside a sentence is no heading.
_HEADING = re.compile(
    r"\b(?P<word>(?:findings?|impressions?|conclusions?|opinion)(?:[ \t]+(?:and|&)[ \t]+"
    r"(?:findings?|impressions?|conclusions?))?)(?:[ \t]*(?P<colon>:)|[ \t]*(?=\n|$))",
    re.IGNORECASE,
)
# A `Key: value` field at the start of a line or sentence: a key of at most four words (letters, no
# digits, so "11.05.2020:" and "10:30" are no keys) and a colon followed by a space or the end. A key
# does not start like a sentence does: CT-RATE writes "In the lung parenchyma examination: no ...".
_FIELD = re.compile(r"\s*(?P<key>[A-Za-z][A-Za-z/&()'#\- ]{0,40}?)[ \t]*:(?=\s|$)")
_FIELD_WORDS = 4
_SENTENCE_STARTS = frozenset("a an the in on at of for from with within as when while it this there and or".split())
# Words of header keys: who the patient is, who asked and read, which exam and why. A field whose key
# holds one is a header line wherever it stands; organ fields inside the findings ("Lungs: clear.",
# "Heart and pericardium: normal.") hold none and stay.
HEADER_KEY_WORDS = frozenset(
    """patient patients name names mrn dob birth birthdate born age sex gender id accession acc
    exam examination study procedure date dated time referring referred referral ordering ordered
    requested requesting physician doctor clinician provider consultant location facility hospital
    ward unit history clinical indication indications reason question technique protocol comparison
    comparisons prior priors dictated dictation signed signature verified radiologist reported
    reader read transcribed transcriptionist attending resident cc""".split()
)

# Anatomy -> word-start patterns. Negation needs no special handling: sentences are never split
# inside, so "No pleural effusion" reaches the lung with its "No".
LEXICON: dict[str, list[str]] = {
    "lung": [
        r"lung",
        r"pulmonar",
        r"lobe",
        r"lobar",
        r"bronch",
        r"pleura",
        r"nodul",
        r"emphysem",
        r"atelecta",
        r"consolidat",
        r"ground[- ]glass",
        r"parenchym",
        r"trachea",
        r"alveol",
        r"interstiti",
        r"pneumo",
        r"mosaic attenuation",
        r"fibro",
        r"septal thickening",
        r"infiltrat",
        r"(?<!pericardial )effusion",
    ],
    "heart": [r"heart", r"cardi", r"pericard", r"coronary", r"atri(?:um|al)", r"ventric", r"myocard", r"valv"],
    "esophagus": [r"esophag", r"oesophag", r"hiatal hernia", r"hiatus hernia"],
    "aorta": [r"aort", r"arterial wall calcification", r"atherosc", r"atherom"],
    "liver": [r"liver", r"hepat", r"portal vein", r"periportal"],
    "spleen": [r"splen", r"spleen"],
    "kidney": [r"kidney", r"renal", r"nephr"],
    "pancreas": [r"pancrea"],
    "stomach": [r"stomach", r"gastric", r"gastro"],
    "gallbladder": [r"gallbladder", r"gall bladder", r"cholecyst", r"cholelith", r"bile duct", r"biliary"],
    "bowel": [
        r"bowel",
        r"colon",
        r"colonic",
        r"intestin",
        r"duoden",
        r"ileum",
        r"jejun",
        r"cecum",
        r"rectum",
        r"sigmoid",
        r"diverticul",
    ],
    "bladder": [r"(?<!gall)bladder", r"vesical"],
    "bone": [
        r"bone",
        r"osseous",
        r"vertebra",
        r"spine",
        r"spinal",
        r"rib\b",
        r"ribs\b",
        r"sternum",
        r"clavic",
        r"scapul",
        r"fractur",
        r"lytic",
        r"sclerotic",
        r"osteo",
        r"spondyl",
        r"disc\b",
        r"skelet",
        r"corpus height",
    ],
}


_CSV_LIMIT = threading.Lock()


@contextlib.contextmanager
def _csv_field_limit(at_least: int) -> Iterator[None]:
    """csv's field size limit raised to `at_least` while the block runs, then put back.

    The limit is process-global: set here, around the one read that needs it, and restored, so that
    no other csv reader of the process runs with ours (the lock keeps two of ctray's reads from
    restoring each other's value)."""
    with _CSV_LIMIT:
        old = csv.field_size_limit()
        csv.field_size_limit(max(old, at_least))
        try:
            yield
        finally:
            csv.field_size_limit(old)


@dataclass
class Report:
    """One row of the reports table. `problem` is set (and `text` None) when the row is unusable."""

    text: str | None
    problem: str | None = None
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class ReportTable:
    reports: dict[str, Report]
    """scan id -> report."""
    problems: list[tuple[str, str]]
    """(where, reason) for rows that name no usable scan id (a malformed JSONL line, ...)."""


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, whitespace collapsed (line breaks too: wrapped lines join again)."""
    text = re.sub(r"\s+", " ", text.replace('"', " ")).strip()
    return [s.strip(" ;") for s in _SENTENCE_END.split(text) if s.strip(" ;.")]


def finding_sentences(text: str) -> list[str]:
    """The sentences of a report that can hold findings: its header left out.

    Header lines carry names, record numbers, dates, physicians and the clinical question, none of
    them a finding; left in, they run into the first finding sentence (a one-paragraph report with
    "Patient: ... MRN: ... FINDINGS: The lungs are clear." is one sentence) and reach an anatomy's
    text. Left out: everything before a FINDINGS heading (exam, history, technique, comparison: the
    request, not the findings); everything before another first heading (IMPRESSION, CONCLUSION)
    when it is all `Key: value` lines; and anywhere, a field whose key is a header key
    (`HEADER_KEY_WORDS`: "Electronically signed by: ..."). A field's value runs to the end of its
    line and the wrapped lines after it, or in a one-paragraph report to the end of its sentence (a
    one-paragraph header with no heading after it takes the first finding sentence with it: lost
    rather than stored with a name). Sentences never cross a section heading, nor a line break before
    a capital or a field. A one-paragraph report without headings or header fields (CT-RATE's) gives
    the sentences `split_sentences` gives.
    """
    sentences = []
    for part in _body(text.replace("\r\n", "\n").replace("\r", "\n")):
        for unit in _units(part):
            if not _is_header_field(unit):
                sentences.extend(split_sentences(unit))
    return sentences


def _body(text: str) -> list[str]:
    """The report's sections from the first heading on, without the heading words, and the text
    before that heading unless it is the report's header."""
    headings = [m for m in _HEADING.finditer(text) if _is_heading(text, m)]
    if not headings:
        return [text]
    first = headings[0]
    preamble = text[: first.start()]
    header = first.group("word").lower().startswith("finding") or _is_header_block(preamble)
    ends = [m.start() for m in headings[1:]] + [len(text)]
    return ([] if header else [preamble]) + [text[m.end() : end] for m, end in zip(headings, ends, strict=True)]


def _is_heading(text: str, m: re.Match) -> bool:
    line_start = not text[text.rfind("\n", 0, m.start()) + 1 : m.start()].strip()
    return line_start or (m.group("colon") is not None and m.group("word")[0].isupper())


def _is_header_block(preamble: str) -> bool:
    units = _units(preamble)
    return bool(units) and all(_field_key(u) is not None for u in units)


def _units(part: str) -> list[str]:
    """A part's lines, a line joining the one before when it continues it (a one-line part: its
    sentences)."""
    lines = [line for line in part.split("\n") if line.strip()]
    if len(lines) <= 1:
        return split_sentences(part)
    units: list[str] = []
    for line in lines:
        if units and _continues(units[-1], line):
            units[-1] += "\n" + line
        else:
            units.append(line)
    return units


def _continues(before: str, line: str) -> bool:
    """Whether `line` continues the unit `before`: a value below its key ("MRN:" then the number),
    or wrapped text (no sentence end before, no capital or field after). A header value without a
    full stop ("MRN: 88231907") is thus not continued by the finding on the next line."""
    before = before.rstrip()
    if before.endswith(":"):
        return True
    first = line.lstrip()[:1]
    return not before.endswith((".", "!", "?", ";")) and not first.isupper() and _field_key(line) is None


def _field_key(unit: str) -> str | None:
    m = _FIELD.match(unit)
    words = m.group("key").split() if m else []
    if not words or len(words) > _FIELD_WORDS or words[0].lower() in _SENTENCE_STARTS:
        return None
    return m.group("key") if m else None


def _is_header_field(unit: str) -> bool:
    key = _field_key(unit)
    return key is not None and not HEADER_KEY_WORDS.isdisjoint(re.findall(r"[a-z]+", key.lower()))


def _compile(anatomies: list[str]) -> dict[str, re.Pattern]:
    out = {}
    for anatomy in anatomies:
        words = LEXICON.get(anatomy, [re.escape(anatomy.replace("_", " "))])
        out[anatomy] = re.compile(r"\b(?:" + "|".join(words) + ")", re.IGNORECASE)
    return out


class RuleParser:
    """Report -> {anatomy: [sentences]} by sentence split and an anatomy lexicon.

    Deterministic and offline. A sentence goes to every anatomy it names; sentences naming none
    (lymph nodes, "upper abdominal organs") are left out of the anatomy texts but stay in the
    stored report text, and so do the report's header lines (`finding_sentences`).
    """

    def __init__(self, anatomies: list[str]) -> None:
        self.patterns = _compile(anatomies)

    def __call__(self, text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for sentence in finding_sentences(text):
            for anatomy, pattern in self.patterns.items():
                if pattern.search(sentence):
                    found.setdefault(anatomy, []).append(sentence)
        return found


def _label_value(v: object) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    return None


def _join_text(parts: list[object]) -> str | object | None:
    """Several text columns (Findings, Impressions) -> one report. Each part ends with a full stop
    so that sentences never run across columns. A non-text part is returned as it is (a problem)."""
    texts = []
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, str):
            return part
        part = part.strip()
        if part:
            texts.append(part if part[-1] in ".!?;" else part + ".")
    return " ".join(texts) if texts else ("" if any(p is not None for p in parts) else None)


def _make_report(text: object, labels: dict, max_chars: int | None) -> Report:
    clean_labels = {k: lv for k, v in labels.items() if (lv := _label_value(v)) is not None}
    if text is None:
        return Report(None, "report is missing", clean_labels)
    if not isinstance(text, str):
        return Report(None, f"report is a {type(text).__name__}, not text", clean_labels)
    if max_chars is not None and len(text) > max_chars:
        why = f"report is {len(text):,} characters, over the {max_chars:,} limit (reports.max_chars)"
        return Report(None, why, clean_labels)
    if _BAD_UTF8.search(text):
        return Report(None, "report is not valid UTF-8", clean_labels)
    if not text.strip():
        return Report(None, "report is empty", clean_labels)
    return Report(text, None, clean_labels)


def table_id(value: object) -> str | None:
    """A table's scan id as ctray spells scan ids: stripped, without a NIfTI suffix (CT-RATE's
    VolumeName column holds file names)."""
    if value is None or _BAD_UTF8.search(str(value)):
        return None
    sid = str(value).strip()
    for suffix in (".nii.gz", ".nii"):
        sid = sid.removesuffix(suffix)
    return sid or None


def _rows(raw: bytes, name: str, needed: list[str]) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(where, row) pairs of a CSV or JSONL table (gzip-compressed or not) and the problems of
    lines that are not rows. Errors name the table and columns, never a cell: in a table without a
    header row the 'column names' are the first report."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{name}: not a readable gzip file ({type(e).__name__})") from None
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    base = name.removesuffix(".gz")
    problems: list[tuple[str, str]] = []
    if base.endswith((".jsonl", ".ndjson")):
        rows = []
        # JSON Lines end at "\n" (a "\r" before it is whitespace): str.splitlines would also cut at
        # U+2028, U+0085 and the other breaks a JSON string may hold unescaped, losing the report.
        for n, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((f"{name}:{n}", f"line is not JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                problems.append((f"{name}:{n}", "line is not a JSON object"))
                continue
            rows.append((f"{name}:{n}", obj))
        return rows, problems
    # csv refuses a field over its limit (131,072 characters by default) by failing the whole read.
    # No field is longer than the table, which is in memory already: at that limit an oversized
    # report is read whole and then refused for its own scan alone (reports.max_chars).
    with _csv_field_limit(len(text) + 1):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(
                f"{name}: no column named {', '.join(repr(c) for c in missing)} in its first row of {len(header)}"
                " fields (a CSV needs a header row; set the id/text column names in the config)"
            )
        return [(f"{name}:{n + 2}", row) for n, row in enumerate(reader)], problems


def parse_report_table(
    raw: bytes, name: str, id_column: str, text_columns: list[str], max_chars: int | None = None
) -> ReportTable:
    """Parse a CSV or JSONL reports table (optionally gzip-compressed), judging each row on its own.

    Undecodable bytes are kept as surrogates (errors="surrogateescape") and a report longer than
    `max_chars` (its text columns joined; None: no limit) is refused, so that one bad report
    quarantines its own scan instead of failing the whole table.
    """
    rows, problems = _rows(raw, name, [id_column, *text_columns])
    reports: dict[str, Report] = {}
    for where, row in rows:
        scan_id = table_id(row.get(id_column))
        if scan_id is None:
            problems.append((where, f"row has no usable {id_column!r}"))
            continue
        labels = {k: v for k, v in row.items() if k != id_column and k not in text_columns}
        if scan_id in reports:
            problems.append((where, "a second report for a scan id already in the table; the first is kept"))
            continue
        reports[scan_id] = _make_report(_join_text([row.get(c) for c in text_columns]), labels, max_chars)
    return ReportTable(reports, problems)


def parse_label_table(raw: bytes, name: str, id_column: str) -> tuple[dict[str, dict[str, int]], list[tuple[str, str]]]:
    """A labels table (CT-RATE's multi_abnormality_labels.csv): scan id -> {finding: 0/1}; columns
    that are not 0/1 are ignored."""
    rows, problems = _rows(raw, name, [id_column])
    out: dict[str, dict[str, int]] = {}
    for where, row in rows:
        scan_id = table_id(row.get(id_column))
        if scan_id is None:
            problems.append((where, f"row has no usable {id_column!r}"))
            continue
        out[scan_id] = {k: lv for k, v in row.items() if k != id_column and (lv := _label_value(v)) is not None}
    return out, problems
