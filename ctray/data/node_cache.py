"""A node-local shard cache (data.node_cache): each node fetches a shard from the shard set's
storage once, into a folder on its own disk, and its Ray Data tasks read the local copy from then
on, in every pass and every run on that node; so too the files cut from each shard beside the
shard set (TotalFM's organ cache).

Without it every draw reads its scan's row group from storage (object storage: a GET or two per
draw); a multi-pass run reads the whole shard set from storage once per pass. With it a node
fetches each shard it samples from once: from the second pass on it reads nothing from storage.

Files are named by the shard's sha256 from the manifest (shards are immutable, and a purge writes
a new shard): a copy never goes stale, and a restarted node (the same disk, the same key) finds its
copies. Each shard fetched is checked against that digest before it is published (rename), under
a lock per file, so tasks of one node fetch a shard once between them. Beyond `max_bytes` the least
recently read copies go when the next is published (a copy a task has open stays until it is
closed, so the folder can briefly hold more).

The node's key (its subfolder) is its Ray label `ctray.io/cache-node` where it has one, else the
machine's host name: nodes of Ray's fake multi-node cluster share one disk and one host name, so
its tests label their nodes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from ctray.ingest.derived import PER_SHARD

NODE_LABEL = "ctray.io/cache-node"
"""The Ray node label that names a node's cache subfolder (`ray start --labels`)."""
FETCH_LOG = "fetched.jsonl"
"""Per node: one line per file fetched from storage ({"file", "bytes", "time"}: the copy's name):
what `ctray bench data` counts, and what shows that a node fetched a file once."""
CHUNK = 8 * 2**20


@functools.cache
def node_key() -> str:
    """This node's cache subfolder: its `ctray.io/cache-node` label, else the host name. Asked
    once per process (a process stays on its node): the labels come from the GCS."""
    import ray

    label = ray.get_runtime_context().get_node_labels().get(NODE_LABEL) if ray.is_initialized() else None
    return str(label) if label else socket.gethostname()


@dataclass(frozen=True)
class NodeCache:
    """Where a node keeps its shard copies, and which shards it may keep (their digests)."""

    folder: str
    """A folder on each node's local disk (data.node_cache)."""
    digests: dict[str, str] = field(default_factory=dict)
    """sha256 of each shard, by its path in the shard set's filesystem (ShardSet.digests)."""
    max_bytes: int = 100 * 10**9
    """Most bytes of shard copies one node keeps (data.node_cache_gb)."""

    def root(self) -> str:
        return os.path.join(os.path.expanduser(self.folder), node_key())

    def local(self, fs: pafs.FileSystem, path: str) -> str | None:
        """The local copy of the shard (or of a file cut from a shard, under its PER_SHARD folder)
        at `path` in `fs`, fetched first if this node lacks it; None for any other file: read it from `fs`."""
        digest = self.digests.get(path)
        name = digest or self._derived_name(path)
        if name is None:
            return None
        root = self.root()
        local = os.path.join(root, f"{name}.parquet")
        try:
            os.utime(local)  # most recently read: evicted last
            return local
        except FileNotFoundError:  # not fetched yet, or evicted by another process of the node
            pass
        os.makedirs(root, exist_ok=True)
        with open(local + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another task of this node may be fetching it
            if not os.path.exists(local):
                self._fetch(fs, path, local, digest)  # digest None: a derived file, nothing of its own to check
        return local

    @functools.cached_property
    def _by_name(self) -> dict[str, str]:
        return {posixpath.basename(p): d for p, d in self.digests.items()}

    def _derived_name(self, path: str) -> str | None:
        """A file cut from a shard (<set>/_per_shard/<kind>/<key>/<shard name>) is named by its
        path and the shard's digest: a purge rewrites a shard, and its files cut anew at the same
        path must not be served from an old copy (they held the purged scan's pixels)."""
        if f"/{PER_SHARD}/" not in path:
            return None
        digest = self._by_name.get(posixpath.basename(path))
        return None if digest is None else hashlib.sha256(f"{path}|{digest}".encode()).hexdigest()

    def _fetch(self, fs: pafs.FileSystem, path: str, local: str, digest: str | None) -> None:
        root = os.path.dirname(local)
        tmp = f"{local}.{os.getpid()}.tmp"
        sha, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    sha.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            if digest is not None and sha.hexdigest() != digest:
                raise OSError(f"{path}: its bytes do not match the manifest's sha256; run `ctray verify`")
            self._make_room(root, size)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        with open(os.path.join(root, FETCH_LOG), "a") as log:
            log.write(json.dumps({"file": os.path.basename(local), "bytes": size, "time": time.time()}) + "\n")

    def _make_room(self, root: str, incoming: int) -> None:
        """Remove the least recently read copies until `incoming` more bytes fit in max_bytes, and
        the partial downloads of processes that died (an hour old), under the node's eviction lock.
        (A copy a task has open stays readable, and on disk, until it is closed.)"""
        with open(os.path.join(root, ".evict.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            copies = []
            for entry in os.scandir(root):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # a download published or abandoned meanwhile
                    continue
                if entry.name.endswith(".parquet"):
                    copies.append((st.st_mtime, st.st_size, entry.path))
                elif entry.name.endswith(".tmp") and st.st_mtime < time.time() - 3600:
                    _remove(entry.path)
            total = sum(size for _, size, _ in copies) + incoming
            for _, size, path in sorted(copies):
                if total <= self.max_bytes:
                    break
                _remove(path)
                total -= size


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:  # another process removed it
        pass


def fetched(folder: str) -> dict[str, list[dict[str, Any]]]:
    """Each node's fetches so far ({node key: [{"file", "bytes", "time"}, ...]}), from the fetch logs."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not os.path.isdir(folder):
        return out
    for key in sorted(os.listdir(folder)):
        log = os.path.join(folder, key, FETCH_LOG)
        if os.path.exists(log):
            with open(log) as f:
                out[key] = [json.loads(line) for line in f if line.strip()]
    return out
