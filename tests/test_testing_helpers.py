"""pipeline.testing: stages run in-process with the runtime's rules, the columnar and keyed checks, and the
pytest fixtures a user's project gets by installing the package."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consumers.features import Features
from consumers.primes import classify
from consumers.signals import Signals
from pipeline.config import load_topology, split_address
from pipeline.ops.processes import pid_alive
from pipeline.stage import Batch, StageContext
from pipeline.testing import (
    DeadRecord,
    assert_columns_match,
    check_keyed,
    copy_topology,
    redelivered,
    run_stage,
)
from stages_for_tests import fail_on_13
from test_features_signals import make_ticks

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
PRIMES = ["prime", "non_prime"]


def numbers(first: int, last: int) -> list[dict]:
    return [{"id": f"r-{n}", "number": n} for n in range(first, last + 1)]


# ---------------------------------------------------------------------------
# run_stage
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [1, 10], ids=["records", "envelopes"])
@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_primes_are_routed_and_bad_records_and_bodies_dead_lettered_as_the_worker_does(pack, codec):
    big = b'{"id": "r-big", "number": 1180591620717411303424}'  # 2**70: no encoder takes it, a body can hold it
    records = [*numbers(1, 12), {"id": "r-x", "number": "x"}, b"not json", big]

    run = run_stage(classify, records, outputs=PRIMES, pack=pack, codec=codec)

    assert run.outputs["prime"] == [{"id": f"r-{n}", "number": n, "prime": True} for n in (2, 3, 5, 7, 11)]
    assert [r["number"] for r in run.outputs["non_prime"]] == [1, 4, 6, 8, 9, 10, 12]
    assert sorted(run.dead, key=repr) == sorted([
        DeadRecord({"id": "r-x", "number": "x"}, "field 'number' must be an integer, got str 'x'"),
        DeadRecord(b"not json", "not a JSON object or msgpack map (starts with b'not json')"),
        DeadRecord({"id": "r-big", "number": 2**70},
                   "field 'number' is outside the signed 64-bit integer range, got int 1180591620717411303424"),
    ], key=repr)
    assert run.retried == [] and run.errors == []


def test_a_stage_of_a_topology_file_runs_with_its_outputs_codecs_and_params():
    run = run_stage("primes", numbers(1, 10), topology=ROOT / "topology.yaml")
    assert [r["number"] for r in run.outputs["prime"]] == [2, 3, 5, 7]

    ticks = make_ticks(300, seed=5)
    run = run_stage("features", ticks, topology=ROOT / "topology.yaml", params={"window": 3})
    direct = Features(StageContext("features", 0, Path("var"), {"window": 3}))(Batch(ticks))["features"]
    by_key = lambda records: sorted(records, key=lambda r: (r["symbol"], r["seq"]))  # noqa: E731
    assert by_key(run.outputs["features"]) == by_key(direct)
    # partitioned by symbol, as the features topic declares
    assert set(run.topics) == {"features.0", "features.1", "features.2", "features.3"}


def test_a_handler_that_raises_is_retried_with_its_message_alone_until_max_tries_then_dead_lettered():
    run = run_stage(fail_on_13, numbers(10, 16), outputs=PRIMES, max_tries=3)

    # Given/Then: the batch ran whole, then message by message; 13 came back twice (attempts 2 and 3)
    assert [r["number"] for r in run.retried] == [13, 13]
    assert [str(e) for e in run.errors] == ["unlucky 13"] * 4
    assert run.dead == [DeadRecord({"id": "r-13", "number": 13},
                                   "handler raised ValueError: unlucky 13 (attempt 3 of max_tries 3)")]
    assert [r["number"] for r in run.outputs["prime"]] == [11]  # the others are not held back
    assert len(run.outputs["non_prime"]) == 5

    once = run_stage(fail_on_13, numbers(10, 16), outputs=PRIMES, redeliver=False)
    assert [r["number"] for r in once.retried] == [13] and once.dead == []


def test_a_failing_record_in_an_envelope_is_dead_lettered_alone_after_max_tries():
    run = run_stage(fail_on_13, numbers(1, 20), outputs=PRIMES, pack=20, max_tries=2)
    assert run.retried == numbers(1, 20)  # the envelope is the unit nsqd redelivers
    assert run.dead == [DeadRecord({"id": "r-13", "number": 13},
                                   "handler raised ValueError: unlucky 13 (attempt 2 of max_tries 2)")]
    assert len(run.outputs["prime"]) + len(run.outputs["non_prime"]) == 19


def test_an_output_the_stage_does_not_declare_is_retried_then_a_dead_letter_naming_it():
    run = run_stage(lambda batch: {"primes": batch.records}, numbers(1, 2), outputs=PRIMES)
    assert {d.reason for d in run.dead} == {"handler emitted to 'primes', which is not an output of stage stage "
                                            "(outputs: prime, non_prime) (attempt 5 of max_tries 5)"}
    assert run.outputs == {"prime": [], "non_prime": []}


def test_bad_options_are_refused_naming_what_to_give():
    with pytest.raises(ValueError, match=r"give outputs=\[\.\.\.\]"):
        run_stage(classify, numbers(1, 2))
    with pytest.raises(ValueError, match="topics.input.pack"):
        run_stage(classify, numbers(1, 2), outputs=PRIMES, pack=0)
    with pytest.raises(ValueError, match="go to a stage class"):
        run_stage(classify, numbers(1, 2), outputs=PRIMES, params={"x": 1})
    with pytest.raises(ValueError, match="^pack: the topology declares the stage's topics already$"):
        run_stage("primes", numbers(1, 2), topology=ROOT / "topology.yaml", pack=10)
    with pytest.raises(ValueError, match="with topology=, give the stage's name"):
        run_stage(classify, numbers(1, 2), topology=ROOT / "topology.yaml")


# ---------------------------------------------------------------------------
# The columnar path against the record path
# ---------------------------------------------------------------------------

def evens(batch: Batch) -> dict:
    return {"out": [{**r, "even": r["number"] % 2 == 0} for r in batch.records]}


def evens_wrongly(batch: Batch) -> dict:
    return evens(batch)


evens.columns = lambda columns: {"out": columns.with_column("even", [n % 2 == 0 for n in columns["number"]])}
evens_wrongly.columns = lambda columns: {"out": columns.with_column("even", True)}  # a bug only the fast path has


def test_the_columnar_paths_of_the_reference_stages_match_their_record_paths():
    run = assert_columns_match(classify, numbers(1, 3000), outputs=PRIMES)
    assert run.columnar >= 1 and len(run.outputs["prime"]) == 430
    ticks = make_ticks(1500, seed=8)
    assert assert_columns_match(Features, ticks, outputs=["features"], key="symbol").columnar >= 1
    assert assert_columns_match(Features, ticks, outputs=["features"], key="symbol",
                                topics={"features": {"pack": 64}}).columnar >= 1


def test_a_columnar_path_that_differs_or_never_runs_fails_the_check():
    assert assert_columns_match(evens, numbers(1, 50), outputs=["out"]).columnar == 1
    with pytest.raises(AssertionError, match=r"differs from the record path: output 'out': item 0 is .*'even': True"):
        assert_columns_match(evens_wrongly, numbers(1, 50), outputs=["out"])
    with pytest.raises(AssertionError, match="took no batch"):
        assert_columns_match(evens, numbers(1, 50), outputs=["out"], pack=1)
    with pytest.raises(AssertionError, match="has no columnar function"):
        assert_columns_match(fail_on_13, numbers(1, 50), outputs=PRIMES)


# ---------------------------------------------------------------------------
# Keyed stages: duplicates, reordering, restarts
# ---------------------------------------------------------------------------

class Sums:
    """A keyed stage: each key's running sum of ``v``."""

    def __init__(self, context: StageContext):
        self.sums: dict[str, int] = {}

    def __call__(self, batch: Batch) -> dict:
        out = []
        for record in batch.records:
            key = record["key"]
            self.sums[key] = self.sums.get(key, 0) + record["v"]
            out.append({"key": key, "seq": record["seq"], "sum": self.sums[key]})
        return {"sums": out}

    def snapshot(self) -> bytes:
        return json.dumps(self.sums).encode()

    def restore(self, data: bytes) -> None:
        self.sums = json.loads(data)


