"""Typed configs loaded from YAML with dotted command-line overrides.

    cfg = load_config(IngestConfig, "jobs/ingest.yaml", ["output.uri=s3://bucket/shards"])

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file or an
override fails at start-up with the offending key named, not hours later on the cluster.
Override values are parsed as YAML scalars/lists (`spacing=[3,1,1]`, `segment=true`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ctray.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; field docstrings become help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class StorageConfig(Section):
    """How ctray reaches local folders and object stores (s3:// through s3fs)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, a test server); None uses AWS. Credentials come from the
    usual AWS environment variables or instance roles, never from configs."""
    retries: int = 5
    """Attempts for each storage operation before giving up with a clear error."""
    backoff_s: float = 0.5
    """First retry delay in seconds; doubles on each attempt."""
    connect_timeout_s: float = 5.0
    """Connection timeout of one S3 request, so a dead endpoint fails fast and is retried."""


class RayConfig(Section):
    """Where the job's Ray cluster is."""

    address: str | None = None
    """Ray address ("auto" inside `ray job submit`, ray://host:10001); None starts or joins a local
    Ray, using the one already running when there is one."""
    num_cpus: int | None = None
    """CPUs of a local Ray started by ctray (None: all of this machine's)."""


T = TypeVar("T", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set (value parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(model: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Load `path` (YAML; None means all defaults), apply overrides, validate into `model`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"config {path or '(defaults)'}: {where}: {first['msg']}{more}") from e


def to_yaml(cfg: BaseModel) -> str:
    """The config as YAML that `load_config` reads back to the same model."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
