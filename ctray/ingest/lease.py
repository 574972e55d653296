"""One writer per output: a lease object in the output storage itself (local folders, S3, GCS).

`_lease.json` names its holder (host, pid, a random token), when it started and when it expires.
Taking it: read it; refuse when another holder's lease has not expired (unless the holder was a
process on this host that is gone: a crashed local ingest need not be waited for); else write ours
as a compare-and-swap against what was read: the write lands only while the lease is still what was
read (none, or the stale lease taken over), so of two ingests taking it at once exactly one gets it,
however late either's write lands. Waiting and reading back cannot give that: a write delayed past
the wait (a slow disk, a retried request) lands over the winner's. How each store swaps:

- Local folders (NFS included): a new lease is hard-linked into place from a complete temp file
  (`os.link` fails where the name exists, on a local disk and on an NFS server alike). Replacing one
  (a takeover, a renewal) and removing it happen under an exclusive flock of `_lease.json.lock`,
  after checking that the lease is still the bytes read. The flock is held for one read and one
  rename, never for the lease's life: a crashed holder leaves no lock behind (the kernel or the NFS
  server drops it) and its lease expires like any other. flock excludes processes on one host; on
  NFS, Linux hands it to the server, which excludes processes on other hosts too. A filesystem that
  refuses locks falls back to the read-back below (a warning says so); one that keeps them to each
  host (some FUSE mounts) leaves two hosts taking over the same expired lease at once unexcluded.
- S3: PUT with If-None-Match: * (a new lease) or If-Match: <the ETag read> (a replacement), and
  DELETE with If-Match; S3 answers 412 to all writers but one. The read-back below stays as a check
  on S3-compatible stores that ignore those headers.
- GCS and other fsspec stores: no compare-and-swap here (gcsfs offers a generation precondition
  only for creating an object, and the tests have no GCS server to hold a replacement against):
  the lease is written, then read back after `settle_s`; of two ingests the later write wins and the
  other one refuses. That holds only while no write takes longer than settle_s to land; a warning
  says so.

The holder renews it every ttl/4 from a thread by the same compare-and-swap, so a renewal never
overwrites a lease that another ingest took over; a crashed holder's lease expires and the next
ingest takes it over. Every write to the output checks the token first (shard commits, and
`Lease.ensure` before cleanup, rewrites, purge's writes and the manifest), so a holder that lost
its lease (paused past expiry) writes nothing more. One request lies between a check and its write:
no store here compares a token on every write.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.errors import CtrayError, StorageError
from ctray.ingest.config import LeaseConfig
from ctray.storage import filesystem, join, publish_bytes, read_bytes, remove, with_retries

log = logging.getLogger(__name__)

LEASE = "_lease.json"
LOCK = LEASE + ".lock"
"""Beside the lease in local folders: flocked for each change of the lease, never removed (removing
a lock file lets a process that opened it before lock the removed file while another locks a new one)."""
LOCK_WAIT_S = 30.0
"""How long a change of a local lease waits for the lock, which others hold for milliseconds."""

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
"""flock's answers on a filesystem that has no locks (not: another process holds it)."""
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
"""link's answers on a filesystem that has no hard links (vfat, some FUSE mounts)."""


class LeaseHeld(CtrayError):
    """Another ingest holds the output's lease."""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _parse(raw: bytes) -> dict:
    """A lease's bytes as a dict; ones that are not a JSON object (half-written by a crash on a
    local disk) read as a stale lease of nobody's."""
    try:
        lease = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        lease = None
    return lease if isinstance(lease, dict) else {"token": "", "expires": 0.0}


def read_lease(uri: str, storage: StorageConfig) -> dict | None:
    fs, root = filesystem(uri, storage)
    try:
        return _parse(read_bytes(fs, join(root, LEASE), storage))
    except FileNotFoundError:
        return None


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


@dataclass(frozen=True)
class _Seen:
    """The lease as read: the version a compare-and-swap is made against."""

    raw: bytes | None
    """Its bytes; None: there is no lease. Every write's bytes differ (a new token or renewal
    time), so equal bytes are the same write: no lease comes back to bytes it had before."""
    tag: str | None = None
    """The store's name for that version (S3's ETag)."""

    @property
    def lease(self) -> dict | None:
        return None if self.raw is None else _parse(self.raw)


