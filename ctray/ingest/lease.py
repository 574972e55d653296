"""One writer per output: a lease object in the output storage itself (works on S3 and GCS).

`_lease.json` names its holder (host, pid, a random token), when it started and when it expires.
Taking it: read it; refuse when another holder's lease has not expired (unless the holder was a
process on this host that is gone: a crashed local ingest need not be waited for); else write ours, wait
`settle_s`, and read it back: of two ingests taking it at once, the later write wins, and the
other one reads that and refuses (object stores give read-after-write consistency; neither
local disks nor S3 need a compare-and-swap for this). The holder renews it every ttl/4 from a
thread; a crashed holder's lease expires and the next ingest takes it over. Shard writers check
the token before each commit, so a holder that lost its lease (paused past expiry) commits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from ctray.config import StorageConfig
from ctray.errors import CtrayError, StorageError
from ctray.ingest.config import LeaseConfig
from ctray.storage import filesystem, join, publish_bytes, read_bytes, remove

log = logging.getLogger(__name__)

LEASE = "_lease.json"


class LeaseHeld(CtrayError):
    """Another ingest holds the output's lease."""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def read_lease(uri: str, storage: StorageConfig) -> dict | None:
    fs, root = filesystem(uri, storage)
    try:
        return json.loads(read_bytes(fs, join(root, LEASE), storage))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {"token": "", "expires": 0.0}  # half-written by a crash on a local disk: stale


def lease_is_ours(uri: str, storage: StorageConfig, token: str) -> bool:
    lease = read_lease(uri, storage)
    return lease is not None and lease.get("token") == token


_HELD: set[str] = set()
"""Tokens of the leases this process holds now."""


def _holder_gone(lease: dict) -> bool:
    """The holder ran on this host and its process no longer exists (or is a newer one with the
    pid), or it was this process and its ingest has ended (a lease it could not release)."""
    import psutil

    if lease.get("host") != socket.gethostname() or not lease.get("pid"):
        return False
    if int(lease["pid"]) == os.getpid():
        return lease.get("token") not in _HELD
    try:
        return psutil.Process(int(lease["pid"])).create_time() > float(lease.get("started", 0)) + 1
    except psutil.NoSuchProcess:
        return True


class Lease:
    """Context manager: hold the output's lease while an ingest writes it."""

    def __init__(self, uri: str, cfg: LeaseConfig, storage: StorageConfig, what: str = "ingest") -> None:
        self.uri, self.cfg, self.storage, self.what = uri, cfg, storage, what
        self.fs, root = filesystem(uri, storage)
        self.path = join(root, LEASE)
        self.token = uuid.uuid4().hex
        self.holder = f"{self.what} on {socket.gethostname()} pid {os.getpid()}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "started_at": _utc(self.started),
                "renewed": now,
                "expires": now + self.cfg.ttl_s,
                "expires_at": _utc(now + self.cfg.ttl_s),
            }
        ).encode()

    def acquire(self) -> Lease:
        current = read_lease(self.uri, self.storage)
        now = time.time()
        if current is not None and current.get("expires", 0) > now and not _holder_gone(current):
            raise LeaseHeld(
                f"{self.uri} is being written by another {current.get('holder', 'ingest')} (started "
                f"{current.get('started_at', '?')}, lease until {current.get('expires_at', '?')}); "
                "wait for it to finish, or for its lease to expire if it crashed"
            )
        if current is not None:
            log.warning(
                "taking over the stale lease of %s on %s (expired %s)",
                current.get("holder", "?"),
                self.uri,
                current.get("expires_at", "?"),
            )
        publish_bytes(self._body(), self.fs, self.path, self.storage)
        time.sleep(self.cfg.settle_s)
        after = read_lease(self.uri, self.storage)
        if after is None or after.get("token") != self.token:
            holder = (after or {}).get("holder", "another ingest")
            raise LeaseHeld(f"{self.uri} was taken by {holder} at the same moment; this ingest stops")
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._renew, name="ctray-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.cfg.ttl_s / 4):
            try:
                current = read_lease(self.uri, self.storage)
                if current is None or current.get("token") != self.token:
                    self.lost = f"the lease on {self.uri} was taken over by {(current or {}).get('holder', 'nobody')}"
                    log.error("%s; no further shard will be committed", self.lost)
                    return
                publish_bytes(self._body(), self.fs, self.path, self.storage)
            except StorageError as e:
                log.warning("lease renewal failed (%s); retrying", e)

    def check(self) -> None:
        if self.lost:
            raise LeaseHeld(self.lost)

    def release(self) -> None:
        _HELD.discard(self.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if lease_is_ours(self.uri, self.storage, self.token):
                remove(self.fs, self.path, self.storage)
        except StorageError as e:
            log.warning("lease not released (%s); it expires by itself", e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
