"""`ctray` command line: parse, build, run. The work lives in the modules each command names."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ctray.bench import add_bench_arguments, add_geometry_arguments
from ctray.errors import CtrayError
from ctray.objectives import objective_names

if TYPE_CHECKING:
    from ctray.config import StorageConfig
    from ctray.evaluate.config import EvalReportConfig
    from ctray.ingest.config import IngestConfig
    from ctray.train.config import PretrainConfig
    from ctray.tune.config import SweepConfig

log = logging.getLogger("ctray")

STACK = ("ray", "torch", "deepspeed", "monai", "transformers")
"""The libraries `ctray --version` reports (from their installed metadata, none imported)."""


def versions() -> list[str]:
    """`ctray <version>`, then Python's and each STACK library's version."""
    from importlib.metadata import PackageNotFoundError, version

    import ctray

    lines = [f"ctray {ctray.__version__}", f"python {platform.python_version()}"]
    for name in STACK:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} not installed")
    return lines


class _Version(argparse.Action):
    """`ctray --version`: the versions, then exit (computed only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print("\n".join(versions()))
        parser.exit()


def _config_job(args: argparse.Namespace) -> None:
    """A command that takes a YAML config: the config (YAML, dotted overrides, ${VAR}s), printed
    with --print-config (credentials ***), else run by the command's function (args.run)."""
    import ctray
    from ctray.config import load_config
    from ctray.config_show import command_config

    cfg = load_config(command_config(args.command), args.config, args.overrides)
    if args.print_config:
        import yaml

        from ctray.redact import redacted

        print(yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False), end="")
        return
    # Which ctray runs it: a job's --working-dir copy or the installed one.
    log.info("ctray %s from %s", ctray.__version__, os.path.dirname(ctray.__file__))
    args.run(cfg)


def _ingest(cfg: IngestConfig) -> None:
    from ctray.ingest.job import run_ingest

    run_ingest(cfg)


def _pretrain(cfg: PretrainConfig) -> None:
    from ctray.train.trainer import run_pretrain

    run_pretrain(cfg)


def _sweep(cfg: SweepConfig) -> None:
    from ctray.tune.sweep import run_sweep

    run_sweep(cfg)


def _config_show(args: argparse.Namespace) -> None:
    from ctray.config_show import show

    print(show(args.section))


def _storage(args: argparse.Namespace) -> StorageConfig:
    from ctray.config import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url)


def _verify(args: argparse.Namespace) -> None:
    from ctray.ingest.records import verify

    problems = verify(args.output, _storage(args))
    if problems:
        raise CtrayError(f"{args.output}: {len(problems)} problem(s), listed above")


def _purge(args: argparse.Namespace) -> None:
    from ctray.ingest.maintain import purge

    purge(args.output, _storage(args), args.scan_id, args.evaluations)


def _phantoms(args: argparse.Namespace) -> None:
    from ctray.data.phantoms import write_dataset

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    write_dataset(args.out, args.n, args.seed, shape, spacing, args.lesion_rate, args.dicom, args.reconstructions)
    log.info("wrote %d phantoms to %s (scans/, masks/, reports.jsonl)", args.n, args.out)


def _embed(args: argparse.Namespace) -> None:
    from ctray.config import RayConfig
    from ctray.embed import run_embed
    from ctray.runtime import ensure_ray

    ensure_ray(RayConfig(address=args.ray_address))
    run_embed(
        args.export, args.shards, args.out, _storage(args), args.batch_scans, args.patches, args.actors, args.seed
    )


def _eval(cfg: EvalReportConfig) -> None:
    import posixpath

    from ctray.evaluate.run import run_eval
    from ctray.export import load_encoder
    from ctray.run_folder import RunFolder
    from ctray.train.tracking import log_evaluation

    result = run_eval(cfg, load_encoder)
    # Into the training run's MLflow and W&B runs when the export is a run's export/ (its tracking.json).
    export = result.export.rstrip("/")
    if export.endswith("/export"):
        run = RunFolder(posixpath.dirname(export), cfg.storage)
        report = RunFolder(posixpath.dirname(result.report), cfg.storage)
        name = posixpath.basename(cfg.embeddings.rstrip("/"))
        log_evaluation(run, max(result.export_step, 0), result.metrics, report, name)


def _bench(args: argparse.Namespace) -> None:
    from ctray.bench import run_bench

    run_bench(args.what, args)


def _doctor(args: argparse.Namespace) -> None:
    from ctray.doctor import run_doctor

    run_doctor(args.address, args.jobs)


def _quickstart(args: argparse.Namespace) -> None:
    from ctray.quickstart import run_quickstart

    run_quickstart(args.dir, args.scans, args.steps)


