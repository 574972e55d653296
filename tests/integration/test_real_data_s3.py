"""The path a user takes with real data, through S3: the real CT and its TotalSegmentator mask in
../shared/data under four CT-RATE ids, the real CT-RATE reports table (its 18 abnormality columns
as finding labels), all on the moto S3 server; ingest to S3 shards, a few steps of each recipe's
local job reading them and writing its run to S3, then embed + eval of CA-GCL's export into S3."""

import csv
import json
import math
import re
import time

import pytest
import s3fs

from ctray.config import load_config
from ctray.embed import run_embed
from ctray.evaluate.config import EvalReportConfig
from ctray.evaluate.run import run_eval
from ctray.export import load_encoder
from ctray.ingest.job import run_ingest
from ctray.train.config import PretrainConfig
from ctray.train.trainer import run_pretrain

from helpers import REPO, ingest_cfg, s3_shard_rows

SCANS = ["train_1", "train_5", "train_9", "train_12"]
"""CT-RATE report rows the one real CT stands in for; Arterial wall calcification 0, 1, 1, 1."""
FINDINGS = "{Arterial wall calcification: aorta, Cardiomegaly: heart, Lung nodule: lung, Emphysema: lung}"
"""CT-RATE's labels (columns of its reports table) -> the anatomy that scores them zero-shot."""


def _recipe(job: str, endpoint: str, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        REPO / "jobs" / job,
        [
            "data.shards=s3://ct-real/shards",
            "run.storage=s3://ct-real/runs",
            f"storage.endpoint_url={endpoint}",
            "train.max_steps=2",
            "train.log_every=1",
            "train.checkpoint_every=2",
            *overrides,
        ],
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_ct_and_ct_rate_reports_through_s3(ray_local, shared_data, s3_endpoint):
    timings: dict[str, float] = {}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-real")
    for sid in SCANS:  # identical bytes under four names: pseudonymisation is off
        fs.put(str(shared_data / "ct" / "example_ct_sm.nii.gz"), f"ct-real/in/scans/{sid}.nii.gz")
        fs.put(str(shared_data / "ct" / "example_seg.nii.gz"), f"ct-real/in/masks/{sid}.nii.gz")
    fs.put(str(shared_data / "reports" / "ct_rate_reports_train.csv"), "ct-real/in/reports.csv")

    with open(shared_data / "reports" / "ct_rate_reports_train.csv", newline="") as f:
        reports = {r["AccessionNo"]: r["report_text"] for r in csv.DictReader(f)}
    t0 = time.perf_counter()
    result = run_ingest(
        ingest_cfg(
            "s3://ct-real/in/scans",
            "s3://ct-real/shards",
            f"storage.endpoint_url={s3_endpoint}",
            "preprocess.spacing=[4,3,3]",
            "input.report_id_column=AccessionNo",
            "input.report_text_columns=[report_text]",
            masks="s3://ct-real/in/masks",
            reports="s3://ct-real/in/reports.csv",
        )
    )
    timings["ingest"] = time.perf_counter() - t0
    assert (result.scans, result.quarantined) == (4, 0)
    manifest, rows = s3_shard_rows(fs, "ct-real/shards")
    assert sorted(r["scan_id"] for r in rows) == sorted(SCANS)
    for row in rows:
        boxes = {b["anatomy"]: b for b in row["anatomy_boxes"]}
        # An upper-abdomen CT: the lung bases are in it, the heart is not (the recipes' anatomies
        # include the heart, and CT-RATE's Cardiomegaly scores it: a real scan lacking an anatomy).
        assert {"lung", "aorta", "liver", "spleen", "kidney", "bone"} <= set(boxes) and "heart" not in boxes, boxes
        assert all(b["voxels"] > 0 for b in boxes.values())
        texts = {t["anatomy"]: t["sentences"] for t in row["anatomy_texts"]}
        assert texts.get("lung") and texts.get("heart"), texts  # every chosen report describes both
        # the report's own sentences, whitespace and quotes normalised as split_sentences does (the
        # last one, which CT-RATE leaves without a full stop, gets one); its whole text is not kept
        # (privacy.keep_report_text)
        report = re.sub(r"\s+", " ", reports[row["scan_id"]].replace('"', " "))
        assert row["report_text"] is None and all(s.rstrip(".") in report for ss in texts.values() for s in ss), texts
        labels = {lab["name"]: lab["value"] for lab in row["labels"]}
        assert len(labels) == 18 and set(labels.values()) <= {0, 1}
    by_id = {r["scan_id"]: r for r in rows}
    assert [by_id[s]["labels"] for s in SCANS] and {
        s: {lab["name"]: lab["value"] for lab in by_id[s]["labels"]}["Arterial wall calcification"] for s in SCANS
    } == dict(zip(SCANS, [0, 1, 1, 1], strict=True))

    zero_shot = f"objective.zero_shot.findings={FINDINGS}"
    runs = {}
    for job, extra in (
        ("ctfm-local.yaml", []),
        ("totalfm-mae-local.yaml", []),
        ("totalfm-clip-local.yaml", ["objective.init_from=s3://ct-real/runs/totalfm-mae-local", zero_shot]),
        ("cagcl-local.yaml", [zero_shot]),
    ):
        cfg = _recipe(job, s3_endpoint, *extra)
        t0 = time.perf_counter()
        trained = run_pretrain(cfg)
        timings[f"pretrain {job}"] = time.perf_counter() - t0
        assert trained.step == 2 and math.isfinite(trained.loss), (job, trained)
        assert trained.export.startswith(f"s3://ct-real/runs/{cfg.run.name}/")
        runs[job] = (cfg, trained)
    fs.invalidate_cache()
    for job in ("totalfm-clip-local.yaml", "cagcl-local.yaml"):  # the last step's zero-shot evaluation
        assert fs.find(f"ct-real/runs/{runs[job][0].run.name}/eval"), job

    for job in ("cagcl-local.yaml",):  # the richest embeddings (anatomies, texts); CT-FM embeds in test_embed.py
        cfg, trained = runs[job]
        out = f"s3://ct-real/embeddings/{cfg.run.name}"
        t0 = time.perf_counter()
        embedded = run_embed(trained.export, cfg.data.shards, out, cfg.storage)
        timings[f"embed {job}"] = time.perf_counter() - t0
        assert (embedded.scans, embedded.parts) == (4, len(manifest["shards"]))
        settings = {"embeddings": out, "bootstrap": 50, "storage": cfg.storage.model_dump()}
        if hasattr(cfg.objective, "zero_shot"):
            settings["zero_shot"] = cfg.objective.zero_shot.model_dump()
        t0 = time.perf_counter()
        report = run_eval(EvalReportConfig.model_validate(settings), load_encoder)
        timings[f"eval {job}"] = time.perf_counter() - t0
        assert report.report == f"{out}/report/report.md", report.report
        fs.invalidate_cache()
        assert fs.cat_file(report.report.removeprefix("s3://")).decode().strip()
        metrics = json.loads(fs.cat_file(f"{out.removeprefix('s3://')}/report/metrics.json"))
        assert {"eval_scans": 4.0, **metrics["metrics"]} == pytest.approx(report.metrics, nan_ok=True)
        print(f"\n{job}: {report.summary}")
        defined = {k: v for k, v in report.metrics.items() if v is not None and not math.isnan(v)}
        assert defined and all(math.isfinite(v) for v in defined.values()), report.metrics
    print("\nreal data through S3, seconds per stage:")
    for stage, seconds in timings.items():
        print(f"  {stage:<32} {seconds:6.1f}")
