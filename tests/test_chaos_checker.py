"""The checker's arithmetic: lost, unexpected, duplicated, dead-lettered, misclassified, recovery."""
from __future__ import annotations

from pathlib import Path

import orjson

from chaos.checker import check, consumed_at, is_prime, node_outages, recovery_times
from chaos.faults import Kill
from chaos.replay import missing_records
from chaos.sink import Arrival, parse_arrival
from chaos.workload import Journal

DEAD = "numbers.dead"


def _arrival(topic: str, record_id: str, number, prime=None) -> Arrival:
    return Arrival(topic, record_id, number, 1, 0.0, prime)


def test_counts_each_kind_of_anomaly() -> None:
    journal = Journal(sent={"r-2": 2, "r-3": 3, "r-4": 4, "r-5": 5, "r-p": "poison", "r-x": 9},
                      acked={"r-2", "r-3", "r-4", "r-5", "r-p"})
    arrivals = [_arrival("prime", "r-2", 2, True), _arrival("prime", "r-2", 2, True),   # duplicated
                _arrival("prime", "r-4", 4, True),                                      # misclassified
                _arrival("non_prime", "r-x", 9, False),                                 # sent, not acked: fine
                _arrival("non_prime", "zz-1", 1, False),                                # never sent
                _arrival(DEAD, "r-p", "poison")]
    report = check(journal, arrivals, DEAD)
    assert (report.acked, report.sent) == (5, 6)
    assert report.lost_ids == ["r-3", "r-5"] and report.lost == 2
    assert (report.unexpected, report.duplicated, report.dead_lettered) == (1, 1, 1)
    assert (report.poison, report.poison_not_dead_lettered, report.misclassified) == (1, 0, 1)


def test_reference_primes() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_recovery_is_kill_to_the_successor_consuming() -> None:
    kills = [Kill("primes:primes-0", 10, "SIGKILL", 100.0), Kill("primes:primes-1", 20, "SIGKILL", 200.0)]
    first_running = {10: ("primes:primes-0", 50.0), 11: ("primes:primes-0", 100.4),
                     20: ("primes:primes-1", 50.0), 21: ("primes:primes-1", 200.9)}
    consuming = {11: 101.5, 21: 202.0}
    running, consumed = recovery_times(kills, first_running, consuming)
    assert [round(t, 3) for t in running] == [0.4, 0.9]
    assert consumed == [1.5, 2.0]
    # a successor that never consumed (killed again first) has a RUNNING time but no recovery
    assert recovery_times(kills, first_running, {11: 101.5}) == (running, [1.5])


def test_a_successor_killed_before_supervisord_called_it_running_is_still_the_successor() -> None:
    # pid 11 consumed 0.7 s after the kill and was killed itself before startsecs made it RUNNING;
    # pid 12, the next one, must not be taken for the kill's successor.
    kills = [Kill("primes:primes-0", 10, "SIGKILL", 100.0), Kill("primes:primes-0", 11, "SIGKILL", 101.9)]
    started = {10: ("primes:primes-0", 50.0), 11: ("primes:primes-0", 100.1), 12: ("primes:primes-0", 102.0)}
    first_running = {10: ("primes:primes-0", 52.0), 12: ("primes:primes-0", 104.0)}
    consuming = {11: 100.7, 12: 102.6}
    log: list = []
    running, consumed = recovery_times(kills, first_running, consuming, log=log, started=started)
    assert consumed == [0.7, 0.7] and [round(t, 3) for t in running] == [2.1]
    assert log == [["primes:primes-0", 100.0, None, 0.7], ["primes:primes-0", 101.9, 2.1, 0.7]]
    # Without ``started`` only RUNNING processes are known, and pid 12's consuming was taken for the first kill.
    assert recovery_times(kills, first_running, consuming)[1] == [2.6, 0.7]


def test_dead_letter_arrivals_carry_the_original_id() -> None:
    body = orjson.dumps({"reason": "bad", "body": orjson.dumps({"id": "r-9", "number": "x"}).decode()})
    arrival = parse_arrival(DEAD, DEAD, body, 1)
    assert (arrival.id, arrival.number) == ("r-9", "x")


def test_missing_records_are_acked_ids_no_sink_saw(tmp_path: Path) -> None:
    (tmp_path / "journal.jsonl").write_bytes(
        orjson.dumps({"sent": [["r-1", 1], ["r-2", 2], ["r-3", 3]]}) + b"\n"
        + orjson.dumps({"acked": ["r-1", "r-2"]}) + b"\n" + b'{"acked": ["r-3"')   # cut short by a crash
    (tmp_path / "arrivals.jsonl").write_bytes(orjson.dumps({"topic": "prime", "id": "r-2"}) + b"\n")
    assert missing_records(tmp_path) == [("r-1", 1)]


