"""Stream jobs and transient Kafka errors (issue 12, finding 3): which errors end a worker,
and what a worker does with the others (abort, rewind to the last commit, back off, go on).
No Kafka here: the producer and consumer are stand-ins recording what they were asked."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from streams.hot.job import HOT_JOB, HotState
from streams.hot.processor import HotProcessor
from streams.hot.twin import Twin
from streams.runtime.core import JobCore
from streams.runtime.job import JobOptions, LoopCounters, TransactionalJob
from streams.runtime.loop import BatchLoop, FailureStreak
from streams.runtime.testing import local_codecs
from streams.runtime.transactions import (
    Aborted,
    Backoff,
    ConsumerFenced,
    Transactions,
    check_consumed,
    is_fatal,
    is_transient,
    rewind_positions,
)
from streams.runtime.watchdog import Watchdog


def kafka_exc(code: int, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "test", **flags))


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.NOT_COORDINATOR,  # the cold worker's commit after a broker restart
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,  # one broker of three killed
        KafkaError._TIMED_OUT,  # the hot worker's transaction while the broker was away
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
    ],
)
def test_errors_of_a_restarting_broker_are_transient(code: int) -> None:
    exc = kafka_exc(code)
    assert is_transient(exc)
    assert not is_fatal(exc)


def test_retriable_and_abortable_errors_are_transient() -> None:
    assert is_transient(kafka_exc(KafkaError._STATE, retriable=True))
    assert is_transient(kafka_exc(KafkaError._INCONSISTENT, txn_requires_abort=True))
    assert is_transient(TimeoutError("changelog not read to its end"))
    assert is_transient(Aborted("transaction aborted"))
    assert is_transient(KafkaException("dead letters not delivered"))


@pytest.mark.parametrize(
    "exc",
    [
        kafka_exc(KafkaError._FENCED),
        kafka_exc(KafkaError.PRODUCER_FENCED),
        kafka_exc(KafkaError.INVALID_PRODUCER_EPOCH),
        kafka_exc(KafkaError.FENCED_INSTANCE_ID),
        kafka_exc(KafkaError._TIMED_OUT, fatal=True),  # a fatal producer state, whatever code
    ],
)
def test_fencing_and_fatal_producer_errors_end_the_worker(exc: KafkaException) -> None:
    assert is_fatal(exc)
    assert not is_transient(exc)


def test_programming_errors_are_not_retried() -> None:
    assert not is_transient(ValueError("bug"))
    assert not is_transient(KeyError("x"))


def test_a_rewind_restarts_at_the_commit_or_the_beginning_if_none() -> None:
    committed = [TopicPartition("t", 0, 42), TopicPartition("t", 1, -1001)]
    assert [(tp.topic, tp.partition, tp.offset) for tp in rewind_positions(committed)] == [
        ("t", 0, 42),
        ("t", 1, OFFSET_BEGINNING),
    ]


def test_failures_in_a_row_back_off_longer_up_to_a_bound() -> None:
    streak = FailureStreak(Backoff(first=0.2, longest=1.0))
    assert [streak.next_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    streak.reset()
    assert streak.next_delay() == 0.2


# ---------------------------------------------------------------- transactions


@dataclass
class FakeProducer:
    """Raises the queued errors of each call, in order, then succeeds."""

    errors: dict[str, list[KafkaException]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        queued = self.errors.get(name)
        if queued:
            raise queued.pop(0)

    def begin_transaction(self) -> None:
        self._call("begin")

    def commit_transaction(self, _timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, _timeout: float) -> None:
        self._call("abort")

    def send_offsets_to_transaction(self, *_args: Any) -> None:
        self._call("send_offsets")

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        self._call("produce")


@dataclass
class FakeConsumer:
    committed_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    seeks: list[tuple[str, int, int]] = field(default_factory=list)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.committed_offsets]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets[(tp.topic, tp.partition)])
            for tp in partitions
        ]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def consumer_group_metadata(self) -> object:
        return object()


def transactions_with(producer: FakeProducer) -> Transactions:
    txn = Transactions.__new__(Transactions)
    txn.producer = producer  # type: ignore[assignment]
    txn._initialised = True
    txn._open = False
    txn.watchdog = Watchdog()
    return txn


def commit(txn: Transactions) -> bool:
    consumer: Any = FakeConsumer({("t", 0): 3})
    return txn.commit(consumer, lambda p: p.produce("out", value=b"x"), consumed=True)


def test_a_commit_that_timed_out_is_resumed_not_aborted() -> None:
    producer = FakeProducer({"commit": [kafka_exc(KafkaError._TIMED_OUT, retriable=True)]})
    assert commit(transactions_with(producer)) is True
    assert producer.calls == ["begin", "produce", "send_offsets", "commit", "commit"]


def test_a_coordinator_error_aborts_and_says_so() -> None:
    producer = FakeProducer({"send_offsets": [kafka_exc(KafkaError.NOT_COORDINATOR)]})
    txn = transactions_with(producer)
    assert commit(txn) is False
    assert producer.calls[-1] == "abort"
    assert not txn._open


def test_an_abort_that_times_out_is_tried_again() -> None:
    producer = FakeProducer(
        {
            "commit": [kafka_exc(KafkaError._INCONSISTENT, txn_requires_abort=True)],
            "abort": [kafka_exc(KafkaError._TIMED_OUT, retriable=True)],
        }
    )
    assert commit(transactions_with(producer)) is False
    assert producer.calls[-2:] == ["abort", "abort"]


def test_an_abort_still_failing_leaves_the_transaction_open_for_the_next_try() -> None:
    producer = FakeProducer({"abort": [kafka_exc(KafkaError._TIMED_OUT)] * 100})
    txn = transactions_with(producer)
    txn.RETRY_FOR_S = 0.0  # type: ignore[misc]
    txn._open = True
    with pytest.raises(KafkaException):
        txn.abort()
    assert txn._open
    producer.errors["abort"].clear()
    txn.abort()
    assert not txn._open


def test_a_fenced_producer_is_not_aborted_but_raised() -> None:
    producer = FakeProducer({"commit": [kafka_exc(KafkaError.PRODUCER_FENCED, fatal=True)]})
    with pytest.raises(KafkaException):
        commit(transactions_with(producer))
    assert "abort" not in producer.calls


# ---------------------------------------------------------------- the loop


class ScriptedLoop(BatchLoop):
    """Steps raise what the script says; the loop stops once the script is played."""

    backoff = Backoff(first=0.001, longest=0.004)

    def __init__(
        self,
        steps: list[BaseException | None],
        stopping: threading.Event,
        recover_errors: list[BaseException] | None = None,
        start_errors: list[BaseException] | None = None,
    ) -> None:
        self.steps = steps
        self.stopping = stopping
        self.recover_errors = recover_errors or []
        self.start_errors = start_errors or []
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")
        if self.start_errors:
            raise self.start_errors.pop(0)

    def step(self) -> None:
        if not self.steps:
            self.stopping.set()
            return
        outcome = self.steps.pop(0)
        self.events.append("step")
        if outcome is not None:
            raise outcome

    def recover(self) -> None:
        self.events.append("recover")
        if self.recover_errors:
            raise self.recover_errors.pop(0)

    def on_transient(self, exc: BaseException) -> None:
        self.events.append("transient")

    def write_status(self) -> None:
        pass

    def close(self) -> None:
        self.events.append("close")


def run_script(**kwargs: Any) -> ScriptedLoop:
    stopping = threading.Event()
    loop = ScriptedLoop(stopping=stopping, **kwargs)
    loop.run(stopping)
    return loop


def test_a_worker_recovers_from_a_commit_error_and_goes_on() -> None:
    loop = run_script(steps=[None, kafka_exc(KafkaError.NOT_COORDINATOR), None])
    assert loop.events == ["start", "step", "step", "transient", "recover", "step", "close"]


def test_a_failed_recovery_is_retried_until_it_succeeds() -> None:
    loop = run_script(
        steps=[Aborted("aborted"), None],
        recover_errors=[TimeoutError("changelog"), kafka_exc(KafkaError._TRANSPORT)],
    )
    assert loop.events.count("recover") == 3
    assert loop.events[-2:] == ["step", "close"]


def test_a_start_meeting_a_broker_away_is_tried_again() -> None:
    loop = run_script(steps=[None], start_errors=[kafka_exc(KafkaError._TIMED_OUT)])
    assert loop.events[:4] == ["start", "transient", "recover", "start"]


def test_a_fatal_error_ends_the_worker_after_closing_it() -> None:
    fenced = kafka_exc(KafkaError._FENCED)
    stopping = threading.Event()
    loop = ScriptedLoop([fenced], stopping)
    with pytest.raises(KafkaException):
        loop.run(stopping)
    assert loop.events == ["start", "step", "close"]


def test_a_stop_request_during_the_back_off_ends_the_loop() -> None:
    stopping = threading.Event()
    loop = ScriptedLoop([kafka_exc(KafkaError._TRANSPORT)] * 3, stopping)
    loop.backoff = Backoff(first=30.0, longest=30.0)
    timer = threading.Timer(0.2, stopping.set)
    timer.start()
    loop.run(stopping)
    timer.join()
    assert loop.events == ["start", "step", "transient", "close"]


# ---------------------------------------------------------------- the hot worker's rewind


@dataclass
class FakeChangelogs:
    """Restores, per partition, the twins the last commit holds."""

    committed: dict[int, list[Twin]]
    restored: list[list[int]] = field(default_factory=list)
    processor: HotProcessor | None = None

    def restore(self, partitions: list[int]) -> int:
        self.restored.append(list(partitions))
        assert self.processor is not None
        for p in partitions:
            for twin in self.committed.get(p, []):
                self.processor.restore_twin(p, twin)
        return 0


@dataclass
class FakeTransactions:
    aborts: int = 0

    def abort(self) -> None:
        self.aborts += 1


def hot_worker(changelogs: FakeChangelogs, consumer: FakeConsumer) -> TransactionalJob[HotState]:
    worker = TransactionalJob.__new__(TransactionalJob)
    worker.spec = HOT_JOB
    worker.core = JobCore(HOT_JOB, local_codecs(HOT_JOB.schemas()))
    worker.counters = LoopCounters()
    worker.options = JobOptions(status_path=Path("/nonexistent/hot-worker.json"))
    changelogs.processor = worker.state.processor
    worker.changelogs = changelogs  # type: ignore[assignment]
    worker.transactions = FakeTransactions()  # type: ignore[assignment]
    worker.consumer = consumer  # type: ignore[assignment]
    worker._owned = {0, 1}
    worker._given = set()
    worker._fenced = False
    worker._consumer_error = None
    return worker


def test_the_hot_worker_rewinds_state_and_positions_to_the_last_commit() -> None:
    committed_twin = Twin(device_id="d1", version=3)
    changelogs = FakeChangelogs({0: [committed_twin]})
    consumer = FakeConsumer({("telemetry.raw", 0): 120, ("telemetry.raw", 1): -1001})
    worker = hot_worker(changelogs, consumer)
    processor = worker.state.processor
    processor.restore_twin(0, committed_twin)
    # The lost batch had moved d1 on and created d2 (partition 1) in memory.
    processor.twins["d1"] = Twin(device_id="d1", version=4)
    processor.restore_twin(1, Twin(device_id="d2", version=1))

    worker.recover()

    assert worker.transactions.aborts == 1  # type: ignore[attr-defined]
    assert changelogs.restored == [[0, 1]]
    assert processor.twins == {"d1": committed_twin}
    assert sorted(consumer.seeks) == [
        ("telemetry.raw", 0, 120),
        ("telemetry.raw", 1, OFFSET_BEGINNING),
    ]


def test_a_hot_transaction_that_is_aborted_goes_to_the_loop_to_rewind() -> None:
    worker = hot_worker(FakeChangelogs({}), FakeConsumer())
    aborting: Callable[..., bool] = lambda *_a, **_k: False  # noqa: E731
    worker.transactions = type("T", (), {"commit": staticmethod(aborting)})()  # type: ignore[assignment]
    with pytest.raises(Aborted):
        worker._commit([], [], consumed=True)


@dataclass
class FailingChangelogs(FakeChangelogs):
    """A changelog read that fails `failures` times first (a broker still loading)."""

    failures: int = 1

    def restore(self, partitions: list[int]) -> int:
        if self.failures:
            self.failures -= 1
            raise TimeoutError("changelog not read to its end")
        return super().restore(partitions)


def test_a_rebalance_callback_does_no_io_and_a_failed_restore_is_retried_by_recovery() -> None:
    """An exception out of on_assign made consume() raise and drop what it fetched, the
    consumer's fatal error with it (the OTA controller then polled a dead consumer for 13
    minutes), and left the partitions assigned but never restored."""
    twin = Twin(device_id="d1", version=3)
    changelogs = FailingChangelogs({2: [twin]})
    worker = hot_worker(changelogs, FakeConsumer({("telemetry.raw", 2): 5}))
    worker._owned = set()
    worker._on_assign(worker.consumer, [TopicPartition("telemetry.raw", 2)])  # never raises
    assert changelogs.restored == []  # nothing read inside the callback
    with pytest.raises(TimeoutError):
        worker._restore_given()  # the next step restores, before processing: it fails
    assert worker._given == {2}
    worker.recover()  # the loop's recovery restores what was given and rewinds
    assert changelogs.restored == [[2]]
    assert worker._owned == {2}
    assert worker._given == set()
    assert worker.state.processor.twins == {"d1": twin}


def test_a_fatal_consumer_error_from_the_error_callback_replaces_the_consumer() -> None:
    worker = hot_worker(FakeChangelogs({}), FakeConsumer())
    worker._on_consumer_error(KafkaError(KafkaError._TRANSPORT, "broker down"))
    worker._check_consumer()  # not fatal: librdkafka retries
    fenced = KafkaError(KafkaError._FATAL, "static consumer fenced", fatal=True)
    worker._on_consumer_error(fenced)
    with pytest.raises(ConsumerFenced) as raised:
        worker._check_consumer()
    worker.on_transient(raised.value)
    assert worker._fenced


@dataclass
class FakeMessage:
    err: KafkaError | None

    def error(self) -> KafkaError | None:
        return self.err


def test_a_fenced_consumer_is_noticed_not_skipped_like_other_event_errors() -> None:
    check_consumed([FakeMessage(None), FakeMessage(KafkaError(KafkaError._PARTITION_EOF))])
    with pytest.raises(ConsumerFenced):
        check_consumed([FakeMessage(KafkaError(KafkaError._FATAL, "fenced", fatal=True))])
    assert is_transient(ConsumerFenced("static member fenced"))


STUCK_LOOP = """
import threading, time
from streams.runtime.loop import BatchLoop

class Stuck(BatchLoop):
    stall_limit_s = 0.5
    def start(self): pass
    def step(self): time.sleep(60)  # a Kafka call that never returns
    def recover(self): pass
    def write_status(self): pass
    def close(self): pass

Stuck().run(threading.Event())
"""


def test_a_step_that_never_returns_ends_the_process_with_its_stack_in_the_log() -> None:
    # The supervisor restarts a process that exits; one stuck forever would hold its partitions.
    done = subprocess.run(
        [sys.executable, "-c", STUCK_LOOP], capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "in step" in done.stderr, done.stderr