class ForgetfulSums(Sums):
    """Restores nothing: after a restart every sum starts again from zero."""

    def restore(self, data: bytes) -> None:
        pass


class UnkeyedDeltas(Sums):
    """Keeps its state across keys (the last ``v`` of any key), so the order between keys leaks into outputs."""

    def __call__(self, batch: Batch) -> dict:
        out = super().__call__(batch)
        for record, emitted in zip(batch.records, out["sums"], strict=True):
            emitted["delta"] = record["v"] - self.sums.get("last", 0)
            self.sums["last"] = record["v"]
        return out


def sums_input(n: int = 400, keys: int = 5) -> list[dict]:
    seqs: dict[str, int] = {}
    records = []
    for i in range(n):
        key = f"k{i * 7 % keys}"
        seqs[key] = seqs.get(key, 0) + 1
        records.append({"key": key, "seq": seqs[key], "v": i % 13})
    return records


def test_the_reference_keyed_stages_pass_the_keyed_check():
    ticks = make_ticks(1200, seed=2)
    reference = check_keyed(Features, ticks, outputs=["features"], key="symbol")
    assert len(reference.outputs["features"]) == 1200
    features = reference.outputs["features"]
    signals = check_keyed(Signals, features, outputs=["signals"], key="symbol", seq="feature_seq", pack=50,
                          restore_at=[1, 500, 1199])
    assert signals.outputs["signals"] and signals.dead == []


