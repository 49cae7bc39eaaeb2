"""Tests for the sink stage ``consumers.archive``: lines, fsync, idempotency, rotation, recovery."""
from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from consumers.archive import Archive, gzip_file
from pipeline.errors import HandlerLoadError
from pipeline.stage import Batch, StageContext, load_handler

STAGE = "archive"
AT_1330 = datetime(2024, 5, 1, 13, 30, tzinfo=timezone.utc)
AT_1405 = datetime(2024, 5, 1, 14, 5, tzinfo=timezone.utc)
AT_1500 = datetime(2024, 5, 1, 15, 0, tzinfo=timezone.utc)
FILE_13 = f"{STAGE}-r0-20240501T13.jsonl"
FILE_14 = f"{STAGE}-r0-20240501T14.jsonl"


class FakeClock:
    """A wall clock the test sets: ``clock.now = ...``; called like :func:`time.time`."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(AT_1330)


@pytest.fixture
def open_archive(var_dir: Path, clock: FakeClock) -> Iterator[Callable[..., Archive]]:
    """Yield a factory ``open_archive(replica=0, **params)``; every archive it made is closed at teardown."""
    made: list[Archive] = []

    def factory(replica: int = 0, **params) -> Archive:
        archive = Archive(StageContext(STAGE, replica, var_dir, params), clock=clock)
        made.append(archive)
        return archive

    yield factory
    for archive in made:
        archive.close()


@pytest.fixture
def fsyncs(monkeypatch) -> list[tuple[str, int]]:
    """Record ``(path, size)`` of every fd passed to ``os.fsync``, at the time of the call, then fsync it."""
    calls: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def archive_dir(var_dir: Path) -> Path:
    return var_dir / "archive" / STAGE


def read_lines(path: Path) -> list[dict]:
    """Return the records of a plain or gzipped archive file, checking every line is complete JSON."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path.name} ends in a partial line"
    return [orjson.loads(line) for line in data.splitlines()]


def file_order(path: Path) -> tuple[str, int]:
    """Sort key of an archive file: its hour, then its index (no suffix is index 0)."""
    stem = path.name.split(".jsonl")[0]
    hour, _, index = stem.rpartition("-")[2].partition(".")
    return hour, int(index or 0)


def read_archive(directory: Path) -> list[dict]:
    """Return every record in ``directory``'s archive files, in file order."""
    files = sorted((p for p in directory.iterdir() if ".jsonl" in p.name), key=file_order)
    return [record for path in files for record in read_lines(path)]


def ids(records: list[dict]) -> list:
    return [r.get("id") for r in records]


# -- writing -------------------------------------------------------------------

def test_records_are_appended_as_compact_json_lines_with_keys_in_given_order(open_archive, var_dir):
    archive = open_archive()
    records = [{"id": 1, "b": "x", "a": [1, 2.5, None]}, {"z": {"y": True}, "id": 2}]

    assert archive(Batch(list(records))) == {}
    assert archive(Batch([{"id": 3}])) == {}

    path = archive_dir(var_dir) / FILE_13
    assert archive.path == path
    assert path.read_bytes() == (
        b'{"id":1,"b":"x","a":[1,2.5,null]}\n{"z":{"y":true},"id":2}\n{"id":3}\n'
    )


def test_every_call_fsyncs_the_file_after_writing_its_lines(open_archive, var_dir, fsyncs):
    archive = open_archive()
    path = str(archive_dir(var_dir) / FILE_13)

    archive(Batch([{"id": 1}, {"id": 2}]))
    first_size = os.path.getsize(path)
    archive(Batch([{"id": 3}]))

    # The fsync of each call saw all of that call's lines: they were flushed first.
    assert (path, first_size) in fsyncs
    assert (path, os.path.getsize(path)) in fsyncs
    # A new file's directory entry is made durable too.
    assert str(archive_dir(var_dir)) in [p for p, _ in fsyncs]


def test_a_batch_of_duplicates_and_rejects_only_writes_nothing(open_archive, var_dir):
    archive = open_archive()
    archive(Batch([{"id": 1}]))
    batch = Batch([{"id": 1}, {"id": 2, "blob": b"\x00"}])

    assert archive(batch) == {}

    assert ids(read_archive(archive_dir(var_dir))) == [1]
    assert list(batch.rejected) == [1]


def test_directory_defaults_to_var_archive_stage_and_is_created_with_parents(var_dir, clock):
    archive = Archive(StageContext(STAGE, 3, var_dir / "deep" / "er"), clock=clock)
    archive(Batch([{"id": 1}]))
    archive.close()

    assert (var_dir / "deep" / "er" / "archive" / STAGE / f"{STAGE}-r3-20240501T13.jsonl").is_file()


