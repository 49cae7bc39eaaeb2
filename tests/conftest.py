"""Shared fixtures: nsqd and nsqlookupd processes, fresh topics.

Every process is started on free 127.0.0.1 ports, stopped by pid at teardown,
and checked to be gone, so no test leaks a server into the next. ``nsq_bin``
and ``nsq_cluster`` come from the package's own pytest plugin
(``pipeline.testing.fixtures``, registered by its entry point), as in any
project that installs it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.ops.processes import NsqProcess, nsqd_args, start_nsqd, start_nsqlookupd, start_process

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Put the checkout on PYTHONPATH for every process a test starts.

    pytest imports the checkout's reference code (consumers/, producers/, chaos/)
    through ``pythonpath = ["."]``; the installed package is only ``pipeline``.
    Workers under supervisord run in a test's temporary folder and import their
    handlers (``consumers.primes:classify``) from here too.
    """
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


#: What a build copy of the checkout leaves out: environments, state and earlier builds.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__")


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once per session from a copy of the checkout (so the build writes nothing into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                           str(source), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = (tmp / "dist").glob("nsq_pipeline-*.whl")
    return built


def _stop(process: NsqProcess) -> None:
    """Stop ``process`` and fail the test if it survives."""
    process.stop()
    assert not process.alive(), f"{process.name} (pid {process.pid}) survived stop()"


@pytest.fixture
def nsqd(nsq_bin: Path, tmp_path: Path) -> Iterator[NsqProcess]:
    """Yield a running nsqd on free ports with its data (and log) in ``tmp_path/nsqd``."""
    process = start_nsqd(tmp_path / "nsqd")
    yield process
    _stop(process)


@dataclass
class NsqFactory:
    """Starts nsqd and nsqlookupd processes for one test (free 127.0.0.1 ports) and stops them all after it.

    ``restart`` starts a stopped nsqd again on the same ports and data dir with
    the same options, as an operator would after a node loss. ``prefix`` runs
    an nsqd under a wrapper, e.g. ``ip netns exec NAME`` (the wrapper must exec it).
    """

    root: Path
    started: list[NsqProcess] = field(default_factory=list)
    options: dict[str, dict] = field(default_factory=dict)

    def lookupd(self, name: str = "nsqlookupd", *, tcp: str | None = None, http: str | None = None) -> NsqProcess:
        """Start one nsqlookupd."""
        process = start_nsqlookupd(self.root / f"{name}.log", name=name, tcp=tcp, http=http)
        self.started.append(process)
        return process

    def nsqd(self, name: str = "nsqd", *, lookupd_tcp=(), extra=(), tcp: str | None = None,
             http: str | None = None, prefix=()) -> NsqProcess:
        """Start one nsqd with its data in ``root/<name>``, registered with ``lookupd_tcp``."""
        self.options[name] = {"extra": list(extra), "prefix": list(prefix)}
        if prefix:
            data_dir = self.root / name
            data_dir.mkdir(parents=True, exist_ok=True)
            argv = [*prefix, *nsqd_args(tcp=tcp, http=http, data_dir=data_dir, lookupd_tcp=list(lookupd_tcp),
                                        extra=list(extra))]
            process = start_process(name, argv, http=http, tcp=tcp, data_dir=data_dir,
                                    log_path=data_dir / f"{name}.log")
        else:
            process = start_nsqd(self.root / name, name=name, lookupd_tcp=list(lookupd_tcp), extra=list(extra),
                                 tcp=tcp, http=http)
        self.started.append(process)
        return process

    def restart(self, process: NsqProcess, *, lookupd_tcp=()) -> NsqProcess:
        """Start ``process`` (stopped) again with the same name, ports, data dir and options."""
        assert not process.alive(), f"{process.name} is still running"
        return self.nsqd(process.name, lookupd_tcp=lookupd_tcp, tcp=process.tcp, http=process.http,
                         **self.options[process.name])

    def stop_all(self) -> None:
        """Stop every process started, nsqd first, and fail if one survives."""
        for process in sorted(self.started, key=lambda p: p.name.startswith("nsqlookupd")):
            _stop(process)


@pytest.fixture
def nsq_factory(nsq_bin: Path, tmp_path: Path) -> Iterator[NsqFactory]:
    """Yield an :class:`NsqFactory` whose processes are stopped at teardown."""
    factory = NsqFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def topic() -> str:
    """Return a topic name no other test uses."""
    return f"t_{uuid.uuid4().hex[:10]}"
