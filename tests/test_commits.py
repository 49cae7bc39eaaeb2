"""CommitQueue: a keyed replica's batches commit in order, publish OK, then checkpoint, then FIN.

Driven through a fake CommitHost and checkpoint that record their calls: the
host (pipeline.runtime.keyed_path) is not what these tests are about, and the
keyed worker tests run the same queue on real nsqd.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from pipeline.errors import PublishError
from pipeline.runtime.commits import CommitQueue, KeyedCommit


class FakeHost:
    """A CommitHost recording what the queue calls back, in order."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.draining = False
        self.queue: CommitQueue | None = None

    def hold_answers(self, hold: bool) -> None:
        pass

    def published(self, outputs: dict) -> None:
        self.calls.append(("published", outputs["out"][0]))

    def publish_failed(self, outputs: dict, count: int, error: BaseException) -> None:
        self.calls.append(("publish_failed", outputs["out"][0]))

    def finish(self, finished: list, requeued: list) -> None:
        self.calls.append(("finish", finished[0]))

    def state_now(self) -> tuple[dict, bytes | None]:
        return {"batches": 3}, None

    def rewind(self) -> None:
        self.calls.append(("rewind", None))
        for commit in self.queue.drop_all():
            self.calls.append(("requeue", commit.finish[0]))
        self.queue.advance()


class FakeCheckpoint:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def encode(self, sequencer_state: dict, handler_state: bytes | None) -> bytes:
        return repr(sequencer_state).encode()

    def write(self, data: bytes) -> None:
        self.calls.append(("checkpoint", data))


def commit(name: str) -> KeyedCommit:
    return KeyedCommit(finish=[f"msg-{name}"], retry=[], outputs={"out": [name.encode()]}, state=None)


async def run_commits(answers: list[tuple[int, PublishError | None]]) -> list:
    """Queue three commits, answer their publishes in the given order, and return the host's calls."""
    calls: list = []
    host = FakeHost(calls)
    spec = SimpleNamespace(max_in_flight=100, checkpoint_interval_ms=0, publish_timeout=5.0)
    queue = host.queue = CommitQueue(host, spec, FakeCheckpoint(calls), Counter(), "stage s replica 0")
    commits = [commit(name) for name in ("a", "b", "c")]
    for c in commits:
        queue.add(c)
    for index, error in answers:
        queue.answered(commits[index], error)
        await asyncio.sleep(0.01)
    await asyncio.wait_for(queue.done.wait(), 5.0)
    return calls


def test_commits_publish_then_checkpoint_then_finish_in_batch_order():
    # Given the last batch's publish acknowledged first, nothing commits until the first one's is.
    calls = asyncio.run(run_commits([(2, None), (0, None), (1, None)]))

    assert calls[0] == ("published", b"a")
    names = [name for name, _ in calls]
    assert names.index("checkpoint") > max(i for i, n in enumerate(names) if n == "published")
    assert names.index("checkpoint") < min(i for i, n in enumerate(names) if n == "finish")
    assert [arg for name, arg in calls if name == "finish"] == ["msg-a", "msg-b", "msg-c"]
    assert [arg for name, arg in calls if name == "published"] == [b"a", b"b", b"c"]


def test_a_failed_publish_rewinds_with_no_checkpoint_and_no_finish():
    calls = asyncio.run(run_commits([(0, PublishError("injected")), (1, None), (2, None)]))

    assert calls[:2] == [("publish_failed", b"a"), ("rewind", None)]
    assert [arg for name, arg in calls if name == "requeue"] == ["msg-a", "msg-b", "msg-c"]
    assert not [c for c in calls if c[0] in ("checkpoint", "finish", "published")]