def test_relative_dir_is_under_var_dir_and_absolute_dir_is_used_as_given(var_dir, tmp_path, clock):
    relative = Archive(StageContext(STAGE, 0, var_dir, {"dir": "cold/store"}), clock=clock)
    absolute = Archive(StageContext(STAGE, 0, var_dir, {"dir": str(tmp_path / "elsewhere")}), clock=clock)

    assert relative.params.dir == var_dir / "cold" / "store"
    assert absolute.params.dir == tmp_path / "elsewhere"
    assert relative.params.dir.is_dir() and absolute.params.dir.is_dir()


def test_replicas_write_separate_files(open_archive, var_dir):
    open_archive(replica=0)(Batch([{"id": 1}]))
    open_archive(replica=1)(Batch([{"id": 1}]))

    assert sorted(p.name for p in archive_dir(var_dir).iterdir()) == [
        f"{STAGE}-r0-20240501T13.jsonl", f"{STAGE}-r1-20240501T13.jsonl"]


def test_load_handler_builds_the_class_from_the_context(var_dir):
    context = StageContext(STAGE, 0, var_dir, {"rotate": "none"})

    handler = load_handler("consumers.archive:Archive", context)

    assert isinstance(handler, Archive)
    assert handler.params.rotate == "none"
    handler.close()


# -- rejects and params ------------------------------------------------------------

def test_records_json_cannot_encode_are_rejected_with_a_reason(open_archive, var_dir):
    archive = open_archive()
    batch = Batch([
        {"id": 1},
        {"id": 2, "blob": b"\x00"},
        {"id": 3, "n": 2**70},
        {"id": 4, "x": [1.0, float("nan")]},
        {"id": 5, 7: "int key"},
        {"id": 6, "s": "\ud800"},
        {"id": 7, "x": None},  # null is fine: only NaN and Infinity are refused
    ])

    archive(batch)

    assert batch.rejected == {
        1: "record cannot be archived as JSON: Type is not JSON serializable: bytes",
        2: "record cannot be archived as JSON: Integer exceeds 64-bit range",
        3: "record cannot be archived as JSON: it holds a NaN or infinite float",
        4: "record cannot be archived as JSON: Dict key must be str",
        5: "record cannot be archived as JSON: str is not valid UTF-8: surrogates not allowed",
    }
    assert read_archive(archive_dir(var_dir)) == [{"id": 1}, {"id": 7, "x": None}]


@pytest.mark.parametrize(("params", "message"), [
    ({"max_bytes": 0}, "archive param 'max_bytes' must be a positive integer (bytes), got 0"),
    ({"max_bytes": "64MiB"}, "archive param 'max_bytes' must be a positive integer (bytes), got '64MiB'"),
    ({"max_bytes": True}, "archive param 'max_bytes' must be a positive integer (bytes), got True"),
    ({"max_bytes": 1e6}, "archive param 'max_bytes' must be a positive integer (bytes), got 1000000.0"),
    ({"rotate": "daily"}, "archive param 'rotate' must be one of 'hourly', 'none', got 'daily'"),
    ({"gzip": "yes"}, "archive param 'gzip' must be true or false, got 'yes'"),
    ({"dir": ""}, "archive param 'dir' must be a non-empty path, got ''"),
    ({"dir": 5}, "archive param 'dir' must be a non-empty path, got 5"),
    ({"max_byte": 10}, "archive: unknown param(s) 'max_byte' (known: dir, gzip, max_bytes, rotate)"),
])
def test_bad_params_raise_value_error_naming_the_param(var_dir, params, message):
    with pytest.raises(ValueError) as caught:
        Archive(StageContext(STAGE, 0, var_dir, params))
    assert str(caught.value) == message


def test_a_dir_that_cannot_be_created_is_a_value_error_naming_dir(var_dir):
    var_dir.mkdir()
    (var_dir / "taken").write_text("a file, not a directory")

    with pytest.raises(ValueError, match=r"^archive param 'dir': cannot create .*taken/sub"):
        Archive(StageContext(STAGE, 0, var_dir, {"dir": "taken/sub"}))


@pytest.mark.parametrize("stage", ["", "a/b", ".."])
def test_a_stage_name_unusable_in_a_file_name_is_refused(var_dir, stage):
    with pytest.raises(ValueError) as caught:
        Archive(StageContext(stage, 0, var_dir))
    assert str(caught.value) == f"archive: stage name {stage!r} cannot be used in a file name"


def test_load_handler_reports_a_bad_param_as_handler_load_error(var_dir):
    context = StageContext(STAGE, 0, var_dir, {"rotate": "weekly"})

    with pytest.raises(HandlerLoadError) as caught:
        load_handler("consumers.archive:Archive", context)
    assert str(caught.value) == ("handler 'consumers.archive:Archive': "
                                 "archive param 'rotate' must be one of 'hourly', 'none', got 'weekly'")