class _Store:
    """How a store reads and writes the lease. This base writes plainly: what it offers where no
    compare-and-swap is known (GCS, other fsspec stores), with the read-back after settle_s."""

    cas = False
    """put and delete change the lease only while it is still what was read."""
    read_back = True
    """Taking the lease ends with waiting settle_s and reading it back."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, storage: StorageConfig) -> None:
        self.fs, self.path, self.storage = fs, path, storage
        self.where = fs.unstrip_protocol(path)

    def read(self) -> _Seen:
        try:
            return _Seen(read_bytes(self.fs, self.path, self.storage))
        except FileNotFoundError:
            return _Seen(None)

    def put(self, body: bytes, seen: _Seen) -> bool:
        """Write `body` as the lease if it is still `seen`; False where it is not (nothing written).
        This base cannot tell: it writes, and the read-back decides."""
        publish_bytes(body, self.fs, self.path, self.storage)
        return True

    def delete(self, seen: _Seen) -> bool:
        """Remove the lease if it is still `seen`; False where it is not (nothing removed). This
        base cannot tell: the caller has just read it as its own."""
        remove(self.fs, self.path, self.storage)
        return True


def _write_synced(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """Write and fsync: a lease that a crash could leave empty would read as stale."""
    with open(os.open(path, flags, 0o666), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: str) -> None:
    """fsync a folder, so that a link or removal in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalStore(_Store):
    """A local (or NFS) folder: link for a new lease, flock around replacing or removing one."""

    cas = True
    read_back = False

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive use of the lease for one read-compare-write. flock, not lockf: flock's locks
        belong to the open file, so two threads of one process exclude each other too (lockf's
        belong to the process)."""
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if self.cas:
                self._flock(fd)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _flock(self, fd: int) -> None:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock = os.path.join(os.path.dirname(self.path), LOCK)
                    raise StorageError(
                        f"{lock} stayed locked for {LOCK_WAIT_S:.0f}s (a change of the lease takes milliseconds):"
                        " is a process that holds it hung?"
                    ) from None
                time.sleep(0.01)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                self.cas, self.read_back = False, True
                log.warning(
                    "%s: this filesystem has no file locks (%s); two ingests taking over a stale lease at once"
                    " are told apart only by reading it back after lease.settle_s",
                    self.where,
                    os.strerror(e.errno),
                )
                return

    def put(self, body: bytes, seen: _Seen) -> bool:
        with self._locked():
            if self.read().raw != seen.raw:
                return False
            if seen.raw is None:
                return self._create(body)
            publish_bytes(body, self.fs, self.path, self.storage)
            return True

    def _create(self, body: bytes) -> bool:
        """Link a complete temp file to the lease's name: refused where the name exists, also
        across hosts where flock is not shared, and no reader ever sees half a lease."""
        folder = os.path.dirname(self.path)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        _write_synced(tmp, body)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            return self._create_exclusive(body)
        finally:
            os.remove(tmp)
        _sync_folder(folder)
        return True

    def _create_exclusive(self, body: bytes) -> bool:
        """Where there are no hard links: O_EXCL, as atomic, though a reader may see the file
        before its bytes (and take it for a stale lease, which the lock then keeps it from replacing)."""
        try:
            _write_synced(self.path, body, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        _sync_folder(os.path.dirname(self.path))
        return True

    def delete(self, seen: _Seen) -> bool:
        with self._locked():
            if self.read().raw != seen.raw:
                return False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            _sync_folder(os.path.dirname(self.path))
            return True


def _error(e: Exception) -> tuple[str, int]:
    """An S3 client error's code and HTTP status ("", 0 for another exception)."""
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), int(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    )


_NOT_AS_READ = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
"""S3's answers to a conditional request when the lease is no longer what was read: another's
write landed (412), is landing (409), or the lease is gone (404 to If-Match)."""


