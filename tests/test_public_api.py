"""``import pipeline`` is the public API: every name of ``__all__`` resolves, and importing it stays cheap."""
from __future__ import annotations

import subprocess
import sys

import pytest

import pipeline


@pytest.mark.parametrize("name", pipeline.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(pipeline, name) is not None


def test_exports_are_the_objects_of_their_modules() -> None:
    from pipeline.config import load_topology
    from pipeline.middleware import Middleware
    from pipeline.stage import Batch

    assert (pipeline.Batch, pipeline.Middleware, pipeline.load_topology) == (Batch, Middleware, load_topology)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'pipeline' has no attribute 'Nope'"):
        pipeline.Nope  # noqa: B018


def test_import_pipeline_loads_neither_numpy_nor_the_topology_schema() -> None:
    code = "import sys, pipeline; print(sorted({'numpy', 'pydantic', 'pipeline.stage'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
