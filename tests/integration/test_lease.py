"""The output's lease is mutual exclusion: of two ingests taking it at once, one of whose writes
lands late (later than lease.settle_s, which writing, waiting and reading back relied on), exactly
one gets it, in a local folder (two processes, and two threads) and on S3 (the moto server); so
for a stale lease taken over by two at once, and for a renewal that lands after a takeover. And
what writes the output (clean, rewrites, purge, the manifest) refuses once the lease was taken
over. A second `ctray ingest` process against a running one: e2e/test_ingest_cli.py."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import s3fs

from ctray.config import StorageConfig
from ctray.data.phantoms import write_dataset
from ctray.ingest import job, maintain, records
from ctray.ingest.config import LeaseConfig
from ctray.ingest.job import run_ingest
from ctray.ingest.lease import LEASE, Lease, LeaseHeld, read_lease
from ctray.ingest.maintain import purge
from ctray.ingest.records import clean, read_records, rewrite_without

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, ingest_cfg

SLOW_S = 2.5
"""How late the "slow" taker's lease writes land, at most: well past settle_s. They land as soon
as the other taker has decided (got the lease or been refused), so that it decides first however
loaded the machine is, unless deciding takes it longer than this (blocked by a lock)."""
SETTLE = LeaseConfig(settle_s=0.2)
BUCKET = "ctray-lease"

# One taker as a process of its own: `python -c TAKER OUT NAME GO`. The "slow" one's lease writes,
# however they are made (a rename into place or a link), land once the "fast" one has decided
# (GO.decided) or SLOW_S later; the fast one starts once the slow one's write is under way
# (GO.pending), so it reads the lease that the slow one read.
TAKER = f"""
import os, sys, time
from ctray.config import StorageConfig
from ctray.ingest.config import LeaseConfig
from ctray.ingest.lease import LEASE, Lease, LeaseHeld

out, name, go = sys.argv[1:4]
for call in ("link", "replace"):
    def late(src, dst, *args, _real=getattr(os, call), **kwargs):
        if name == "slow" and os.path.basename(str(dst)) == LEASE:
            open(go + ".pending", "w").close()
            waited = time.monotonic() + {SLOW_S}
            while not os.path.exists(go + ".decided") and time.monotonic() < waited:
                time.sleep(0.005)
        return _real(src, dst, *args, **kwargs)
    setattr(os, call, late)
open(go + "." + name, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
while name == "fast" and not os.path.exists(go + ".pending"):
    time.sleep(0.005)
try:
    lease = Lease(out, LeaseConfig(settle_s={SETTLE.settle_s}), StorageConfig(), what=name).acquire()
except LeaseHeld as e:
    print("REFUSED", e, flush=True)
    open(go + ".decided", "w").close()
    sys.exit(0)
print("ACQUIRED", flush=True)
open(go + ".decided", "w").close()
time.sleep({SLOW_S} + 2)  # held while the other one decides
lease.release()
"""


def test_two_processes_taking_a_new_local_lease_one_gets_it(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", TAKER, str(out), name, str(go)], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        for name in ("slow", "fast")
    }
    deadline = time.time() + 60
    while not all(Path(f"{go}.{name}").exists() for name in procs) and time.time() < deadline:
        time.sleep(0.01)  # both have imported ctray: they start together
    go.touch()
    said = {name: p.communicate(timeout=60)[0].strip() for name, p in procs.items()}
    assert sorted(line.split()[0] for line in said.values()) == ["ACQUIRED", "REFUSED"], said
    refused = next(line for line in said.values() if line.startswith("REFUSED"))
    assert "at the same moment; this ingest stops" in refused and "\n" not in refused, refused


# --- two takers as threads of this process, in a local folder or on S3 ---


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[str, StorageConfig]:
    """An output URI with no lease yet, and its storage settings."""
    if request.param == "local":
        return str(tmp_path / "out"), StorageConfig()
    endpoint = request.getfixturevalue("s3_endpoint")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", StorageConfig(endpoint_url=endpoint)


class Slow:
    """Whose lease writes land late, whether one is under way, and whether the other taker has
    decided (the late writes land then, or SLOW_S later)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.pending = threading.Event()
        self.decided = threading.Event()

    def __call__(self, body: bytes) -> bool:
        late = any(f'"holder": "{name} on '.encode() in body for name in self.names)
        if late:
            self.pending.set()
        return late


@pytest.fixture
def slow_writes(monkeypatch) -> Iterator[Slow]:
    """The lease writes of the holders named in `names` land SLOW_S late: a local file's rename
    or link into place, or an S3 PUT of a lease naming them (the request is sent late)."""
    from aiobotocore.client import AioBaseClient

    slowed = Slow()

    def late(real: Callable) -> Callable:
        def call(src, dst, *args, **kwargs):
            if os.path.basename(str(dst)) == LEASE and slowed(Path(src).read_bytes()):
                slowed.decided.wait(SLOW_S)
            return real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "link", late(os.link))
    monkeypatch.setattr(os, "replace", late(os.replace))
    api_call = AioBaseClient._make_api_call

    async def late_put(self, operation, params):
        if operation == "PutObject" and isinstance(params.get("Body"), bytes) and slowed(params["Body"]):
            waited = time.monotonic() + SLOW_S
            while not slowed.decided.is_set() and time.monotonic() < waited:
                await asyncio.sleep(0.005)
        return await api_call(self, operation, params)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", late_put)
    yield slowed


