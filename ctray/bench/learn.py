"""`ctray bench learn`: does each recipe learn something useful? Pretrained vs random init, on the
same held-out scans, with paired bootstrap intervals (a benchmark table like lightly's kNN tables
or open_clip's zero-shot tables, at a size a laptop runs).

1. Phantoms with planted findings (ctray.data.phantoms: lesions in organs, each named in the report
   and labelled), `reconstructions` scans per patient; a grouped split (ctray.evaluate.paired) puts
   each patient's scans in the training or the held-out folder; each folder is ingested (groups:
   the patient).
2. Each recipe's local job pretrains on the training shards (ingested at 3x2x2 mm) for the size's
   steps (TotalFM stage 2 from its stage 1), and its export embeds the held-out shards. The same architecture at its
   initialisation (the run's own seed, before any step; the tokenizer trained on the same reports)
   is exported and embeds them too.
3. Protocols, each on the held-out scans only:
   - linear probe: per finding, out-of-fold scores of a stratified group k-fold logistic regression
     (ctray.evaluate.probe) on the embedding the recipe gives it (the organ-wise recipes: the
     finding's anatomy embedding, as zero-shot scores it; CT-FM: the scan embedding), AUROC
     averaged over the findings;
   - zero-shot (TotalFM stage 2, CA-GCL): per finding, the logit margin between the phantoms'
     report-worded prompts (a text tower trained for minutes on phantoms knows no other language),
     AUROC averaged over templates and findings.
   Pretrained minus random init, with a paired bootstrap over patients (95%): "pretrained > random
   init" when the interval lies above 0, else said to be inside its CI; and whether A's own
   interval lies above chance (0.5). A random text tower's zero-shot AUROC is a coin flip shared by
   every finding (its prompts' direction is random: ~0.3 or ~0.7 on these phantoms), so a zero-shot
   difference needs the chance column beside it.
4. Ablations (--ablations, separate runs): TotalFM stage 2 without stage 1 (its vision tower from
   random init) against with it; CA-GCL local loss only (global_weight 0) against local + global,
   with the text-embedding similarity (collapse) of each.

Output: <workdir>/bench-learn.md and .json (the table, settings and seconds per stage), named in the
final line. Not in CI: the default size takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctray.evaluate.paired import Comparison, Scored, grouped_split, paired_macro_auroc

log = logging.getLogger("ctray")

GROUP_PATTERN = r"^(.+)_[a-z]_\d+$"
"""Patient of a phantom written with reconstructions (CT-RATE's names: train_<patient>_a_<k>)."""


@dataclass(frozen=True)
class Size:
    patients: int
    """Phantom patients, `reconstructions` scans each, split into training and held-out."""
    reconstructions: int
    held_out: float
    """Share of the patients held out."""
    steps: dict[str, int]
    """Pretraining steps per recipe (TotalFM stage 2 and the ablations as their recipe)."""
    scans_per_batch: int


SIZES = {
    "small": Size(40, 2, 0.5, {"ctfm": 200, "totalfm_mae": 400, "totalfm_clip": 400, "cagcl": 400}, 8),
    "medium": Size(120, 2, 0.4, {"ctfm": 800, "totalfm_mae": 1600, "totalfm_clip": 1600, "cagcl": 1600}, 8),
    "large": Size(600, 2, 0.3, {"ctfm": 4000, "totalfm_mae": 8000, "totalfm_clip": 8000, "cagcl": 8000}, 16),
}
"""small: the default, about 20 minutes on this 2-core CPU machine; medium and large for a GPU node."""

SPACING = "[3.0, 2.0, 2.0]"
"""Ingest spacing (mm): the phantoms' 2.5 mm in-plane resampled to 2 mm instead of the local ingest
job's 1 mm, a quarter of the voxels to sample and embed; the planted lesions stay several voxels
wide."""


@dataclass(frozen=True)
class Scores:
    """One model's items on the held-out scans, by protocol, and each scan's group."""

    protocols: dict[str, list[Scored]]
    """"linear probe" (and "zero-shot" for the text-tower recipes) -> the findings' items."""
    groups: dict[str, str]
    """Scan id -> its patient."""


@dataclass(frozen=True)
class Recipe:
    key: str
    """Its name in Size.steps and --recipes."""
    title: str
    job: str
    """Local job under jobs/."""
    zero_shot: bool
    overrides: tuple[str, ...] = ()


RECIPES = {
    "ctfm": Recipe("ctfm", "CT-FM intra-sample SimCLR", "ctfm-local.yaml", False),
    "totalfm_mae": Recipe("totalfm_mae", "TotalFM stage 1 (organ VideoMAE)", "totalfm-mae-local.yaml", False),
    "totalfm_clip": Recipe("totalfm_clip", "TotalFM stage 2 (organ-wise CLIP)", "totalfm-clip-local.yaml", True),
    "cagcl": Recipe("cagcl", "CA-GCL", "cagcl-local.yaml", True),
}


def bench_learn(size_name: str, recipes: list[str], ablations: bool, workdir: str, seed: int, resamples: int) -> dict:
    size = SIZES[size_name]
    started = time.time()
    seconds: dict[str, float] = {}
    os.makedirs(workdir, exist_ok=True)
    t = time.time()
    train_shards, test_shards = _shard_sets(workdir, size, seed)
    seconds["phantoms and ingest"] = time.time() - t
    rows: list[dict[str, Any]] = []
    scores: dict[str, Scores] = {}  # by run name: the ablations compare against the recipes' runs
    stage1 = None
    for name in recipes:
        recipe = RECIPES[name]
        extra = list(recipe.overrides)
        if name == "totalfm_clip":
            if stage1 is None:  # stage 2 starts from stage 1: train it (unreported) when not asked for
                stage1 = _pretrain(workdir, "totalfm_mae", RECIPES["totalfm_mae"], size, train_shards, seed, [])
            extra.append(f"objective.init_from={stage1}")
        t = time.time()
        run = _pretrain(workdir, name, recipe, size, train_shards, seed, extra)
        if name == "totalfm_mae":
            stage1 = run
        random_run = _random_export(workdir, name, recipe, size, train_shards, seed, extra)
        scores[name] = _scored(workdir, name, run, test_shards, recipe.zero_shot, seed)
        random_scores = _scored(workdir, f"{name}-random-init", random_run, test_shards, recipe.zero_shot, seed)
        rows += _comparisons(recipe.title, ("pretrained", "random init"), scores[name], random_scores, seed, resamples)
        seconds[name] = time.time() - t
    if ablations:
        t = time.time()
        rows += _ablations(workdir, scores, size, train_shards, test_shards, seed, resamples, stage1)
        seconds["ablations"] = time.time() - t
    seconds["total"] = time.time() - started
    result = {
        "size": size_name,
        **asdict(size),
        "seed": seed,
        "resamples": resamples,
        "ablations": ablations,
        "rows": rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    md, js = os.path.join(workdir, "bench-learn.md"), os.path.join(workdir, "bench-learn.json")
    with open(md, "w") as f:
        f.write(markdown(result))
    with open(js, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result), flush=True)
    print(f"bench learn done in {seconds['total']:.0f}s: table {md}, figures {js}", flush=True)
    return result


def _shard_sets(workdir: str, size: Size, seed: int) -> tuple[str, str]:
    """Phantoms split by patient into training and held-out folders, each ingested (reused when
    already there)."""
    from ctray.config import load_config
    from ctray.data.phantoms import write_dataset
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest
    from ctray.quickstart import job_yaml

    data = os.path.join(workdir, "phantoms")
    out = {side: os.path.join(workdir, f"shards-{side}") for side in ("train", "held_out")}
    if all(os.path.exists(os.path.join(p, "manifest.json")) for p in out.values()):
        return out["train"], out["held_out"]
    n = size.patients * size.reconstructions
    log.info("bench learn: %d phantoms of %d patients -> %s", n, size.patients, data)
    phantoms = write_dataset(data, n, seed=seed, reconstructions=size.reconstructions)
    ids = [p.scan_id for p in phantoms]
    patients = [i.rsplit("_", 2)[0] for i in ids]
    held = grouped_split(patients, size.held_out, seed)
    with open(os.path.join(data, "reports.jsonl")) as f:
        reports = [json.loads(line) for line in f]
    for side, keep in (("train", ~held), ("held_out", held)):
        folder = os.path.join(data, side)
        for sub in ("scans", "masks"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            for i, k in zip(ids, keep, strict=True):
                if k:
                    shutil.copy(os.path.join(data, sub, i + ".nii.gz"), os.path.join(folder, sub, i + ".nii.gz"))
        with open(os.path.join(folder, "reports.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r, k in zip(reports, keep, strict=True) if k)
        cfg = load_config(
            IngestConfig,
            job_yaml("ingest-local.yaml"),
            [
                f"input.scans={folder}/scans",
                f"input.masks={folder}/masks",
                f"input.reports={folder}/reports.jsonl",
                f"output.uri={out[side]}",
                f"groups.pattern='{GROUP_PATTERN}'",
                f"preprocess.spacing={SPACING}",
            ],
        )
        run_ingest(cfg)
    return out["train"], out["held_out"]


def _job(workdir: str, name: str, recipe: Recipe, size: Size, shards: str, seed: int, extra: list[str]) -> Any:
    from ctray.config import load_config
    from ctray.data.phantoms import report_prompts
    from ctray.objectives.contrast import ContrastConfig
    from ctray.quickstart import job_yaml
    from ctray.train.config import PretrainConfig

    cfg = load_config(
        PretrainConfig,
        job_yaml(recipe.job),
        [
            f"data.shards={shards}",
            f"run.storage={workdir}/runs",
            f"run.name={name}",
            f"train.seed={seed}",
            f"train.max_steps={size.steps[recipe.key]}",
            f"train.log_every={max(1, size.steps[recipe.key] // 10)}",
            f"train.checkpoint_every={size.steps[recipe.key]}",
            f"data.scans_per_batch={size.scans_per_batch}",
            "eval.every=0",
            *extra,
        ],
    )
    if isinstance(cfg.objective, ContrastConfig):  # the phantoms' report wording (see zero_shot_items)
        cfg.objective.zero_shot.finding_prompts = report_prompts()
    return cfg


def _pretrain(workdir: str, name: str, recipe: Recipe, size: Size, shards: str, seed: int, extra: list[str]) -> str:
    from ctray.train.trainer import run_pretrain

    log.info("bench learn: pretraining %s for %d steps", recipe.title, size.steps[recipe.key])
    run_pretrain(_job(workdir, name, recipe, size, shards, seed, extra))
    return os.path.join(workdir, "runs", name)


def _random_export(
    workdir: str, name: str, recipe: Recipe, size: Size, shards: str, seed: int, extra: list[str]
) -> str:
    """The recipe's model as its run initialises it (same seed, same tokenizer corpus), exported at
    step 0 into runs/<name>-random-init/export. TotalFM stage 2 at random init has no stage 1."""
    import torch

    from ctray.export import ExportRun, write_export
    from ctray.objectives import get_objective

    extra = [e for e in extra if not e.startswith("objective.init_from=")]
    cfg = _job(workdir, f"{name}-random-init", recipe, size, shards, seed, extra)
    if name == "totalfm_clip":
        cfg.objective.init_from = None
    run = cfg.run_folder()
    if run.exists("export/export.json"):
        return run.uri
    spec = get_objective(cfg.objective.name)
    assets = spec.prepare(cfg.objective, cfg.data.shards, run)
    torch.manual_seed(cfg.train.seed)  # as the trainer does before building the task
    task = spec.task(cfg.objective, assets)
    write_export(task, cfg.objective, assets, lambda n, data: run.write(f"export/{n}", data), ExportRun(0, None))
    return run.uri


def _comparisons(
    title: str, labels: tuple[str, str], a: Scores, b: Scores, seed: int, resamples: int
) -> list[dict[str, Any]]:
    """One row per protocol of model A (labels[0]) against model B (labels[1]), logged."""
    rows = []
    for protocol, items in a.protocols.items():
        c = paired_macro_auroc(items, b.protocols[protocol], a.groups, resamples, seed)
        rows.append(_row(title, protocol, *labels, c))
        log.info("bench learn: %s", _line(rows[-1]))
    return rows


def _scored(workdir: str, name: str, run: str, shards: str, zero_shot: bool, seed: int) -> Scores:
    """The held-out scans embedded by the run's export (into embeddings/<name>), scored by each
    protocol."""
    from ctray.config import StorageConfig
    from ctray.embed import run_embed
    from ctray.evaluate.embeddings import load_embeddings

    out = os.path.join(workdir, "embeddings", name)
    run_embed(os.path.join(run, "export"), shards, out, seed=seed)
    emb = load_embeddings(out, StorageConfig())
    protocols = {"linear probe": probe_items(emb, seed)}
    if zero_shot:
        protocols["zero-shot"] = zero_shot_items(emb)
    return Scores(protocols, dict(zip(emb.scan_ids, emb.groups, strict=True)))


def probe_items(emb: Any, seed: int) -> list[Scored]:
    """Each finding's out-of-fold linear-probe scores (scans of a skipped fold left out), on the
    embedding its recipe gives the finding: the anatomy embedding of the finding's anatomy for the
    organ-wise recipes (as zero-shot scores it; the scans that show the anatomy), else the scan
    embedding."""
    from ctray.evaluate.config import ProbeConfig
    from ctray.evaluate.probe import ProbeTask, cross_validate

    cfg = ProbeConfig()
    ids = np.asarray(emb.scan_ids)
    items = []
    for c, finding in enumerate(emb.findings):
        ok = (emb.finding_labels[:, c] >= 0) & emb.embedded
        x = emb.embedding
        anatomy = emb.finding_anatomies.get(finding)
        if emb.anatomy_embedding is not None and anatomy in emb.anatomies:
            j = emb.anatomies.index(anatomy)
            ok &= emb.region[:, j]
            x = emb.anatomy_embedding[:, j]
        task = ProbeTask("finding", finding, x[ok], emb.finding_labels[ok, c].astype(int), emb.group_index[ok])
        folds = min(cfg.folds, task.minority)
        if folds < 2:
            continue
        scores = cross_validate(task, "linear", cfg, folds, 1.0, seed).out_of_fold
        done = np.isfinite(scores)
        items.append(Scored(finding, ids[ok][done], task.y[done], scores[done][None]))
    return items


def zero_shot_items(emb: Any) -> list[Scored]:
    """Each finding's zero-shot logit margins (one row per template) with the export's text tower
    and the phantoms' report-worded prompts."""
    from ctray.data.phantoms import report_prompts
    from ctray.evaluate.config import ZeroShotConfig
    from ctray.evaluate.run import embeddings_zero_shot
    from ctray.export import load_encoder

    zs = ZeroShotConfig(finding_prompts=report_prompts())
    zs.findings = {**zs.findings, **emb.finding_anatomies}
    items = embeddings_zero_shot(emb, zs, load_encoder(emb.export))
    ids = np.asarray(emb.scan_ids)
    return [Scored(it.item, ids[it.scans], it.labels, it.margins) for it in items if it.task == "finding"]


def _ablations(
    workdir: str,
    scores: dict[str, Scores],
    size: Size,
    train_shards: str,
    test_shards: str,
    seed: int,
    resamples: int,
    stage1: str | None,
) -> list[dict[str, Any]]:
    """TotalFM stage 2 with vs without stage 1; CA-GCL local + global vs local only (with each
    run's text-embedding similarity: a collapsed text tower embeds every report alike). Each against
    the recipe's own run, scored before (`scores`, by run name)."""
    rows = []
    if "totalfm_clip" in scores and stage1 is not None:
        recipe = RECIPES["totalfm_clip"]
        alone = _pretrain(
            workdir, "totalfm_clip-no-stage1", recipe, size, train_shards, seed, ["objective.init_from=null"]
        )
        b = _scored(workdir, "totalfm_clip-no-stage1", alone, test_shards, True, seed)
        labels = ("with stage 1", "without stage 1")
        rows += _comparisons(recipe.title, labels, scores["totalfm_clip"], b, seed, resamples)
    if "cagcl" in scores:
        recipe = RECIPES["cagcl"]
        local = _pretrain(workdir, "cagcl-local-only", recipe, size, train_shards, seed, ["objective.global_weight=0"])
        b = _scored(workdir, "cagcl-local-only", local, test_shards, True, seed)
        spread = {
            k: _text_spread(os.path.join(workdir, "runs", r)) for k, r in (("a", "cagcl"), ("b", "cagcl-local-only"))
        }
        for row in _comparisons(recipe.title, ("local + global", "local only"), scores["cagcl"], b, seed, resamples):
            rows.append({**row, "text_cos_std": spread})
    return rows


def _text_spread(run: str) -> float:
    """The last logged std of cosine similarities between different anatomies' report texts (the
    loop's collapse measure; near 0 when the text tower embeds every text alike)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        values = [m["text_cos_std"] for m in map(json.loads, f) if "text_cos_std" in m]
    return float(values[-1]) if values else float("nan")


def _row(recipe: str, protocol: str, a: str, b: str, c: Comparison) -> dict[str, Any]:
    verdict = {"A > B": f"{a} > {b}", "A < B": f"{a} < {b}"}.get(c.verdict, "inside its CI")
    return {
        "recipe": recipe,
        "protocol": protocol,
        "a": a,
        "b": b,
        "a_auroc": c.a,
        "a_ci": c.a_ci,
        "b_auroc": c.b,
        "b_ci": c.b_ci,
        "difference": c.difference,
        "difference_ci": c.difference_ci,
        "items": c.items,
        "scans": c.scans,
        "groups": c.groups,
        "verdict": verdict,
    }


def _ci(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['recipe']}, {row['protocol']}: {row['a']} {_ci(row['a_auroc'], row['a_ci'])}, {row['b']} "
        f"{_ci(row['b_auroc'], row['b_ci'])}, difference {_ci(row['difference'], row['difference_ci'])}: "
        f"{row['verdict']}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The table, with the command and settings that made it."""
    lines = [
        "| recipe | protocol | A | B | macro AUROC A [95% CI] | macro AUROC B [95% CI] | A - B [95% CI] | findings "
        "| verdict | A above chance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['protocol']} | {r['a']} | {r['b']} | {_ci(r['a_auroc'], r['a_ci'])} | "
            f"{_ci(r['b_auroc'], r['b_ci'])} | {_ci(r['difference'], r['difference_ci'])} | {r['items']} | "
            f"{r['verdict']} | {'yes' if r['a_ci'][0] > 0.5 else 'no'} |"
        )
    spreads = {(r["recipe"], r["a"], r["b"]): r["text_cos_std"] for r in result["rows"] if "text_cos_std" in r}
    for (recipe, a, b), spread in spreads.items():
        lines += [
            "",
            f"{recipe} text-embedding spread (std of the cosine between different anatomies' report texts; near 0: "
            f"collapsed): {a} {spread['a']:.3f}, {b} {spread['b']:.3f}.",
        ]
    s = result
    command = f"ctray bench learn --size {s['size']} --seed {s['seed']}{' --ablations' if s.get('ablations') else ''}"
    lines += [
        "",
        f"`{command}`: {s['patients']} phantom patients x "
        f"{s['reconstructions']} scans, {s['held_out']:.0%} of the patients held out; steps per run "
        f"{', '.join(f'{k} {v}' for k, v in s['steps'].items())} at "
        f"{s['scans_per_batch']} scans per batch; paired bootstrap over held-out patients ({s['resamples']} "
        f"resamples). Seconds: {', '.join(f'{k} {v:.0f}' for k, v in s['seconds'].items())}.",
    ]
    return "\n".join(lines) + "\n"
