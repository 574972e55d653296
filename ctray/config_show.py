"""`ctray config show`: the fields of a command's config, or of one section or field of it, each with
its type, default and docstring (the string literal under each field of ctray's config classes,
which pydantic keeps as the field's description).

    ctray config show pretrain                    # every section, nested
    ctray config show pretrain.optim              # one section
    ctray config show pretrain.objective.cagcl    # a registered objective's own section
    ctray config show ingest.preprocess.spacing   # one field
"""

from __future__ import annotations

import difflib
import importlib
import json
import textwrap
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from ctray.config import Section, item_type, section_type
from ctray.errors import ConfigError

COMMANDS: dict[str, str] = {
    "ingest": "ctray.ingest.config:IngestConfig",
    "pretrain": "ctray.train.config:PretrainConfig",
    "sweep": "ctray.tune.config:SweepConfig",
    "eval": "ctray.evaluate.config:EvalReportConfig",
}
"""Each command that takes a YAML config -> its config class (imported on use: none needs torch)."""

WIDTH = 100
"""Characters per line of the listing."""


def command_config(command: str) -> type[BaseModel]:
    """The config class of `ctray <command>`."""
    if command not in COMMANDS:
        raise ConfigError(f"{command!r} takes no config{_did_you_mean(command, list(COMMANDS), '')}")
    module, attr = COMMANDS[command].split(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), attr)
    return model


def show(path: str) -> str:
    """The listing of `path`: COMMAND[.SECTION...][.FIELD]."""
    parts = path.split(".")
    model = command_config(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        where = ".".join(parts[:i])
        variants = model.variants() if issubclass(model, Section) else {}
        if part in variants:
            model = variants[part]
        elif part in model.model_fields:
            field = model.model_fields[part]
            inner = _section(field.annotation)
            if inner is None:
                if i < len(parts) - 1:
                    raise ConfigError(f"{where}.{part} is a value, not a section")
                return "\n".join(_field(model, part, field, "", label=path))
            model = inner
        else:
            raise ConfigError(f"{where} has no {part!r}{_did_you_mean(part, [*model.model_fields, *variants], where)}")
    lines = _wrap(f"{path} ({model.__name__}): {_paragraph(model.__doc__)}", "")
    _fields(model, path, "  ", lines)
    return "\n".join(lines)


def _fields(model: type[BaseModel], path: str, pad: str, lines: list[str]) -> None:
    """Each field of `model`, a nested section's fields indented under it."""
    for name, field in model.model_fields.items():
        lines += _field(model, name, field, pad)
        inner = _section(field.annotation)
        if inner is None:
            continue
        variants = inner.variants() if issubclass(inner, Section) else {}
        if variants:
            lines += _wrap(f"one of {', '.join(variants)}", pad + "    ")
            lines.append(f"{pad}    (each one's fields: ctray config show {path}.{name}.<name>)")
        _fields(inner, f"{path}.{name}", pad + "  ", lines)


def _field(model: type[BaseModel], name: str, field: FieldInfo, pad: str, label: str = "") -> list[str]:
    """`name: type = default` (`label` for the name: a field shown alone goes by its path) and the
    field's docstring under it."""
    inner = _section(field.annotation)
    if field.is_required():
        default = " (required)"
    elif inner is not None:
        default = ""  # its fields' defaults follow
    else:
        default = f" = {json.dumps(to_jsonable_python(field.get_default(call_default_factory=True)))}"
    lines = [f"{pad}{label or name}: {type_name(field.annotation)}{default}"]
    doc = _description(model, name) or (_paragraph(inner.__doc__) if inner is not None else "")
    return lines + (_wrap(doc, pad + "    ") if doc else [])


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, or that each value of a dict or list field is."""
    return section_type(annotation) or section_type(item_type(annotation))


def _description(model: type[BaseModel], name: str) -> str:
    """The field's docstring, or that of the same field in a base class (a recipe's `name`)."""
    for cls in model.__mro__:
        field = getattr(cls, "model_fields", {}).get(name) if isinstance(cls, type) else None
        if field is not None and field.description:
            return " ".join(field.description.split())
    return ""


def type_name(annotation: Any) -> str:
    """A field's type as a config writer reads it: `int | None`, `"PACK" | "SPREAD"`, `list[str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).removeprefix("typing.")


def _paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _wrap(text: str, pad: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False)


def _did_you_mean(word: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"; did you mean {where + '.' if where else ''}{close[0]}?"
    return f"; it has {', '.join(names)}"
