"""`ctray quickstart`: the README's main job on one machine (local Ray, local folders, CPU):
phantoms -> ingest -> CT-FM pretraining with 2 DeepSpeed workers for a few steps.

The configs are jobs/ingest-local.yaml and jobs/ctfm-local.yaml (shipped inside the package as
well, so the command works from any folder), pointed at `--dir`.
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
from ctray.train.trainer import run_pretrain

log = logging.getLogger(__name__)


def job_yaml(name: str) -> str:
    """Path of a bundled job config (jobs/<name> in a checkout, ctray/jobs/<name> when installed)."""
    return str(resources.files("ctray") / "jobs" / name)


def run_quickstart(workdir: str, scans: int, steps: int) -> None:
    data = os.path.join(workdir, "phantoms")
    if not os.path.exists(os.path.join(data, "reports.jsonl")):
        log.info("quickstart 1/3: writing %d phantoms to %s", scans, data)
        write_dataset(data, scans, seed=0, dicom=1)
    log.info("quickstart 2/3: ingest")
    ingest = load_config(IngestConfig, job_yaml("ingest-local.yaml"), [
        f"input.scans={data}/scans", f"input.masks={data}/masks", f"input.reports={data}/reports.jsonl",
        f"output.uri={workdir}/shards",
    ])
    shards = run_ingest(ingest)
    log.info("quickstart 3/3: CT-FM pretraining, 2 DeepSpeed workers on CPU")
    pretrain = load_config(PretrainConfig, job_yaml("ctfm-local.yaml"), [
        f"data.shards={workdir}/shards", f"run.storage={workdir}/runs", f"train.max_steps={steps}",
    ])
    result = run_pretrain(pretrain)
    log.info(
        "quickstart done: %d scans in %d shards (manifest %s); %d steps, loss %.3f; checkpoint %s; export %s",
        shards.scans, shards.shards, shards.manifest_uri, result.step, result.loss, result.checkpoint, result.export,
    )