def _write_lease(uri: str, storage: StorageConfig, **fields) -> None:
    """A lease of another host's ingest (node-7), not through ctray's lease code."""
    now = time.time()
    lease = {"token": "theirs", "holder": "ingest on node-7 pid 42", "host": "node-7", "pid": 42, "started": now - 60}
    lease.update(fields)
    if uri.startswith("s3://"):
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": storage.endpoint_url}, skip_instance_cache=True)
        fs.pipe_file(f"{uri.removeprefix('s3://')}/{LEASE}", json.dumps(lease).encode())
    else:
        Path(uri).mkdir(parents=True, exist_ok=True)
        (Path(uri) / LEASE).write_text(json.dumps(lease))


def _race(uri: str, storage: StorageConfig, slow: Slow) -> dict[str, str | Lease]:
    """The takers "slow" and, once its write is under way, "fast": name -> its Lease, or why it was
    refused. The fast one reads the lease that the slow one read and writes before the slow one's
    write lands."""
    said: dict[str, str | Lease] = {}
    slow.names.add("slow")

    def take(name: str) -> None:
        if name == "fast":
            slow.pending.wait(timeout=30)
        try:
            said[name] = Lease(uri, SETTLE, storage, what=name).acquire()
        except LeaseHeld as e:
            said[name] = str(e)
        if name == "fast":
            slow.decided.set()

    threads = [threading.Thread(target=take, args=(name,)) for name in ("slow", "fast")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return said


def _one_holder(said: dict[str, str | Lease], uri: str, storage: StorageConfig) -> None:
    holders = [lease for lease in said.values() if isinstance(lease, Lease)]
    try:
        assert len(holders) == 1, said
        refused = next(why for why in said.values() if isinstance(why, str))
        assert "at the same moment; this ingest stops" in refused, refused
        assert read_lease(uri, storage)["token"] == holders[0].token
    finally:
        for lease in holders:
            lease.release()


def test_two_taking_a_new_lease_at_once_one_gets_it(store, slow_writes):
    uri, storage = store
    _one_holder(_race(uri, storage, slow_writes), uri, storage)


def test_two_taking_over_an_expired_lease_at_once_one_gets_it(store, slow_writes):
    uri, storage = store
    _write_lease(uri, storage, expires=time.time() - 10, expires_at="10 s ago")
    _one_holder(_race(uri, storage, slow_writes), uri, storage)


def test_a_renewal_landing_after_a_takeover_does_not_undo_it(store, slow_writes):
    """The holder's renewal is read (still its lease), then written late, after its lease expired
    and another ingest took it over: one of the two holds it, never both."""
    uri, storage = store
    first = Lease(uri, LeaseConfig(ttl_s=1.0, settle_s=0.2), storage, what="slow").acquire()
    slow_writes.names.add("slow")  # its renewals (every 0.25 s) land late from now on
    time.sleep(1.5)  # its lease, last written on acquiring, has expired
    second: Lease | None = None
    try:
        second = Lease(uri, SETTLE, storage, what="fast").acquire()
    except LeaseHeld as e:
        assert "at the same moment; this ingest stops" in str(e)
    slow_writes.decided.set()  # the renewal read before the takeover lands now (or is refused)
    time.sleep(SLOW_S)
    try:
        holders = [lease for lease in (first, second) if lease is not None and lease.lost is None]
        assert len(holders) == 1, [(lease.holder, lease.lost) for lease in (first, second) if lease]
        assert read_lease(uri, storage)["token"] == holders[0].token
    finally:
        slow_writes.names.clear()
        for lease in (first, second):
            if lease is not None:
                lease.release()


def test_stores_without_a_compare_and_swap_read_the_lease_back(caplog):
    """memory:// (like gs://): written, then read back after settle_s, with a warning that this
    tells two ingests apart only while no write lands later than that."""
    uri = f"memory://lease-{uuid.uuid4().hex[:8]}"
    with Lease(uri, SETTLE, StorageConfig()) as lease:
        assert read_lease(uri, StorageConfig())["token"] == lease.token
        with pytest.raises(LeaseHeld, match="is being written by another ingest"):
            Lease(uri, SETTLE, StorageConfig()).acquire()
    assert read_lease(uri, StorageConfig()) is None
    assert "no compare-and-swap on this store" in caplog.text


def test_a_folder_without_file_locks_reads_the_lease_back(tmp_path, monkeypatch, caplog):
    """flock refused (ENOLCK: an NFS mount without its lock service): the lease is still taken, by
    the link and the read-back after settle_s, with a warning."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with Lease(str(tmp_path), SETTLE, StorageConfig()):
        with pytest.raises(LeaseHeld, match="is being written by another ingest"):
            Lease(str(tmp_path), SETTLE, StorageConfig()).acquire()
    assert not (tmp_path / LEASE).exists()
    assert "this filesystem has no file locks (No locks available)" in caplog.text


# --- what writes the output refuses once the lease was taken over ---


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory) -> Path:
    """4 phantoms ingested two per shard (copied by each test that changes them)."""
    root = tmp_path_factory.mktemp("lease-ingested")
    write_dataset(str(root / "data"), 4, seed=5, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    run_ingest(ingest_cfg(root / "data" / "scans", root / "out"))
    return root


@pytest.fixture
def output(ingested, tmp_path) -> tuple[Path, Path]:
    """(its data folder, a copy of its output with a leftover shard: a writer died before committing it)."""
    out = tmp_path / "out"
    shutil.copytree(ingested / "out", out)
    shutil.copy(next((out / "shards").iterdir()), out / "shards" / "part-00deadbeef00dead.parquet")
    return ingested / "data", out


def _files(out: Path) -> dict[str, bytes]:
    """The output's files but the lease."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(LEASE)
    }


