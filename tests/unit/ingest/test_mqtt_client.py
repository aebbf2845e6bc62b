"""Read coalescing on a gmqtt connection, with a stand-in protocol and transport."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

from ingest.mqtt_client import coalesce_reads


@dataclass
class Transport:
    events: list[str] = field(default_factory=list)
    closing: bool = False

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")


class Protocol:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def read(self, n: int = -1) -> bytes:
        return self.chunks.pop(0)


def connected(chunks: list[bytes]) -> tuple[SimpleNamespace, Protocol, Transport]:
    protocol, transport = Protocol(chunks), Transport()
    client = SimpleNamespace(_connection=SimpleNamespace(_protocol=protocol, _transport=transport))
    return client, protocol, transport


def test_a_read_soon_after_the_last_waits_out_the_window_with_the_socket_paused() -> None:
    async def scenario() -> tuple[list[bytes], float, list[str]]:
        client, protocol, transport = connected([b"a", b"b"])
        coalesce_reads(client, 0.05)
        loop = asyncio.get_running_loop()
        first = await protocol.read(65536)
        assert transport.events == []  # nothing read before: no wait
        start = loop.time()
        second = await protocol.read(65536)
        return [first, second], loop.time() - start, transport.events

    chunks, waited, events = asyncio.run(scenario())
    assert chunks == [b"a", b"b"]
    assert waited >= 0.04
    assert events == ["pause", "resume"]


def events_of_two_reads(window_s: float, first_read: int, quiet_s: float, close: bool) -> list[str]:
    """The transport's pauses and resumes around two reads of a coalesced connection."""

    async def scenario() -> list[str]:
        client, protocol, transport = connected([b"full", b"more"])
        coalesce_reads(client, window_s)
        await protocol.read(first_read)
        await asyncio.sleep(quiet_s)  # time passing is the condition under test
        transport.closing = close
        await protocol.read(4)
        return transport.events

    return asyncio.run(scenario())


def test_a_read_after_a_quiet_spell_is_not_delayed() -> None:
    assert events_of_two_reads(0.01, -1, quiet_s=0.02, close=False) == []


def test_a_read_that_filled_its_buffer_is_followed_at_once() -> None:
    # As many bytes as asked for: more may be waiting (a backlog, a large message).
    assert events_of_two_reads(0.05, 4, quiet_s=0, close=False) == []


def test_a_closing_transport_is_neither_paused_nor_resumed() -> None:
    assert events_of_two_reads(0.05, -1, quiet_s=0, close=True) == []


def test_a_zero_window_leaves_the_protocol_as_it_was() -> None:
    client, protocol, _transport = connected([])
    read = protocol.read
    coalesce_reads(client, 0)
    assert protocol.read == read
