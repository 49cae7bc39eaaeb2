"""Keyed partitions: which physical topic ``<topic>.<k>`` a record belongs to.

A topic declared with ``partitions: N`` and a ``key`` field is carried by N
NSQ topics ``<topic>.0`` .. ``<topic>.<N-1>``; every record goes to partition
``partition_of(record[key], N)``, so all records of one key meet in one
partition and replica k of a keyed stage sees every record of its keys.
Producers and the worker's output routing both use this module, so they
always agree::

    from pipeline.records.partition import Router, partition_of

    partition_of("SYM000", 4)                        # 3, on every machine, forever
    router = Router.of(topology, "ticks")
    router.route([{"symbol": "SYM000", ...}, ...])   # {"ticks.3": [...], ...}

A record without its key field, or with a key that is neither a string nor an
integer, raises :class:`PartitionKeyError` (with the record attached) rather
than being routed anywhere: a partition picked for it would be arbitrary, and
the caller (a producer, or the worker dead-lettering the input) knows best
what to do with it.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pipeline.errors import PipelineError
from pipeline.stage import plain

_CACHE_KEYS = 65536  # a Router remembers the partition of this many keys

if TYPE_CHECKING:  # only for hints
    from pipeline.config import TopicSpec, Topology


class PartitionKeyError(PipelineError, ValueError):
    """Raised when a record lacks the key field of a partitioned topic, or its key is not a str or int.

    ``error.record`` is the offending record, ``error.key`` the field name,
    ``error.topic`` the logical topic.
    """

    def __init__(self, reason: str, record: Any, key: str, topic: str):
        super().__init__(f"{reason}: {_short(record)}")
        self.reason, self.record, self.key, self.topic = reason, record, key, topic


def _short(record: Any, limit: int = 200) -> str:
    text = repr(record)
    return text if len(text) <= limit else text[:limit] + "..."


def partition_of(key: str | int, partitions: int) -> int:
    """Return the partition, in ``range(partitions)``, of records with key ``key``.

    The hash is ``zlib.crc32(key.encode("utf-8")) % partitions`` (an integer
    key is hashed as its decimal text), which gives the same answer in every
    process, Python version and machine, unlike the salted built-in
    ``hash()``. It must never change: a keyed stage's state lives in the
    partition this function picks.

    Raises:
        ValueError: ``partitions`` is below 1.
        TypeError: ``key`` is neither a str nor an int (bool included).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, not {partitions}")
    return zlib.crc32(_key_bytes(key)) % partitions


def _key_bytes(key: str | int) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode("ascii")
    raise TypeError(f"a partition key must be a str or an int, not {type(key).__name__}")


def partition_topics(topic: str, partitions: int) -> list[str]:
    """The physical topics of ``topic``: ``<topic>.<k>`` per partition, or ``[topic]`` for one partition.

    The same naming as :meth:`pipeline.config.topology.Topology.physical_topics`,
    for callers that hold a :class:`TopicSpec` rather than a whole topology.
    """
    if partitions == 1:
        return [topic]
    return [f"{topic}.{k}" for k in range(partitions)]


