"""`ctray bench WHAT`: measured figures, side by side with the reference pipeline, ending with one
JSON line. Targets are printed as ratios, never asserted."""

from __future__ import annotations

import argparse

from ctray.objectives import objective_names


def add_geometry_arguments(
    p: argparse.ArgumentParser, shape: tuple[int, int, int], spacing: tuple[float, float, float], what: str = ""
) -> None:
    """--shape Z Y X and --spacing Z Y X (mm) of generated phantoms."""
    p.add_argument("--shape", type=int, nargs=3, default=list(shape), metavar=("Z", "Y", "X"),
                   help=f"{what}voxels (default {' '.join(map(str, shape))})")  # fmt: skip
    p.add_argument("--spacing", type=float, nargs=3, default=list(spacing), metavar=("Z", "Y", "X"),
                   help=f"{what}mm (default {' '.join(f'{v:g}' for v in spacing)})")  # fmt: skip


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    ing = sub.add_parser(
        "ingest",
        help="ctray's per-scan preprocessing vs MONAI's LoadImage+Orientation+Spacing, per core",
        description="Scans/s per core and peak memory on a clinical-size phantom, ctray vs MONAI, each in a "
        "fresh one-thread process (its own CPU time): an untimed scan, then --repeats runs of as many scans as "
        "fill --seconds; median and spread of each and of the ratio over paired runs.",
    )
    add_geometry_arguments(ing, (300, 512, 512), (1.0, 0.7, 0.7), "phantom ")
    ing.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline after warm-up (default 3)")
    ing.add_argument(
        "--seconds", type=float, default=20.0, help="wall seconds of each timed run, in whole scans (default 20)"
    )
    ing.add_argument("--workdir", default=None, help="where to write the phantom (default: a temp folder)")
    da = sub.add_parser(
        "data",
        help="CPU per scan of an objective's data feed by stage, cores per GPU at its target (CT-FM: vs MONAI)",
        description="CPU ms per scan of the training data feed at the objective's paper sampler settings, by stage "
        "(read + decompress, sample, on one core) and through the whole pipeline (Ray Data on a local Ray of its "
        "own; CPU of this process and its descendants, not of other processes), per shard codec; the cores per "
        "GPU that makes at the GPU target and the bytes per second per 8-GPU node from storage. CT-FM also against "
        "its MONAI chain on the same scan on one core. Warm-up excluded, --repeats runs of about --seconds each, "
        "median and spread.",
    )
    da.add_argument(
        "--objective",
        default="ctfm_simclr",
        choices=objective_names(),
        help="objective whose paper job's sampler feeds (default ctfm_simclr)",
    )
    add_geometry_arguments(da, (300, 512, 512), (1.0, 0.7, 0.7), "phantom ")
    da.add_argument(
        "--codecs",
        nargs="+",
        default=["lz4"],
        choices=["lz4", "zstd", "none"],
        help="shard codecs of the volume and label map to compare (ingest's output.bulk_codec; default lz4)",
    )
    da.add_argument("--scans", type=int, default=16, help="rows in the benchmark shards (default 16)")
    da.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="wall seconds of each timed run (default 20): passes over the rows for ctray, scans for MONAI",
    )
    da.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline after warm-up (default 3)")
    da.add_argument("--workdir", default=None, help="where to keep the phantom and shards (default: a temp folder)")
    sc = sub.add_parser(
        "scale",
        help="the driver's own seconds and MiB for N scans (listing, resume check, manifest, scan index)",
        description="Driver-side work of ingest (listing, commit records, reports, plan, manifest) and pretrain "
        "(scan index, Ray Data dataset) on synthetic listings of N scans, each N in a fresh process: seconds, "
        "peak MiB, and whether time per scan stays flat (linear growth).",
    )
    sc.add_argument(
        "--points",
        type=int,
        nargs="+",
        default=[25_000, 50_000, 100_000],
        help="scan counts (default 25000 50000 100000)",
    )
    sc.add_argument(
        "--ranks",
        type=int,
        default=512,
        help="then plan this many training ranks' datasets over --plan-scans scans, without running them: the"
        " driver's seconds and MiB and the bytes each rank's plan carries (default 512; 0: skip)",
    )
    sc.add_argument("--plan-scans", type=int, default=1_000_000, help="scans of that plan (default 1000000)")
    st = sub.add_parser(
        "step",
        help="views/s and TFLOP/s of the training step, synthetic input vs streaming from shards",
        description="Runs the real trainer twice (in-memory input, then shards through Ray Data) and "
        "prints views/s (median and spread of the logging windows after the first), TFLOP/s, on a GPU MFU and "
        "peak memory, and the data-stall fraction (override data.pin_memory=false: pageable batches). "
        "Without --config, per --objective: on a "
        "GPU the paper-size model of the recipe's bench profile (CT-FM's SegResEncoder at 32x128x128, "
        "VideoMAE-B at 16x160x160 organ volumes, CA-GCL's ViT-B at 112x256x352), on a CPU its local job. A view "
        "is a patch view (CT-FM), an organ volume (TotalFM) or a scan (CA-GCL).",
    )
    st.add_argument(
        "--objective",
        default="ctfm_simclr",
        choices=objective_names(),
        help="objective of the default config (default ctfm_simclr)",
    )
    st.add_argument("--config", default=None, help="pretrain YAML (default: see above)")
    st.add_argument(
        "--modes",
        nargs="+",
        default=["synthetic", "streaming"],
        choices=["synthetic", "streaming"],
        help="input modes to run (default both)",
    )
    st.add_argument("overrides", nargs="*", help="dotted overrides of the pretrain config")
    st.add_argument(
        "--steps",
        type=int,
        default=300,
        help="steps per run, logged in 6 windows; the first (start-up) is left out (default 300)",
    )
    st.add_argument("--scans", type=int, default=8, help="phantoms in the benchmark shards (default 8)")
    st.add_argument("--workdir", default=None, help="where to keep phantoms, shards and runs (default: a temp folder)")

    le = sub.add_parser(
        "learn",
        help="does each recipe learn? pretrained vs random init on held-out phantoms, with paired bootstrap CIs",
        description="Phantoms with planted findings, split by patient; each recipe's local job pretrains on the "
        "training patients, then its export and the same architecture at random init embed the held-out ones: "
        "linear-probe AUROC (every recipe) and zero-shot AUROC (TotalFM stage 2, CA-GCL), pretrained minus random "
        "init with a paired bootstrap over patients. Writes bench-learn.md and .json in --workdir. The default "
        "size takes about 20 minutes on 2 CPU cores; it stays out of CI.",
    )
    le.add_argument("--size", default="small", choices=["small", "medium", "large"], help="default small")
    le.add_argument(
        "--recipes",
        nargs="+",
        default=["ctfm", "totalfm_mae", "totalfm_clip", "cagcl"],
        choices=["ctfm", "totalfm_mae", "totalfm_clip", "cagcl"],
        help="default all four (TotalFM stage 2 trains stage 1 first)",
    )
    le.add_argument(
        "--ablations",
        action="store_true",
        help="also TotalFM stage 2 without stage 1, and CA-GCL with the local loss only (more runs)",
    )
    le.add_argument("--seed", type=int, default=0, help="phantoms, split, runs and bootstrap (default 0)")
    le.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    le.add_argument(
        "--workdir", default="bench-learn", help="phantoms, shards, runs and the table (default ./bench-learn)"
    )


def run_bench(what: str, args: argparse.Namespace) -> dict:
    if what == "ingest":
        from ctray.bench.ingest import bench_ingest

        return bench_ingest(tuple(args.shape), tuple(args.spacing), args.repeats, args.seconds, args.workdir)
    if what == "data":
        from ctray.bench.data import bench_data

        return bench_data(
            args.objective,
            tuple(args.shape),
            tuple(args.spacing),
            args.scans,
            args.seconds,
            args.repeats,
            args.workdir,
            args.codecs,
        )
    if what == "scale":
        from ctray.bench.scale import bench_scale

        return bench_scale(args.points, args.ranks, args.plan_scans)
    if what == "step":
        from ctray.bench.step import bench_step

        return bench_step(args.objective, args.config, args.overrides, args.steps, args.scans, args.workdir, args.modes)
    if what == "learn":
        from ctray.bench.learn import bench_learn

        return bench_learn(args.size, args.recipes, args.ablations, args.workdir, args.seed, args.resamples)
    raise ValueError(what)
