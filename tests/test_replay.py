"""`pipeline replay --missing`: republish what nsqd acknowledged but no sink saw."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from nsqhttp import wait_until
from pipeline.client import nsqd_http
from pipeline.records.codecs import decode
from pipeline.client.nsqclient import NsqSubscriber

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_replays_exactly_the_missing_records(nsqd, topic: str, tmp_path: Path) -> None:
    # Given a run folder: 5 records acked, 1 sent but not acked, 2 of the acked seen downstream
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "topology.yaml").write_text(yaml.safe_dump({"nsq": {"nsqd": [
        {"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}]}}))
    sent = [[f"r-{n}", n] for n in range(1, 7)]
    (folder / "journal.jsonl").write_bytes(orjson.dumps({"sent": sent}) + b"\n"
                                           + orjson.dumps({"acked": [i for i, _ in sent[:5]]}) + b"\n")
    (folder / "arrivals.jsonl").write_bytes(b"".join(orjson.dumps({"topic": "prime", "id": i}) + b"\n"
                                                     for i in ("r-2", "r-5")))
    nsqd_http.create_channel(nsqd.http, topic, "check")
    # When replaying
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", "--missing", "--run", str(folder),
                           "--topic", topic], cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then the three acked-but-missing records are published again, and nothing else
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"replayed 3 missing records to {topic} on {nsqd.tcp}"
    records = []
    with NsqSubscriber(nsqd.tcp, topic, "check") as sub:
        wait_until(lambda: records.extend(decode(m.body) for m in sub.messages(timeout=0.2)) or len(records) >= 3,
                   10, message="replayed records never arrived")
    assert sorted((r["id"], r["number"]) for r in records) == [("r-1", 1), ("r-3", 3), ("r-4", 4)]
    assert nsqd_http.topic_message_count(nsqd.http, topic) == 3
