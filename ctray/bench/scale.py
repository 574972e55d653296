"""`ctray bench scale`: what the driver itself costs for a data set of N scans, in seconds and MiB.

The driver of `ctray ingest` lists the inputs, reads every commit record to decide what is done,
matches reports, and writes the manifest; `ctray pretrain` reads the manifest, builds the scan
index and hands it to Ray Data. None of that is parallel, so it has to stay linear in N and small.
Here it runs on a synthetic listing of N NIfTI files and an output where every scan is already
committed (the resume check of a finished ingest: the most driver work per run), in fsspec's
in-memory filesystem, so that the figure is the driver's CPU and memory, not a network's. Each N
runs in a fresh process, timed on its second pass (the first warms imports and Ray up); memory is
that pass's peak above the process's size before it.

`--ranks R --plan-scans N` plans a run of R training ranks over N scans, which cannot run here (512
ranks): each rank's dataset over one scan order (ctray.data.pipeline.rank_datasets) on a synthetic
shard set of N scans in N / 16 shards, without executing them. It prints the driver's seconds and
peak MiB for the plan, and the bytes each rank's plan carries: its split coordinator holds them on
the driver's node, and each of its map tasks receives them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ctray.bench.common import one_core

if TYPE_CHECKING:
    from ctray.config import StorageConfig
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.shardset import ShardSet

SCANS_PER_SHARD = 16


def _synthetic_inputs(n: int) -> None:
    """N scans under memory://scans and their reports in memory://reports.csv."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.store.clear()
    for i in range(n):
        fs.pipe_file(f"/scans/site{i % 50:02d}/case{i:07d}.nii.gz", b"x")
    fs.pipe_file(
        "/reports.csv",
        (
            "scan_id,report,nodule\n"
            + "".join(
                f"case{i:07d},The lungs are clear. No pleural effusion. Heart size is normal.,{i % 2}\n"
                for i in range(n)
            )
        ).encode(),
    )
    assert len(fs.find("/scans")) == n


def _commit_all(cfg: IngestConfig, storage: StorageConfig) -> None:
    """Commit records at cfg.output.uri holding every input of cfg, with the stamp discovery gives
    it: the output of a finished ingest (no shard files: the driver reads none)."""
    import ctray
    from ctray.ingest.discover import attach, discover, load_reports, probe_cache_location
    from ctray.ingest.privacy import Names
    from ctray.ingest.schema import SCHEMA_VERSION
    from ctray.ingest.shards import publish_record
    from ctray.ingest.shardset import SHARDS_DIR, CommitRecord, CommittedScan, ShardStats
    from ctray.storage import filesystem

    names = Names(cfg)
    inventory = discover(cfg, names, probe_cache_location(cfg, names))
    attach(inventory, {}, load_reports(cfg))
    fs, root = filesystem(cfg.output.uri, storage)
    for s in range(0, len(inventory.scans), SCANS_PER_SHARD):
        scans = [
            CommittedScan(scan["scan_id"], scan["label"], scan["stamp"], "0" * 64)
            for scan in inventory.scans[s : s + SCANS_PER_SHARD]
        ]
        record = CommitRecord(
            shard=f"part-{s:016x}",
            path=f"{SHARDS_DIR}/part-{s:016x}.parquet",
            sha256="0" * 64,
            bytes=1,
            scans=tuple(scans),
            quarantine=(),
            supersedes=(),
            stats=ShardStats(len(scans), 0, 1, None, None, 0, 0, {}),
            parsers={"rules": len(scans)},
            fingerprint="",
            schema_version=SCHEMA_VERSION,
            ctray_version=ctray.__version__,
            committed_at=float(s),
            seconds=0.0,
        )
        publish_record(record, fs, root, storage)


