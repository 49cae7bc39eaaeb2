"""The topology reference, rendered as Markdown from the models of ``pipeline.config``.

The field list is never written by hand: every section and row comes from the
pydantic models, so the docs cannot drift from what the loader accepts.
Regenerate ``docs/TOPOLOGY.md`` with::

    python -m pipeline.config.docs > docs/TOPOLOGY.md
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config.topology import Topology
from pipeline.config.types import TypeDoc

__all__ = ["render_reference"]

_HEADER = """\
# topology.yaml reference

<!-- Generated from the models in pipeline/config/; do not edit.
     Regenerate: python -m pipeline.config.docs > docs/TOPOLOGY.md -->

`topology.yaml` describes the whole pipeline. Unknown keys are errors, and every
error names its place as `topology.yaml:LINE:COL: dotted.field: reason`.
Run `pipeline check` to list all of them at once; it then imports every stage's
`handler` (and builds a stage class with its `params`) as the stage's worker will.
"""

_SCALARS = {int: "int", float: "float", str: "str", bool: "bool"}


def render_reference() -> str:
    """Return the Markdown reference of every topology model, one section and table per model."""
    parts = [_HEADER]
    for model, where in _models(Topology, "(top level)"):
        parts.append(_section(model, where))
    return "\n".join(parts)


def _models(model: type[BaseModel], where: str) -> list[tuple[type[BaseModel], str]]:
    """List ``model`` and the models nested in it, depth first, each with its place in the file."""
    found = [(model, where)]
    for name, info in model.model_fields.items():
        nested, suffix = _nested_model(info.annotation)
        if nested is not None:
            prefix = "" if model is Topology else f"{where}."
            found += _models(nested, f"{prefix}{name}{suffix}")
    return found


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """Return the model inside ``annotation`` and how its place in the file is written."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list:
        inner, suffix = _nested_model(args[0])
        return inner, "[]" + suffix
    if origin is dict:
        inner, suffix = _nested_model(args[1])
        return inner, ".<name>" + suffix
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin is Union or isinstance(annotation, UnionType):  # an optional section: `X | None`
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return (models[0], "") if len(models) == 1 else (None, "")
    return None, ""


def _section(model: type[BaseModel], where: str) -> str:
    # Usage examples (a paragraph ending in "::" and its indented block) belong to the code, not the reference.
    paragraphs = inspect.cleandoc(model.__doc__ or "").split("\n\n")
    prose = "\n\n".join(p.replace("\n", " ") for p in paragraphs if not (p.endswith("::") or p.startswith(" ")))
    lines = [f"## {model.__name__}", "", f"Where: `{where}`", "", prose, ""]
    lines += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        kind = _type(info.annotation, info.metadata)
        cells = [f"`{info.alias or name}`", kind, _default(info), _bounds(info), info.description or ""]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """Name a type the way a YAML author thinks of it."""
    for item in metadata:
        if isinstance(item, TypeDoc):
            return item.name
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is not None and hasattr(annotation, "__metadata__"):  # Annotated inside a container
        return _type(args[0], list(annotation.__metadata__))
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[0])} to {_type(args[1])}"
    if origin in (Union, UnionType):
        return " or ".join("null" if a is type(None) else _type(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "all defaults"
    if value is None:
        return "`null`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _bounds(info: FieldInfo) -> str:
    limits: dict[str, Any] = {}
    rules = []
    for item in info.metadata:
        if isinstance(item, TypeDoc):
            rules.append(item.rule)
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if hasattr(item, name) and isinstance(item, annotated_types.BaseMetadata):
                limits[name] = getattr(item, name)
    rules += _limits_text(limits, info.annotation)
    rules += [f"each {doc.name}: {doc.rule}" for doc in _inner_type_docs(info.annotation)]
    return "; ".join(dict.fromkeys(rules))  # a union may name the same inner type twice


def _inner_type_docs(annotation: Any) -> list[TypeDoc]:
    """Return the TypeDoc of constrained types inside a container, such as the keys of a map."""
    found = []
    for arg in get_args(annotation):
        if hasattr(arg, "__metadata__"):
            found += [item for item in arg.__metadata__ if isinstance(item, TypeDoc)]
        else:
            found += _inner_type_docs(arg)
    return found


def _limits_text(limits: dict[str, Any], annotation: Any) -> list[str]:
    def fmt(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    text = []
    if "ge" in limits and "le" in limits:
        text.append(f"{fmt(limits['ge'])}..{fmt(limits['le'])}")
    else:
        text += [f"{sym} {fmt(limits[key])}" for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                 if key in limits]
    unit = "item" if get_origin(annotation) is list else "character"
    if "min_length" in limits:
        count = limits["min_length"]
        text.append(f"at least {count} {unit}{'s' if count != 1 else ''}")
    if "max_length" in limits:
        text.append(f"at most {limits['max_length']} {unit}s")
    return text


if __name__ == "__main__":
    print(render_reference(), end="")