def test_a_stage_whose_state_is_not_restored_fails_the_restart_step():
    assert check_keyed(Sums, sums_input(), outputs=["sums"], key="key").outputs["sums"]
    with pytest.raises(AssertionError, match=r"after a restart from the checkpoint taken at record \d+ of \d+ "
                                             r"\(of the redelivered records\), output 'sums': item \d+ is"):
        check_keyed(ForgetfulSums, sums_input(), outputs=["sums"], key="key")


def test_a_stage_whose_outputs_depend_on_the_order_between_keys_fails_the_redelivery_step():
    with pytest.raises(AssertionError, match=r"with duplicates and reordering \(seed 0, batches of 1\), "
                                             r"output 'sums', key 'k\d': item \d+ is"):
        check_keyed(UnkeyedDeltas, sums_input(), outputs=["sums"], key="key")


def test_the_keyed_check_refuses_a_built_stage_and_a_stage_that_is_not_keyed():
    with pytest.raises(ValueError, match="give the class"):
        check_keyed(Sums(StageContext("s", 0, Path("var"))), sums_input(), outputs=["sums"], key="key")
    with pytest.raises(ValueError, match="not keyed"):
        check_keyed(Sums, sums_input(), outputs=["sums"])


def test_redelivered_moves_records_a_little_and_repeats_some():
    records = list(range(1000))
    stream = redelivered(records, seed=3, window=8, duplicates=0.25)
    assert sorted(set(stream)) == records and 150 < len(stream) - 1000 < 350
    firsts = list(dict.fromkeys(stream))  # each record where it first arrives
    assert firsts != records and all(abs(position - r) <= 16 for position, r in enumerate(firsts))
    assert redelivered(records, seed=3) == redelivered(records, seed=3)


def test_a_keyed_run_parks_records_ahead_of_a_gap_and_drops_repeats():
    records = [{"key": "a", "seq": s, "v": s} for s in (1, 2, 2, 4, 5)]
    run = run_stage(Sums, records, outputs=["sums"], key="key")
    assert run.outputs["sums"] == [{"key": "a", "seq": 1, "sum": 1}, {"key": "a", "seq": 2, "sum": 3}]
    assert (run.duplicates, run.parked) == (1, 2)


# ---------------------------------------------------------------------------
# The fixtures: a copy of a topology on free ports; a user's project under pytest
# ---------------------------------------------------------------------------

def test_copy_topology_moves_every_address_to_a_free_port_and_keeps_files_reachable(tmp_path):
    # Given the checkout's topology with TLS files, a secret file and an absolute var dir
    doc = yaml.safe_load((ROOT / "topology.yaml").read_text())
    doc["nsq"]["var_dir"] = "/var/lib/pipeline"
    doc["nsq"]["nsqd"][0]["proxy_tcp"] = "127.0.0.1:24150"
    doc["tls"] = {"cert": "certs/nsqd.pem", "key": "certs/nsqd.key", "root_ca_file": "certs/ca.pem"}
    doc["auth"] = {"http": "127.0.0.1:4181", "secrets": {"primes": {"file": "secrets/primes"}}}
    source = tmp_path / "project" / "topology.yaml"
    source.parent.mkdir()
    source.write_text(yaml.safe_dump(doc))
    original = load_topology(source)

    copy = load_topology(copy_topology(source, tmp_path / "copy"))

    addresses = [a for _, a in copy.nsq.addresses()] + [copy.monitor.listen, copy.auth.http]
    before = {a for _, a in original.nsq.addresses()} | {original.monitor.listen, original.auth.http}
    assert len(set(addresses)) == len(addresses) and not set(addresses) & before
    assert all(split_address(a)[0] == "127.0.0.1" for a in addresses) and copy.nsq.nsqd[0].proxy_tcp is None
    metrics = {name: s.metrics_port for name, s in copy.stages.items()}
    assert metrics.keys() == original.stages.keys() and not set(metrics.values()) & {9300, 9310, 9320, 9330, 9331}
    assert copy.var_dir == tmp_path / "copy" / "var"
    assert copy.tls.cert == str(source.parent / "certs" / "nsqd.pem")
    assert copy.auth.secrets["primes"].file == str(source.parent / "secrets" / "primes")
    assert copy.stages == {name: s.model_copy(update={"metrics_port": metrics[name]})
                           for name, s in original.stages.items()}
    assert load_topology(copy_topology(source, tmp_path / "bare", monitor=False)).monitor is None


