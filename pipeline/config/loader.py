"""Loading topology.yaml: YAML with positions, and every problem as ``topology.yaml:LINE:COL: dotted.path: reason``.

The file is parsed keeping where each key and value starts, validated against
:class:`~pipeline.config.topology.Topology`, and pydantic's errors are turned into
:class:`~pipeline.errors.TopologyError` pointing at the offending line and column::

    from pipeline.config import load_topology

    topology = load_topology("topology.yaml")
    stage = topology.stage("primes")
    print(stage.input, stage.channel, topology.dead_letter_topic("primes"))

A broken file raises, for example::

    topology.yaml:12:15: stages.primes.replicas: must be >= 1

The big picture is in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pipeline.config.observe import environment_problems
from pipeline.config.topology import Topology
from pipeline.errors import TopologyError

__all__ = ["Positions", "load_topology", "read_positions", "validate_topology"]

#: A place in the file: the keys and list indexes that lead to it.
Loc = tuple[str, ...]


@dataclass
class Positions:
    """Where each key and value of a YAML document starts (1-based line, col), by field path.

    A field path is the keys (and list indexes, as strings) leading to it: ``("stages", "primes", "handler")``.
    """

    root: tuple[int, int] = (1, 1)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[Loc, str]] = field(default_factory=list)

    def locate(self, loc: Loc, *, at_key: bool = False) -> tuple[int, int]:
        """Return the position of ``loc``, else of the key of its nearest ancestor in the file."""
        table = self.keys if at_key else self.values
        if loc in table:
            return table[loc]
        for end in range(len(loc) - 1, 0, -1):
            if loc[:end] in self.keys:
                return self.keys[loc[:end]]
        return self.root


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: Loc, positions: Positions, stack: tuple[int, ...] = ()) -> None:
    """Record the position of every key and value under ``node`` and note duplicate keys."""
    if id(node) in stack:  # a recursive alias; the validator reports it
        return
    stack = (*stack, id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loc = (*path, str(i))
            positions.keys[loc] = positions.values[loc] = _mark(item)
            _walk(item, loc, positions, stack)
    elif isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key, value in node.value:
            # Merge keys (<<) splice in another mapping; its keys are reported at the parent.
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            loc = (*path, key.value)
            if key.value in first_seen:
                reason = f"duplicate key {key.value!r} (first defined at line {first_seen[key.value]})"
                positions.duplicates.append((loc, reason))
            else:
                first_seen[key.value] = _mark(key)[0]
            positions.keys[loc], positions.values[loc] = _mark(key), _mark(value)
            _walk(value, loc, positions, stack)


def _parse(text: str) -> tuple[Any, Positions]:
    """Parse one YAML document into plain data and the positions of its nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        positions = Positions()
        if node is not None:
            positions.root = _mark(node)
            # Walk before constructing: construction flattens merge keys in place.
            _walk(node, (), positions)
        return (loader.construct_document(node) if node is not None else None), positions
    finally:
        loader.dispose()


_REASONS = {
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "must be an integer"),
    **dict.fromkeys(("float_type", "float_parsing"), "must be a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "must be true or false"),
    **dict.fromkeys(("dict_type", "model_type", "model_attributes_type"), "must be a mapping"),
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "missing": "required field is missing",
    "list_type": "must be a list",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "recursion_loop": "must not contain itself",
}


def _reason(error: ErrorDetails) -> str:
    """Turn one pydantic error into a short, human-readable reason."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(error["loc"][:-1])
        allowed = ", ".join(f.alias or n for n, f in model.model_fields.items()) if model is not None else "?"
        return f"unknown field; expected one of: {allowed}"
    if kind == "literal_error":
        return "must be one of: " + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
    if kind in _REASONS:
        return _REASONS[kind].format(**ctx)
    msg = error["msg"]
    return msg if kind == "topology" else msg[:1].lower() + msg[1:]


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a type annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or type(annotation).__name__ == "UnionType":
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the model class that validates the value at ``loc`` in a topology, if any."""
    annotation: Any = Topology
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model_field = annotation.model_fields.get(str(part))
            if model_field is None:
                return None
            annotation = model_field.annotation
        else:  # list[X] or dict[str, X]: the part is an index or a key
            args = get_args(annotation)
            annotation = args[-1] if args else None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _to_topology_error(shown: str, positions: Positions, error: ErrorDetails) -> TopologyError:
    loc = tuple(str(part) for part in error["loc"])
    on_key = error["type"] == "extra_forbidden" or loc[-1:] == ("[key]",)
    if loc[-1:] == ("[key]",):
        loc = loc[:-1]
    line, col = positions.locate(loc, at_key=on_key)
    return TopologyError(shown, line, col, ".".join(loc), _reason(error))


