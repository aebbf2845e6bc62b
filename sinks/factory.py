"""The sink a warehouse URL names: ``doris://`` is Apache Doris (sinks/doris.py); ``chdb://``
(embedded) and ``http(s)://`` are ClickHouse (sinks/clickhouse.py)."""

from __future__ import annotations

from sinks.base import WarehouseSink
from sinks.clickhouse import ClickHouseSink
from sinks.doris import DorisSink, is_doris_dsn

__all__ = ["open_sink"]


def open_sink(dsn: str, *, query_timeout_s: float = 300.0) -> WarehouseSink:
    """The sink for ``dsn`` (connections open lazily: nothing is reached yet)."""
    if is_doris_dsn(dsn):
        return DorisSink(dsn, query_timeout_s=query_timeout_s)
    return ClickHouseSink(dsn, query_timeout_s=query_timeout_s)
