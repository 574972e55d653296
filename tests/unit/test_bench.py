"""The benchmarks' measuring parts (ctray/bench/common.py) and their command line; the benchmarks
themselves take minutes and run by hand (`ctray bench ...`)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
from functools import partial

import pytest

from ctray.bench import add_bench_arguments, run_bench
from ctray.bench.common import ROLES, OneCore, OtherLoad, TreeCpu, one_core, role_of, spread


def _burn(n: int) -> None:
    sum(i * i for i in range(n))


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
    before, children0 = meter.snapshot(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child = mp.get_context("fork").Process(target=_burn, args=(2_000_000,))
    child.start()
    child.join()  # reaped: its CPU is now in this process's children_* times
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    roles, exited = meter.delta(before, meter.snapshot())
    child_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    assert set(roles) == set(ROLES) and exited == 0  # it came and went between the snapshots
    assert roles["driver"] >= child_cpu - 0.02  # /proc counts in clock ticks
    assert OtherLoad().cores() >= 0.0


def test_other_load_sampled_keeps_processes_that_exit():
    load = OtherLoad(sample_s=0.01)
    child = mp.get_context("fork").Process(target=_burn, args=(2_000_000,))
    child.start()
    child.join()
    assert 0.0 <= load.cores() <= 64


def test_one_core_runs_after_a_warm_up_and_reports_per_call():
    factory = partial(partial, sum, [1, 2, 3])  # module-level and picklable: factory()() == 6
    r = one_core(factory, repeats=3)
    assert r["result"] == 6 and r["calls_per_run"] == [1, 1, 1] and len(r["cpu_s_runs"]) == 3
    proc = OneCore(factory)
    assert proc.run(0.05)["calls"] >= 1
    assert proc.close() >= 0


def test_bench_arguments_reach_the_benchmarks(monkeypatch):
    import ctray.bench.data
    import ctray.bench.ingest

    seen = {}
    monkeypatch.setattr(ctray.bench.data, "bench_data", lambda *a: seen.setdefault("data", a))
    monkeypatch.setattr(ctray.bench.ingest, "bench_ingest", lambda *a: seen.setdefault("ingest", a))
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(["data", "--seconds", "2", "--repeats", "4", "--scans", "3"])
    run_bench(args.what, args)
    assert seen["data"][4:] == (3, 2.0, 4, None)
    args = p.parse_args(["ingest", "--seconds", "1"])
    run_bench(args.what, args)
    assert seen["ingest"][2:] == (3, 1.0, None)
    assert p.parse_args(["step"]).steps == 300
