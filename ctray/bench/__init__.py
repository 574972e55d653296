"""`ctray bench WHAT`: measured figures, side by side with the reference pipeline, ending with one
JSON line. Targets are printed as ratios, never asserted."""

from __future__ import annotations

import argparse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    ing = sub.add_parser("ingest", help="ctray's per-scan preprocessing vs MONAI's LoadImage+Orientation+Spacing, per core",
                         description="Scans/s per core and peak memory on a clinical-size phantom, ctray vs MONAI, one run.")
    ing.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"), help="phantom voxels (default 300 512 512)")
    ing.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.7, 0.7], metavar=("Z", "Y", "X"), help="phantom mm (default 1 0.7 0.7)")
    ing.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (default 3)")
    ing.add_argument("--workdir", default=None, help="where to write the phantom (default: a temp folder)")


def run_bench(what: str, args: argparse.Namespace) -> dict:
    if what == "ingest":
        from ctray.bench.ingest import bench_ingest

        return bench_ingest(tuple(args.shape), tuple(args.spacing), args.repeats, args.workdir)
    raise ValueError(what)