@functools.cache
def _s3_conditions() -> bool:
    """This botocore knows If-None-Match and If-Match on PutObject (releases since late 2024)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    return {"IfNoneMatch", "IfMatch"} <= set(model.operation_model("PutObject").input_shape.members)


class _S3Store(_Store):
    """S3: conditional PUT and DELETE on the ETag read."""

    cas = True
    read_back = True  # a check on S3-compatible stores that ignore If-None-Match / If-Match

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, storage: StorageConfig) -> None:
        super().__init__(fs, path, storage)
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict:
        """One request on s3fs's client, not through s3fs's wrappers: they drop the parameters
        the client does not know (an old botocore would make a conditional PUT a plain one) and
        turn 412 into a generic OSError."""

        async def call() -> dict:
            await self.fs.set_session()
            client = await self.fs.get_s3(self.bucket)
            out = await getattr(client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
            if method == "get_object":
                body = out["Body"]
                try:
                    out["Body"] = await body.read()
                finally:
                    body.close()
            return out

        try:
            return fsspec.asyn.sync(self.fs.loop, call)
        except Exception as e:
            code, status = _error(e)
            if code in ("NoSuchBucket", "AccessDenied") or status == 403:  # no retry mends these
                raise StorageError(f"{method} {self.where}: {code or status}") from None
            raise

    def read(self) -> _Seen:
        def get() -> _Seen:
            try:
                out = self._call("get_object")
            except Exception as e:
                if _error(e)[0] == "NoSuchKey":
                    return _Seen(None)
                raise
            return _Seen(out["Body"], out["ETag"])

        return with_retries(get, f"read {self.where}", self.storage)

    def put(self, body: bytes, seen: _Seen) -> bool:
        condition = {"IfNoneMatch": "*"} if seen.raw is None else {"IfMatch": seen.tag}

        def put() -> bool:
            try:
                self._call("put_object", Body=body, **condition)
            except Exception as e:
                if _error(e)[0] in _NOT_AS_READ:
                    return False
                raise
            return True

        return with_retries(put, f"write {self.where}", self.storage)

    def delete(self, seen: _Seen) -> bool:
        def delete() -> bool:
            try:
                self._call("delete_object", IfMatch=seen.tag)
            except Exception as e:
                code = _error(e)[0]
                if code == "NotImplemented":  # a store without conditional deletes (AWS before 2025-09)
                    self._call("delete_object")
                    return True
                if code in _NOT_AS_READ:
                    return False
                raise
            return True

        return with_retries(delete, f"remove {self.where}", self.storage)


def _store(fs: fsspec.AbstractFileSystem, path: str, storage: StorageConfig) -> _Store:
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path, storage)
    if "s3" in fs.protocol and _s3_conditions():
        return _S3Store(fs, path, storage)
    return _Store(fs, path, storage)


class Lease:
    """Context manager: hold the output's lease while an ingest writes it."""

    def __init__(self, uri: str, cfg: LeaseConfig, storage: StorageConfig, what: str = "ingest") -> None:
        self.uri, self.cfg, self.storage, self.what = uri, cfg, storage, what
        self.fs, root = filesystem(uri, storage)
        self.path = join(root, LEASE)
        self.store = _store(self.fs, self.path, storage)
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

    def _ours(self, seen: _Seen) -> bool:
        lease = seen.lease
        return lease is not None and lease.get("token") == self.token

    def _put(self, seen: _Seen) -> tuple[bool, _Seen]:
        """Our lease written over `seen` by the store's compare-and-swap: (whether it is ours now,
        the lease as it stands where it is not)."""
        body = self._body()
        if self.store.put(body, seen):
            return True, _Seen(body)
        after = self.store.read()
        # A write retried after its answer was lost (or an NFS link whose reply was) is refused by
        # its own first try: the lease is then these very bytes.
        return after.raw == body, after

    def acquire(self) -> Lease:
        seen = self.store.read()
        current = seen.lease
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
        if not self.store.cas:
            log.warning(
                "%s: no compare-and-swap on this store; two ingests starting within lease.settle_s (%.1fs) of each"
                " other are told apart by reading the lease back, which fails if a write takes longer to land",
                self.uri,
                self.cfg.settle_s,
            )
        ours, after = self._put(seen)
        if ours and self.store.read_back:
            time.sleep(self.cfg.settle_s)
            after = self.store.read()
            ours = self._ours(after)
            if not ours and self.store.cas:
                log.warning(
                    "%s: the store took a conditional write, then showed another's: it may ignore them", self.uri
                )
        if not ours:
            holder = (after.lease or {}).get("holder", "another ingest")
            raise LeaseHeld(f"{self.uri} was taken by {holder} at the same moment; this ingest stops")
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._renew, name="ctray-lease", daemon=True)
        self._thread.start()
        return self

    def _taken_by(self, seen: _Seen) -> str:
        return f"the lease on {self.uri} was taken over by {(seen.lease or {}).get('holder', 'nobody')}"

    def _lose(self, seen: _Seen) -> None:
        self.lost = self._taken_by(seen)
        log.error("%s; no further shard will be committed", self.lost)

    def _renew(self) -> None:
        while not self._stop.wait(self.cfg.ttl_s / 4):
            try:
                seen = self.store.read()
                if self._ours(seen):
                    ours, seen = self._put(seen)
                    if ours:
                        continue
                self._lose(seen)
                return
            except (StorageError, OSError) as e:  # a local disk's errors are not retried below
                log.warning("lease renewal failed (%s); retrying", e)

    def check(self) -> None:
        """LeaseHeld where the renewal found the lease taken over (no request: for loops)."""
        if self.lost:
            raise LeaseHeld(self.lost)

    def ensure(self, doing: str) -> None:
        """LeaseHeld (naming `doing`) unless the lease is ours in the store now: before a write to
        the output, since the renewal sees a takeover only every ttl/4."""
        if self.lost:
            raise LeaseHeld(f"{doing}: {self.lost}; not done")
        seen = self.store.read()
        if not self._ours(seen):
            raise LeaseHeld(f"{doing}: {self._taken_by(seen)}; not done")

    def release(self) -> None:
        _HELD.discard(self.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            seen = self.store.read()
            if self._ours(seen) and not self.store.delete(seen):
                log.warning("the lease on %s changed while it was released; left to its new holder", self.uri)
        except StorageError as e:
            log.warning("lease not released (%s); it expires by itself", e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