def _driver(n: int) -> Callable[[], dict]:
    """Set-up (untimed): the synthetic data and a local Ray. The timed run: ingest's driver path on
    a finished output, then pretrain's scan index and dataset."""
    import logging

    import ray

    from ctray.config import StorageConfig, load_config
    from ctray.data.pipeline import StreamPlan, training_datasets
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.discover import attach, discover, load_reports, probe_cache_location
    from ctray.ingest.job import plan, resolve
    from ctray.ingest.privacy import Names
    from ctray.ingest.records import build_manifest, read_records
    from ctray.ingest.shards import preprocess_fingerprint
    from ctray.ingest.shardset import MANIFEST, Quarantined, ShardSet, Skipped
    from ctray.objectives.ctfm.sampler import PatchSampler
    from ctray.storage import filesystem, publish_bytes

    logging.disable(logging.INFO)
    _synthetic_inputs(n)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    cfg = resolve(
        load_config(
            IngestConfig,
            None,
            [
                "input.scans=memory://scans",
                "input.reports=memory://reports.csv",
                "output.uri=memory://out",
                f"output.scans_per_shard={SCANS_PER_SHARD}",
            ],
        )
    )
    storage = StorageConfig()
    _commit_all(cfg, storage)

    def run() -> dict:
        # the ingest driver: resume check, discovery, reports, plan, manifest
        names = Names(cfg)
        records = read_records(cfg.output.uri, storage)
        table = load_reports(cfg)
        inventory = discover(cfg, names, probe_cache_location(cfg, names))
        attach(inventory, {}, table)
        todo = plan(cfg, inventory, records, set())
        manifest = build_manifest(
            cfg.output.uri,
            storage,
            cfg,
            preprocess_fingerprint(cfg),
            records,
            [Quarantined.from_json(q) for q in inventory.quarantined],
            [Skipped.from_json(s) for s in inventory.skipped],
            [],
            [],
        )
        fs, root = filesystem(cfg.output.uri, storage)
        publish_bytes(manifest.to_json().encode(), fs, root + "/" + MANIFEST, storage)
        # the pretrain driver: manifest and scan index, and the run's scan order with a rank's Ray Data stream over it
        items = ShardSet.open(cfg.output.uri, storage).scans()
        stream_plan = StreamPlan(seed=0, steps=1000, per_rank=16)
        datasets = training_datasets(cfg.output.uri, storage, PatchSampler(1, (8, 8, 8)), stream_plan)
        return {
            "written": manifest.counts.written,
            "todo": len(todo),
            "index": len(items),
            "dataset": type(datasets["train_0"]).__name__,
        }

    return run


def _synthetic_shard_set(n: int) -> ShardSet:
    """A shard set of `n` scans in n / SCANS_PER_SHARD shards as its manifest describes them (no files)."""
    from ctray.config import StorageConfig, load_config
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.shardset import SHARDS_DIR, Shard, ShardSet, ShardStats

    ingest = load_config(IngestConfig, None, ["input.scans=memory://scans", "output.uri=memory://plan"])
    shards = tuple(
        Shard(
            f"{SHARDS_DIR}/part-{s:016x}.parquet",
            f"part-{s:016x}",
            min(SCANS_PER_SHARD, n - s),
            f"{s:064x}",
            1,
            ShardStats(min(SCANS_PER_SHARD, n - s), 0, 1, None, None, 0, 0, {}),
        )
        for s in range(0, n, SCANS_PER_SHARD)
    )
    return ShardSet(
        uri="memory://plan",
        storage=StorageConfig(),
        schema_version=0,
        ctray_version="",
        created_at="",
        fingerprint="",
        ingest=ingest,
        shards=shards,
        failed=(),
        purged=(),
        llm_fallbacks={},
        ungrouped=0,
        written=(),
        quarantine=(),
        skipped=(),
    )


