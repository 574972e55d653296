"""<run.storage>/<run.name>: the one place that knows where a run's files live."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property

import fsspec

from ctray.config import StorageConfig
from ctray.storage import filesystem, is_remote, publish_bytes, read_bytes


@dataclass(frozen=True)
class RunFolder:
    """A run's folder (local or s3://), with its files' URIs (for logs) and paths (for I/O)."""

    uri: str
    """<run.storage>/<run.name> as the user wrote it (resolved to an absolute path when local)."""
    storage: StorageConfig

    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.uri, self.storage)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    def path(self, *parts: str) -> str:
        """A file's path inside the run's filesystem."""
        return posixpath.join(self._fs_root[1], *parts)

    def uri_of(self, *parts: str) -> str:
        """A file's URI, for log lines."""
        return posixpath.join(self.uri, *parts)

    def write(self, name: str, data: bytes) -> None:
        publish_bytes(data, self.fs, self.path(name), self.storage)

    def read(self, name: str) -> bytes:
        return read_bytes(self.fs, self.path(name), self.storage)

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def checkpoint_uri(self, path: str) -> str:
        """Ray Train reports a checkpoint's path without the scheme on object stores."""
        if path and is_remote(self.uri) and "://" not in path:
            return self.uri.split("://")[0] + "://" + path
        return path

    def eval_dir(self, step: int) -> str:
        return posixpath.join("eval", f"step_{step:08d}")
