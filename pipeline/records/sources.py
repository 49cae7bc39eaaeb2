"""Records from a file of JSON lines or CSV with a header, each with its line, and how far the file was read.

``pipeline produce TOPIC --from FILE`` reads through :class:`FileSource`::

    source = FileSource("orders.jsonl")
    for line in source:                  # Line(number, record, error)
        if line.error:
            print(f"{source.shown}:{line.number}: {line.error}")
        else:
            producer.send(line.record)
    source.mark()                        # SourceMark: bytes and lines read so far, and their SHA-256

JSON lines: one JSON object per line; blank lines are skipped. CSV: the first
line names the columns; a value that reads as an integer or a decimal number
becomes one (``007`` stays text: a leading zero is part of a code), an empty
value becomes null, anything else stays text.

A :class:`SourceMark` lets a run that stopped early resume after the last line
its producer saw acknowledged (see :mod:`pipeline.client.position`).
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from pipeline.errors import PipelineError

FORMATS = ("jsonl", "csv")
_FIELD_LIMIT = 16 << 20
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


class SourceError(PipelineError):
    """Raised when a file cannot be read as records at all (a missing file, a CSV without a header)."""


@dataclass
class SourceMark:
    """How far into a file every record was acknowledged."""

    path: str
    offset: int = 0  # bytes of the file whose records were all acknowledged
    line: int = 0  # lines in those bytes
    sha256: str = ""  # of those bytes
    done: bool = False  # the whole file was published

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "line": self.line, "sha256": self.sha256,
                "done": self.done}


@dataclass(frozen=True, slots=True)
class Line:
    """One record of a file, or why its line is not one."""

    number: int  # the line the record starts on (1 is the first)
    record: dict[str, Any] | None
    error: str | None = None
    size: int = 0  # bytes of the file it was read from


class FileSource:
    """Iterates over the records of a JSON-lines or CSV file (``-``: standard input).

    Parameters:
        path: the file, or ``-`` for standard input (which cannot be resumed).
        format: ``jsonl`` or ``csv``; None picks ``csv`` for a ``.csv`` name, else ``jsonl``.
        resume: a mark of an earlier, unfinished run of this file: lines up to it are skipped.

    Raises:
        SourceError: the file cannot be opened, or a CSV file has no header.
    """

    def __init__(self, path: str, format: str | None = None, resume: SourceMark | None = None):
        self.path, self.shown = path, "<stdin>" if path == "-" else path
        self.format = format or ("csv" if path.lower().endswith(".csv") else "jsonl")
        if self.format not in FORMATS:
            raise SourceError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        self.resume = resume
        self.offset = self.line = 0  # bytes and lines consumed
        self._digest = hashlib.sha256()
        self._row_start = (0, 0, self._digest.copy())
        self._file: IO[bytes]
        try:
            self._file = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115  # closed in close()
        except OSError as e:
            raise SourceError(f"{path}: {e.strerror}") from None

    def close(self) -> None:
        if self._file is not sys.stdin.buffer:
            self._file.close()

    def mark(self, done: bool = False, before_last: bool = False) -> SourceMark | None:
        """The position after the last line read, or before the last record's first line (None for stdin)."""
        if self.path == "-":
            return None
        offset, line, digest = self._row_start if before_last else (self.offset, self.line, self._digest)
        return SourceMark(os.path.abspath(self.path), offset, line, digest.hexdigest(), done)

    def _start_row(self) -> None:
        self._row_start = (self.offset, self.line, self._digest.copy())

    def _lines(self) -> Iterator[bytes]:
        for raw in self._file:
            self.offset += len(raw)
            self.line += 1
            self._digest.update(raw)
            yield raw

    def __iter__(self) -> Iterator[Line]:
        lines = self._lines()
        records = self._csv(lines) if self.format == "csv" else self._jsonl(lines)
        skip = self.resume.offset if self.resume else 0
        for line in records:
            if self.offset > skip:
                yield line

    def _jsonl(self, lines: Iterator[bytes]) -> Iterator[Line]:
        self._start_row()
        for raw in lines:
            if not raw.strip():
                self._start_row()
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                yield Line(self.line, None, f"not JSON: {e}")
            else:
                yield Line(self.line, value, size=len(raw)) if type(value) is dict else \
                    Line(self.line, None, f"expected a JSON object, got {_kind(value)}")
            self._start_row()

    def _decoded(self, lines: Iterator[bytes], undecodable: dict[int, str]) -> Iterator[str]:
        """Each line as text, one at a time (so the csv reader never reads ahead of the row it returns)."""
        for raw in lines:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                undecodable[self.line] = f"not UTF-8: {e}"
                yield raw.decode("utf-8", "replace")

    def _csv(self, lines: Iterator[bytes]) -> Iterator[Line]:
        undecodable: dict[int, str] = {}
        # the csv module refuses fields over 128 KiB; nsqd takes messages up to 1 MiB (the producer checks)
        csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
        reader = csv.reader(self._decoded(lines, undecodable))
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"{self.shown}: empty file; a CSV file starts with a header naming its columns") from None
        except csv.Error as e:
            raise SourceError(f"{self.shown}:1: not CSV: {e}") from None
        names = [name.strip() for name in header]
        if not all(names) or len(set(names)) != len(names):
            raise SourceError(f"{self.shown}:1: the header must name every column once, got {','.join(names)}")
        while True:
            self._start_row()
            first = self.line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Line(first, None, f"not CSV: {e}")
                continue
            if not row:
                continue
            if undecodable:
                yield Line(first, None, undecodable.popitem()[1])
                undecodable.clear()
                continue
            if len(row) != len(names):
                yield Line(first, None, f"expected {len(names)} fields ({','.join(names)}), got {len(row)}")
                continue
            yield Line(first, {name: _value(text) for name, text in zip(names, row, strict=True)},
                       size=self.offset - self._row_start[0])


def _value(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text):
        return float(text)
    return text


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null")
