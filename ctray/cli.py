"""`ctray` command line: parse, build, run. The work lives in the modules each command names."""

from __future__ import annotations

import argparse
import logging
import sys

from ctray.errors import CtrayError

log = logging.getLogger("ctray")


def _ingest(args: argparse.Namespace) -> None:
    from ctray.config import load_config
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest

    run_ingest(load_config(IngestConfig, args.config, args.overrides))


def _pretrain(args: argparse.Namespace) -> None:
    from ctray.config import load_config
    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import run_pretrain

    run_pretrain(load_config(PretrainConfig, args.config, args.overrides))


def _sweep(args: argparse.Namespace) -> None:
    from ctray.config import load_config
    from ctray.tune.config import SweepConfig
    from ctray.tune.sweep import run_sweep

    run_sweep(load_config(SweepConfig, args.config, args.overrides))


def _phantoms(args: argparse.Namespace) -> None:
    from ctray.data.phantoms import write_dataset

    write_dataset(args.out, args.n, args.seed, tuple(args.shape), tuple(args.spacing), args.lesion_rate, args.dicom)
    log.info("wrote %d phantoms to %s (scans/, masks/, reports.jsonl)", args.n, args.out)


def _bench(args: argparse.Namespace) -> None:
    from ctray.bench import run_bench

    run_bench(args.what, args)


def _quickstart(args: argparse.Namespace) -> None:
    from ctray.quickstart import run_quickstart

    run_quickstart(args.dir, args.scans, args.steps)


def _config_command(sub, name: str, fn, example_yaml: str, example_override: str, **texts) -> None:
    """A subcommand that takes a YAML config and dotted overrides."""
    cmd = sub.add_parser(name, **texts)
    cmd.add_argument("config", help=f"YAML config (see {example_yaml})")
    cmd.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example_override}")
    cmd.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctray", description=__doc__.split("\n")[0] + " See README.md.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _config_command(sub, "ingest", _ingest, "jobs/ingest.yaml", "output.scans_per_shard=32",
                    help="scans + masks + reports -> preprocessed Parquet shards + manifest.json",
                    description="Preprocess scans once into Parquet shards (local folder or s3://). Resumable: "
                    "re-running skips committed scans. Example: ctray ingest jobs/ingest-local.yaml output.uri=s3://bucket/shards")
    _config_command(sub, "pretrain", _pretrain, "jobs/ctfm.yaml", "objective.temperature=0.2",
                    help="shards -> Ray Data -> Ray Train + DeepSpeed workers -> checkpoints + encoder",
                    description="Pretrain with a registered objective (ctfm_simclr, ...). Re-running the same "
                    "run.storage/run.name resumes. Example: ctray pretrain jobs/ctfm-local.yaml train.max_steps=50")
    _config_command(sub, "sweep", _sweep, "jobs/sweep-ctfm.yaml", "num_samples=8",
                    help="Ray Tune over pretrain configs: temperatures, patch counts, loss weights, lr",
                    description="Each trial is a full `ctray pretrain` run with its own workers; ASHA stops poor "
                    "trials. Re-running the same storage/name continues the sweep. Writes results.csv, "
                    "metric_vs_params.png and best.yaml. Example: ctray sweep jobs/sweep-ctfm-local.yaml")

    ph = sub.add_parser("phantoms", help="write synthetic CT phantoms with masks and reports",
                        description="Synthetic CTs with TotalSegmentator label maps, known lesions and reports.")
    ph.add_argument("out", help="output folder (gets scans/, masks/, reports.jsonl)")
    ph.add_argument("--n", type=int, default=8, help="number of phantoms (default 8)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ph.add_argument("--shape", type=int, nargs=3, default=[48, 128, 128], metavar=("Z", "Y", "X"), help="voxels (default 48 128 128)")
    ph.add_argument("--spacing", type=float, nargs=3, default=[3.0, 2.5, 2.5], metavar=("Z", "Y", "X"), help="mm (default 3 2.5 2.5)")
    ph.add_argument("--lesion-rate", type=float, default=0.5, help="probability of each finding (default 0.5)")
    ph.add_argument("--dicom", type=int, default=0, help="write the first K phantoms as DICOM series")
    ph.set_defaults(fn=_phantoms)

    from ctray.bench import add_bench_arguments

    be = sub.add_parser("bench", help="measure ctray against the reference pipelines",
                        description="Benchmarks; each prints its figures and ends with one JSON line.")
    add_bench_arguments(be)
    be.set_defaults(fn=_bench)

    qs = sub.add_parser("quickstart", help="phantoms -> ingest -> CT-FM pretraining (2 DeepSpeed workers) on a local Ray",
                        description="The README's main job, a few minutes on a 2-core laptop: synthetic phantoms, ingest to "
                        "local shards, then CT-FM pretraining with 2 DeepSpeed workers on CPU. Re-running resumes.")
    qs.add_argument("--dir", default="quickstart", help="working folder (default ./quickstart)")
    qs.add_argument("--scans", type=int, default=8, help="number of phantoms (default 8)")
    qs.add_argument("--steps", type=int, default=12, help="pretraining steps (default 12)")
    qs.set_defaults(fn=_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.fn(args)
    except CtrayError as e:
        print(f"ctray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctray: interrupted; committed shards and checkpoints are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