def _planner(n: int, ranks: int) -> Callable[[], dict]:
    """Set-up (untimed): the synthetic shard set and a local Ray. The timed run: every rank's dataset."""
    import ray

    from ctray.data.pipeline import ScanOrder, StreamPlan, block_draws, rank_datasets
    from ctray.objectives.ctfm.sampler import PatchSampler

    shard_set = _synthetic_shard_set(n)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    # CT-FM's paper run on 16 GPUs' worth of draws per rank: 100,000 micro-steps of 2 scans
    plan = StreamPlan(seed=0, steps=100_000, ranks=ranks, per_rank=2, node_cache="/tmp/unused")
    sampler = PatchSampler(4, (96, 96, 96))

    order_bytes = len(ray.cloudpickle.dumps(ScanOrder(shard_set.scans(), 0)))

    def run() -> dict:
        t0 = time.perf_counter()
        datasets = rank_datasets(shard_set, sampler, plan)
        plan_s = time.perf_counter() - t0
        length = plan.steps * plan.per_rank
        return {
            "ranks": len(datasets),
            "plan_s": plan_s,
            "per_rank_bytes": len(ray.cloudpickle.dumps(datasets[-1])),
            "order_bytes": order_bytes,
            "blocks": math.ceil(length / block_draws(sampler, plan.per_rank, length)),
        }

    return run


def bench_plan(scans: int, ranks: int) -> dict:
    """The driver's plan of `ranks` ranks' datasets over `scans` scans (see the module's docstring)."""
    r = one_core(partial(_planner, scans, ranks), repeats=1)
    res = r["result"]
    assert res["ranks"] == ranks, res
    mib = 2**20
    print(
        f"plan of {ranks} ranks over {scans:,} scans ({scans // SCANS_PER_SHARD:,} shards): {res['plan_s']:.2f} s"
        f" wall, peak +{r['peak_extra_bytes'] / mib:.0f} MiB on the driver; each rank's plan"
        f" {res['per_rank_bytes'] / 1024:.0f} KiB at {res['blocks']:,} blocks (Ray Data's metadata of each; {ranks} x ="
        f" {ranks * res['per_rank_bytes'] / mib:.1f} MiB held by"
        f" the split coordinators on the driver's node), the scan order {res['order_bytes'] / mib:.1f} MiB once in the"
        f" object store (carried by each rank's plan: {ranks * res['order_bytes'] / 2**30:.1f} GiB)",
        flush=True,
    )
    return {
        "scans": scans,
        "ranks": ranks,
        "plan_s": round(res["plan_s"], 2),
        "peak_mib": round(r["peak_extra_bytes"] / mib, 1),
        "per_rank_plan_bytes": res["per_rank_bytes"],
        "scan_order_bytes": res["order_bytes"],
        "blocks_per_rank": res["blocks"],
    }


def bench_scale(points: list[int], ranks: int = 512, plan_scans: int = 1_000_000) -> dict:
    rows = []
    print(
        "driver work for a finished ingest of N scans (resume check, listing, reports, manifest) + pretrain's"
        f" scan index and dataset; in-memory storage; {SCANS_PER_SHARD} scans per shard; one fresh process per N",
        flush=True,
    )
    for n in points:
        r = one_core(partial(_driver, n), repeats=1)
        assert r["result"]["written"] == n and r["result"]["todo"] == 0 and r["result"]["index"] == n, r["result"]
        rows.append(
            {
                "scans": n,
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                "peak_mib": round(r["peak_extra_bytes"] / 2**20, 1),
            }
        )
        print(
            f"  {n:>8d} scans  {r['wall_s']:7.2f} s wall  {r['cpu_s']:7.2f} s CPU"
            f"  peak +{r['peak_extra_bytes'] / 2**20:7.1f} MiB  ({1e6 * r['wall_s'] / n:6.1f} us/scan)",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    growth = (last["wall_s"] / first["wall_s"]) / (last["scans"] / first["scans"])
    print(
        f"{last['scans']} scans: {last['wall_s']:.1f} s (target < 30 s), +{last['peak_mib']:.0f} MiB"
        f" (target < 2048 MiB); time per scan at {last['scans']} vs {first['scans']}: {growth:.2f}x (1.0 = linear)"
    )
    figures = {"bench": "scale", "points": rows, "time_per_scan_growth": round(growth, 3)}
    if ranks:
        figures["plan"] = bench_plan(plan_scans, ranks)
    print(json.dumps(figures))
    return figures
