"""`ctray quickstart`: the README's main job on one machine (local Ray, local folders, CPU)."""

from __future__ import annotations

import logging
import os

from ctray.config import load_config
from ctray.data.phantoms import write_dataset
from ctray.ingest.config import IngestConfig
from ctray.ingest.job import run_ingest

log = logging.getLogger(__name__)


def run_quickstart(workdir: str, scans: int) -> None:
    data = os.path.join(workdir, "phantoms")
    if not os.path.exists(os.path.join(data, "reports.jsonl")):
        log.info("quickstart: writing %d phantoms to %s", scans, data)
        write_dataset(data, scans, seed=0, dicom=1)
    cfg = load_config(
        IngestConfig,
        None,
        [
            f"input.scans={data}/scans",
            f"input.masks={data}/masks",
            f"input.reports={data}/reports.jsonl",
            f"output.uri={workdir}/shards",
            "output.scans_per_shard=4",
            "ray.num_cpus=2",
        ],
    )
    result = run_ingest(cfg)
    log.info("quickstart done: %d scans in %d shards; manifest %s", result.scans, result.shards, result.manifest_uri)
