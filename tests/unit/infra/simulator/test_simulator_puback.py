"""The simulated device reads PUBACK reason codes: 0x10 keeps the message, a refusal ends it."""

from __future__ import annotations

import asyncio
import struct

from infra.simulator.protocol import (
    NO_MATCHING_SUBSCRIBERS,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    AckCountingClient,
    parse_puback,
    retry_delay,
)


def _puback(mid: int, reason: int | None) -> bytes:
    head = struct.pack("!H", mid)
    return head if reason is None else head + bytes([reason, 0])  # reason, empty properties


def test_a_puback_without_reason_code_is_a_success() -> None:
    assert parse_puback(_puback(7, None)) == (7, 0)
    assert parse_puback(_puback(65535, NO_MATCHING_SUBSCRIBERS)) == (65535, 0x10)


def test_the_retry_backoff_doubles_and_is_bounded() -> None:
    delays = [retry_delay(n) for n in range(1, 40)]
    assert delays[0] == RETRY_FIRST_S
    assert delays[1] == 2 * RETRY_FIRST_S
    assert delays == sorted(delays)
    assert max(delays) == RETRY_MAX_S
    assert retry_delay(10**6) == RETRY_MAX_S  # no overflow however long it lasts
    assert retry_delay(3, jitter=0.5) == retry_delay(3) / 2


def test_0x10_keeps_the_message_and_a_success_or_refusal_ends_it() -> None:
    async def scenario() -> list[int]:
        answers: list[int] = []
        client = AckCountingClient("dev-1", on_puback=answers.append)
        storage = client._persistent_storage
        for mid in (1, 2, 3):
            storage.push_message(mid, b"publish-%d" % mid)
        handle = client._package_handler._handle_puback_packet
        handle(0x40, _puback(1, NO_MATCHING_SUBSCRIBERS))  # kept, resent later
        handle(0x40, _puback(2, None))  # delivered
        handle(0x40, _puback(3, 0x95))  # refused (too large): retrying cannot help
        assert [mid for mid, _ in storage.get_all()] == [1]
        handle(0x40, _puback(1, 0))  # the retry's answer
        assert storage.is_empty
        return answers

    assert asyncio.run(scenario()) == [NO_MATCHING_SUBSCRIBERS, 0, 0x95, 0]