# -- idempotency and crash recovery --------------------------------------------------

def test_a_new_instance_does_not_rewrite_ids_already_in_the_open_file(open_archive, var_dir):
    # Given: a replica wrote a batch, fsynced it, and died before the inputs were FINed.
    open_archive()(Batch([{"id": 1}, {"id": "2"}, {"id": [3, "x"]}, {"note": "no id"}]))

    # When: its successor gets the same batch again, plus new records.
    successor = open_archive()
    successor(Batch([{"id": 1}, {"id": "2"}, {"id": [3, "x"]}, {"note": "no id"},
                     {"id": 2}, {"id": 4}, {"id": 4}, {"id": None}, {"id": None}]))

    # Then: each id is written once, records without an id every time,
    # and ids compare by JSON value and type ("2" is not 2).
    assert successor.path == archive_dir(var_dir) / FILE_13
    assert ids(read_archive(archive_dir(var_dir))) == [
        1, "2", [3, "x"], None, None, 2, 4, None, None]


@pytest.mark.parametrize("torn", [b'{"id":3,"pay', b'{"id":3}'], ids=["mid-record", "before-newline"])
def test_an_incomplete_last_line_is_truncated_on_reopen(open_archive, var_dir, torn):
    # Given: a crash mid-write left a last line without its newline (its record was never FINed).
    open_archive()(Batch([{"id": 1}, {"id": 2}]))
    path = archive_dir(var_dir) / FILE_13
    complete = path.read_bytes()
    with open(path, "ab") as f:
        f.write(torn)

    # When: the successor opens the file, and the record is delivered again.
    successor = open_archive()
    assert path.read_bytes() == complete
    successor(Batch([{"id": 2}, {"id": 3}]))

    # Then: the file is whole JSON lines, with record 3 once.
    assert read_lines(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


def failing_fsync(fd: int) -> None:
    """An fsync that fails as a dying disk does."""
    raise OSError(5, "Input/output error")


def test_a_failed_fsync_cuts_the_file_back_and_the_retry_writes_the_batch_once(open_archive, var_dir, monkeypatch):
    archive = open_archive()
    archive(Batch([{"id": 1}]))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        archive(Batch([{"id": 2}, {"id": 3}]))
    monkeypatch.setattr(os, "fsync", real_fsync)

    # The lines that fsync did not confirm are cut off, not trusted to be on disk ...
    assert ids(read_archive(archive_dir(var_dir))) == [1]
    # ... so the runtime's retry of the batch writes them again, once.
    archive(Batch([{"id": 2}, {"id": 3}, {"id": 4}]))

    assert ids(read_archive(archive_dir(var_dir))) == [1, 2, 3, 4]


# -- rotation -------------------------------------------------------------------

def test_size_rotation_with_gzip_produces_valid_gz_files_holding_the_records(open_archive, var_dir, fsyncs):
    archive = open_archive(max_bytes=40, gzip=True)
    records = [{"id": i, "pad": "x" * 10} for i in range(10)]  # 25 or 26 bytes a line: one per file

    archive(Batch(records[:5]))
    archive(Batch(records[5:]))

    directory = archive_dir(var_dir)
    names = sorted((p.name for p in directory.iterdir()), key=lambda n: file_order(directory / n))
    assert names == [f"{STAGE}-r0-20240501T13.jsonl.gz"] + [
        f"{STAGE}-r0-20240501T13.{i}.jsonl.gz" for i in range(1, 9)] + [f"{STAGE}-r0-20240501T13.9.jsonl"]
    assert read_archive(directory) == records
    for name in names:
        assert len(read_lines(directory / name)) == 1  # two lines would exceed max_bytes
    # Each .gz was fsynced as .gz.tmp before being renamed into place.
    assert f"{directory / names[0]}.tmp" in [p for p, _ in fsyncs]


def test_size_cap_packs_lines_up_to_the_cap_and_never_past_it(open_archive, var_dir):
    archive = open_archive(max_bytes=30)
    archive(Batch([{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4, "pad": "y" * 40}, {"id": 5}]))

    directory = archive_dir(var_dir)
    sizes = {p.name: p.stat().st_size for p in directory.iterdir()}
    # Three 9-byte lines fit in 30 bytes; the 4th line is longer than the cap and gets a file alone.
    assert sizes == {
        f"{STAGE}-r0-20240501T13.jsonl": 27,
        f"{STAGE}-r0-20240501T13.1.jsonl": 58,
        f"{STAGE}-r0-20240501T13.2.jsonl": 9,
    }
    assert ids(read_archive(directory)) == [1, 2, 3, 4, 5]


def test_a_restart_resumes_the_newest_file_under_the_cap_and_starts_a_new_one_at_the_cap(open_archive, var_dir):
    open_archive(max_bytes=30)(Batch([{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}]))
    directory = archive_dir(var_dir)

    resumed = open_archive(max_bytes=30)
    assert resumed.path == directory / f"{STAGE}-r0-20240501T13.1.jsonl"  # 9 of 30 bytes
    resumed(Batch([{"id": 5}, {"id": 6}]))
    resumed.close()

    at_cap = open_archive(max_bytes=27)
    at_cap(Batch([{"id": 7}]))
    assert at_cap.path == directory / f"{STAGE}-r0-20240501T13.2.jsonl"
    assert ids(read_archive(directory)) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("compress", [False, True])
def test_hourly_rotation_follows_the_injected_clock(open_archive, var_dir, clock, compress):
    archive = open_archive(gzip=compress)
    archive(Batch([{"id": 1}, {"id": 2}]))

    clock.now = AT_1405
    archive(Batch([{"id": 2}, {"id": 3}]))

    directory = archive_dir(var_dir)
    old = directory / (FILE_13 + (".gz" if compress else ""))
    assert sorted(p.name for p in directory.iterdir()) == sorted([old.name, FILE_14])
    assert archive.path == directory / FILE_14
    assert read_lines(old) == [{"id": 1}, {"id": 2}]
    # Ids are checked against the open file only: id 2 is written again in the new hour.
    assert read_lines(directory / FILE_14) == [{"id": 2}, {"id": 3}]


def test_rotate_none_keeps_one_file_across_hours_and_restarts(open_archive, var_dir, clock):
    open_archive(rotate="none")(Batch([{"id": 1}]))

    clock.now = AT_1500
    successor = open_archive(rotate="none")
    successor(Batch([{"id": 1}, {"id": 2}]))

    directory = archive_dir(var_dir)
    assert [p.name for p in directory.iterdir()] == [FILE_13]
    assert ids(read_lines(directory / FILE_13)) == [1, 2]


def test_a_restart_in_a_later_hour_compresses_the_file_left_plain(open_archive, var_dir, clock):
    open_archive(gzip=True)(Batch([{"id": 1}]))  # stopped at 13:30: T13 stays plain

    clock.now = AT_1500
    successor = open_archive(gzip=True)

    directory = archive_dir(var_dir)
    assert [p.name for p in directory.iterdir()] == [FILE_13 + ".gz"]
    assert successor.path is None  # the T15 file is created by the first write
    successor(Batch([{"id": 2}]))
    assert ids(read_archive(directory)) == [1, 2]


def test_a_restart_cleans_up_after_a_compression_interrupted_by_a_crash(open_archive, var_dir, clock):
    # Given: T12 left plain with a partial .gz.tmp, and T11 compressed but its plain file not yet deleted.
    directory = archive_dir(var_dir)
    directory.mkdir(parents=True)
    t12 = directory / f"{STAGE}-r0-20240501T12.jsonl"
    t12.write_bytes(b'{"id":12}\n')
    (directory / (t12.name + ".gz.tmp")).write_bytes(b"\x1f\x8b partial")
    t11 = directory / f"{STAGE}-r0-20240501T11.jsonl"
    t11.write_bytes(b'{"id":11}\n')
    gzip_file(t11)
    t11.write_bytes(b'{"id":11}\n')

    # When: the replica starts with gzip on.
    open_archive(gzip=True)

    # Then: only complete .gz files remain, each holding its records once.
    assert sorted(p.name for p in directory.iterdir()) == [t11.name + ".gz", t12.name + ".gz"]
    assert ids(read_archive(directory)) == [11, 12]


def test_gzip_file_replaces_the_file_by_a_valid_gz(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b'{"id":1}\n{"id":2}\n')

    gz = gzip_file(plain)

    assert gz == tmp_path / "a.jsonl.gz"
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl.gz"]
    assert gzip.decompress(gz.read_bytes()) == b'{"id":1}\n{"id":2}\n'


def test_a_failed_fsync_at_size_rotation_cuts_the_old_file_back(open_archive, var_dir, monkeypatch):
    archive = open_archive(max_bytes=20)
    archive(Batch([{"id": 1}]))
    real_fsync = os.fsync
    # When: the fsync before a size rotation fails.
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        archive(Batch([{"id": 2}, {"id": 3}]))  # 2 fits beside 1; 3 needs a new file
    monkeypatch.setattr(os, "fsync", real_fsync)

    # Then: line 2 is cut off and no new file was started; the retry writes 2 and 3 once.
    assert [p.name for p in archive_dir(var_dir).iterdir()] == [FILE_13]
    assert ids(read_archive(archive_dir(var_dir))) == [1]
    archive(Batch([{"id": 2}, {"id": 3}]))
    assert ids(read_archive(archive_dir(var_dir))) == [1, 2, 3]
