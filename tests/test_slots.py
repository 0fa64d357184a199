"""The worker's concurrency slots (pure asyncio: no server involved)."""

from __future__ import annotations

import asyncio

import pytest

from aiotasks.slots import MAX_CONCURRENCY, Slots


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


async def test_a_release_of_many_slots_pays_debt_then_waiters_then_frees_the_rest() -> None:
    slots = Slots(4)
    assert slots.take(4) == 4
    slots.take_now()  # one over the limit
    waiters = [asyncio.create_task(slots.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    slots.release(4)  # one pays the debt, two go to the waiters, one is free
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert slots.free == 1
    slots.release(3)
    assert slots.free == 4


def test_the_largest_concurrency_gives_its_slots_back_at_once() -> None:
    """A fetch takes as many slots as the concurrency and gives back what it did not use:
    all of them, at the largest concurrency allowed. (Slot by slot, a concurrency of
    2**63 - 1 spun a core for as long as the worker ran; it is refused now, below.)"""
    slots = Slots(MAX_CONCURRENCY)
    assert slots.take(MAX_CONCURRENCY) == MAX_CONCURRENCY
    slots.release(MAX_CONCURRENCY)
    assert slots.free == MAX_CONCURRENCY


@pytest.mark.parametrize("total", [0, -1, MAX_CONCURRENCY + 1, 2**63 - 1])
def test_a_concurrency_out_of_range_is_refused(total: int) -> None:
    with pytest.raises(ValueError, match="concurrency must be between 1 and 1,000,000"):
        Slots(total)
