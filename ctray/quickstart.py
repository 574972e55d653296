"""`ctray quickstart`: the README's main job on one machine (local Ray, local folders, CPU):
phantoms -> ingest -> a few steps of each objective with 2 DeepSpeed workers: CT-FM, TotalFM
stage 1 (organ VideoMAE) then stage 2 (organ-wise CLIP from stage 1), and CA-GCL; then each
run's export embeds the shards (`ctray embed`) and is evaluated (`ctray eval`), one report each.

The configs are jobs/ingest-local.yaml and jobs/<objective>-local.yaml (shipped inside the
package as well, so the command works from any folder), pointed at `--dir`.
"""

from __future__ import annotations

import logging
import os
from importlib import resources

from ctray.config import load_config
from ctray.data.phantoms import write_dataset
from ctray.ingest.config import IngestConfig
from ctray.ingest.job import run_ingest
from ctray.train.config import PretrainConfig
from ctray.train.trainer import PretrainResult, run_pretrain

log = logging.getLogger(__name__)


def job_yaml(name: str) -> str:
    """Path of a bundled job config (jobs/<name> in a checkout, ctray/jobs/<name> when installed)."""
    return str(resources.files("ctray") / "jobs" / name)


def run_quickstart(workdir: str, scans: int, steps: int) -> None:
    data = os.path.join(workdir, "phantoms")
    if not os.path.exists(os.path.join(data, "reports.jsonl")):
        log.info("quickstart 1/7: writing %d phantoms to %s", scans, data)
        write_dataset(data, scans, seed=0, dicom=1)
    log.info("quickstart 2/7: ingest")
    ingest = load_config(
        IngestConfig,
        job_yaml("ingest-local.yaml"),
        [
            f"input.scans={data}/scans",
            f"input.masks={data}/masks",
            f"input.reports={data}/reports.jsonl",
            f"output.uri={workdir}/shards",
        ],
    )
    shards = run_ingest(ingest)
    runs: dict[str, tuple[PretrainConfig, PretrainResult]] = {}
    stages = [
        ("CT-FM intra-sample SimCLR", "ctfm-local.yaml", []),
        ("TotalFM stage 1, organ VideoMAE", "totalfm-mae-local.yaml", []),
        (
            "TotalFM stage 2, organ-wise CLIP",
            "totalfm-clip-local.yaml",
            [f"objective.init_from={workdir}/runs/totalfm-mae-local"],
        ),
        ("CA-GCL", "cagcl-local.yaml", []),
    ]
    for i, (title, yaml, extra) in enumerate(stages, start=3):
        log.info("quickstart %d/%d: %s, 2 DeepSpeed workers on CPU", i, len(stages) + 3, title)
        cfg = load_config(
            PretrainConfig,
            job_yaml(yaml),
            [
                f"data.shards={workdir}/shards",
                f"run.storage={workdir}/runs",
                f"train.max_steps={steps}",
                *extra,
            ],
        )
        runs[cfg.objective.name] = (cfg, run_pretrain(cfg))
    reports = {}
    for name, (cfg, result) in runs.items():
        log.info("quickstart %d/%d: embed and evaluate %s", len(stages) + 3, len(stages) + 3, name)
        reports[name] = evaluate_run(cfg, result.export, f"{workdir}/embeddings/{name}")
    # Said plainly, so that nobody reads the reports' figures as what a recipe learns.
    log.info(
        "quickstart: %d steps on %d phantoms measure no learning; the reports show that every stage, from shards "
        "to figures, runs, on the scans the runs trained on",
        steps,
        scans,
    )
    log.info(
        "quickstart done: %d scans in %d shards (manifest %s); runs in %s: %s",
        shards.scans,
        shards.shards,
        shards.manifest_uri,
        os.path.join(workdir, "runs"),
        "; ".join(
            f"{name} {r.step} steps, loss {r.loss:.3f}, export {r.export}, report {reports[name]}"
            for name, (_, r) in runs.items()
        ),
    )


def evaluate_run(cfg: PretrainConfig, export: str, out: str) -> str:
    """The run's export over its shards (ctray embed), then ctray eval with the run's zero-shot
    prompts; returns the report's URI."""
    from ctray.embed import run_embed
    from ctray.evaluate.config import EvalReportConfig
    from ctray.evaluate.run import run_eval
    from ctray.export import load_encoder

    run_embed(export, cfg.data.shards, out, cfg.storage)
    zero_shot = getattr(cfg.objective, "zero_shot", None)
    settings = {"embeddings": out, "bootstrap": 200, "storage": cfg.storage.model_dump()}
    if zero_shot is not None:
        settings["zero_shot"] = zero_shot.model_dump()
    return run_eval(EvalReportConfig.model_validate(settings), load_encoder).report
