"""`ctray bench ingest`: ctray's per-scan ingest (hash the file, read, check and preprocess it,
write its row to a shard) vs MONAI's LoadImage + Orientation + Spacing chain on the same
clinical-size NIfTI, one core each, in one run.

Each pipeline runs in its own fresh process with one thread (OMP/MKL/torch), so that "per core"
means what it says and peak memory is not inherited from the other: an untimed scan, then
`repeats` timed runs of as many scans as fill `seconds` each, alternating between the two (so that
run i of each sees the same machine); CPU is the process's own. Peak
memory is the process's high-water mark (VmHWM, reset after imports and the warm-up) above its
resident size before the timed runs, compared with the raw int16 volume. ctray's write (the row
to a Parquet shard at output.bulk_codec's and compression_level's defaults, and the shard's sha256)
is timed apart too, and the row's write time, bytes ratio and read time per codec of CODECS are
measured once more in a process of their own.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ctray.bench.common import OneCore, OtherLoad, Staged, clinical_phantom, one_core, spread, summary
from ctray.ingest.schema import BulkCodec

if TYPE_CHECKING:
    from ctray.ingest.preprocess import Preprocessed

SPACING_OUT = (3.0, 1.0, 1.0)
CODECS: tuple[tuple[BulkCodec, int], ...] = (("lz4", 2), ("zstd", 1), ("zstd", 2), ("zstd", 3), ("none", 2))
"""The volume's codecs (output.bulk_codec, and zstd's level) whose write time, bytes ratio and
read time the bench prints."""


def _write(shard: str, pre: Preprocessed, content_hash: str, codec: BulkCodec, level: int) -> None:
    """ShardWriter's write of one scan: its row (without mask, report or labels: the volume is
    nearly all its bytes) to a shard of its own at zstd `level`, then the shard's sha256."""
    from ctray.ingest.shards import file_sha256, open_shard, write_row

    row = {
        "scan_id": "bench",
        "group": "bench",
        "volume": pre.hu.tobytes(),
        "shape": list(pre.hu.shape),
        "spacing": list(pre.spacing),
        "orientation": "SPL",
        "affine": pre.affine.reshape(-1).tolist(),
        "content_hash": content_hash,
        "stamp": "bench",
    }
    with open_shard(shard, level, codec) as writer:
        write_row(writer, row)
    file_sha256(shard)


def _ctray_chain(path: str, codec: BulkCodec, level: int) -> Callable[[], Staged]:
    from ctray.ingest.config import PreprocessConfig
    from ctray.ingest.preprocess import preprocess
    from ctray.ingest.shards import file_sha256
    from ctray.ingest.volume import load_nifti

    cfg = PreprocessConfig(spacing=SPACING_OUT)
    shard = os.path.join(os.path.dirname(path), "bench-shard.parquet")

    def run() -> Staged:
        digest = file_sha256(path)
        pre = preprocess(load_nifti(path, path), None, cfg)
        t0 = time.process_time()
        _write(shard, pre, digest.hexdigest(), codec, level)
        return Staged(list(pre.hu.shape), {"write": time.process_time() - t0})

    return run


def _write_levels(path: str, repeats: int = 3) -> Callable[[], dict[str, dict[str, float]]]:
    """Per codec of CODECS, for the row of the phantom's scan: the median CPU seconds of
    `repeats` writes (as _write) and of reading the row back, and the volume's bytes over the file's."""
    import pyarrow.parquet as pq

    from ctray.ingest.config import PreprocessConfig
    from ctray.ingest.preprocess import preprocess
    from ctray.ingest.volume import load_nifti

    pre = preprocess(load_nifti(path, path), None, PreprocessConfig(spacing=SPACING_OUT))
    shard = os.path.join(os.path.dirname(path), "bench-levels.parquet")

    def timed(f: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            f()
            times.append(time.process_time() - t0)
        return statistics.median(times)

    def run() -> dict[str, dict[str, float]]:
        out = {}
        for codec, level in CODECS:
            write_s = timed(partial(_write, shard, pre, "", codec, level))
            read_s = timed(lambda: pq.read_table(shard))
            name = f"zstd-{level}" if codec == "zstd" else codec
            out[name] = {"write_s": write_s, "ratio": pre.hu.nbytes / os.path.getsize(shard), "read_s": read_s}
        return out

    return run


def _monai_chain(path: str) -> Callable[[], list[int]]:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    chain = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation("SPL"),
            Spacing(pixdim=SPACING_OUT, mode="bilinear"),
        ]
    )
    return lambda: list(chain(path).shape[1:])


