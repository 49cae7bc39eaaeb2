"""Every `pipeline <command>` the docs name exists: README.md and docs/*.md against the CLI.

The docs are parsed as Markdown (markdown-it-py, CommonMark with tables): the
commands are read from fenced and indented code blocks and from inline code
spans, where a command starts a line or follows a shell separator. For a
command that is a group (``chaos``, ``produce``) the next word is its
subcommand. Each one must answer ``--help`` with exit 0 through the real
command group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt

from pipeline.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `pipeline` (or `python -m pipeline.cli`) where a command starts: at the start of the
# code, after a prompt, a shell separator or a backtick (a span quoted in a comment).
COMMAND = re.compile(r"(?:^|[;&|(`]|\$)\s*(?:pipeline|python3?\s+-m\s+pipeline\.cli)"
                     r"\s+([a-z][a-z0-9-]*)(?:[ \t]+([a-z][a-z0-9-]*))?", re.MULTILINE)


@dataclass(frozen=True)
class Mention:
    """One `pipeline WORD [WORD]` in a doc, where it was found."""

    where: str
    words: tuple[str, ...]


def code_in(text: str) -> list[tuple[int, str]]:
    """(first line, text) of every code block and inline code span of a Markdown document."""
    code = []
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        line = token.map[0] + 1 if token.map else 0
        if token.type in ("fence", "code_block"):
            code.append((line + (token.type == "fence"), token.content))
        elif token.type == "inline":
            code += [(line, child.content) for child in token.children or [] if child.type == "code_inline"]
    return code


def mentions(text: str, name: str) -> list[Mention]:
    """Every command named in the code of one Markdown document."""
    found = []
    for line, code in code_in(text):
        for match in COMMAND.finditer(code):
            at = line + code.count("\n", 0, match.start(1))
            found.append(Mention(f"{name}:{at}", tuple(w for w in match.groups() if w)))
    return found


def command_line(words: tuple[str, ...]) -> list[str]:
    """The words to ask ``--help`` of: the command, and its subcommand when the command is a group."""
    import click
    command = main.get_command(click.Context(main), words[0])
    return list(words[:2]) if isinstance(command, click.Group) and len(words) > 1 else [words[0]]


def help_exit(words: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*words, "--help"])
    return result.exit_code, result.output


def all_mentions() -> dict[tuple[str, ...], list[str]]:
    by_command: dict[tuple[str, ...], list[str]] = {}
    for path in DOCS:
        for mention in mentions(path.read_text(), path.relative_to(ROOT).as_posix()):
            by_command.setdefault(tuple(command_line(mention.words)), []).append(mention.where)
    return by_command


MENTIONS = all_mentions()


@pytest.mark.parametrize("words", sorted(MENTIONS), ids=" ".join)
def test_every_command_the_docs_name_answers_help(words):
    code, output = help_exit(list(words))
    assert code == 0, (f"`pipeline {' '.join(words)}` is named in {', '.join(MENTIONS[words])} "
                       f"but `pipeline {' '.join(words)} --help` exits {code}: {output.strip()}")


def test_the_docs_name_the_commands_a_user_needs():
    named = {words[0] for words in MENTIONS}
    assert named >= {"up", "down", "status", "scale", "restart", "worker", "produce", "check", "chaos"}
    assert ("chaos", "run") in MENTIONS and ("produce", "numbers") in MENTIONS


def test_commands_are_read_from_fences_and_inline_spans_but_not_prose():
    doc = ("Run `pipeline restart primes` after a deploy, not the pipeline itself.\n\n"
           "| a | `pipeline scale primes 4` |\n|---|---|\n\n"
           "```sh\n$ pipeline up            # the pipeline starts\n"
           "cd docker && pipeline chaos run kill-worker\n"
           "python -m pipeline.ops.supervise -c x  # not a command\n"
           "python -m pipeline.cli worker primes\n```\n")
    assert [(m.where, m.words) for m in mentions(doc, "x.md")] == [
        ("x.md:1", ("restart", "primes")), ("x.md:3", ("scale", "primes")), ("x.md:7", ("up",)),
        ("x.md:8", ("chaos", "run")), ("x.md:10", ("worker", "primes"))]


def test_a_command_that_does_not_exist_fails_the_check():
    code, output = help_exit(["nosuchcommand"])
    assert code != 0 and "No such command 'nosuchcommand'" in output
    assert help_exit(["chaos", "nosuchsub"])[0] != 0
