"""The report folder: report.md (tables, notes, the figures inline), one PNG per figure,
figures.json (every figure's numbers) and metrics.json (flat metrics, detailed tables, notes and
the config)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray.config import StorageConfig
from ctray.evaluate.plots import Figure
from ctray.storage import filesystem, join, publish_bytes, resolve_uri


@dataclass(frozen=True)
class Part:
    """One section of the report, as each evaluation returns it."""

    title: str
    metrics: dict[str, float] = field(default_factory=dict)
    """Flat name -> value, merged into EvalResult.metrics and metrics.json."""
    markdown: list[str] = field(default_factory=list)
    """The section's lines (tables); figures are appended after them."""
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What was skipped and why (tiny or unlabelled data degrade to notes, not errors)."""
    tables: dict[str, Any] = field(default_factory=dict)
    """Detailed JSON-able results for metrics.json."""


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays as Python ones, NaN and infinities as null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def markdown(header: list[str], parts: list[Part]) -> str:
    lines = list(header)
    for part in parts:
        lines += [f"## {part.title}", "", *part.markdown]
        lines += [line for f in part.figures for line in (f"![{f.title}]({f.name}.png)", "")]
        lines += [f"- {n}" for n in part.notes] + ([""] if part.notes else [])
    return "\n".join(lines)


def write_report(out: str, header: list[str], parts: list[Part], config: dict[str, Any], storage: StorageConfig) -> str:
    """Publish the report folder at `out`; returns the URI of report.md."""
    fs, root = filesystem(out, storage)
    figures = [f for p in parts for f in p.figures]
    files = {f"{f.name}.png": f.png for f in figures}
    files["figures.json"] = _dumps(
        {f.name: {"title": f.title, "file": f"{f.name}.png", "data": f.data} for f in figures}
    )
    files["metrics.json"] = _dumps(
        {
            "metrics": {k: v for p in parts for k, v in p.metrics.items()},
            "tables": {p.title: p.tables for p in parts},
            "notes": [n for p in parts for n in p.notes],
            "config": config,
        }
    )
    files["report.md"] = markdown(header, parts).encode()
    for name, data in files.items():
        publish_bytes(data, fs, join(root, name), storage)
    return join(resolve_uri(out), "report.md")


def _dumps(obj: Any) -> bytes:
    return json.dumps(jsonable(obj), indent=1, allow_nan=False).encode()
