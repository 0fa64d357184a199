"""The worker's concurrency slots (pure asyncio: no server involved)."""

from __future__ import annotations

import asyncio

import pytest

from aiotasks.slots import Slots


async def test_waiters_get_released_slots_in_order() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await slots.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert slots.free == 0


async def test_a_slot_taken_over_the_limit_is_paid_back_first() -> None:
    """take_now() (a waiting parent told to wrap up) may go over the limit: the next
    release pays it back before a waiter or a fetch gets a slot."""
    slots = Slots(1)
    await slots.acquire()
    slots.take_now()
    assert (slots.free, slots.busy) == (-1, 2)
    assert slots.take(5) == 0
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # pays the debt
    await asyncio.sleep(0)
    assert not waiter.done() and slots.free == 0
    slots.release()  # now the waiter's turn
    await asyncio.wait_for(waiter, 1)
    assert slots.free == 0


async def test_a_waiter_cancelled_then_skipped_by_a_release_does_not_raise() -> None:
    """Cancelled while waiting, and a release() ran before it resumed: the release passes
    over the cancelled waiter (dropping it) and the cancelled acquire ends quietly."""
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)  # it waits in line
    waiter.cancel()  # its future is cancelled now; the task resumes on the next step
    slots.release()  # drops the cancelled future and frees the slot
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1
    await asyncio.wait_for(slots.acquire(), 1)  # the slot is really there


async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # so the slot went on to `second`
    assert slots.free == 0
