"""The benchmarks' measuring parts (ctray/bench/common.py) and their command line; the benchmarks
themselves take minutes and run by hand (`ctray bench ...`)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from functools import partial

import numpy as np
import pytest

from ctray.bench import add_bench_arguments, run_bench
from ctray.bench.common import (
    ROLES,
    OneCore,
    OtherLoad,
    Staged,
    TreeCpu,
    _machine_busy_s,
    one_core,
    role_of,
    spread,
)

TICKS_S = 0.1
"""What /proc's clock ticks (10 ms) can cost the CPU figures compared here: /proc truncates each
field it reports to a tick, and each figure adds up a few fields (a process's user and system time,
and its reaped children's; the machine's six busy fields) at both ends."""

BURN = 10_000_000
"""A child's work: about half a second of CPU, well above TICKS_S, so that a figure that left the
child out could not pass for one that counts it."""


def _burn(n: int) -> None:
    sum(i * i for i in range(n))


def _cpu_s(before: resource.struct_rusage, after: resource.struct_rusage) -> float:
    """User + system seconds between two getrusage readings."""
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _usage() -> tuple[resource.struct_rusage, resource.struct_rusage]:
    """getrusage of this process, and of its reaped children."""
    return resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)


def _burn_in_a_child() -> float:
    """A forked child burns BURN and exits, reaped: its CPU seconds."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = mp.get_context("fork").Process(target=_burn, args=(BURN,))
    child.start()
    child.join()  # reaped: its CPU is now in this process's children_* times
    return _cpu_s(children0, resource.getrusage(resource.RUSAGE_CHILDREN))


def _check_other_load(sample_s: float | None) -> None:
    """OtherLoad(sample_s) across a child of this process that burns CPU and exits. cores() times
    the wall time it spans is the machine's busy CPU in that span less this process tree's, the
    child's included though it is gone at the end: at most the machine's busy CPU around the span
    less this process's and the child's inside it, at least the machine's inside the span less the
    tree's around it (TreeCpu, which counts the reaped child through this process's children times)."""
    tree = TreeCpu()
    t0, busy0, tree0 = time.perf_counter(), _machine_busy_s(), tree.snapshot()
    load = OtherLoad(sample_s)
    t1, busy1, self1 = time.perf_counter(), _machine_busy_s(), resource.getrusage(resource.RUSAGE_SELF)
    child_cpu = _burn_in_a_child()
    self2, busy2, t2 = resource.getrusage(resource.RUSAGE_SELF), _machine_busy_s(), time.perf_counter()
    cores = load.cores()
    tree1, busy3, t3 = tree.snapshot(), _machine_busy_s(), time.perf_counter()
    own, ours = _cpu_s(self1, self2), sum(TreeCpu.delta(tree0, tree1)[0].values())
    figures = {"cores": cores, "child": child_cpu, "own": own, "tree": ours, "busy": (busy0, busy1, busy2, busy3)}
    assert cores * (t2 - t1) <= busy3 - busy0 - child_cpu - own + TICKS_S, figures  # the child is this tree's
    assert cores * (t3 - t0) >= busy2 - busy1 - ours - TICKS_S, figures  # the rest of the machine's busy CPU


def test_spread_is_range_over_median():
    assert spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert spread([2.0]) == 0.0


@pytest.mark.parametrize(
    ("title", "role"),
    [
        ("ray::IDLE", "workers"),
        ("ray::MapBatches(ShardRowReader)", "workers"),
        ("ray::ReadRange->MapBatches(ShardRowReader)", "workers"),
        ("ray::SplitCoordinator.get", "coordinator"),
        ("ray::IDLE_SpillWorker", "spilling"),
        ("ray::SPILL_SpillWorker", "spilling"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "ray"),
        ("ray::_StatsActor", "ray"),
    ],
)
def test_ray_process_titles_map_to_stable_groups(title, role):
    assert role_of(title) == role


def test_tree_cpu_counts_a_child_that_exits_between_snapshots():
    meter = TreeCpu()
    self0, children0 = _usage()
    before = meter.snapshot()
    self1, _ = _usage()
    child_cpu = _burn_in_a_child()
    self2, _ = _usage()
    after = meter.snapshot()
    self3, children3 = _usage()
    roles, exited = meter.delta(before, after)
    assert set(roles) == set(ROLES) and exited == 0  # it came and went between the snapshots
    # The driver is this process with what it reaped: its own CPU and the child's between the two
    # snapshots, which lie between the readings taken inside them and those taken around them.
    inside = _cpu_s(self1, self2) + child_cpu
    around = _cpu_s(self0, self3) + _cpu_s(children0, children3)
    assert inside - TICKS_S <= roles["driver"] <= around + TICKS_S, (roles, inside, around)
    _check_other_load(sample_s=None)  # exact here: the child that exits is reaped by this process


