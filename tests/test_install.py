"""Tests for pipeline.ops.install: idempotence, each install source, and the one-line failure."""
from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import sysconfig
import tarfile
import threading
from pathlib import Path

import pytest

from pipeline.ops import install
from pipeline.errors import InstallError
from pipeline.ops.install import NSQ_TOOLS, NSQ_VERSION, bin_dir, install_nsq, installed_version, nsq_binary
from pipeline.ops.processes import free_port

pytestmark = pytest.mark.integration


def _fake_tool(path: Path, prints: str) -> Path:
    """Write a shell script at ``path`` that answers ``--version`` with ``prints``."""
    path.write_text(f'#!/bin/sh\necho "{prints}"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Cut every install source: an empty PATH, no Go anywhere, a release URL on a closed port.

    Returns the (empty) PATH folder, for a test to put tools into.
    """
    empty = tmp_path / "path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(install, "GO_FALLBACKS", ())
    monkeypatch.setattr(install, "RELEASE_URL", f"http://127.0.0.1:{free_port()}/{{archive}}")
    return empty


def test_second_install_is_a_no_op(nsq_bin: Path) -> None:
    # Given the session fixture installed everything
    before = {tool: (nsq_bin / tool).stat() for tool in NSQ_TOOLS}
    lines: list[str] = []
    # When installing again
    assert install_nsq(nsq_bin, log=lines.append) == nsq_bin
    # Then every tool is reported present and no file was rewritten
    assert lines == [f"{tool} {NSQ_VERSION} already installed" for tool in NSQ_TOOLS]
    for tool, stat in before.items():
        after = (nsq_bin / tool).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), tool


def test_installed_version_of_every_tool(nsq_bin: Path, tmp_path: Path) -> None:
    for tool in NSQ_TOOLS:
        assert installed_version(nsq_bin / tool) == NSQ_VERSION, tool
    assert installed_version(tmp_path / "missing") is None
    assert installed_version(_fake_tool(tmp_path / "odd", "no version here")) is None


def test_wrong_versions_are_replaced_from_path(
    nsq_bin: Path, offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a dest with an old nsqd and an nsqlookupd that is really an nsqd,
    # and the real tools on PATH
    dest = tmp_path / "dest"
    dest.mkdir()
    _fake_tool(dest / "nsqd", "nsqd v0.0.1")
    _fake_tool(dest / "nsqlookupd", f"nsqd v{NSQ_VERSION}")
    monkeypatch.setenv("PATH", f"{nsq_bin}{os.pathsep}{offline}")
    lines: list[str] = []
    # When installing
    install_nsq(dest, log=lines.append)
    # Then every tool is a copy of the one on PATH
    assert lines == [f"copied {tool} {NSQ_VERSION} from {nsq_bin / tool}" for tool in NSQ_TOOLS]
    for tool in NSQ_TOOLS:
        assert (dest / tool).read_bytes() == (nsq_bin / tool).read_bytes(), tool
    assert sorted(p.name for p in dest.iterdir()) == sorted(NSQ_TOOLS)  # no temp files left


def test_no_source_raises_one_line(offline: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(InstallError) as info:
        install_nsq(dest, log=lambda line: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot install NSQ {NSQ_VERSION} into {dest}: no nsqd, nsqlookupd")
    assert "no Go toolchain (install Go >= 1.24 from https://go.dev/dl/)" in message
    assert "and the release download failed: " in message
    assert "Connection refused" in message
    assert list(dest.iterdir()) == []


def test_failed_go_build_is_reported(offline: Path, tmp_path: Path) -> None:
    fake_go = offline / "go"
    fake_go.write_text(
        '#!/bin/sh\necho "go: downloading x" >&2\necho "go: go.mod requires go >= 1.24" >&2\nexit 1\n'
    )
    fake_go.chmod(0o755)
    failed = r"`go build` in .*gomod/nsq failed: go: go.mod requires go >= 1.24, and the release download"
    with pytest.raises(InstallError, match=failed):
        install_nsq(tmp_path / "dest", log=lambda line: None)


@pytest.mark.skipif(install._find_go() is None, reason="needs a Go toolchain")
def test_missing_tool_is_built_with_go(
    nsq_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a dest holding all tools but nsq_stat, and no nsq_stat on PATH
    dest = tmp_path / "dest"
    dest.mkdir()
    for tool in NSQ_TOOLS[:-2] + NSQ_TOOLS[-1:]:
        shutil.copy2(nsq_bin / tool, dest / tool)
    go_dir = os.path.dirname(install._find_go())
    monkeypatch.setenv("PATH", os.pathsep.join([go_dir, "/usr/bin", "/bin"]))
    lines: list[str] = []
    # When installing
    install_nsq(dest, log=lines.append)
    # Then only nsq_stat was built, through a temp folder that is gone now
    assert lines[-2].startswith("building nsq_stat from the Go module proxy (gomod/nsq)")
    assert installed_version(dest / "nsq_stat") == NSQ_VERSION
    assert sorted(p.name for p in dest.iterdir()) == sorted(NSQ_TOOLS)


def _release_tarball(path: Path, top: str) -> None:
    """Write a release-shaped archive of fake tools, plus a member that tries to escape."""
    with tarfile.open(path, "w:gz") as tar:
        for tool in NSQ_TOOLS + ("../../escape",):
            data = f'#!/bin/sh\necho "{Path(tool).name} v{NSQ_VERSION}"\n'.encode()
            info = tarfile.TarInfo(f"{top}/bin/{tool}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serve files without printing an access log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(install.release_archive() is None, reason="NSQ publishes no archive for this platform")
def test_release_archive_is_downloaded(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a local web server holding a release-shaped archive
    archive = install.release_archive()
    served = tmp_path / "served"
    served.mkdir()
    _release_tarball(served / archive, archive.removesuffix(".tar.gz"))
    handler = functools.partial(_QuietHandler, directory=served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(install, "RELEASE_URL", f"http://127.0.0.1:{server.server_port}/{{archive}}")
    dest = tmp_path / "deep" / "dest"
    lines: list[str] = []
    try:
        # When installing with nothing on PATH and no Go
        install_nsq(dest, log=lines.append)
    finally:
        server.shutdown()
        server.server_close()
    # Then the tools come from the archive, and nothing else in it was written
    assert lines[-1] == f"installed {', '.join(NSQ_TOOLS)} {NSQ_VERSION} from {archive}"
    assert sorted(p.name for p in dest.iterdir()) == sorted(NSQ_TOOLS)
    assert not list(tmp_path.rglob("escape"))


def test_bin_dir_is_the_interpreters_scripts_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(install.BIN_ENV, raising=False)
    assert bin_dir() == Path(sysconfig.get_path("scripts"))
    monkeypatch.setenv(install.BIN_ENV, str(tmp_path))
    assert bin_dir() == tmp_path


def test_nsq_binary(nsq_bin: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(install.BIN_ENV, str(nsq_bin))
    assert nsq_binary("nsqd") == str(nsq_bin / "nsqd")
    monkeypatch.setenv(install.BIN_ENV, str(tmp_path))
    with pytest.raises(InstallError) as info:
        nsq_binary("nsqd")
    assert str(info.value) == f"nsqd not found in {tmp_path}; run `pipeline install-nsq` (or `make setup`)"
