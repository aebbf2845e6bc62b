"""A Faust codec for the Confluent wire format, backed by the schema registry.

It encodes with the project's own codec (schemas/codec.py): magic byte, the 4-byte schema id
the registry gave the ``.avsc`` schema under ``<topic>-value``, Avro body. Decoding reads
records written with any registered version of the schema into the ``.avsc``'s shape.
Schema ids are cached: the registry is asked once per schema (on first use), never per message.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from faust.serializers.codecs import Codec

from schemas.codec import AvroCodec, CodecRegistry, Decoded, load_schema


class RegistrySchemas(Mapping[int, Mapping[str, Any]]):
    """Schema id -> schema JSON, fetched from the registry on first ask, then cached.

    ``get`` answers None for an id the registry does not know (404); other errors propagate.
    """

    def __init__(self, client: SchemaRegistryClient) -> None:
        self._client = client
        self._cache: dict[int, Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, schema_id: int) -> Mapping[str, Any]:
        with self._lock:
            cached = self._cache.get(schema_id)
            if cached is not None:
                return cached
            try:
                schema = self._client.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    raise KeyError(schema_id) from exc
                raise
            if schema.schema_str is None:
                raise KeyError(schema_id)
            parsed: Mapping[str, Any] = json.loads(schema.schema_str)
            self._cache[schema_id] = parsed
            return parsed

    def __iter__(self) -> Iterator[int]:
        return iter(dict(self._cache))

    def __len__(self) -> int:
        return len(self._cache)

    def __bool__(self) -> bool:
        # Lazy: empty until asked. AvroCodec takes ``writer_schemas or {}``, which would drop
        # an empty-looking mapping and, with it, every older schema version.
        return True


class ConfluentAvroCodec(Codec):
    """The value codec of one Avro topic: dict in, Confluent wire-format bytes out, and back.

    Faust turns records into dicts (``to_representation``) before ``dumps`` and dicts into
    records (the topic's ``value_type``) after ``loads``.
    """

    def __init__(
        self,
        topic: str,
        schema: str,
        registry: CodecRegistry,
        writers: Mapping[int, Mapping[str, Any]],
    ) -> None:
        super().__init__()
        self.topic, self.schema_name = topic, schema
        self._schema = load_schema(schema)
        self._registry = registry
        self._writers = writers
        self._codec: AvroCodec | None = None

    def _avro(self) -> AvroCodec:
        # Registered on first use (CodecRegistry caches the id): a job that only reads a
        # topic never registers its schema, one that writes registers it once.
        if self._codec is None:
            registered = self._registry.codec(self.topic, self._schema)
            self._codec = AvroCodec(self._schema, registered.schema_id, self._writers)
        return self._codec

    def _dumps(self, obj: Any) -> bytes:
        if not isinstance(obj, Mapping):
            raise TypeError(f"{self.topic}: expected a record or a dict, got {type(obj).__name__}")
        record = {k: v for k, v in obj.items() if k != "__faust"}
        return self._avro().encode(record)

    def _loads(self, s: bytes) -> Any:
        result = self._avro().decode(s)
        if isinstance(result, Decoded):
            return result.record
        raise ValueError(f"{self.topic}: {result.reason}: {result.detail}")