USER_STAGE = '''
def double(batch):
    out = []
    for i, record in enumerate(batch.records):
        if type(record.get("n")) is not int:
            batch.reject(i, "field 'n' must be an integer")
        else:
            out.append({**record, "n": 2 * record["n"]})
    return {"doubled": out}
'''

USER_TOPOLOGY = '''
nsq:
  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]
  lookupd: [{tcp: 127.0.0.1:4160, http: 127.0.0.1:4161}]
  admin: 127.0.0.1:4171
topics:
  numbers: {codec: json}
  doubled: {codec: msgpack, pack: 8}
stages:
  double: {handler: "mystage:double", input: numbers, channel: double, outputs: [doubled], metrics_port: 9300}
monitor: {interval: 5, listen: 127.0.0.1:9117}
'''

USER_TESTS = '''
import json
from pathlib import Path

from pipeline.client.nsqclient import NsqSubscriber, publish_records


def test_the_stage_doubles_under_supervisord(running_topology):
    pipeline = running_topology("topology.yaml")
    pipeline.publish("numbers", [{"id": f"n{i}", "n": i} for i in range(1, 21)] + [{"id": "x", "n": "x"}, b"junk"])
    assert sorted(r["n"] for r in pipeline.read("doubled", 20, timeout=60)) == list(range(2, 41, 2))
    letters = pipeline.dead_letters("double", 2, timeout=60)
    assert sorted(d["reason"] for d in letters) == [
        "field 'n' must be an integer", "not a JSON object or msgpack map (starts with b'junk')"]
    pidfile = pipeline.topology.var_dir / "run" / "supervisord.pid"
    pids = [p.pid for p in pipeline.supervisor.processes()] + [int(pidfile.read_text())]
    assert len(pids) == 7  # nsqlookupd, nsqd, nsqadmin, the worker, the monitor, the restarter; supervisord
    Path("pids-topology.json").write_text(json.dumps(pids))


def test_nsq_cluster_is_an_nsqd_registered_with_a_lookupd(nsq_cluster):
    publish_records(nsq_cluster.nsqd.tcp, "t", [b'{"a": 1}'])
    with NsqSubscriber(nsq_cluster.nsqd.tcp, "t", "c") as sub:
        assert [m.body for m in sub.messages(timeout=5)] == [b'{"a": 1}']
    Path("pids-cluster.json").write_text(json.dumps([nsq_cluster.nsqd.pid, nsq_cluster.lookupd.pid]))
'''


@pytest.mark.integration
def test_a_users_project_gets_the_fixtures_by_installing_the_package_and_they_leave_no_process(pytester):
    # Given a project of its own: a stage module, its topology on the default ports, and tests using the
    # fixtures, with no conftest (the plugin comes from the package's entry point)
    pytester.makepyfile(mystage=USER_STAGE, test_user=USER_TESTS)
    (pytester.path / "topology.yaml").write_text(USER_TOPOLOGY)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=280)

    result.assert_outcomes(passed=2)
    pids = json.loads((pytester.path / "pids-topology.json").read_text())
    pids += json.loads((pytester.path / "pids-cluster.json").read_text())
    assert len(pids) == 9 and [pid for pid in pids if pid_alive(pid)] == []
    # the copy ran elsewhere: nothing was written beside the user's topology
    assert not (pytester.path / "var").exists() and not (pytester.path / "supervisord.conf").exists()


# ---------------------------------------------------------------------------
# The package's face
# ---------------------------------------------------------------------------

def test_every_name_of_pipeline_testing_resolves():
    import pipeline.testing

    for name in pipeline.testing.__all__:
        assert getattr(pipeline.testing, name).__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'Producer'"):
        pipeline.testing.Producer  # noqa: B018


def test_the_pytest_plugin_loads_neither_numpy_nor_the_runtime():
    # Every pytest run of an environment with the package installed imports the plugin.
    code = "import sys, pipeline.testing.fixtures; print(sorted({'numpy', 'pipeline.runtime'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
