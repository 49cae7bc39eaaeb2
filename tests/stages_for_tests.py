"""Stage handlers used only by tests."""
from __future__ import annotations

import time

from consumers.primes import classify


def fail_on_13(batch):
    """Classify like primes, but raise for any batch holding the number 13."""
    if any(r.get("number") == 13 for r in batch.records):
        raise ValueError("unlucky 13")
    return classify(batch)


def forgets_return(batch):
    """Classify like primes, but forget to return what it classified (the result is None)."""
    classify(batch)


class RunningSum:
    """A keyed stage for runtime tests: per key, the running sum of ``v`` (raises on v == 13)."""

    def __init__(self, context):
        self.sums: dict[str, int] = {}

    def __call__(self, batch):
        out = []
        for i, record in enumerate(batch.records):
            if not isinstance(record.get("v"), int):
                batch.reject(i, "field 'v' must be an integer")
                continue
            if record["v"] == 13:
                raise ValueError("unlucky 13")
            key = record["key"]
            self.sums[key] = self.sums.get(key, 0) + record["v"]
            out.append({"id": record["id"], "key": key, "seq": record["seq"], "sum": self.sums[key]})
        return {"sums": out}

    def snapshot(self) -> bytes:
        import msgpack
        return msgpack.packb(self.sums)

    def restore(self, data: bytes) -> None:
        import msgpack
        self.sums = msgpack.unpackb(data)


def throttled_classify(batch):
    """Classify like primes, 20 ms slower per batch: consumers fall behind, so nsqd holds a backlog."""
    time.sleep(0.02)  # throughput limit, not synchronisation
    return classify(batch)


def _plain(column):
    """A column as Python values (an envelope's int and float columns arrive as numpy arrays)."""
    return column.tolist() if hasattr(column, "tolist") else column


class ColumnarRunningSum(RunningSum):
    """RunningSum with a columnar path too; it changes its state before failing on v == 13, as a careless stage might."""

    def columns(self, cols):
        from pipeline.stage import Columns
        out: dict[str, list] = {"id": [], "key": [], "seq": [], "sum": []}
        for id_, key, seq, v in zip(cols["id"], cols["key"], _plain(cols["seq"]), _plain(cols["v"])):
            if type(v) is not int:
                return None
            self.sums[key] = self.sums.get(key, 0) + v
            if v == 13:
                raise ValueError("unlucky 13")
            for name, value in zip(out, (id_, key, seq, self.sums[key])):
                out[name].append(value)
        return {"sums": Columns(out)}


class AtomicColumnarRunningSum(ColumnarRunningSum):
    """ColumnarRunningSum that checks every record before it changes anything (``columns_atomic``); it
    still raises on v == 13 after adding the records before it, as a stage with a bug would. Counts its
    snapshots."""

    columns_atomic = True

    def __init__(self, context):
        super().__init__(context)
        self.snapshots = 0

    def snapshot(self) -> bytes:
        self.snapshots += 1
        return super().snapshot()

    def columns(self, cols):
        if any(type(v) is not int for v in _plain(cols["v"])):
            return None  # before any change: the record path names the bad record
        return super().columns(cols)
