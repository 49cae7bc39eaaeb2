"""The `curl … /pub` examples of the docs publish what the checkout's topology.yaml accepts.

Each example's body (``-d``/``--data``/``--data-binary``, or the lines a
``printf … |`` pipes into ``--data-binary @-``) goes through the stage that
reads the example's topic in topology.yaml, with the runtime's own rules
(:func:`pipeline.testing.run_stage`): none of it may be dead-lettered.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from markdown_it import MarkdownIt

from pipeline.config import load_topology
from pipeline.testing import run_stage

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "topology.yaml"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA_OPTIONS = ("-d", "--data", "--data-raw", "--data-binary")


@dataclass(frozen=True)
class Publish:
    """One curl example: where it is, the topic it publishes to and the message bodies it sends."""

    where: str
    topic: str
    bodies: tuple[bytes, ...]


def code_of(path: Path) -> list[str]:
    """The code of every code block and inline code span of a Markdown file, continuation lines joined."""
    codes = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type in ("fence", "code_block"):
            codes.append(token.content)
        for child in token.children or []:
            if child.type == "code_inline":
                codes.append(child.content)
    return [code.replace("\\\n", " ") for code in codes]


def publishes(path: Path) -> list[Publish]:
    """Every ``curl`` of ``path`` that posts to a ``/pub`` or ``/mpub`` URL."""
    found = []
    for code in code_of(path):
        for line in code.splitlines():
            if "curl" not in line or not re.search(r"/m?pub\?", line):
                continue
            words = shlex.split(line, comments=True)
            url = next(w for w in words if re.search(r"/m?pub\?", w))
            [topic] = parse_qs(urlsplit(url).query)["topic"]
            data = next(words[i + 1] for i, w in enumerate(words) if w in DATA_OPTIONS)
            if data == "@-":  # printf 'LINE\nLINE\n' | curl --data-binary @-
                data = words[words.index("printf") + 1].replace("\\n", "\n")
            bodies = data.encode().split(b"\n") if urlsplit(url).path == "/mpub" else [data.encode()]
            found.append(Publish(f"{path.name}: {line.strip()[:90]}", topic, tuple(b for b in bodies if b)))
    return found


EXAMPLES = [p for doc in DOCS for p in publishes(doc)]


def test_the_readme_has_curl_examples_to_check():
    assert sum(p.where.startswith("README.md") for p in EXAMPLES) >= 2, EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.where for p in EXAMPLES])
def test_a_curl_example_is_not_dead_lettered_by_the_stage_reading_its_topic(example):
    topology = load_topology(TOPOLOGY)
    readers = [name for name, stage in topology.stages.items() if stage.input == example.topic]
    assert readers, f"{example.where}: no stage of topology.yaml reads {example.topic!r}"
    for stage in readers:
        run = run_stage(stage, list(example.bodies), topology=topology)
        assert run.dead == [], f"{example.where}: {stage} dead-letters it: {run.dead}"
        assert sum(map(len, run.outputs.values())) == len(example.bodies)