def _taken_over(out: Path) -> None:
    """Another ingest's lease where ours was: ours expired while its holder was paused."""
    _write_lease(str(out), StorageConfig(), expires=time.time() + 600, expires_at="in 10 min")


def _taking_over_after(module: object, name: str, out: Path) -> Callable:
    """`module.name`, which takes the lease over after each call."""
    real = getattr(module, name)

    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        _taken_over(out)
        return result

    return call


TAKEN = r": the lease on \S+ was taken over by ingest on node-7 pid 42; not done$"
LEFTOVER = r"^removing uncommitted leftover shards/part-00deadbeef00dead\.parquet" + TAKEN


def test_clean_and_rewrite_refuse_once_the_lease_was_taken_over(output, monkeypatch):
    _, out = output
    before = _files(out)
    storage = StorageConfig()
    found = read_records(str(out), storage)
    record, drop = found.holding(["phantom0001"])[0]
    with Lease(str(out), SETTLE, storage) as lease:
        _taken_over(out)
        with pytest.raises(LeaseHeld, match=LEFTOVER):
            clean(str(out), storage, found, lease)
        with pytest.raises(LeaseHeld, match=rf"^rewriting shard {record.shard}" + TAKEN):
            rewrite_without(str(out), storage, record, drop, "test", lease)
    assert _files(out) == before

    # taken over while the shard is being copied: its new file stays a leftover, never committed
    (out / LEASE).unlink()
    committing = rf"^committing shard part-\w+ \(shard {record.shard} without 1 scan\(s\)\)" + TAKEN
    with Lease(str(out), SETTLE, storage) as lease:
        monkeypatch.setattr(records, "publish_file", _taking_over_after(records, "publish_file", out))
        with pytest.raises(LeaseHeld, match=committing):
            rewrite_without(str(out), storage, record, drop, "test", lease)
    after = _files(out)
    new = [name for name in after if name not in before]
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(new) == 1 and new[0].startswith("shards/part-"), new


def test_an_ingest_whose_lease_was_taken_over_removes_no_leftover(output, monkeypatch):
    data, out = output
    before = _files(out)
    monkeypatch.setattr(job, "read_records", _taking_over_after(job, "read_records", out))
    with pytest.raises(LeaseHeld, match=LEFTOVER):
        run_ingest(ingest_cfg(data / "scans", out))
    assert _files(out) == before


def test_a_purge_whose_lease_was_taken_over_writes_nothing(output, monkeypatch):
    _, out = output
    before = _files(out)
    monkeypatch.setattr(maintain, "read_records", _taking_over_after(maintain, "read_records", out))
    with pytest.raises(LeaseHeld, match=r"^rewriting shard part-\w+" + TAKEN):
        purge(str(out), StorageConfig(), ["phantom0001"])
    assert _files(out) == before
