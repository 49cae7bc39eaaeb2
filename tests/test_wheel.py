"""The wheel installs the framework only: ``pipeline``, its data files, and nothing of the checkout."""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(built_wheel: Path) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(built_wheel) as archive:
        yield archive


def test_the_only_top_level_names_are_pipeline_and_the_dist_info(wheel):
    import pipeline

    top = {name.split("/")[0] for name in wheel.namelist()}
    assert top == {"pipeline", f"nsq_pipeline-{pipeline.__version__}.dist-info"}
    assert not top & {"consumers", "producers", "chaos", "benchmarks", "tools", "tests"}


def test_every_module_and_the_data_files_it_needs_at_run_time_are_inside(wheel):
    names = set(wheel.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    assert sources - names == set()  # a sub-package without __init__.py would be left out
    assert {"pipeline/py.typed", "pipeline/ops/gomod/nsq/go.mod", "pipeline/ops/gomod/nsq/go.sum"} <= names


def test_the_console_script_is_pipeline_cli_main(wheel):
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "pipeline = pipeline.cli:main" in wheel.read(entry_points).decode().splitlines()
