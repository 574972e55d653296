"""Paths and URIs -> filesystems: local folders, s3:// (s3fs), gs:// (gcsfs) and other fsspec URLs.

One place for the things every job needs: the filesystem for a URI (with the S3 endpoint
override), retries with exponential backoff around storage calls, listings with a change stamp
per file, and atomic publication of a file (a reader never sees half of it; local files are
fsynced before the rename, so a power cut cannot leave a committed name over missing bytes).
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.errors import ConfigError, CtrayError, StorageError, first_line, library_error

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)
R = TypeVar("R")

# Errors that retrying cannot fix: the object is not there or not ours to touch, or a bug (which
# must surface as itself, not as "storage unreachable").
_PERMANENT = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    CtrayError,
    TypeError,
    AttributeError,
    NameError,
)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve_uri(uri: str) -> str:
    """Make a local path absolute so that Ray workers, whose working directory may differ from
    the driver's, see the same place. URIs with a scheme are returned unchanged."""
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def filesystem(uri: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it."""
    uri = resolve_uri(uri)
    if not is_remote(uri):
        return LocalFileSystem(), uri
    options: dict = {}
    if uri.startswith("s3://"):
        options = dict(
            # Fresh listings every call: resume logic must see what other workers just wrote.
            skip_instance_cache=True,
            use_listings_cache=False,
            # Our own retry loop (with_retries) owns backoff; keep botocore from stacking its own.
            config_kwargs={
                "connect_timeout": cfg.connect_timeout_s,
                "read_timeout": max(60.0, cfg.connect_timeout_s),
                "retries": {"max_attempts": 1},
            },
        )
        if cfg.endpoint_url:
            options["client_kwargs"] = {"endpoint_url": cfg.endpoint_url}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:  # fsspec names the package to install, or an unknown scheme
        scheme = uri.split("://", 1)[0]
        raise ConfigError(f"no filesystem for {scheme}:// URIs ({uri}): {first_line(e) or type(e).__name__}") from None
    return fs, path


def arrow_filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `uri`, for Ray Data reads and Ray Train storage.

    s3:// uses pyarrow's native S3 client (with the endpoint override); other schemes wrap
    their fsspec filesystem."""
    import pyarrow.fs as pafs

    uri = resolve_uri(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    if uri.startswith("s3://"):
        kwargs: dict = {"connect_timeout": cfg.connect_timeout_s, "request_timeout": max(60.0, cfg.connect_timeout_s)}
        if cfg.endpoint_url:
            scheme, _, host = cfg.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://")
    fs, path = filesystem(uri, cfg)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(root: str, *parts: str) -> str:
    """Join path parts the way fsspec spells paths (always "/", local or remote)."""
    return posixpath.join(root, *parts)


def with_retries(fn: Callable[[], R], what: str, cfg: StorageConfig, quote_errors: bool = True) -> R:
    """Call `fn`, retrying transient failures with exponential backoff; then a clear StorageError.

    `what` names the operation and its target (never credentials), e.g. "write s3://b/x.json".
    `quote_errors` False: the error gives the failure's type only, not the client's message (which
    quotes the URL: an input's, where inputs are named by pseudonym).
    """
    delay = cfg.backoff_s
    for attempt in range(1, cfg.retries + 1):
        try:
            return fn()
        except _PERMANENT:
            raise
        except Exception as e:  # any transport error is worth another try
            if attempt == cfg.retries:
                raise StorageError(
                    f"{what}: storage unreachable after {cfg.retries} attempts ({library_error(e, quote_errors)})"
                ) from e
            log.warning(
                "%s failed (attempt %d/%d, %s); retrying in %.1fs", what, attempt, cfg.retries, type(e).__name__, delay
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _replace_locally(dest: str, write: Callable[[str], object]) -> None:
    """Write through a temp file beside `dest`, fsync it, rename (atomic within one filesystem),
    then fsync the folder so that the rename itself survives a crash."""
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: str, data: bytes, mode: int = 0o666) -> None:
    """`mode` before the umask: the file is created with it, so no moment exposes it wider."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)


def publish_file(local_path: str, fs: fsspec.AbstractFileSystem, dest: str, cfg: StorageConfig) -> None:
    """Copy a finished local file to `dest` so that it appears whole or not at all.

    Local destinations: copy beside the target, then rename. Object stores: a PUT or a completed
    multipart upload is already all-or-nothing, so the object is written in place.
    """
    if isinstance(fs, LocalFileSystem):
        _replace_locally(dest, lambda tmp: shutil.copyfile(local_path, tmp))
        return
    with_retries(lambda: fs.put_file(local_path, dest), f"upload {fs.unstrip_protocol(dest)}", cfg)


def publish_bytes(
    data: bytes, fs: fsspec.AbstractFileSystem, dest: str, cfg: StorageConfig, owner_only: bool = False
) -> None:
    """Write `data` to `dest` atomically (see publish_file). `owner_only`: a local file readable by
    its owner alone (0600); object stores have no such bit (their access is the bucket's policy)."""
    if isinstance(fs, LocalFileSystem):
        _replace_locally(dest, lambda tmp: _write_bytes(tmp, data, 0o600 if owner_only else 0o666))
        return
    with_retries(lambda: fs.pipe_file(dest, data), f"write {fs.unstrip_protocol(dest)}", cfg)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, cfg: StorageConfig) -> bytes:
    return with_retries(lambda: fs.cat_file(path), f"read {fs.unstrip_protocol(path)}", cfg)


def read_many(
    fs: fsspec.AbstractFileSystem, paths: list[str], cfg: StorageConfig, missing_ok: bool = False
) -> dict[str, bytes]:
    """Several small objects at once (s3fs and gcsfs fetch them concurrently): path -> bytes.
    With `missing_ok`, absent objects are left out instead of raising FileNotFoundError."""
    if not paths:
        return {}
    where = f"read {len(paths)} objects under {fs.unstrip_protocol(posixpath.dirname(paths[0]))}"
    out = with_retries(lambda: fs.cat(list(paths), on_error="omit" if missing_ok else "raise"), where, cfg)
    return {fs._strip_protocol(k): v for k, v in out.items() if not isinstance(v, Exception)}


def list_files(fs: fsspec.AbstractFileSystem, root: str, cfg: StorageConfig, suffix: str = "") -> list[str]:
    """Files under `root` (recursive) ending in `suffix`; an absent root is an empty list."""
    return [e.path for e in list_entries(fs, root, cfg) if e.path.endswith(suffix)]


@dataclass(frozen=True)
class Entry:
    """A file in a listing and what tells a changed file from an unchanged one without reading it."""

    path: str
    size: int
    stamp: str
    """Size plus the store's own change marker: the ETag on S3, the generation or md5 on GCS, the
    modification time on local disks."""


def _stamp(info: dict) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return f"{info.get('size', 0)}:{str(info[key]).strip(chr(34))}"
    return str(info.get("size", 0))


def list_entries(fs: fsspec.AbstractFileSystem, root: str, cfg: StorageConfig) -> list[Entry]:
    """Files under `root` (recursive) with sizes and change stamps, sorted by path; an absent root
    is an empty list. One listing call: S3 and GCS return the details with the names."""

    def _find() -> list[Entry]:
        if not fs.exists(root):
            return []
        out = []
        for p, i in sorted(fs.find(root, detail=True).items()):
            if i.get("islink") and isinstance(fs, LocalFileSystem):  # a symlinked file counts as its target
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue  # a dangling link
                i = {"type": "file" if os.path.isfile(p) else "other", "size": st.st_size, "mtime": st.st_mtime}
            if i.get("type", "file") == "file":
                out.append(Entry(p, int(i.get("size") or 0), _stamp(i)))
        return out

    return with_retries(_find, f"list {fs.unstrip_protocol(root)}", cfg)


def remove(fs: fsspec.AbstractFileSystem, path: str, cfg: StorageConfig) -> None:
    """Delete one object; an absent one is not an error (another cleanup got there first)."""
    try:
        with_retries(lambda: fs.rm_file(path), f"remove {fs.unstrip_protocol(path)}", cfg)
    except FileNotFoundError:
        pass


@contextmanager
def local_folder(uri: str, cfg: StorageConfig) -> Iterator[str]:
    """A folder on this machine for the block: itself when local, else a temporary copy of it
    (removed afterwards), for libraries that read only local paths (transformers, MLflow)."""
    fs, root = filesystem(uri, cfg)
    if not is_remote(uri):
        yield root
        return
    tmp = tempfile.mkdtemp(prefix="ctray-copy-")
    try:
        for path in with_retries(lambda: list(fs.find(root)), f"list {uri}", cfg):
            dest = os.path.join(tmp, posixpath.relpath(path, root))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fetch = functools.partial(fs.get_file, path, dest)
            with_retries(fetch, f"read {fs.unstrip_protocol(path)}", cfg)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
