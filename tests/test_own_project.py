"""A user's own project, from the built wheel in a fresh venv, in a folder that is not this checkout.

`pipeline init`, `up`, `produce --from` (10,000 JSON lines), `peek`, `down`:
every good record reaches the output, every bad one `orders.dead` with its
line's reason; the scaffold's own pytest passes, and fails once its handler is
broken.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CHECK_CHANNEL, collect
from nsqhttp import wait_until
from undelivered import channels

from pipeline.client import nsqd_http
from pipeline.config import KEEP_CHANNEL
from pipeline.ops.install import bin_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, nsq_bin: Path, built_wheel: Path) -> Iterator[Path]:
    """A venv with the wheel (and its testing extra), and NSQ copied in."""
    tmp = tmp_path_factory.mktemp("user")
    wheel = built_wheel
    run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    # with the user's environment: the checkout on PYTHONPATH would make pip take the package as installed
    run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", "--no-compile", "--disable-pip-version-check",
         f"{wheel}[testing]"],
        tmp, venv=tmp / "venv", timeout=600)
    # NSQ v1.3.0 already on PATH is copied rather than built
    done = run([str(tmp / "venv" / "bin" / "pipeline"), "install-nsq"], tmp, venv=tmp / "venv", path=str(bin_dir()))
    assert (tmp / "venv" / "bin" / "nsqd").exists(), done.stdout + done.stderr
    yield tmp / "venv"


def user_env(venv: Path, path: str | None = None) -> dict[str, str]:
    """A user's shell: the venv first on PATH, nothing of this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in (str(venv / "bin"), path, "/usr/bin:/bin") if p)
    return env


def run(argv: list[str], cwd: Path, *, venv: Path | None = None, path: str | None = None, timeout: float = 240,
        check: bool = True) -> subprocess.CompletedProcess:
    env = user_env(venv, path) if venv else None
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


def orders_file(path: Path, count: int) -> tuple[int, dict[int, str]]:
    """Write ``count`` lines of orders: every 50th has qty 0 (the stage rejects it); return (good, bad reasons)."""
    bad: dict[int, str] = {}
    with path.open("w") as f:
        for i in range(1, count + 1):
            order = {"order": i, "qty": i % 5 + 1, "price": 2.0}
            if i % 50 == 0:
                order["qty"] = 0
                bad[i] = "qty must be a positive integer, got 0"
            f.write(json.dumps(order) + "\n")
    return count - len(bad), bad


def test_init_up_produce_tail_down_and_the_scaffolds_own_tests(venv: Path):
    # a short folder: supervisord's unix socket lives under var/run/, and its path may not pass 108 bytes
    home = Path(tempfile.mkdtemp(prefix="np-user-"))
    try:
        check_the_scaffold(venv, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def check_the_scaffold(venv: Path, home: Path) -> None:
    pipeline = str(venv / "bin" / "pipeline")
    created = run([pipeline, "init", "shop"], home, venv=venv)
    assert "ports (free now):" in created.stdout
    project = home / "shop"
    refused = run([pipeline, "init", "shop"], home, venv=venv, check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == "pipeline init: shop is not empty; give a new or " \
                                                                 "empty folder"
    topology = (project / "topology.yaml").read_text()
    http = "127.0.0.1:" + re.search(r"http: 127\.0\.0\.1:(\d+)}", topology).group(1)

    tests = run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"], project, venv=venv)
    assert "2 passed" in tests.stdout

    good, bad = orders_file(project / "orders.jsonl", 10_000)
    run([pipeline, "up"], project, venv=venv, timeout=120)
    try:
        nsqd_http.create_channel(http, "orders.dead", CHECK_CHANNEL)  # keep the dead letters for this test
        produced = run([pipeline, "produce", "orders", "--from", "orders.jsonl"], project, venv=venv)
        assert "read 10000 lines; published 10000 records to orders, 10000 acknowledged; refused 0" in produced.stdout
        wait_until(lambda: nsqd_http.topic_message_count(http, "valued_orders") >= good
                   and nsqd_http.topic_message_count(http, "orders.dead") >= len(bad), 60,
                   message="the stage did not process every order")
        assert nsqd_http.topic_message_count(http, "valued_orders") == good
        assert nsqd_http.topic_message_count(http, "orders.dead") == len(bad)
        tcp = "127.0.0.1:" + re.search(r"tcp: 127\.0\.0\.1:(\d+), http", topology).group(1)
        letters = collect(tcp, ["orders.dead"], lambda got: len(got["orders.dead"]) >= len(bad), 30)["orders.dead"]
        assert {json.loads(d["body"])["order"]: d["reason"] for d in letters} == bad
        # the results wait in valued_orders' keep channel (made by up): peek shows them and leaves them there
        peeked = run([pipeline, "peek", "valued_orders", "-n", "3"], project, venv=venv).stdout.splitlines()
        assert len(peeked) == 3 and all(json.loads(line)["value"] > 0 for line in peeked)
        assert channels(http, "valued_orders")[KEEP_CHANNEL] == good
    finally:
        run([pipeline, "down"], project, venv=venv, timeout=120)

    stages = project / "stages.py"
    stages.write_text(stages.read_text().replace('return {"valued_orders": valued}', "valued"))
    broken = run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"], project,
                 venv=venv, check=False)
    assert broken.returncode == 1 and "failed" in broken.stdout