def test_clear_recovery_leaves_out_kills_during_a_broker_or_network_fault() -> None:
    # Given three kills whose successors consumed after 1, 9 and 2 s; nsqd was stopped during the second
    kills = [Kill("primes:primes-0", 10, "SIGKILL", 100.0), Kill("primes:primes-1", 11, "SIGKILL", 200.0),
             Kill("primes:primes-0", 12, "SIGKILL", 300.0)]
    first_running = {20: ("primes:primes-0", 102.0), 21: ("primes:primes-1", 202.0), 22: ("primes:primes-0", 302.0)}
    consuming = {20: 101.0, 21: 209.0, 22: 302.0}
    report = check(Journal(), [], DEAD, kills=kills, first_running=first_running, consuming=consuming)
    assert (report.recovered, report.recovery_p99) == (3, 9.0)
    report = check(Journal(), [], DEAD, kills=kills, first_running=first_running, consuming=consuming,
                   disturbances=[[203.0, 208.5], [400.0, None]])
    assert (report.recovered, report.recovered_clear) == (3, 2)
    assert (report.recovery_clear_p50, report.recovery_clear_p99) == (1.5, 2.0)
    assert report.recovery_log[1] == ["primes:primes-1", 200.0, 2.0, 9.0]


def test_a_crash_record_counts_only_when_its_dead_letter_names_the_deaths_and_their_cause() -> None:
    crash = lambda kind, n: {"crash": kind, "number": n}  # noqa: E731 - as the producer journals them
    journal = Journal(sent={"r-1": 1, "r-e": crash("exit", 2), "r-s": crash("segv", 3), "r-k": crash("segv", 4)},
                      acked={"r-1", "r-e", "r-s", "r-k"})
    arrivals = [_arrival("non_prime", "r-1", 1, False),
                Arrival(DEAD, "r-e", 2, 3, 0.0, reason="worker died 2 times while processing it (last: exit status 1)"),
                Arrival(DEAD, "r-s", 3, 3, 0.0, reason="worker died 2 times while processing it (last: SIGKILL)"),
                Arrival(DEAD, "r-k", 4, 6, 0.0, reason="handler raised ValueError: no")]
    report = check(journal, arrivals, DEAD)
    assert (report.crash_records, report.crash_not_dead_lettered) == (3, 2)  # wrong cause, and no crash at all
    assert (report.lost, report.poison, report.poison_not_dead_lettered) == (0, 3, 0)


def test_a_dead_letters_reason_is_kept_by_the_sink() -> None:
    letter = orjson.dumps({"reason": "worker died 2 times while processing it (last: SIGSEGV)",
                           "body": orjson.dumps({"id": "r-9", "number": 9, "crash": "segv"}).decode()})
    arrival = parse_arrival(DEAD, DEAD, letter, 3)
    assert (arrival.id, arrival.number, arrival.reason) == ("r-9", 9, "worker died 2 times while processing it"
                                                                       " (last: SIGSEGV)")
    assert parse_arrival("prime", DEAD, orjson.dumps({"id": "r-2", "number": 2}), 1).reason is None


NODES = ["nsqd-n0", "nsqd-n1", "nsqd-n2"]


def test_a_process_consumes_once_subscribed_to_every_node_that_is_up() -> None:
    # every node up: the last of the three subscriptions
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 10.5, "nsqd-n2": 10.4}, NODES, {}) == 10.5
    # n2 stopped from 9 to 20: the two others are enough while it is; after it resumes, it must be read too
    stopped = {"nsqd-n2": [[9.0, 20.0]]}
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 10.5, "nsqd-n2": 20.3}, NODES, stopped) == 10.5
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 21.0, "nsqd-n2": 20.3}, NODES, stopped) == 21.0
    # a node that is up and never read: no time; a node that goes down later: from that moment
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 10.5}, NODES, {}) is None
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 10.5}, NODES, {"nsqd-n2": [[13.0, None]]}) == 13.0
    # ... unless the process was killed before: it never consumed
    assert consumed_at({"nsqd-n0": 10.2, "nsqd-n1": 10.5}, NODES, {"nsqd-n2": [[13.0, None]]}, until=11.0) is None
    # every node down still needs one subscription
    assert consumed_at({}, NODES, {n: [[0.0, None]] for n in NODES}) is None


def test_an_nsqd_is_out_from_its_kill_until_supervisord_sees_it_running_again() -> None:
    # SIGTERM at 100: supervisord saw it exit at 103 and RUNNING again at 105; SIGSTOPped from 200 to 210
    kills = [Kill("nsqd-n1:nsqd-n1", 7, "SIGTERM", 100.0)]
    down = {"nsqd-n1": [[50.0, 52.0], [103.0, 105.0]]}
    outages = node_outages(kills, down, {"nsqd-n1": [[200.0, 210.0]]})
    assert sorted(outages["nsqd-n1"]) == [[50.0, 52.0], [100.0, 105.0], [103.0, 105.0], [200.0, 210.0]]
    # a successor that subscribed to n0 and n2 at 101 consumed then; at 106, n1 must be read too
    assert consumed_at({"nsqd-n0": 101.0, "nsqd-n2": 101.0}, NODES, outages) == 101.0
    assert consumed_at({"nsqd-n0": 106.0, "nsqd-n2": 106.0, "nsqd-n1": 115.0}, NODES, outages) == 115.0
