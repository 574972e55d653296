"""Radiology reports: the reports table and the rule-based anatomy-level sentence parser.

Report text may hold patient information: nothing here logs it or puts it in an error message.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field

# Sentence ends: . ! ? ; followed by space and a capital, digit or quote. "3.5 mm" has no space
# after its dot, so numbers stay whole; CT-RATE's "window; Aeration" splits at the semicolon.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9\"'(])")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")

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
    text = re.sub(r"\s+", " ", text.replace('"', " ")).strip()
    return [s.strip(" ;") for s in _SENTENCE_END.split(text) if s.strip(" ;.")]


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
    stored report text.
    """

    def __init__(self, anatomies: list[str]) -> None:
        self.patterns = _compile(anatomies)

    def __call__(self, text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for sentence in split_sentences(text):
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


def _make_report(text: object, labels: dict) -> Report:
    clean_labels = {k: lv for k, v in labels.items() if (lv := _label_value(v)) is not None}
    if text is None:
        return Report(None, "report is missing", clean_labels)
    if not isinstance(text, str):
        return Report(None, f"report is a {type(text).__name__}, not text", clean_labels)
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
        for n, line in enumerate(text.splitlines(), 1):
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
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(
            f"{name}: no column named {', '.join(repr(c) for c in missing)} in its first row of {len(header)} fields "
            "(a CSV needs a header row; set the id/text column names in the config)"
        )
    return [(f"{name}:{n + 2}", row) for n, row in enumerate(reader)], problems


def parse_report_table(raw: bytes, name: str, id_column: str, text_columns: list[str]) -> ReportTable:
    """Parse a CSV or JSONL reports table (optionally gzip-compressed), judging each row on its own.

    Undecodable bytes are kept as surrogates (errors="surrogateescape") so that one bad report
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
        reports[scan_id] = _make_report(_join_text([row.get(c) for c in text_columns]), labels)
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
