"""`ctray eval`: zero-shot (CLIP-type embeddings), linear probe and kNN, retrieval and the anatomy
map over an embeddings folder, written as one report. Each evaluation is a function of the
embeddings returning a report Part; run_eval loads, runs them and publishes the folder."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.evaluate.bootstrap import group_resample_weights, mean_intervals, nanmean, zero_shot_intervals
from ctray.evaluate.config import EvalReportConfig, ZeroShotConfig
from ctray.evaluate.embeddings import Embeddings, load_embeddings, require_labels
from ctray.evaluate.plots import label_efficiency, roc_curves, similarity_histogram, tsne_map
from ctray.evaluate.probe import KINDS, SCORES, ProbeRow, ProbeTask, probe_tasks, run_probes
from ctray.evaluate.report import Part, fmt, table, write_report
from ctray.evaluate.retrieval import gallery_retrieval, label_overlap_at_k, precision_at_k, text_to_scan_ranks
from ctray.evaluate.thresholds import apply_protocol
from ctray.evaluate.zeroshot import (
    METRICS,
    TASKS,
    AnatomyScans,
    ItemScores,
    Prompts,
    TextTower,
    cross_anatomy_similarity,
    template_rows,
    template_summary,
    zero_shot_scores,
)
from ctray.ingest.derived import embedded_shards, record_derived
from ctray.redact import redact_text
from ctray.storage import join

log = logging.getLogger("ctray")

SHORT = {
    "auroc": "AUROC",
    "balanced_accuracy": "bal. acc.",
    "weighted_f1": "weighted F1",
    "sensitivity": "sens.",
    "specificity": "spec.",
    "precision": "prec.",
}

KIND_NAMES = {"linear": "linear probe", "knn": "kNN"}


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    """Flat metric name -> value (also in metrics.json)."""
    report: str
    """URI of report.md."""
    summary: str
    """One line for the console."""
    export: str
    """URI of the export whose embeddings these are."""
    export_step: int
    """Its step (-1: not recorded)."""


TowerLoader = Callable[[str, StorageConfig], TextTower]
"""An export's URI -> its text tower: ctray.export.load_encoder, or a stand-in in tests. Passed in
because this package sits beneath the recipes and the export that rebuilds them."""


def run_eval(cfg: EvalReportConfig, load_tower: TowerLoader | None = None) -> EvalResult:
    """Evaluate the embeddings folder cfg.embeddings and publish the report to cfg.out. Zero-shot
    applies to CLIP-type embeddings (those with text embeddings) only, and needs the text tower of
    the export embed.json names: `load_tower` loads it."""
    emb = load_embeddings(cfg.embeddings, cfg.storage)
    require_labels(emb)
    held_out = held_out_status(emb, cfg.storage)
    if held_out.startswith("no"):
        log.warning("eval: %s", held_out)
    if not emb.embedded.all():
        log.warning("eval: %d scan(s) have a zero embedding (no anatomy in the image): left out", (~emb.embedded).sum())
    parts = []
    if emb.text_embedding is not None:
        if load_tower is None:
            raise ConfigError(f"{emb.uri} holds text embeddings: zero-shot needs the export's text tower (load_tower)")
        parts.append(zero_shot_part(emb, cfg, load_tower(emb.export, cfg.storage)))
    parts += [probe_part(emb, cfg), retrieval_part(emb, cfg), map_part(emb, cfg)]
    out = cfg.out or join(cfg.embeddings, "report")
    report = write_report(out, _header(emb, cfg, held_out), parts, cfg.model_dump(mode="json"), cfg.storage)
    if emb.shards:  # its figures were computed with these scans: a purge of one of them must find it
        record_derived(emb.shards, cfg.storage, "evaluation", out, embedded_shards(emb.uri, cfg.storage))
    metrics = {"eval_scans": float(len(emb.scan_ids)), **{k: v for p in parts for k, v in p.metrics.items()}}
    summary = _summary(emb, metrics, cfg, report)
    log.info("%s", summary)
    return EvalResult(metrics, report, summary, emb.export, emb.export_step)


def held_out_status(emb: Embeddings, storage: StorageConfig) -> str:
    """One line: whether the embedded shards are the ones the export trained on (export.json's
    trained_on against embed.json's shards). "no: ..." when they are."""
    from ctray.models.pretrained import META
    from ctray.storage import filesystem, read_bytes

    try:
        fs, root = filesystem(emb.export, storage)
        trained_on = json.loads(read_bytes(fs, posixpath.join(root, META), storage)).get("trained_on")
    except (FileNotFoundError, ValueError, ConfigError):
        return "unknown (the export is not readable here)"
    if not trained_on:
        return "unknown (the export records no training shards: synthetic data or an older ctray)"
    if emb.shards and redact_text(emb.shards.rstrip("/")) == str(trained_on["shards"]).rstrip("/"):
        return (
            f"no: these are embeddings of the shards the model trained on ({trained_on['shards']}): the figures are "
            "not held-out; embed a held-out shard set (README: Use what was pretrained)"
        )
    return f"yes (trained on {trained_on['shards']}, {trained_on['scans']} scans; these embed {emb.shards or '?'})"


def _header(emb: Embeddings, cfg: EvalReportConfig, held_out: str) -> list[str]:
    known = (emb.finding_labels >= 0).any(1).sum()
    return [
        f"# Evaluation of {emb.objective} embeddings",
        "",
        f"- embeddings: `{emb.uri}` (export `{emb.export}`)",
        f"- held-out: {held_out}",
        f"- {len(emb.scan_ids)} scans of {len(set(emb.groups))} groups ({known} with finding labels), {emb.dim} "
        f"dimensions, {len(emb.findings)} findings, {len(emb.anatomies)} anatomies",
        *_coverage(emb),
        f"- seed {cfg.seed}; {cfg.bootstrap} bootstrap resamples, {cfg.ci:.0%} percentile intervals",
        "",
    ]


def _coverage(emb: Embeddings) -> list[str]:
    """How many scans show each anatomy, and the scans with no embedding at all (left out of the
    probes and retrieval rather than entering them as zero vectors)."""
    lines = []
    if emb.region is not None:
        shown = ", ".join(f"{a} {int(emb.region[:, j].sum())}" for j, a in enumerate(emb.anatomies))
        lines.append(f"- scans showing each anatomy (of {len(emb.scan_ids)}): {shown}")
    empty = int((~emb.embedded).sum())
    if empty:
        lines.append(
            f"- {empty} scan(s) with no anatomy in the image (a zero embedding): left out of probes and retrieval"
        )
    return lines


def _summary(emb: Embeddings, m: dict[str, float], cfg: EvalReportConfig, report: str) -> str:
    bits = []
    if "zs_finding_auroc_mean" in m:
        ci = f" [{fmt(m['zs_finding_auroc_ci_low'])}, {fmt(m['zs_finding_auroc_ci_high'])}]" if cfg.bootstrap else ""
        bits.append(
            f"zero-shot finding AUROC {fmt(m['zs_finding_auroc_mean'])} ± {fmt(m['zs_finding_auroc_std'])}{ci}, "
            f"anatomy {fmt(m['zs_anatomy_auroc_mean'])}"
        )
    bits.append(
        f"probe finding AUROC linear {fmt(m.get('probe_linear_finding_auroc', float('nan')))}, "
        f"kNN {fmt(m.get('probe_knn_finding_auroc', float('nan')))}"
    )
    k = cfg.retrieval.k[0]
    bits.append(f"P@{k} {fmt(m.get(f'retrieval_finding_p@{k}', float('nan')))}")
    if f"text_to_scan_r@{k}" in m:
        bits.append(f"text-to-scan R@{k} {fmt(m[f'text_to_scan_r@{k}'])}")
    return f"eval {emb.objective} ({len(emb.scan_ids)} scans): " + "; ".join(bits) + f"; report {report}"


# Zero-shot ---------------------------------------------------------------------------------------


def zero_shot_part(emb: Embeddings, cfg: EvalReportConfig, tower: TextTower) -> Part:
    """The papers' zero-shot metrics per item and macro, mean ± std over templates, with bootstrap
    CIs of the template mean; ROC curves and the text-similarity histogram."""
    assert emb.anatomy_embedding is not None and emb.region is not None and emb.abnormal is not None
    assert emb.text_embedding is not None and emb.present is not None
    dt = int(tower.embed_texts(["a"]).shape[-1])
    if dt != emb.dim:
        raise ConfigError(
            f"the text tower embeds in {dt} dimensions, the embeddings of {emb.uri} have {emb.dim}: "
            "they come from different exports"
        )
    zs = cfg.zero_shot.model_copy(update={"findings": {**cfg.zero_shot.findings, **emb.finding_anatomies}})
    log.info("eval: zero-shot over %d templates, %d bootstrap resamples", len(zs.templates), cfg.bootstrap)
    items, protocol = apply_protocol(
        embeddings_zero_shot(emb, zs, tower), cfg.threshold, emb.group_index, cfg.validation_fraction, cfg.seed
    )
    rows = template_rows(items)
    metrics = template_summary(rows)
    intervals = (
        zero_shot_intervals(items, group_resample_weights(emb.group_index, cfg.bootstrap, cfg.seed), cfg.ci)
        if cfg.bootstrap
        else {}
    )
    per_item = _item_metrics(items, intervals)
    for task, by_item in intervals.items():
        for m, (lo, hi) in by_item["macro"].items():
            metrics[f"zs_{task}_{m}_ci_low"], metrics[f"zs_{task}_{m}_ci_high"] = lo, hi
    present = emb.present
    sims = cross_anatomy_similarity(torch.from_numpy(emb.text_embedding[present]), np.nonzero(present)[1])
    metrics["text_cos_mean"] = float(sims.mean()) if len(sims) else float("nan")
    metrics["text_cos_std"] = float(sims.std()) if len(sims) else float("nan")
    figures = [roc_curves(items)] if any(it.scorable for it in items) else []
    figures.append(similarity_histogram(sims, "text embeddings of different anatomies"))
    return Part(
        "Zero-shot",
        {**metrics, **{k: v for row in per_item for k, v in row["metrics"].items()}},
        [protocol, "", *_zero_shot_tables(metrics, per_item, len(zs.templates), cfg)],
        figures,
        _zero_shot_notes(emb, zs.findings, items, len(zs.templates)),
        {
            "per_template": rows,
            "items": per_item,
            "templates": [list(t) for t in zs.templates],
            "threshold": cfg.threshold,
            "protocol": protocol,
        },
    )


def embeddings_zero_shot(emb: Embeddings, zs: ZeroShotConfig, tower: TextTower) -> list[ItemScores]:
    """The zero-shot items of an embeddings folder (anatomy embeddings) scored with the tower's
    prompts, before any threshold protocol."""
    assert emb.anatomy_embedding is not None and emb.region is not None and emb.abnormal is not None
    scans = AnatomyScans(
        torch.from_numpy(emb.anatomy_embedding),
        emb.region,
        emb.finding_labels,
        emb.findings,
        emb.abnormal,
        emb.anatomies,
    )
    prompts = Prompts(lambda t: tower.embed_texts(t).detach().float().cpu(), 1.0 / float(tower.temperature))
    return zero_shot_scores(scans, prompts, zs)


def _item_metrics(items: list[ItemScores], intervals: dict) -> list[dict]:
    """Each scorable item: its n, positives and zs_<task>.<item>.<metric>_{mean,std,ci_low,ci_high}."""
    out = []
    for it in (it for it in items if it.scorable):
        values = it.per_template()
        flat = {}
        for m in METRICS:
            key = f"zs_{it.task}.{it.item}.{m}"
            flat[f"{key}_mean"], flat[f"{key}_std"] = float(values[m].mean()), float(values[m].std())
            if intervals:
                flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = intervals[it.task][it.item][m]
        out.append(
            {
                "task": it.task,
                "item": it.item,
                "anatomy": it.anatomy,
                "n": len(it.labels),
                "positives": int(it.labels.sum()),
                "metrics": flat,
            }
        )
    return out


def _ci(m: dict[str, float], key: str) -> str:
    return f"[{fmt(m[f'{key}_ci_low'])}, {fmt(m[f'{key}_ci_high'])}]" if f"{key}_ci_low" in m else "-"


def _zero_shot_tables(
    metrics: dict[str, float], per_item: list[dict], templates: int, cfg: EvalReportConfig
) -> list[str]:
    ci = f"{cfg.ci:.0%} CI"
    macro = [
        [
            task,
            SHORT[m],
            f"{fmt(metrics[f'zs_{task}_{m}_mean'])} ± {fmt(metrics[f'zs_{task}_{m}_std'])}",
            _ci(metrics, f"zs_{task}_{m}"),
        ]
        for task in TASKS
        for m in METRICS
        if f"zs_{task}_{m}_mean" in metrics and np.isfinite(metrics[f"zs_{task}_{m}_mean"])
    ]
    lines = [
        f"Logit margin of the present vs absent prompt, over the labelled scans showing the item's anatomy; "
        f"macro over items, mean ± std over {templates} templates; {ci} of the template mean by bootstrap over "
        "groups (patients).",
        "",
        *table(["task", "metric", "mean ± std", ci], macro),
    ]
    rows = []
    for r in per_item:
        fm = r["metrics"]
        key = f"zs_{r['task']}.{r['item']}"
        cells = [f"{fmt(fm[f'{key}.{m}_mean'])} ± {fmt(fm[f'{key}.{m}_std'])}" for m in METRICS]
        rows.append([r["task"], r["item"], r["anatomy"], f"{r['positives']}/{r['n']}", *cells, _ci(fm, f"{key}.auroc")])
    head = ["task", "item", "anatomy", "pos/n", *(SHORT[m] for m in METRICS), f"AUROC {ci}"]
    return lines + table(head, rows)


def _zero_shot_notes(emb: Embeddings, findings: dict[str, str], items: list[ItemScores], templates: int) -> list[str]:
    notes = [f"only {templates} prompt templates: the papers average over >= 5"] if templates < 5 else []
    notes += [
        f"zero-shot: finding {f} has no anatomy among {emb.anatomies} (embed.json finding_anatomies or "
        "zero_shot.findings); not scored"
        for f in emb.findings
        if findings.get(f) not in emb.anatomies
    ]
    notes += [
        f"zero-shot {it.task} {it.item}: {int(it.labels.sum())} positive of {len(it.labels)} scans; one class, skipped"
        for it in items
        if not it.scorable
    ]
    return notes


# Probes ------------------------------------------------------------------------------------------


def probe_part(emb: Embeddings, cfg: EvalReportConfig) -> Part:
    """Linear probe and kNN per label, cross-validated, at every labelled fraction."""
    tasks = probe_tasks(emb)
    rows, notes = run_probes(tasks, cfg.probe, cfg.seed, cfg.bootstrap, cfg.ci)
    fractions = cfg.probe.labelled_fractions
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for kind in KINDS:
        for family in ("finding", "anatomy"):
            mine = [r for r in rows if r.kind == kind and r.family == family]
            if mine:
                metrics |= _probe_metrics(f"probe_{kind}_{family}", mine, fractions)
                curves[f"{KIND_NAMES[kind]}, {family}"] = [
                    metrics[f"probe_{kind}_{family}_auroc@{f:g}"] for f in fractions
                ]
    lines = [
        f"Stratified group k-fold CV over {len(set(emb.groups))} groups of {len(emb.groups)} scans (a group's "
        "scans in one fold; k capped to the groups of the minority class); logistic regression on standardised "
        f"features with C in {cfg.probe.cs} chosen inside each training fold by AUROC, distance-weighted kNN "
        f"(k = {cfg.probe.knn_k}, cosine); training folds at labelled fraction {fractions[-1]:g}; mean ± std "
        "over the folds"
        + (
            f"; [{cfg.ci:.0%} interval] of the pooled out-of-fold AUROC over {cfg.bootstrap} resamples of the groups"
            if cfg.bootstrap
            else ""
        )
        + "; chance AUROC 0.5, balanced accuracy 0.5.",
        "",
        *_probe_table(tasks, [r for r in rows if r.fraction == fractions[-1]]),
    ]
    figures = [label_efficiency(fractions, curves, "AUROC")] if curves else []
    return Part("Linear probe and kNN", metrics, lines, figures, notes, {"rows": [asdict(r) for r in rows]})


def _probe_metrics(prefix: str, rows: list[ProbeRow], fractions: list[float]) -> dict[str, float]:
    """<prefix>_<score>@<fraction> macro over labels, <prefix>_<score> at the largest fraction, and
    <prefix>.<label>.<score> there."""
    out = {}
    for f in fractions:
        for s in SCORES:
            out[f"{prefix}_{s}@{f:g}"] = float(nanmean(np.array([getattr(r, s) for r in rows if r.fraction == f]), 0))
    for s in SCORES:
        out[f"{prefix}_{s}"] = out[f"{prefix}_{s}@{fractions[-1]:g}"]
        out |= {f"{prefix}.{r.name}.{s}": getattr(r, s) for r in rows if r.fraction == fractions[-1]}
        out |= {f"{prefix}.{r.name}.{s}_std": getattr(r, f"{s}_std") for r in rows if r.fraction == fractions[-1]}
    for r in rows:
        if r.fraction == fractions[-1] and np.isfinite(r.auroc_ci).all():
            out[f"{prefix}.{r.name}.auroc_ci_low"], out[f"{prefix}.{r.name}.auroc_ci_high"] = r.auroc_ci
    return out


def _probe_table(tasks: list[ProbeTask], rows: list[ProbeRow]) -> list[str]:
    size = {(t.family, t.name): f"{int(t.y.sum())}/{len(t.y)}" for t in tasks}
    cells: dict[tuple[str, str], list[str]] = {}
    for r in sorted(rows, key=lambda r: KINDS.index(r.kind)):  # linear's columns first
        cells.setdefault((r.family, r.name), [str(r.folds)]).extend(
            [
                f"{fmt(r.auroc)} ± {fmt(r.auroc_std)}"
                + (f" [{fmt(r.auroc_ci[0])}, {fmt(r.auroc_ci[1])}]" if np.isfinite(r.auroc_ci).all() else ""),
                f"{fmt(r.balanced_accuracy)} ± {fmt(r.balanced_accuracy_std)}",
            ]
        )
    head = [
        "family",
        "label",
        "pos/n",
        "folds",
        *(f"{KIND_NAMES[k]} {s}" for k in KINDS for s in ("AUROC", "bal. acc.")),
    ]
    return table(head, [[fam, name, size[fam, name], *c] for (fam, name), c in cells.items()])


# Retrieval ---------------------------------------------------------------------------------------


Items = dict[str, tuple[np.ndarray, np.ndarray]]
"""Item name -> (the evaluation scan of each query, the query's value): what mean_intervals resamples."""


@dataclass
class _Scored:
    """A retrieval part's figures as they are computed: metrics, and for each macro figure its
    interval over resampled groups."""

    cfg: EvalReportConfig
    weights: np.ndarray | None
    """(B, S) group-bootstrap multiplicities of the evaluation scans; None: no intervals."""
    metrics: dict[str, float]

    def add(self, key: str, items: Items, per_item: str | None = None) -> None:
        """metrics[key]: the macro over items of their query means, with key_ci_low/high; per_item:
        also metrics[per_item.format(item)] for each item."""
        means = _item_means(items)
        self.metrics[key] = _macro_of(items)
        if per_item:
            self.metrics |= {per_item.format(name): m for name, m in means.items()}
        if self.weights is not None and items:
            _, (lo, hi) = mean_intervals(items, self.weights, self.cfg.ci)
            self.metrics[f"{key}_ci_low"], self.metrics[f"{key}_ci_high"] = lo, hi

    def cell(self, key: str, chance: bool = False) -> str:
        """The figure, its interval when there is one, and its chance level when asked."""
        out = fmt(self.metrics.get(key, float("nan")))
        if f"{key}_ci_low" in self.metrics:
            out += f" [{fmt(self.metrics[f'{key}_ci_low'])}, {fmt(self.metrics[f'{key}_ci_high'])}]"
        if chance:
            out += f" (chance {fmt(self.metrics.get(f'{key}_chance', float('nan')))})"
        return out


def retrieval_part(emb: Embeddings, cfg: EvalReportConfig) -> Part:
    """Scan-to-scan retrieval under the three protocols of ctray.evaluate.retrieval, and text-to-scan
    recall@k for CLIP-type embeddings; every macro figure with its interval over resampled groups."""
    weights = group_resample_weights(emb.group_index, cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
    scored = _Scored(cfg, weights, {})
    notes: list[str] = []
    tables: dict = {}
    ci = f"; [{cfg.ci:.0%} interval] over {cfg.bootstrap} resamples of the query groups" if cfg.bootstrap else ""
    lines = [
        f"Scan-to-scan retrieval by cosine similarity, macro over the findings (each finding's positive scans "
        f"query){ci}. A query's own group (its patient's other scans) is never in its gallery; chance is what a "
        "random ranking scores.",
        "",
    ]
    lines += _leave_group_out(emb, cfg, scored, notes, tables)
    lines += _ctfm_protocol(emb, cfg, scored, notes, tables)
    lines += _ctclip_protocol(emb, cfg, scored, notes)
    if emb.text_embedding is not None and emb.present is not None:
        lines += _text_to_scan(emb, cfg, scored, tables)
    return Part("Retrieval", scored.metrics, lines, [], notes, tables)


def _finding_queries(emb: Embeddings, c: int) -> np.ndarray:
    """The scans labelled for finding c that have an embedding."""
    return np.flatnonzero((emb.finding_labels[:, c] >= 0) & emb.embedded)


def _leave_group_out(
    emb: Embeddings, cfg: EvalReportConfig, scored: _Scored, notes: list[str], tables: dict
) -> list[str]:
    """Precision@k of each finding's positive scans against the rest of the evaluation set, and of
    anatomy embeddings retrieving their own anatomy."""
    ks, groups = cfg.retrieval.k, emb.group_index
    per: dict[int, Items] = {k: {} for k in ks}
    chance: dict[int, Items] = {k: {} for k in ks}
    for c, f in enumerate(emb.findings):
        ok = _finding_queries(emb, c)
        y = emb.finding_labels[ok, c].astype(int)
        if y.sum() == 0 or y.sum() == len(y):
            notes.append(f"retrieval by {f}: {int(y.sum())} positive of {len(y)} labelled scans; skipped")
            continue
        for k in ks:
            p, pc = precision_at_k(emb.embedding[ok], y, k, y == 1, groups[ok])
            per[k][f], chance[k][f] = (ok[y == 1], p), (ok[y == 1], pc)
    for k in ks:
        scored.add(f"retrieval_finding_p@{k}", per[k], f"retrieval_finding.{{}}.p@{k}")
        scored.metrics[f"retrieval_finding_p@{k}_chance"] = _macro_of(chance[k])
        scored.metrics |= {f"retrieval_finding.{f}.p@{k}_chance": float(v.mean()) for f, (_, v) in chance[k].items()}
    findings = list(per[ks[0]])
    body = [[f, *(scored.cell(f"retrieval_finding.{f}.p@{k}", chance=True) for k in ks)] for f in findings]
    body.append(["macro", *(scored.cell(f"retrieval_finding_p@{k}", chance=True) for k in ks)])
    if emb.anatomy_embedding is not None and emb.region is not None:
        scan, anatomy = np.nonzero(emb.region)
        x = emb.anatomy_embedding[scan, anatomy]
        for k in ks:
            p, pc = precision_at_k(x, anatomy, k, np.ones(len(x), bool), groups[scan])
            scored.add(f"retrieval_anatomy_p@{k}", {"anatomy": (scan, p)})
            scored.metrics[f"retrieval_anatomy_p@{k}_chance"] = float(pc.mean()) if len(pc) else float("nan")
        body.append(["same anatomy", *(scored.cell(f"retrieval_anatomy_p@{k}", chance=True) for k in ks)])
    tables["leave_group_out"] = {f: {k: scored.metrics[f"retrieval_finding.{f}.p@{k}"] for k in ks} for f in findings}
    return [
        "**Leave one group out** (every query against the rest of the evaluation set): precision@k.",
        "",
        *table(["query", *(f"P@{k}" for k in ks)], body),
    ]


def _item_means(items: Items) -> dict[str, float]:
    """Each item's mean over its queries (NaN without queries)."""
    return {name: float(v.mean()) if len(v) else float("nan") for name, (_, v) in items.items()}


def _macro_of(items: Items) -> float:
    """The mean over the items of their query means (NaN without any)."""
    return float(nanmean(np.array(list(_item_means(items).values()) or [np.nan]), 0))


@dataclass(frozen=True)
class _Side:
    """One side of CT-FM's protocol: scans as arrays, groups numbered across both sides."""

    scans: np.ndarray
    """Indices into the evaluation set (query side; the gallery's when it is the evaluation set)."""
    x: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    anatomy_x: np.ndarray | None
    region: np.ndarray | None


def _ctfm_sides(emb: Embeddings, cfg: EvalReportConfig) -> tuple[_Side, _Side, str]:
    """(queries, gallery, where the gallery comes from): the evaluation set against cfg.retrieval.gallery
    (findings aligned by name), or a seeded split of the evaluation set's groups."""
    if cfg.retrieval.gallery is None:
        n_groups = int(emb.group_index.max()) + 1
        size = min(max(1, round(cfg.retrieval.gallery_fraction * n_groups)), n_groups - 1)
        in_gallery = np.isin(emb.group_index, np.random.default_rng(cfg.seed).permutation(n_groups)[:size])
        sides = []
        for mask in (~in_gallery, in_gallery):
            rows = np.flatnonzero(mask)
            sides.append(
                _Side(
                    rows,
                    emb.embedding[rows],
                    emb.finding_labels[rows],
                    emb.group_index[rows],
                    None if emb.anatomy_embedding is None else emb.anatomy_embedding[rows],
                    None if emb.region is None else emb.region[rows],
                )
            )
        where = f"{size} of {n_groups} groups of the evaluation set (drawn with seed {cfg.seed}), queried by the rest"
        return sides[0], sides[1], where
    gal = load_embeddings(cfg.retrieval.gallery, cfg.storage)
    if gal.dim != emb.dim:
        raise ConfigError(f"retrieval.gallery {gal.uri}: {gal.dim}-d embeddings, the evaluation set's are {emb.dim}-d")
    numbered = np.unique(np.asarray(emb.groups + gal.groups, dtype=object), return_inverse=True)[1]
    columns = [gal.findings.index(f) if f in gal.findings else -1 for f in emb.findings]
    labels = np.where(np.array(columns) >= 0, gal.finding_labels[:, np.maximum(columns, 0)], -1).astype(np.int8)
    anatomies = gal.anatomies == emb.anatomies
    queries = _Side(
        np.arange(len(emb.scan_ids)),
        emb.embedding,
        emb.finding_labels,
        numbered[: len(emb.groups)],
        emb.anatomy_embedding,
        emb.region,
    )
    embedded = np.flatnonzero(gal.embedded)
    gallery = _Side(
        embedded,
        gal.embedding[embedded],
        labels[embedded],
        numbered[len(emb.groups) :][embedded],
        gal.anatomy_embedding[embedded] if anatomies and gal.anatomy_embedding is not None else None,
        gal.region[embedded] if anatomies and gal.region is not None else None,
    )
    return queries, gallery, f"the {len(embedded)} embedded scans of {redact_text(gal.uri)}"


def _ctfm_protocol(
    emb: Embeddings, cfg: EvalReportConfig, scored: _Scored, notes: list[str], tables: dict
) -> list[str]:
    """CT-FM's content-based retrieval: test queries against a gallery of other scans, P/AP/HR@k by
    finding (positive queries; a positive gallery scan matches) and by anatomy (a query anatomy
    matches the same anatomy, as CT-FM's OrganMNIST3D organ retrieval)."""
    q, g, where = _ctfm_sides(emb, cfg)
    ks = cfg.retrieval.k
    stats = ("p", "ap", "hr")
    per: dict[tuple[str, int], Items] = {(m, k): {} for m in (*stats, "chance") for k in ks}
    for c, f in enumerate(emb.findings):
        qrows = np.flatnonzero((q.labels[:, c] == 1) & (np.linalg.norm(q.x, axis=1) > 0))
        grows = np.flatnonzero(g.labels[:, c] >= 0)
        g_y = g.labels[grows, c]
        if not len(qrows) or g_y.sum() == 0:
            notes.append(
                f"CT-FM retrieval by {f}: {len(qrows)} positive queries, "
                f"{int(g_y.sum())} positive gallery scans; skipped"
            )
            continue
        for k in ks:
            r = gallery_retrieval(q.x[qrows], np.ones(len(qrows)), q.groups[qrows], g.x[grows], g_y, g.groups[grows], k)
            for m in (*stats, "chance"):
                per[m, k][f] = (q.scans[qrows], r[m])
    for k in ks:
        for m in stats:
            scored.add(f"retrieval_ctfm_finding_{m}@{k}", per[m, k], f"retrieval_ctfm_finding.{{}}.{m}@{k}")
        scored.metrics[f"retrieval_ctfm_finding_p@{k}_chance"] = _macro_of(per["chance", k])
    families = ["finding"]
    if q.anatomy_x is not None and q.region is not None and g.anatomy_x is not None and g.region is not None:
        families.append("anatomy")
        qs, qa = np.nonzero(q.region)
        gs, ga = np.nonzero(g.region)
        for k in ks:
            r = gallery_retrieval(q.anatomy_x[qs, qa], qa, q.groups[qs], g.anatomy_x[gs, ga], ga, g.groups[gs], k)
            for m in stats:
                scored.add(f"retrieval_ctfm_anatomy_{m}@{k}", {"anatomy": (q.scans[qs], r[m])})
            scored.metrics[f"retrieval_ctfm_anatomy_p@{k}_chance"] = float(r["chance"].mean()) if len(qs) else np.nan
    body = [
        [f"{m.upper()}@{k}", *(scored.cell(f"retrieval_ctfm_{fam}_{m}@{k}", chance=m == "p") for fam in families)]
        for k in ks
        for m in stats
    ]
    head = ["figure", *(f"by {fam}" for fam in families)]
    tables["ctfm"] = {"gallery": where, "queries": len(q.scans)}
    return [
        f"**CT-FM's protocol** (test queries against a gallery: {where}): precision, average precision and hit "
        "rate at k.",
        "",
        *table(head, body),
    ]


def _ctclip_protocol(emb: Embeddings, cfg: EvalReportConfig, scored: _Scored, notes: list[str]) -> list[str]:
    """CT-CLIP's volume-to-volume retrieval: the label overlap of each scan's top k among the scans
    with a positive finding."""
    ok = np.flatnonzero(emb.embedded)
    body = []
    for k in cfg.retrieval.overlap_k:
        rows, overlap, chance = label_overlap_at_k(emb.embedding[ok], emb.finding_labels[ok], emb.group_index[ok], k)
        if not len(rows):
            notes.append(
                f"CT-CLIP retrieval at k={k}: no gallery (no scan with a positive finding outside a query's group)"
            )
            continue
        scored.add(f"retrieval_ctclip_overlap@{k}", {"all": (ok[rows], overlap)})
        scored.metrics[f"retrieval_ctclip_overlap@{k}_chance"] = float(chance.mean())
        body.append([str(k), scored.cell(f"retrieval_ctclip_overlap@{k}", chance=True)])
    return [
        "**CT-CLIP's protocol**: every scan queries the scans with a positive finding; a retrieved scan scores "
        "|both positive| / |positive in either| over the findings, averaged over the top k.",
        "",
        *table(["k", "label overlap"], body),
    ]


def _text_to_scan(emb: Embeddings, cfg: EvalReportConfig, scored: _Scored, tables: dict) -> list[str]:
    """text_to_scan_r@k (all report texts pooled) and per anatomy; -> its table."""
    assert emb.text_embedding is not None and emb.anatomy_embedding is not None
    assert emb.present is not None and emb.region is not None
    ranks = text_to_scan_ranks(
        emb.text_embedding, emb.anatomy_embedding, emb.present, emb.region, emb.anatomies, emb.group_index
    )
    if not ranks:
        return ["No report texts: no text-to-scan retrieval.", ""]
    ks = cfg.retrieval.k
    scans = {a: np.flatnonzero(emb.region[:, j] & emb.present[:, j]) for j, a in enumerate(emb.anatomies) if a in ranks}
    pooled = (np.concatenate(list(scans.values())), np.concatenate(list(ranks.values())))
    for k in ks:
        # Pooled over every text (one item), as CLIP-style recall is reported.
        scored.add(f"text_to_scan_r@{k}", {"all": (pooled[0], (pooled[1] < k).astype(np.float64))})
        scored.metrics |= {f"text_to_scan.{a}.r@{k}": float((r < k).mean()) for a, r in ranks.items()}
    gallery = {a: int(emb.region[:, emb.anatomies.index(a)].sum()) for a in ranks}
    rows = [
        [a, f"{len(r)}/{gallery[a]}", *(fmt(scored.metrics[f"text_to_scan.{a}.r@{k}"]) for k in ks)]
        for a, r in ranks.items()
    ]
    rows.append(["all", f"{len(pooled[1])}", *(scored.cell(f"text_to_scan_r@{k}") for k in ks)])
    tables["text_to_scan"] = {a: {"texts": len(r), "gallery": gallery[a], "ranks": r} for a, r in ranks.items()}
    return [
        "Text-to-scan recall@k: an anatomy's report text retrieves its own scan among the scans showing that anatomy.",
        "",
        *table(["anatomy", "texts/gallery", *(f"R@{k}" for k in ks)], rows),
    ]


# Anatomy map -------------------------------------------------------------------------------------


def map_part(emb: Embeddings, cfg: EvalReportConfig) -> Part:
    """t-SNE of the anatomy embeddings coloured by anatomy (CA-GCL Fig. 4)."""
    if emb.anatomy_embedding is None or emb.region is None:
        return Part("Anatomy embedding map", notes=["scan-level embeddings (no anatomy embeddings): no anatomy map"])
    scan, anatomy = np.nonzero(emb.region)
    if len(scan) > cfg.tsne_points:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(scan), cfg.tsne_points, replace=False))
        scan, anatomy = scan[keep], anatomy[keep]
    if len(scan) < 3:
        return Part("Anatomy embedding map", notes=[f"{len(scan)} anatomy embeddings: too few for a t-SNE map"])
    log.info("eval: t-SNE of %d anatomy embeddings", len(scan))
    fig = tsne_map(emb.anatomy_embedding[scan, anatomy], [emb.anatomies[a] for a in anatomy], cfg.seed)
    return Part("Anatomy embedding map", figures=[fig])
