"""Typed configs loaded from YAML with dotted command-line overrides.

    cfg = load_config(IngestConfig, "jobs/ingest.yaml", ["output.uri=s3://bucket/shards"])

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file or an
override fails at start-up with the offending key named, not hours later on the cluster.
Override values are parsed as YAML scalars/lists (`spacing=[3,1,1]`, `segment=true`).

String values may name environment variables of the process that loads them, `${CTRAY_BUCKET}`
or `${VAR:-default}`: the cluster jobs spell every location as `${CTRAY_BUCKET}/...`, so one
variable (set with `ray job submit --runtime-env-json`) points them all at a bucket. This is plain
substitution, not code: nothing in a config is evaluated.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ctray.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; field docstrings become help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    @classmethod
    def variants(cls) -> dict[str, type[Section]]:
        """The sections that stand in for this one, by the value of their `name` key (a pretrain job's
        `objective:` is the config of the objective it names); {} for an ordinary section."""
        return {}


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
    schedule_timeout_s: float = 45.0
    """How long a job waits for the autoscaler to start a node that can run its workers or tasks
    before failing with one line naming the resources no node type offers (the wait goes on while
    the autoscaler is launching nodes)."""


T = TypeVar("T", bound=BaseModel)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "") -> Any:
    """`value` with ${VAR} / ${VAR:-default} in its strings replaced from the environment."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{where or 'a value'} uses ${{{name}}}, which is not set in the environment (e.g. export {name}=...)"
        )

    return _VAR.sub(sub, value)


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


def bundled_job(path: str | Path) -> Path | None:
    """The copy of jobs/<name> shipped inside the package (for an installed ctray, where the
    repository's jobs/ folder is not on disk: a container image, a RayJob's entrypoint)."""
    from importlib import resources

    candidate = Path(str(resources.files("ctray") / "jobs")) / Path(path).name
    return candidate if Path(path).parent.name in ("jobs", "") and candidate.is_file() else None


def load_config(model: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load `path` (YAML; None means all defaults), apply overrides, validate into `model`. A
    path like jobs/<name>.yaml that does not exist here is read from the package's own copy."""
    data: dict[str, Any] = {}
    if path is not None and not Path(path).exists() and (bundled := bundled_job(path)) is not None:
        path = bundled
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    data = expand_env(apply_overrides(data, list(overrides)))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        if first["type"] == "extra_forbidden":
            msg = unknown_key(model, first["loc"], data)
        else:
            msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        raise ConfigError(f"config {path or '(defaults)'}: {where}: {msg}{more}") from e


def section_type(annotation: Any, value: Any = None) -> type[BaseModel] | None:
    """The config section a field's annotation holds (`X | None` and SerializeAsAny[X] unwrapped),
    or None for a plain value. `value`, the field's raw data, picks a variant (Section.variants)
    by its `name`."""
    annotation = _unwrap(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return None
    name = value.get("name") if isinstance(value, dict) else None
    if issubclass(annotation, Section) and isinstance(name, str):
        return annotation.variants().get(name, annotation)
    return annotation


def item_type(annotation: Any) -> Any:
    """The type of the values of a dict or list field (dict[str, X], list[X] -> X), or None."""
    annotation = _unwrap(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin is list and args:
        return args[0]
    return None


def _unwrap(annotation: Any) -> Any:
    if get_origin(annotation) is Annotated:
        return _unwrap(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(members[0]) if len(members) == 1 else annotation
    return annotation


def _section_at(model: type[BaseModel], loc: Sequence[int | str], data: Any) -> type[BaseModel] | None:
    """The section at `loc` (keys from the top of the config) of a config whose raw data is `data`."""
    annotation: Any = model
    for key in loc:
        section = section_type(annotation, data)
        if section is not None:
            field = section.model_fields.get(str(key))
            annotation = field.annotation if field is not None else None
        else:
            annotation = item_type(annotation)
        if annotation is None:
            return None
        data = _child(data, key)
    return section_type(annotation, data)


def _child(data: Any, key: int | str) -> Any:
    if isinstance(data, dict):
        return data.get(key)
    if isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
        return data[key]
    return None


def unknown_key(model: type[BaseModel], loc: Sequence[int | str], data: Any) -> str:
    """pydantic's "Extra inputs are not permitted" for the key at `loc`, with the section's
    closest key (a typo: optim.lrr -> "did you mean optim.lr?") or, with none close, its keys."""
    section = _section_at(model, loc[:-1], data)
    if section is None:
        return "unknown key"
    parent = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    if close:
        return f"unknown key; did you mean {parent + '.' if parent else ''}{close[0]}?"
    return f"unknown key; {parent or 'the top level'} has {', '.join(section.model_fields)}"


def to_yaml(cfg: BaseModel) -> str:
    """The config as YAML that `load_config` reads back to the same model."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
