"""load_handler: a handler that cannot be loaded is one line naming the handler's own file and line."""
from __future__ import annotations

import sys

import pytest

from pipeline.errors import HandlerLoadError
from pipeline.stage import load_handler


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("broken_syntax", "raises_on_import"):
        sys.modules.pop(name, None)


def test_a_syntax_error_names_the_handlers_file_and_line(project):
    (project / "broken_syntax.py").write_text("import math\n\ndef f(batch)\n    return {}\n")
    with pytest.raises(HandlerLoadError) as caught:
        load_handler("broken_syntax:f")
    assert str(caught.value) == f"handler 'broken_syntax:f': {project / 'broken_syntax.py'}:3: SyntaxError: expected ':'"


def test_an_exception_at_import_names_the_users_line_not_the_librarys(project):
    (project / "raises_on_import.py").write_text('import json\n\nSETTINGS = json.loads("{")\n')
    with pytest.raises(HandlerLoadError) as caught:
        load_handler("raises_on_import:f")
    assert str(caught.value).startswith("handler 'raises_on_import:f': importing 'raises_on_import' raised "
                                        "JSONDecodeError: ")
    assert str(caught.value).endswith(f"(at {project / 'raises_on_import.py'}:3)")
