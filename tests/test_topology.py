"""Tests of the topology schema, its loader's error messages and the generated reference."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import TopologyError
from pipeline.config import StageSpec, Topology, load_topology, socket_address, split_address, validate_topology
from pipeline.config.docs import render_reference

REPO = Path(__file__).resolve().parent.parent

# Line numbers matter: the expected messages below point into this text.
BASE = """\
nsq:
  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]
  lookupd: [{tcp: 127.0.0.1:4160, http: 127.0.0.1:4161}]
topics:
  numbers: {codec: json}
  prime: {codec: json}
  non_prime: {codec: msgpack}
stages:
  primes:
    handler: consumers.primes:classify
    input: numbers
    channel: primes
    outputs: [prime, non_prime]
    replicas: 2
    max_in_flight: 500
    batch: {size: 256, wait_ms: 5}
    msg_timeout: 60
producers:
  numbers: {topic: numbers, chunk: 500}
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    """Return ``text`` with the one occurrence of ``old`` replaced by ``new``."""
    if text.count(old) != 1:
        raise ValueError(f"{old!r} must occur exactly once")
    return text.replace(old, new)


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a topology.yaml in a fresh directory and return its relative name."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "topology.yaml") -> str:
        Path(name).write_text(text, encoding="utf-8")
        return name

    return _write