@dataclass
class _Outcome:
    """What loading a file gave: a topology, or else the problems (at least one) and their cause."""

    topology: Topology | None
    problems: list[TopologyError]
    cause: BaseException | None = None


def _read(shown: str) -> tuple[dict[str, Any], Positions]:
    """Read and parse the file into a mapping and its positions.

    Raises:
        TopologyError: the file cannot be read, is not YAML, or is not a mapping.
    """
    try:
        data, positions = _parse(Path(shown).read_text(encoding="utf-8"))
    except OSError as e:
        raise TopologyError(shown, 0, 0, "", f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TopologyError(shown, 0, 0, "", "cannot read: not UTF-8 text") from e
    except yaml.YAMLError as e:
        raise _yaml_error(shown, e) from e
    except RecursionError as e:  # PyYAML and our position walk recurse once per nesting level
        raise TopologyError(shown, 0, 0, "", "invalid YAML: nested too deeply") from e
    if not isinstance(data, dict):
        what = "the file is empty" if data is None else f"got {type(data).__name__}"
        reason = f"top level must be a mapping with sections nsq, topics, stages, producers; {what}"
        raise TopologyError(shown, *positions.root, "", reason)
    return data, positions


def _yaml_error(shown: str, error: yaml.YAMLError) -> TopologyError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if problem:
        reason = f"{problem} ({context})" if context else problem
    else:
        reason = str(error).replace("\n", " ")
    return TopologyError(shown, line, col, "", f"invalid YAML: {reason}")


def _load(path: str | os.PathLike[str], environment: bool = False) -> _Outcome:
    """Read, parse and validate a topology file, collecting every problem in file order."""
    shown = os.fspath(path)
    try:
        data, positions = _read(shown)
    except TopologyError as e:
        return _Outcome(None, [e], e.__cause__)
    problems = [TopologyError(shown, *positions.locate(loc, at_key=True), ".".join(loc), reason)
                for loc, reason in positions.duplicates]
    topology, cause = None, None
    try:
        topology = Topology.model_validate(data)
    except ValidationError as e:
        cause = e
        problems += [_to_topology_error(shown, positions, err) for err in e.errors(include_url=False)]
    if environment and topology is not None:  # e.g. the SMTP password's variable: checked where it is needed
        problems += [TopologyError(shown, *positions.locate(loc), ".".join(loc), reason)
                     for loc, reason in environment_problems(topology)]
    if problems:
        return _Outcome(None, sorted(problems, key=lambda p: (p.line, p.col)), cause)
    assert topology is not None  # no problems means validation passed
    topology._path = Path(shown)
    return _Outcome(topology, [])


def load_topology(path: str | os.PathLike[str], *, environment: bool = False) -> Topology:
    """Load and validate a topology file.

    Parameters:
        path: the topology file; error messages show it exactly as given.
        environment: also check what the environment must provide (the SMTP password's variable).

    Raises:
        TopologyError: the file cannot be read, is not YAML, or breaks the schema;
            the first problem in file order, as ``PATH:LINE:COL: field: reason``.
    """
    outcome = _load(path, environment)
    if outcome.topology is None:
        raise outcome.problems[0] from outcome.cause
    return outcome.topology


def validate_topology(path: str | os.PathLike[str], *, environment: bool = True) -> list[TopologyError]:
    """Return every problem of a topology file, sorted by line; empty when it is valid.

    Cross-field rules (declared topics, timeouts, channels) are checked once the
    fields they compare are themselves valid.
    """
    return _load(path, environment).problems


def read_positions(path: str | os.PathLike[str]) -> Positions:
    """Return where each field of a topology file starts, for problems found after loading it.

    Raises:
        TopologyError: the file cannot be read, is not YAML, or is not a mapping.
    """
    return _read(os.fspath(path))[1]
