"""Paths and URIs -> filesystems: local folders, or s3:// (and other fsspec URLs) through fsspec.

One place for three things every job needs: the filesystem for a URI (with the S3 endpoint
override), retries with exponential backoff around storage calls, and atomic publication of a
file (a reader never sees half of it).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.errors import CtrayError, StorageError

log = logging.getLogger(__name__)
R = TypeVar("R")

# Errors that retrying cannot fix: the object is not there or not ours to touch, or a bug (which
# must surface as itself, not as "storage unreachable").
_PERMANENT = (
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, CtrayError,
    TypeError, AttributeError, NameError,
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
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def arrow_filesystem(uri: str, cfg: StorageConfig):
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


def with_retries(fn: Callable[[], R], what: str, cfg: StorageConfig) -> R:
    """Call `fn`, retrying transient failures with exponential backoff; then a clear StorageError.

    `what` names the operation and its target (never credentials), e.g. "write s3://b/x.json".
    """
    delay = cfg.backoff_s
    for attempt in range(1, cfg.retries + 1):
        try:
            return fn()
        except _PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - any transport error is worth another try
            if attempt == cfg.retries:
                raise StorageError(
                    f"{what}: storage unreachable after {cfg.retries} attempts "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
            log.warning("%s failed (attempt %d/%d, %s); retrying in %.1fs", what, attempt, cfg.retries, type(e).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _replace_locally(dest: str, write: Callable[[str], None]) -> None:
    """Write through a temp file beside `dest`, then rename (atomic within one filesystem)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    write(tmp)
    os.replace(tmp, dest)


def publish_file(local_path: str, fs: fsspec.AbstractFileSystem, dest: str, cfg: StorageConfig) -> None:
    """Copy a finished local file to `dest` so that it appears whole or not at all.

    Local destinations: copy beside the target, then rename. Object stores: a PUT or a completed
    multipart upload is already all-or-nothing, so the object is written in place.
    """
    if isinstance(fs, LocalFileSystem):
        _replace_locally(dest, lambda tmp: shutil.copyfile(local_path, tmp))
        return
    with_retries(lambda: fs.put_file(local_path, dest), f"upload {fs.unstrip_protocol(dest)}", cfg)


def publish_bytes(data: bytes, fs: fsspec.AbstractFileSystem, dest: str, cfg: StorageConfig) -> None:
    """Write `data` to `dest` atomically (see publish_file)."""
    if isinstance(fs, LocalFileSystem):
        _replace_locally(dest, lambda tmp: Path(tmp).write_bytes(data))
        return
    with_retries(lambda: fs.pipe_file(dest, data), f"write {fs.unstrip_protocol(dest)}", cfg)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, cfg: StorageConfig) -> bytes:
    return with_retries(lambda: fs.cat_file(path), f"read {fs.unstrip_protocol(path)}", cfg)


def list_files(fs: fsspec.AbstractFileSystem, root: str, cfg: StorageConfig, suffix: str = "") -> list[str]:
    """Files under `root` (recursive) ending in `suffix`; an absent root is an empty list."""

    def _find() -> list[str]:
        if not fs.exists(root):
            return []
        return sorted(p for p in fs.find(root) if p.endswith(suffix))

    return with_retries(_find, f"list {fs.unstrip_protocol(root)}", cfg)