def load_error(path: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    return info.value


# --- valid files ---------------------------------------------------------------------------

def test_default_topology_loads():
    topology = load_topology(REPO / "topology.yaml")
    primes = topology.stage("primes")
    assert (primes.input, primes.channel, primes.outputs) == ("numbers", "primes", ["prime", "non_prime"])
    assert primes.replicas == 2 and primes.batch.size == 256 and primes.batch.wait_ms == 5
    assert topology.nsq.admin == "127.0.0.1:4171"
    assert topology.producers["numbers"].chunk == 500
    assert topology.var_dir == REPO / "var"


def test_base_loads(write):
    topology = load_topology(write(BASE))
    assert topology.path == Path("topology.yaml")
    assert list(topology.stages) == ["primes"]


def test_defaults_are_applied(write):
    text = edit("    batch: {size: 256, wait_ms: 5}\n", "", edit("    replicas: 2\n", ""))
    stage = load_topology(write(text)).stage("primes")
    assert stage.batch.size == 256 and stage.batch.wait_ms == 5
    assert stage.replicas == 1
    assert (stage.max_tries, stage.requeue_delay, stage.max_backoff_duration) == (5, 1.0, 10.0)
    assert (stage.msg_timeout, stage.publish_timeout) == (60, 10.0)
    topology = load_topology(write(edit("  numbers: {topic: numbers, chunk: 500}", "  numbers: {topic: numbers}")))
    assert topology.producers["numbers"].chunk == 500 and topology.producers["numbers"].rate == 0
    assert topology.nsq.admin is None and topology.nsq.var_dir == "var"


def test_minimal_topology_needs_only_nsqd(write):
    topology = load_topology(write("nsq:\n  nsqd: [{name: n0, tcp: 'localhost:4150', http: '[::1]:4151'}]\n"))
    assert topology.topics == {} and topology.stages == {} and topology.nsq.lookupd == []


def test_var_dir_resolves_relative_to_the_file(tmp_path, monkeypatch):
    # Given a topology in a subdirectory, loaded from elsewhere
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "topology.yaml"
    path.write_text(edit("  lookupd:", "  var_dir: ../state\n  lookupd:"))
    monkeypatch.chdir("/")
    # Then var_dir is relative to the file, not to the working directory
    assert load_topology(path).var_dir == tmp_path / "state"
    path.write_text(edit("  lookupd:", f"  var_dir: {tmp_path / 'abs'}\n  lookupd:"))
    assert load_topology(path).var_dir == tmp_path / "abs"


def test_helpers(write):
    topology = load_topology(write(BASE))
    assert topology.codec_for("non_prime") == "msgpack"
    assert topology.codec_for("numbers.dead") == "json"
    assert topology.dead_letter_topic("primes") == "numbers.dead"
    assert topology.nsqd_tcp_addresses() == ["127.0.0.1:4150"]
    assert topology.nsqd_http_addresses() == ["127.0.0.1:4151"]
    assert topology.lookupd_tcp_addresses() == ["127.0.0.1:4160"]
    assert topology.lookupd_http_addresses() == ["127.0.0.1:4161"]


def test_unknown_stage_lists_known_stages(write):
    topology = load_topology(write(BASE))
    with pytest.raises(KeyError, match="unknown stage 'nope'; known stages: primes"):
        topology.stage("nope")


def test_topology_is_frozen(write):
    topology = load_topology(write(BASE))
    with pytest.raises(ValidationError):
        topology.stage("primes").replicas = 3


def test_ephemeral_channel_is_accepted(write):
    topology = load_topology(write(edit("channel: primes", "channel: 'primes#ephemeral'")))
    assert topology.stage("primes").channel == "primes#ephemeral"


def test_split_address():
    assert split_address("127.0.0.1:4150") == ("127.0.0.1", 4150)
    assert split_address("[::1]:4150") == ("[::1]", 4150)
    with pytest.raises(ValueError, match="must be host:port"):
        split_address("localhost")


def test_port_zero_only_for_listeners_that_ask_for_it():
    # The monitor listens on port 0 in tests so the OS picks a free port; topology.yaml may not.
    with pytest.raises(ValueError, match=r"port 0 in '127.0.0.1:0' must be 1\.\.65535"):
        split_address("127.0.0.1:0")
    assert split_address("[::1]:0", port_zero=True) == ("[::1]", 0)


def test_socket_address_drops_the_brackets_of_an_ipv6_host():
    assert socket_address("[::1]:4150") == ("::1", 4150)
    assert socket_address("localhost:4150") == ("localhost", 4150)
    with pytest.raises(ValueError, match="has an empty host"):
        socket_address(":4150")


# --- broken files: every message in full ------------------------------------------------------

BROKEN = [
    ("replicas-zero", "replicas: 2", "replicas: 0",
     "topology.yaml:14:15: stages.primes.replicas: must be >= 1"),
    ("replicas-too-many", "replicas: 2", "replicas: 65",
     "topology.yaml:14:15: stages.primes.replicas: must be <= 64"),
    ("replicas-not-int", "replicas: 2", "replicas: '2'",
     "topology.yaml:14:15: stages.primes.replicas: must be an integer"),
    ("unknown-stage-key", "    replicas: 2", "    replica: 2",
     "topology.yaml:14:5: stages.primes.replica: unknown field; expected one of: handler, input, channel, "
     "outputs, replicas, max_in_flight, batch, max_tries, crash_tries, dead_keep, msg_timeout, requeue_delay, "
     "max_backoff_duration, publish_timeout, output_buffer_timeout, output_buffer_size, keyed, "
     "checkpoint_interval_ms, dedup_window, gap_max_count, gap_max_ms, params, metrics_port, metrics_host"),
    ("unknown-top-level-key", "producers:", "producer:",
     "topology.yaml:18:1: producer: unknown field; expected one of: nsq, topics, stages, producers, monitor, report, "
     "gateway, auth, tls"),
    ("undeclared-output", "[prime, non_prime]", "[prime, composite]",
     "topology.yaml:13:22: stages.primes.outputs.1: topic 'composite' is not declared under topics "
     "(declared: numbers, prime, non_prime)"),
    ("undeclared-input", "input: numbers", "input: integers",
     "topology.yaml:11:12: stages.primes.input: topic 'integers' is not declared under topics "
     "(declared: numbers, prime, non_prime)"),
    ("output-is-own-input", "[prime, non_prime]", "[numbers, prime]",
     "topology.yaml:13:15: stages.primes.outputs.0: output 'numbers' is the stage's own input; "
     "it would consume its own output"),
    ("undeclared-producer-topic", "{topic: numbers,", "{topic: nums,",
     "topology.yaml:19:20: producers.numbers.topic: topic 'nums' is not declared under topics "
     "(declared: numbers, prime, non_prime)"),
    ("codec-xml", "prime: {codec: json}", "prime: {codec: xml}",
     "topology.yaml:6:18: topics.prime.codec: must be one of: json, msgpack"),
    ("port-out-of-range", "tcp: 127.0.0.1:4150", "tcp: 127.0.0.1:99999",
     "topology.yaml:2:26: nsq.nsqd.0.tcp: port 99999 in '127.0.0.1:99999' must be 1..65535"),
    ("address-with-empty-host", "tcp: 127.0.0.1:4150", "tcp: ':4150'",
     "topology.yaml:2:26: nsq.nsqd.0.tcp: address ':4150' has an empty host"),
    ("address-without-port", "http: 127.0.0.1:4161", "http: 127.0.0.1",
     "topology.yaml:3:41: nsq.lookupd.0.http: address '127.0.0.1' must be host:port, e.g. 127.0.0.1:4150"),
    ("batch-larger-than-max-in-flight", "size: 256", "size: 600",
     "topology.yaml:16:19: stages.primes.batch.size: batch.size 600 is larger than max_in_flight 500, "
     "so a batch can never fill"),
    ("publish-timeout-not-below-msg-timeout", "    msg_timeout: 60", "    msg_timeout: 60\n    publish_timeout: 70",
     "topology.yaml:18:22: stages.primes.publish_timeout: publish_timeout 70 must be less than msg_timeout 60"),
    ("publish-timeout-equal-msg-timeout", "    msg_timeout: 60", "    msg_timeout: 10",
     # publish_timeout keeps its default: the error points at the stage that inherits it
     "topology.yaml:9:3: stages.primes.publish_timeout: publish_timeout 10 must be less than msg_timeout 10"),
    ("output-buffer-size-too-small", "    msg_timeout: 60", "    msg_timeout: 60\n    output_buffer_size: 10",
     "topology.yaml:18:25: stages.primes.output_buffer_size: output_buffer_size 10 must be -1 (no buffering) "
     "or at least 64"),
    ("missing-required-field", "    handler: consumers.primes:classify\n", "",
     "topology.yaml:9:3: stages.primes.handler: required field is missing"),
    ("handler-syntax", "consumers.primes:classify", "consumers/primes.py",
     "topology.yaml:10:14: stages.primes.handler: handler 'consumers/primes.py' must look like "
     "'package.module:function'"),
    ("bad-topic-name", "  prime: {codec: json}", "  'pri me': {codec: json}",
     "topology.yaml:6:3: topics.pri me: topic name 'pri me' must be 1..64 characters of a-z A-Z 0-9 . _ -"),
    ("dead-letter-topic-too-long", "input: numbers", f"input: {'n' * 60}",
     f"topology.yaml:11:12: stages.primes.input: dead-letter topic '{'n' * 60}.dead' would be longer than "
     "64 characters"),
    ("batch-not-a-mapping", "batch: {size: 256, wait_ms: 5}", "batch: 256",
     "topology.yaml:16:12: stages.primes.batch: must be a mapping"),
    ("msg-timeout-not-a-number", "msg_timeout: 60", "msg_timeout: yes",
     "topology.yaml:17:18: stages.primes.msg_timeout: must be a number"),
    ("duplicate-address", "http: 127.0.0.1:4161", "http: 127.0.0.1:4151",
     "topology.yaml:3:41: nsq.lookupd.0.http: address 127.0.0.1:4151 is already used by nsq.nsqd.0.http"),
    ("no-nsqd", "  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]", "  nsqd: []",
     "topology.yaml:2:9: nsq.nsqd: must have at least 1 item(s)"),
    ("nsqd-name-escapes-var-dir", "name: n0", "name: ..",
     "topology.yaml:2:17: nsq.nsqd.0.name: nsqd name '..' must not be '.' or '..'"),
    ("duplicate-key", "    replicas: 2", "    replicas: 2\n    replicas: 3",
     "topology.yaml:15:5: stages.primes.replicas: duplicate key 'replicas' (first defined at line 14)"),
]


@pytest.mark.parametrize("old, new, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_file_names_line_column_field_and_reason(write, old, new, expected):
    assert str(load_error(write(edit(old, new)))) == expected


def test_two_stages_sharing_a_channel(write):
    # Given a second stage on the same input and channel as primes
    copy = "  copy:\n    handler: consumers.copy:run\n    input: numbers\n    channel: primes\n"
    text = edit("producers:", copy + "producers:")
    # Then the second one is reported at its channel
    assert str(load_error(write(text))) == (
        "topology.yaml:21:14: stages.copy.channel: channel 'primes' on topic 'numbers' is already used by "
        "stage 'primes'; the two stages would steal each other's messages")


def test_duplicate_nsqd_name(write):
    text = edit("  lookupd:", "  - {name: n0, tcp: 127.0.0.1:5150, http: 127.0.0.1:5151}\n  lookupd:",
                edit("  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]",
                     "  nsqd:\n  - {name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}"))
    assert str(load_error(write(text))) == (
        "topology.yaml:4:12: nsq.nsqd.1.name: nsqd name 'n0' is already used by nsq.nsqd.0")


def test_cross_field_rules_wait_for_valid_fields(write):
    # A known limit: a section's own rules run once its fields are valid, so a
    # bad replicas hides the undeclared output until it is fixed.
    text = edit("replicas: 2", "replicas: 0", edit("[prime, non_prime]", "[prime, composite]"))
    assert [e.field for e in validate_topology(write(text))] == ["stages.primes.replicas"]


def test_yaml_syntax_error(write):
    error = load_error(write(edit("replicas: 2", "replicas: [2")))
    assert str(error) == (
        # PyYAML notices the unclosed list at the next line's ':'
        "topology.yaml:15:18: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)")
    assert error.field == ""


def test_yaml_tab_indentation(write):
    assert str(load_error(write(edit("    replicas: 2", "\treplicas: 2")))) == (
        "topology.yaml:14:1: invalid YAML: found character '\\t' that cannot start any token "
        "(while scanning for the next token)")


def test_missing_file(write):
    assert str(load_error("absent.yaml")) == "absent.yaml:0:0: cannot read: No such file or directory"


def test_empty_file(write):
    assert str(load_error(write("# only a comment\n"))) == (
        "topology.yaml:1:1: top level must be a mapping with sections nsq, topics, stages, producers; "
        "the file is empty")


def test_top_level_not_a_mapping(write):
    assert str(load_error(write("- nsq\n- topics\n"))) == (
        "topology.yaml:1:1: top level must be a mapping with sections nsq, topics, stages, producers; got list")


def test_missing_nsq_section(write):
    assert str(load_error(write("topics: {numbers: {}}\n"))) == "topology.yaml:1:1: nsq: required field is missing"


def test_absolute_path_is_shown_as_given(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(edit("replicas: 2", "replicas: 0"))
    assert str(load_error(str(path))) == f"{path}:14:15: stages.primes.replicas: must be >= 1"


def test_error_attributes_and_cause(write):
    error = load_error(write(edit("replicas: 2", "replicas: 0")))
    assert (error.path, error.line, error.col) == ("topology.yaml", 14, 15)
    assert (error.field, error.reason) == ("stages.primes.replicas", "must be >= 1")
    assert isinstance(error.__cause__, ValidationError)


def test_validate_topology_returns_all_errors_sorted_by_line(write):
    # Given three independent mistakes, written bottom-up
    text = edit("chunk: 500", "chunk: 0", edit("replicas: 2", "replicas: 0", edit("codec: msgpack", "codec: xml")))
    errors = validate_topology(write(text))
    # Then each is reported, in file order, and load_topology raises the first
    assert [str(e) for e in errors] == [
        "topology.yaml:7:22: topics.non_prime.codec: must be one of: json, msgpack",
        "topology.yaml:14:15: stages.primes.replicas: must be >= 1",
        "topology.yaml:19:36: producers.numbers.chunk: must be >= 1",
    ]
    assert str(load_error("topology.yaml")) == str(errors[0])


def test_validate_topology_of_a_valid_file_is_empty(write):
    assert validate_topology(write(BASE)) == []


def test_duplicate_key_is_reported_with_other_errors(write):
    text = edit("  numbers: {codec: json}", "  numbers: {codec: json}\n  numbers: {codec: json}")
    text = edit("replicas: 2", "replicas: 100", text)
    assert [str(e) for e in validate_topology(write(text))] == [
        "topology.yaml:6:3: topics.numbers: duplicate key 'numbers' (first defined at line 5)",
        "topology.yaml:15:15: stages.primes.replicas: must be <= 64",
    ]


def test_model_rules_apply_without_a_file():
    # The schema, not the loader, owns the rules: building in code checks them too.
    with pytest.raises(ValidationError, match="publish_timeout 30 must be less than msg_timeout 20"):
        StageSpec(handler="a.b:c", input="t", channel="c", msg_timeout=20, publish_timeout=30)
    with pytest.raises(ValidationError, match="topic 't' is not declared under topics"):
        Topology.model_validate({"nsq": {"nsqd": [{"name": "n0", "tcp": "h:1", "http": "h:2"}]},
                                 "stages": {"s": {"handler": "a.b:c", "input": "t", "channel": "c"}}})


# --- the generated reference -----------------------------------------------------------------

def test_reference_docs_are_up_to_date():
    docs = (REPO / "docs" / "TOPOLOGY.md").read_text(encoding="utf-8")
    assert docs == render_reference(), (
        "docs/TOPOLOGY.md is stale; regenerate it with: python -m pipeline.config.docs > docs/TOPOLOGY.md")


def test_reference_lists_every_field_with_its_bounds():
    reference = render_reference()
    assert "| `replicas` | int | `1` | 1..64 |" in reference
    assert "| `codec` | \"json\" or \"msgpack\" | `json` |" in reference
    models = ("Topology", "NsqSpec", "NsqdSpec", "LookupdSpec", "TopicSpec", "StageSpec", "BatchSpec", "ProducerSpec")
    for model in models:
        assert f"\n## {model}\n" in reference


def test_outputs_may_map_handler_names_to_topics(tmp_path):
    # Given a stage whose handler emits "prime"/"non_prime" published under other topic names
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq:\n"
        "  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]\n"
        "topics: {numbers: {}, p2: {}}\n"
        "stages:\n"
        "  primes:\n"
        "    handler: consumers.primes:classify\n"
        "    input: numbers\n"
        "    channel: primes\n"
        "    outputs: {prime: p2, non_prime: np2}\n"
    )
    [error] = validate_topology(path)
    assert str(error) == (f"{path}:9:37: stages.primes.outputs.non_prime: topic 'np2' is not declared "
                          "under topics (declared: numbers, p2)")
    path.write_text(path.read_text().replace("non_prime: np2", "non_prime: p2"))
    assert load_topology(path).stage("primes").output_topics == {"prime": "p2", "non_prime": "p2"}


def test_stage_names_of_the_pipelines_own_programs_are_refused(tmp_path):
    # A stage "nsqadmin" would be a second supervisord program of that name, and
    # "nsqd-x" replicas would write into the logs of an nsqd.
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq:\n"
        "  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]\n"
        "topics: {numbers: {}}\n"
        "stages:\n"
        "  nsqd-x: {handler: consumers.primes:classify, input: numbers, channel: c}\n"
    )
    [error] = validate_topology(path)
    assert error.field == "stages.nsqd-x" and "clashes with the pipeline's own programs" in error.reason


def test_a_partitioned_topic_needs_a_key_and_its_readers_must_be_keyed(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        "topics:\n"
        "  ticks: {partitions: 4}\n"
        "  quotes: {partitions: 2, key: symbol}\n"
        "stages:\n"
        "  f: {handler: 'm:f', input: quotes, channel: c}\n"
        "  g: {handler: 'm:g', input: quotes, channel: d, keyed: true, replicas: 3}\n"
    )
    errors = [f"{e.line}:{e.field}: {e.reason}" for e in validate_topology(path)]
    assert errors == ["3:topics.ticks.partitions: a topic with 4 partitions needs a key (the record field that "
                      "routes it)"]
    # rules across sections run once every field is valid
    path.write_text(path.read_text().replace("{partitions: 4}", "{partitions: 4, key: symbol}"))
    errors = [f"{e.line}:{e.field}: {e.reason}" for e in validate_topology(path)]
    assert errors == [
        "6:stages.f.input: topic 'quotes' has 2 partitions; a stage reading it must be keyed (keyed: true), "
        "one replica per partition",
        "7:stages.g.replicas: a keyed stage runs one replica per partition: topic 'quotes' has 2 partitions, "
        "so replicas must be 2",
    ]
