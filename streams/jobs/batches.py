"""Batches for agents that fold many records into one table write each.

A table write sends a changelog record, so an agent that updates an aggregate for every
record costs a Kafka send per record. ``stream.take_events(n, within)`` hands an agent its
records in batches (acked only once the batch is processed: at-least-once holds); grouped by
source partition, a batch becomes one write per key. Faust sends a write to the changelog
partition of the event being processed, which it reads from a context variable that
``take_events`` does not set in the agent's task: :func:`writing_as` sets it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from faust.streams import _current_event
from faust.types import EventT


def by_partition(events: Sequence[EventT[Any]]) -> dict[int, list[EventT[Any]]]:
    """The batch's events by source partition, each list in arrival (offset) order."""
    grouped: dict[int, list[EventT[Any]]] = {}
    for event in events:
        grouped.setdefault(event.message.partition, []).append(event)
    return grouped


@contextmanager
def writing_as(event: EventT[Any]) -> Iterator[None]:
    """Table writes inside go where they would go while ``event`` is processed: to the
    changelog partition of its source partition."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