def bench_ingest(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    repeats: int,
    seconds: float,
    workdir: str | None,
) -> dict:
    import numpy as np

    from ctray.ingest.config import OutputConfig
    from ctray.ingest.volume import gzip_reader

    level = OutputConfig.model_fields["compression_level"].default
    codec = OutputConfig.model_fields["bulk_codec"].default
    written = f"zstd-{level}" if codec == "zstd" else f"{codec} (the rest zstd-{level})"
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    path = clinical_phantom(workdir, shape, spacing)
    raw_bytes = int(np.prod(shape)) * 2
    print(
        f"raw volume: {raw_bytes / 2**20:.0f} MiB int16; file {os.path.getsize(path) / 2**20:.0f} MiB;"
        f" target spacing {SPACING_OUT} mm; {repeats} runs of >= {seconds:g} s each, 1 thread;"
        f" ctray inflates with {gzip_reader().name} and writes the volume {written}",
        flush=True,
    )
    procs = {
        "ctray": OneCore(partial(_ctray_chain, path, codec, level)),
        "monai": OneCore(partial(_monai_chain, path)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in procs}
    other = OtherLoad()
    for _ in range(repeats):  # alternating, so that run i of each sees the same machine
        for name, proc in procs.items():
            runs[name].append(proc.run(seconds))
    other_cores = other.cores()
    results = {}
    for name, proc in procs.items():
        results[name] = r = summary(runs[name], proc.close())
        r["out_shape"] = r.pop("result")
        print(
            f"  {name:6s} {r['cpu_s']:6.2f} s CPU/scan (median of {repeats} runs of {r['calls_per_run']} scans,"
            f" spread {100 * r['cpu_spread']:.0f}%)  "
            f"{1 / r['cpu_s']:6.3f} scans/s/core  wall {r['wall_s']:6.2f} s  "
            f"peak +{r['peak_extra_bytes'] / 2**20:6.0f} MiB ({r['peak_extra_bytes'] / raw_bytes:4.2f}x raw)"
            f"  out {r['out_shape']}",
            flush=True,
        )
    write_s = results["ctray"]["stages_cpu_s"]["write"]
    print(
        f"  ctray's write (row -> Parquet shard, volume {written}, its sha256): {write_s:.3f} s CPU/scan,"
        f" {100 * write_s / results['ctray']['cpu_s']:.0f}% of ctray's",
        flush=True,
    )
    levels = one_core(partial(_write_levels, path), repeats=1)["result"]
    print(
        "  the row with the volume in "
        + "; ".join(
            f"{lv}: write {r['write_s']:.3f} s, {r['ratio']:.2f}x smaller, read {r['read_s']:.3f} s"
            for lv, r in levels.items()
        ),
        flush=True,
    )
    speedup = results["monai"]["cpu_s"] / results["ctray"]["cpu_s"]
    # The ratio's spread over paired runs: ctray's run i against MONAI's run i.
    ratios = [m / c for m, c in zip(results["monai"]["cpu_s_runs"], results["ctray"]["cpu_s_runs"], strict=True)]
    mem_ratio = results["ctray"]["peak_extra_bytes"] / raw_bytes
    print(
        f"ctray vs MONAI per core: {speedup:.2f}x (spread {100 * spread(ratios):.0f}% over {repeats} paired runs;"
        " target >= 10x, ctray's write included);"
        f" ctray peak memory {mem_ratio:.2f}x the raw volume (target <= 3x); other processes kept"
        f" {other_cores:.1f} of {os.cpu_count()} cores busy during the timed runs"
    )
    figures = {
        "bench": "ingest",
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "raw_bytes": raw_bytes,
        "ctray_scans_per_s_per_core": round(1 / results["ctray"]["cpu_s"], 4),
        "monai_scans_per_s_per_core": round(1 / results["monai"]["cpu_s"], 4),
        "speedup_vs_monai": round(speedup, 3),
        "speedup_spread": round(spread(ratios), 3),
        "inflate": gzip_reader().name,
        "compression_level": level,
        "bulk_codec": codec,
        "ctray_write_cpu_s": round(write_s, 4),
        "codecs": {str(lv): {k: round(v, 4) for k, v in r.items()} for lv, r in levels.items()},
        "ctray_peak_over_raw": round(mem_ratio, 3),
        "monai_peak_over_raw": round(results["monai"]["peak_extra_bytes"] / raw_bytes, 3),
        "other_load_cores": round(other_cores, 2),
        "ctray": results["ctray"],
        "monai": results["monai"],
    }
    print(json.dumps(figures))
    if tmp is not None:
        tmp.cleanup()
    return figures