def test_other_load_sampled_keeps_processes_that_exit():
    _check_other_load(sample_s=0.01)


def _take(n: int) -> int:
    """A timed closure's work (OneCore imports this module in its process): n bytes written, then freed."""
    return len(b"x" * n)


def test_one_core_runs_after_a_warm_up_and_reports_per_call():
    factory = partial(partial, sum, [1, 2, 3])  # module-level and picklable: factory()() == 6
    r = one_core(factory, repeats=3)
    assert r["result"] == 6 and r["calls_per_run"] == [1, 1, 1] and len(r["cpu_s_runs"]) == 3
    # the figures are the runs' median and spread, of per-call times that took some time
    assert r["cpu_s"] == statistics.median(r["cpu_s_runs"]) and r["cpu_spread"] == spread(r["cpu_s_runs"])
    assert r["wall_s"] > 0
    size = 64 * 2**20
    proc = OneCore(partial(partial, _take, size))
    run = proc.run(0.05)
    # calls until 0.05 s of wall time have passed: the calls times the wall time per call is at least that
    assert run["result"] == size and run["calls"] >= 1 and run["calls"] * run["wall_s"] >= 0.05 - 1e-9, run
    assert 0 < run["cpu_s"]
    # the peak above the resident size after the warm-up: each call's 64 MiB (the warm-up's is freed)
    peak = proc.close()
    assert size - 2**22 <= peak <= 2 * size, peak


def _staged(n: int) -> Staged:
    """A timed closure with one stage (its burn) inside more work (as much again, unstaged)."""
    _burn(n)
    t0 = time.process_time()
    _burn(n)
    return Staged("done", {"burn": time.process_time() - t0})


def test_one_core_reports_the_stages_of_a_staged_closure_per_call():
    r = one_core(partial(partial, _staged, BURN // 20), repeats=2)
    assert r["result"] == "done" and set(r["stages_cpu_s"]) == {"burn"}
    # a part of each call's CPU time: more than nothing, less than the whole call
    assert 0 < r["stages_cpu_s"]["burn"] < r["cpu_s"], r
    assert one_core(partial(partial, sum, [1]), repeats=1)["stages_cpu_s"] == {}


def test_bench_arguments_reach_the_benchmarks(monkeypatch):
    import ctray.bench.data
    import ctray.bench.ingest

    seen = {}
    monkeypatch.setattr(ctray.bench.data, "bench_data", lambda *a: seen.setdefault("data", a))
    monkeypatch.setattr(ctray.bench.ingest, "bench_ingest", lambda *a: seen.setdefault("ingest", a))
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(["data", "--objective", "cagcl", "--seconds", "2", "--repeats", "4", "--scans", "3"])
    run_bench(args.what, args)
    assert seen["data"][0] == "cagcl" and seen["data"][3:] == (3, 2.0, 4, None, ["lz4"])
    args = p.parse_args(["ingest", "--seconds", "1"])
    run_bench(args.what, args)
    assert seen["ingest"][2:] == (3, 1.0, None)
    assert p.parse_args(["step"]).steps == 300


def test_the_planning_bench_describes_the_shard_set_it_plans_over():
    """bench scale's synthetic shard set: N scans in ceil(N / 16) shards, each a digest of its own,
    read as a training run reads a manifest (scan index, digests for the node cache)."""
    from ctray.bench.scale import SCANS_PER_SHARD, _synthetic_shard_set

    shard_set = _synthetic_shard_set(100)
    rows = shard_set.scans()
    assert len(rows) == shard_set.scan_count == 100
    assert len(shard_set.shards) == -(-100 // SCANS_PER_SHARD) == len(set(shard_set.digests().values()))
    assert [r.row_group for r in rows[: SCANS_PER_SHARD + 1]] == [*range(SCANS_PER_SHARD), 0]


def test_stored_bytes_stand_in_copies_the_file_into_the_row_it_is_handed(tmp_path):
    from ctray.bench.data import StoredBytes
    from ctray.data.samplers import WritesInto, output_bytes

    payload = np.random.default_rng(3).integers(0, 256, 4099, dtype=np.uint8)
    path = tmp_path / "stored.bin"
    payload.tofile(path)
    sampler = StoredBytes(str(path), payload.size)
    assert isinstance(sampler, WritesInto) and output_bytes(sampler.bulk) == sampler.draw_bytes == payload.size

    block = np.zeros((3, payload.size), np.uint8)
    out = sampler({}, np.random.default_rng(0), out={"stored": block[1:2]})
    assert np.shares_memory(out["stored"], block)
    np.testing.assert_array_equal(block[1], payload)
    assert not block[0].any() and not block[2].any()
    np.testing.assert_array_equal(sampler({}, np.random.default_rng(0))["stored"][0], payload)

    with pytest.raises(ValueError, match="fewer than"):
        StoredBytes(str(path), payload.size + 1)({}, np.random.default_rng(0))
