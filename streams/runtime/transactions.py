"""Read-process-write in Kafka transactions: what a batch emitted, the state it changed and
its input offsets become visible together, or not at all.

Used by the stream workers (hot path, OTA controller): a worker consumes a batch, computes
its outputs with pure functions, and calls :meth:`Transactions.commit` with a function that
produces them. An abortable failure aborts; the worker then rewinds its state and positions
to the last commit (its changelogs and committed offsets hold exactly that).

Transient Kafka errors (a broker restarting, a coordinator moving or loading, a timeout) are
not the end of a worker: the batch loop (streams/runtime/loop.py) aborts what is open, rewinds
to the last commit, backs off and goes on. Only a fatal error (fenced by a newer instance, a
fatal producer state) ends the process: then nothing this process does can be committed any
more."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streams.runtime.clients import KafkaConfig, transactional_producer_config
from streams.runtime.watchdog import Watchdog

log = logging.getLogger("fleetstream.transactions")

# Errors after which this process can commit nothing more: a newer instance with the same
# transactional id or static member id took over (fenced), or the producer is in a fatal state.
FATAL_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)

# Seen when a broker dies or restarts (issue 12): retried after a rewind. librdkafka does not
# flag all of them retriable() (a consumer's commit error never is), hence the list.
TRANSIENT_CODES = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.CONCURRENT_TRANSACTIONS,
        KafkaError.UNKNOWN_PRODUCER_ID,
    }
)


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if it carries one."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def is_fatal(exc: BaseException) -> bool:
    """True if the process cannot go on (fenced, fatal producer error)."""
    error = kafka_error(exc)
    return error is not None and (error.fatal() or error.code() in FATAL_CODES)


class Aborted(Exception):
    """A worker's transaction was aborted: the loop backs off, then rewinds (recover)."""


class ConsumerFenced(Exception):
    """A consumer hit a fatal error (a static member fenced: a lone member fences itself when
    it rejoins blind after a coordinator stall, as after a broker restart here). The consumer
    is dead; the worker replaces it with a new one (same group.instance.id), which starts at
    the committed offsets: a rewind like any other."""


def check_consumed(messages: Iterable[Message]) -> None:
    """Raise ConsumerFenced if a consumed batch carries the consumer's fatal error (librdkafka
    reports it as an error event; the consumer gets nothing more after it)."""
    for msg in messages:
        error = msg.error()
        if error is not None and (error.fatal() or error.code() == KafkaError._FATAL):
            raise ConsumerFenced(str(error))


def is_transient(exc: BaseException) -> bool:
    """True for what a rewind and a retry get past: any Kafka error that is not fatal (the
    listed ones, those librdkafka flags retriable or abortable, and the rest, which a restart
    of the process would meet again), and a table read that timed out while a broker was away.
    """
    if isinstance(exc, (TimeoutError, Aborted, ConsumerFenced)):
        return True
    return isinstance(exc, KafkaException) and not is_fatal(exc)


@dataclass(frozen=True)
class Backoff:
    """Exponential delays, bounded: first, 2x first, ... up to `longest`."""

    first: float = 0.2
    longest: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.longest)


def rewind_positions(committed: Iterable[TopicPartition]) -> list[TopicPartition]:
    """Pure: where each partition restarts after a rewind: its committed offset, or the
    beginning where nothing was committed yet (auto.offset.reset=earliest; staying at the
    current position would skip the aborted batch)."""
    return [
        TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
        for tp in committed
    ]


def rewind_to_committed(consumer: Consumer, timeout: float = 10.0) -> list[TopicPartition]:
    """Seek every assigned partition back to its last committed offset. Raises KafkaException
    if the coordinator does not answer in time (the caller backs off and tries again)."""
    assignment = consumer.assignment()
    if not assignment:
        return []
    positions = rewind_positions(consumer.committed(assignment, timeout=timeout))
    for tp in positions:
        consumer.seek(tp)
    return positions


class Transactions:
    # How long a commit, an abort or init may keep retrying a retriable error before the
    # failure goes up to the loop (which aborts, rewinds and backs off).
    RETRY_FOR_S = 30.0
    # send_offsets_to_transaction's own timeout, and how long it may really take before the
    # process ends (it can ignore its timeout: streams/runtime/watchdog.py).
    SEND_OFFSETS_TIMEOUT_S = 20.0
    SEND_OFFSETS_LIMIT_S = 30.0

    def __init__(
        self, kafka: KafkaConfig, transactional_id: str, watchdog: Watchdog | None = None
    ) -> None:
        self.producer = Producer(transactional_producer_config(kafka, transactional_id))
        self.watchdog = watchdog or Watchdog()
        self._initialised = False
        self._open = False  # a transaction was begun and neither committed nor aborted

    def start(self) -> None:
        """Fence a predecessor with the same id and abort what it left open. Idempotent; a
        retriable failure (broker away) may be retried by calling again."""
        if not self._initialised:
            self.producer.init_transactions(30)
            self._initialised = True

    def commit(
        self, consumer: Consumer, produce: Callable[[Producer], None], consumed: bool
    ) -> bool:
        """One transaction: `produce(producer)`'s records and, if `consumed`, the consumer's
        positions. False if it was aborted: the caller rewinds to the last commit. A fatal
        error raises; so does an abort that could not complete (the loop retries it)."""
        try:
            self.producer.begin_transaction()
            self._open = True
            produce(self.producer)
            if consumed:
                assigned = consumer.position(consumer.assignment())
                positions = [tp for tp in assigned if tp.offset >= 0]
                with self.watchdog.within(self.SEND_OFFSETS_LIMIT_S):
                    self.producer.send_offsets_to_transaction(
                        positions, consumer.consumer_group_metadata(), self.SEND_OFFSETS_TIMEOUT_S
                    )
            self._commit_retrying()
            self._open = False
            return True
        except KafkaException as exc:
            if is_fatal(exc):
                raise
            log.warning("transaction failed (%s); aborting, rewinding to the last commit", exc)
            self.abort()
            return False

    def _commit_retrying(self) -> None:
        """commit_transaction, called again while it fails retriably (librdkafka: on a
        timeout the commit goes on in the background and calling again resumes it). What is
        not retriable (abortable, or still failing at the deadline) goes to the caller."""
        deadline = time.monotonic() + self.RETRY_FOR_S
        for delay in Backoff(first=0.1, longest=2.0).delays():
            try:
                self.producer.commit_transaction(30)
                return
            except KafkaException as exc:
                error = kafka_error(exc)
                retriable = (
                    error is not None and error.retriable() and not error.txn_requires_abort()
                )
                if not retriable or is_fatal(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("commit not confirmed yet (%s); resuming in %.1fs", error, delay)
                time.sleep(delay)

    def abort(self) -> None:
        """Abort the open transaction, if any, retrying while the coordinator is away. Raises
        if it cannot within RETRY_FOR_S (the transaction stays marked open: call again)."""
        if not self._open:
            return
        deadline = time.monotonic() + self.RETRY_FOR_S
        for delay in Backoff(first=0.1, longest=2.0).delays():
            try:
                self.producer.abort_transaction(30)
                self._open = False
                return
            except KafkaException as exc:
                if is_fatal(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("abort not done yet (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)

    def close(self) -> None:
        self.producer.flush(10)
