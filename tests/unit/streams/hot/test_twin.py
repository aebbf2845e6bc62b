"""Device twins: merge, null removal, delta, versions and conflicts, ordering by seq, limits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import AvroCodec, Decoded, load_schema
from streams.hot.twin import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    Accepted,
    Conflict,
    Ignored,
    Twin,
    TwinDocumentError,
    apply_desired,
    apply_reported,
    delta,
    from_record,
    to_record,
    twin_view,
)


def desired(twin: Twin, patch: dict[str, Any], version: int | None = None, now: int = 1) -> Twin:
    result = apply_desired(twin, patch, version, now)
    assert isinstance(result, Accepted)
    return result.twin


def reported(twin: Twin, patch: dict[str, Any], seq: int, now: int = 1) -> Twin:
    result = apply_reported(twin, patch, seq, now)
    assert isinstance(result, Accepted)
    return result.twin


def test_nested_merge_and_null_removes_a_key() -> None:
    twin = desired(Twin("d-1"), {"led": "on", "cfg": {"rate": 1, "mode": "a"}})
    twin = desired(twin, {"cfg": {"rate": 5, "mode": None}, "led": None, "fw": [1, 2]})
    assert twin.desired == {"cfg": {"rate": 5}, "fw": [1, 2]}
    twin = desired(twin, {"cfg": {"rate": None}})  # an object emptied by removals is dropped
    assert twin.desired == {"fw": [1, 2]}


def test_per_key_metadata_mirrors_the_document() -> None:
    twin = desired(Twin("d-1"), {"a": 1, "cfg": {"x": 1, "y": 1}}, now=10)
    twin = desired(twin, {"cfg": {"y": 2}}, now=20)
    assert twin.desired_metadata == {"a": 10, "cfg": {"x": 10, "y": 20}}
    assert twin.updated_at == 20


def test_delta_compares_nested_objects_key_by_key() -> None:
    twin = desired(Twin("d-1"), {"a": 1, "b": True, "cfg": {"x": 1, "y": 2}, "l": [1]})
    twin = reported(twin, {"a": 1.0, "b": 1, "cfg": {"x": 1, "y": 3}, "l": [1], "extra": 0}, 1)
    assert delta(twin) == {"b": True, "cfg": {"y": 2}}  # true is not 1; 1 == 1.0
    twin = reported(twin, {"b": True, "cfg": {"y": 2}}, 2)
    assert twin_view(twin) == {
        "desired": twin.desired,
        "reported": twin.reported,
        "delta": {},
        "version": 3,
    }


def test_versions_grow_by_one_and_a_stale_version_is_refused() -> None:
    twin = desired(Twin("d-1"), {"a": 1}, version=0)
    assert twin.version == 1
    assert apply_desired(twin, {"a": 2}, 0, 2) == Conflict(current_version=1, expected_version=0)
    twin = desired(twin, {"a": 2}, version=1)
    assert twin.version == 2
    unchanged = apply_desired(twin, {"a": 2, "b": None}, 2, 3)
    assert unchanged == Accepted(twin, changed=False)  # nothing changed: same version


def test_an_older_reported_update_is_ignored() -> None:
    twin = reported(Twin("d-1"), {"t": 20}, seq=5)
    result = apply_reported(twin, {"t": 10}, 4, 2)
    assert isinstance(result, Ignored)
    assert "stale" in result.reason
    assert isinstance(apply_reported(twin, {"t": 10}, 5, 2), Ignored)  # a replay too
    same = apply_reported(twin, {"t": 20}, 6, 3)  # unchanged, yet seq moves on
    assert isinstance(same, Accepted)
    assert not same.changed
    assert (same.twin.version, same.twin.last_reported_seq) == (1, 6)


@given(
    seqs=st.lists(st.integers(0, 1000), min_size=1, max_size=12, unique=True),
    data=st.data(),
)
def test_reports_in_any_order_end_at_the_newest(seqs: list[int], data: st.DataObject) -> None:
    # Each report sets the same keys, so whatever the arrival order the newest one wins.
    values = {s: data.draw(st.integers(0, 3)) for s in seqs}
    order = data.draw(st.permutations(seqs))
    twin, last_seq = Twin("d-1"), -1
    for seq in order:
        result = apply_reported(twin, {"v": values[seq], "seq": seq}, seq, 1)
        if isinstance(result, Accepted):
            assert result.twin.version == twin.version + int(result.changed)
            twin = result.twin
        assert twin.last_reported_seq == max(last_seq, seq) >= last_seq
        last_seq = twin.last_reported_seq
    assert twin.reported == {"v": values[max(seqs)], "seq": max(seqs)}


def test_limits_give_clear_errors() -> None:
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(MAX_DEPTH):
        deep = {"k": deep}
    with pytest.raises(TwinDocumentError, match="too_deep"):
        apply_desired(Twin("d-1"), deep, None, 1)
    with pytest.raises(TwinDocumentError, match="too_large"):
        apply_desired(Twin("d-1"), {"blob": "x" * MAX_DOCUMENT_BYTES}, None, 1)
    half = "x" * (MAX_DOCUMENT_BYTES // 2)
    twin = desired(Twin("d-1"), {"a": half})
    with pytest.raises(TwinDocumentError, match="too_large"):  # the merged document
        apply_desired(twin, {"b": half}, None, 1)
    with pytest.raises(TwinDocumentError, match="invalid"):
        apply_reported(Twin("d-1"), {"t": float("nan")}, 1, 1)


def test_twin_state_round_trips_through_avro() -> None:
    twin = desired(Twin("d-1"), {"cfg": {"rate": 2}, "name": "pump ü"}, now=5)
    twin = reported(twin, {"cfg": {"rate": 1}}, seq=42, now=6)
    codec = AvroCodec(load_schema("TwinState"), schema_id=3)
    decoded = codec.decode(codec.encode(to_record(twin)))
    assert isinstance(decoded, Decoded)
    assert from_record(decoded.record) == twin