def _config_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: Callable[[Any], None],
    example_yaml: str,
    example_override: str,
    *,
    help: str,
    description: str,
) -> None:
    """A subcommand that takes a YAML config and dotted overrides (its config class:
    ctray.config_show.COMMANDS), run by `run`."""
    cmd = sub.add_parser(name, help=help, description=description)
    cmd.add_argument("config", help=f"YAML config (see {example_yaml}; `ctray config show {name}` lists its fields)")
    cmd.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example_override}")
    cmd.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as it would run (the YAML with the overrides and ${VAR}s applied, credentials as "
        "***) and exit without running",
    )
    cmd.set_defaults(fn=_config_job, run=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctray", description=__doc__.split("\n")[0] + " See README.md.")
    p.add_argument("--version", action=_Version, help="ctray's version and those of Python, Ray, torch, DeepSpeed, ...")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, Ray Train's own lines (a TrainingReport per report and worker), Ray Data's progress "
        "bars, every worker's copy of a repeated line, and the messages of internal errors",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _config_command(
        sub,
        "ingest",
        _ingest,
        "jobs/ingest.yaml",
        "output.scans_per_shard=32",
        help="scans + masks + reports -> preprocessed Parquet shards + manifest.json",
        description="Preprocess scans once into Parquet shards (local folder or s3://). Resumable: "
        "re-running skips committed scans. Example: ctray ingest jobs/ingest-local.yaml output.uri=s3://bucket/shards",
    )
    _config_command(
        sub,
        "pretrain",
        _pretrain,
        "jobs/ctfm.yaml",
        "objective.temperature=0.2",
        help="shards -> Ray Data -> Ray Train + DeepSpeed workers -> checkpoints + encoder",
        description=f"Pretrain with a registered objective ({', '.join(objective_names())}; "
        "objective.name in the config). Re-running the same run.storage/run.name resumes. "
        "Example: ctray pretrain jobs/ctfm-local.yaml train.max_steps=50",
    )
    _config_command(
        sub,
        "sweep",
        _sweep,
        "jobs/sweep-ctfm.yaml",
        "num_samples=8",
        help="Ray Tune over pretrain configs: temperatures, patch counts, loss weights, lr",
        description="Each trial is a full `ctray pretrain` run with its own workers; ASHA stops poor "
        "trials. Re-running the same storage/name continues the sweep. Writes results.csv, "
        "metric_vs_params.png and best.yaml. Example: ctray sweep jobs/sweep-ctfm-local.yaml",
    )

    ve = sub.add_parser(
        "verify",
        help="check every committed shard against its commit record (size, sha256, rows)",
        description="Reads every committed shard of an ingest output and checks its size and sha256 against its "
        "commit record, its rows against the record's scans, that no scan is in two shards and that the manifest "
        "lists them. Exit status 2 with one line per problem. Example: ctray verify s3://bucket/shards",
    )
    ve.add_argument("output", help="ingest output (folder or s3:// / gs:// URI)")
    ve.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, ...)")
    ve.set_defaults(fn=_verify)
    pu = sub.add_parser(
        "purge",
        help="remove scans from an ingest output: shards, manifest, LLM cache, id map",
        description="Rewrites the shards holding the scans without them and re-commits them, removes their LLM "
        "cache entries, quarantine mentions and id map entries, and records their ids and content hashes in "
        "purged.json so that no later ingest takes them again (nor a copy of their files under another name). "
        "It reaches what `ctray embed`, `ctray eval` and runs recorded in the shard set: embeddings are rewritten "
        "without the scans, evaluation reports deleted or kept (--evaluations), runs whose tokenizer saw their "
        "reports named. With pseudonymised ids, an original id works too when the key is set. "
        "Example: ctray purge s3://bucket/shards --scan-id CT0042 --scan-id CT0107",
    )
    pu.add_argument("output", help="ingest output (folder or s3:// / gs:// URI)")
    pu.add_argument("--scan-id", action="append", required=True, help="a scan id to remove (repeat for several)")
    pu.add_argument(
        "--evaluations",
        choices=("delete", "keep"),
        default=None,
        help="evaluation reports computed with the scans: delete them or keep them (default: stop while any exist)",
    )
    pu.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, ...)")
    pu.set_defaults(fn=_purge)

    ph = sub.add_parser(
        "phantoms",
        help="write synthetic CT phantoms with masks and reports",
        description="Synthetic CTs with TotalSegmentator label maps, known lesions and reports.",
    )
    ph.add_argument("out", help="output folder (gets scans/, masks/, reports.jsonl)")
    ph.add_argument("--n", type=int, default=8, help="number of phantoms (default 8)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_geometry_arguments(ph, (48, 128, 128), (3.0, 2.5, 2.5))
    ph.add_argument("--lesion-rate", type=float, default=0.5, help="probability of each finding (default 0.5)")
    ph.add_argument("--dicom", type=int, default=0, help="write the first K phantoms as DICOM series")
    ph.add_argument(
        "--reconstructions",
        type=int,
        default=0,
        help="K > 0: CT-RATE's names, train_<patient>_a_<k>, K scans per patient (for groups.pattern)",
    )
    ph.set_defaults(fn=_phantoms)

    em = sub.add_parser(
        "embed",
        help="a trained encoder over shards -> Parquet embeddings (Ray Data batch inference, resumable)",
        description="Embeds every committed scan of SHARDS with the export of a pretrain run (its sampler is the "
        "preprocessing; one GPU per actor where the cluster has GPUs, an autoscaling actor pool) into "
        "OUT/part-<shard>.parquet + OUT/embed.json. Re-running skips shards already embedded. "
        "Example: ctray embed runs/cagcl-local shards embeddings/cagcl",
    )
    em.add_argument("export", help="a pretrain run folder or its export/ (folder or s3:// URI)")
    em.add_argument("shards", help="ingest output (folder or s3:// URI)")
    em.add_argument("out", help="embeddings folder (folder or s3:// URI)")
    em.add_argument("--batch-scans", type=int, default=4, help="scans per inference batch (default 4)")
    em.add_argument("--patches", action="store_true", help="CT-FM: also each sampled patch's embedding")
    em.add_argument("--actors", type=int, default=None, help="most inference actors (default: GPUs, or CPUs / 4)")
    em.add_argument("--seed", type=int, default=0, help="seed of the sampler's draws per scan (default 0)")
    em.add_argument("--ray-address", default=None, help="Ray cluster (default: start or join a local one)")
    em.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, ...)")
    em.set_defaults(fn=_embed)
    _config_command(
        sub,
        "eval",
        _eval,
        "jobs/eval.yaml",
        "bootstrap=200",
        help="embeddings -> zero-shot, linear probe, kNN, retrieval, plots and one report",
        description="Evaluates the embeddings of `ctray embed`: zero-shot finding- and anatomy-wise (CLIP-type "
        "objectives, with the export's text tower), linear probe and kNN with k-fold CV, retrieval; writes "
        "report.md, PNGs, figures.json and metrics.json. Example: ctray eval jobs/eval.yaml embeddings=emb/cagcl",
    )

    be = sub.add_parser(
        "bench",
        help="measure ctray against the reference pipelines",
        description="Benchmarks; each prints its figures and ends with one JSON line.",
    )
    add_bench_arguments(be)
    be.set_defaults(fn=_bench)

    do = sub.add_parser(
        "doctor",
        help="what a job would meet on a Ray cluster: versions, autoscaler and node types, GPUs, NCCL/EFA, storage",
        description="Checks a Ray cluster before a job is submitted, in a few lines: Ray, Python and ctray versions "
        "of this driver against the nodes; the autoscaler (v1, v2, KubeRay) and its node types, and whether each "
        "given job's workers fit one; per GPU node torch's CUDA build against the driver, bf16 support and NCCL/EFA "
        "settings; each job's storage, reached with its credentials. Nothing is launched. Exit status 2 when a job "
        "would trip on something (marked !!). Example: ctray doctor 10.0.0.5:6379 jobs/ctfm.yaml jobs/ingest.yaml",
    )
    do.add_argument(
        "address", nargs="?", default=None, help="the cluster's GCS address HOST:PORT (default: RAY_ADDRESS)"
    )
    do.add_argument("jobs", nargs="*", help="job YAMLs (pretrain, sweep, ingest) to check against the cluster")
    do.set_defaults(fn=_doctor)

    qs = sub.add_parser(
        "quickstart",
        help="phantoms -> ingest -> a few steps of every objective (2 DeepSpeed workers) on a local Ray",
        description="The README's main job, a few minutes on a 2-core laptop: synthetic phantoms, ingest to "
        "local shards, then a few steps of each objective (CT-FM, TotalFM stage 1 then stage 2, CA-GCL) "
        "with 2 DeepSpeed workers on CPU. Re-running resumes.",
    )
    qs.add_argument("--dir", default="quickstart", help="working folder (default ./quickstart)")
    qs.add_argument("--scans", type=int, default=8, help="number of phantoms (default 8)")
    qs.add_argument("--steps", type=int, default=12, help="steps of each objective (default 12)")
    qs.set_defaults(fn=_quickstart)

    co = sub.add_parser(
        "config",
        help="the fields of a command's config: type, default and what each does",
        description="The configs of ingest, pretrain, sweep and eval, from the docstrings of their typed models.",
    )
    co_sub = co.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = co_sub.add_parser(
        "show",
        help="a config, one of its sections or one field",
        description="Each field of a command's config, or of one section of it, with its type, default and "
        "docstring; nested sections indented under their field. Examples: ctray config show pretrain.optim; "
        "ctray config show pretrain.objective.cagcl (an objective's own fields); ctray config show ingest",
    )
    show.add_argument("section", help="COMMAND[.SECTION...][.FIELD], COMMAND one of ingest, pretrain, sweep, eval")
    show.set_defaults(fn=_config_show)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a flag may stand between a config command's overrides (`ctray pretrain
    job.yaml a=1 --print-config b=2`), which argparse alone would not take."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.verbose:
        # Every worker's copy of a line instead of Ray's "[repeated Nx across cluster]"; read by Ray's log
        # monitor in this process, which starts later (commands import Ray lazily).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    else:
        from ctray.console import quiet_driver

        quiet_driver()  # before the command imports Ray
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
    except Exception as e:  # a bug: its message may quote patient data, so -v shows it
        if args.verbose:
            raise
        frames = traceback.extract_tb(e.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        print(
            f"ctray: internal error: {type(e).__name__}{where} (message and traceback withheld: they may quote "
            "input data; run with -v to see them)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