@dataclass(frozen=True)
class Router:
    """Routes records of one logical topic to its physical topics (one per partition).

    Build one per topic and reuse it: :meth:`of` from a topology, or
    :meth:`for_spec` from a topic's spec. An unpartitioned topic routes every
    record to itself and needs no key.

    Raises:
        ValueError: the topic has several partitions but no key field.
    """

    topic: str
    topics: tuple[str, ...]
    key: str | None
    # str key -> physical topic, so a busy key is hashed once (bounded by _CACHE_KEYS)
    _cache: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.topics) > 1 and self.key is None:
            raise ValueError(f"topic {self.topic!r} has {len(self.topics)} partitions but no key field")

    @classmethod
    def of(cls, topology: Topology, topic: str) -> Router:
        """The router of ``topic`` as ``topology`` declares it (undeclared topics are unpartitioned)."""
        spec = topology.topics.get(topic)
        return cls(topic, tuple(topology.physical_topics(topic)), spec.key if spec else None)

    @classmethod
    def for_spec(cls, topic: str, spec: TopicSpec) -> Router:
        """The router of ``topic`` declared by ``spec``."""
        return cls(topic, tuple(partition_topics(topic, spec.partitions)), spec.key)

    @property
    def partitioned(self) -> bool:
        """True when records are spread over several physical topics."""
        return len(self.topics) > 1

    def topic_of(self, record: dict) -> str:
        """The physical topic ``record`` belongs to.

        Raises:
            PartitionKeyError: the topic is partitioned and ``record`` has no
                usable key (missing, or not a str or int).
        """
        if len(self.topics) == 1:
            return self.topics[0]
        try:
            key = record[self.key]
        except (KeyError, TypeError):
            # a partitioned topic has a key field (__post_init__)
            raise PartitionKeyError(f"record has no {self.key!r} field to pick a partition of {self.topic!r}",
                                    record, cast(str, self.key), self.topic) from None
        if type(key) is str and (topic := self._cache.get(key)) is not None:
            return topic
        try:
            return self._remember(key, self.topics[partition_of(key, len(self.topics))])
        except TypeError as e:
            raise PartitionKeyError(f"{self.key!r} of a record for {self.topic!r}: {e}",
                                    record, cast(str, self.key), self.topic) from e

    def route(self, records: Iterable[dict]) -> dict[str, list[dict]]:
        """Group ``records`` by physical topic, keeping their order within each topic.

        Only topics that receive a record appear, in partition order.

        Raises:
            PartitionKeyError: a record has no usable key; nothing is returned.
        """
        if len(self.topics) == 1:
            records = list(records)
            return {self.topics[0]: records} if records else {}
        groups: dict[str, list[dict]] = {t: [] for t in self.topics}
        cache, field_name = self._cache, self.key
        for record in records:
            key = record.get(field_name) if type(record) is dict else None
            topic = cache.get(key) if type(key) is str else None
            if topic is None:
                topic = self._remember(key, self.topic_of(record))
            groups[topic].append(record)
        return {t: group for t, group in groups.items() if group}

    def route_rows(self, keys: list) -> dict[str, list[int]] | None:
        """Group row numbers by physical topic, given each row's key (a column); None if a key is unusable.

        :meth:`route` for records held as columns (see :class:`pipeline.stage.Columns`): the caller
        takes each topic's rows. A key that is not a str or int gives None, and the record path
        reports it with :meth:`route`'s error.
        """
        if len(self.topics) == 1:
            return {self.topics[0]: list(range(len(keys)))} if len(keys) else {}
        keys = plain(keys)  # an int64 column of a batched envelope is an array
        cache, count = self._cache, len(self.topics)
        try:
            distinct = set(map(cache.get, keys))
        except TypeError:  # an unhashable key: the loop below gives up on it
            distinct = set()
        if len(distinct) == 1 and (only := distinct.pop()) is not None:
            return {only: list(range(len(keys)))}  # every key cached, all in one partition
        groups: dict[str, list[int]] = {t: [] for t in self.topics}
        for i, key in enumerate(keys):
            topic = cache.get(key) if type(key) is str else None
            if topic is None:
                try:
                    topic = self._remember(key, self.topics[partition_of(key, count)])
                except (TypeError, ValueError):  # not a str or int; a str that is not UTF-8
                    return None
            groups[topic].append(i)
        return {t: rows for t, rows in groups.items() if rows}

    def _remember(self, key: Any, topic: str) -> str:
        """Cache ``topic`` as the partition of a str ``key`` (the cache is cleared when full); return it."""
        if type(key) is str:
            if len(self._cache) >= _CACHE_KEYS:
                self._cache.clear()
            self._cache[key] = topic
        return topic


def route(records: Iterable[dict], topic: str, topology: Topology) -> dict[str, list[dict]]:
    """Group ``records`` of logical ``topic`` by the physical topic they go to (see :meth:`Router.route`).

    Raises:
        PartitionKeyError: a record of a partitioned topic has no usable key.
        ValueError: the topic has several partitions but no key field.
    """
    return Router.of(topology, topic).route(records)
