"""What the kit does with a job's records, Kafka aside: decode inputs, apply table records
through the error channel, run `process`, encode outputs. Shared by the Kafka loop
(streams/runtime/job.py) and the harness (streams/runtime/testing.py), so a job tested in
memory runs the same code as in production."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic

from schemas.codec import AvroCodec, Decoded
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.spec import Batch, Input, JobSpec, Output, S, TableRecord, TableSpec
from streams.runtime.tables import TableErrors, UnreadableRecord


def key_of(key: bytes | str | None) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key or "")


class JobCore(Generic[S]):
    def __init__(self, spec: JobSpec[S], codecs: Mapping[str, AvroCodec]) -> None:
        self.spec = spec
        self.codecs = codecs
        self.state: S = spec.state()
        self.table_errors = TableErrors(spec.stage)

    def decode_input(self, source: SourceRecord) -> Input:
        if self.spec.inputs[source.topic] is None:
            return Input(source, {})  # not decoded: the job reads its key and timestamp
        # No input is compacted: a record without a value is bad input, like one that does
        # not decode.
        decoded = self.codecs[source.topic].decode(source.value or b"")
        if isinstance(decoded, Decoded):
            return Input(source, decoded.record)
        dead = DeadLetter(source, str(decoded.reason), decoded.detail, stage=self.spec.stage)
        return Input(source, {}, dead)

    def apply_table(self, table: TableSpec[S], source: SourceRecord) -> None:
        """Apply one table record; what cannot be used goes to the error channel."""
        key = key_of(source.key)
        record = None
        if source.value is not None and table.schema is not None:
            decoded = self.codecs[table.topic].decode(source.value)
            if not isinstance(decoded, Decoded):
                self._refuse(table, source, key, str(decoded.reason), decoded.detail)
                return
            record = decoded.record
        try:
            table.apply(
                self.state, TableRecord(key, record, source.value, source.partition, source.offset)
            )
        except UnreadableRecord as exc:
            self._refuse(table, source, key, exc.reason, exc.detail)
        except ValueError as exc:
            self._refuse(table, source, key, "invalid_record", str(exc))

    def _refuse(
        self, table: TableSpec[S], source: SourceRecord, key: str, reason: str, detail: str
    ) -> None:
        self.table_errors.refuse(source, reason, f"table {table.topic}: {detail}")
        if table.unreadable_deletes:
            table.apply(self.state, TableRecord(key, None, None, source.partition, source.offset))

    def process(self, batch: Batch) -> list[Output]:
        return list(self.spec.process(self.state, batch))

    def encode(self, output: Output) -> bytes | None:
        value = output.value
        if value is None or isinstance(value, bytes):
            return value
        return self.codecs[output.topic].encode(value)
