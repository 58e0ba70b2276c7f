"""lipdet serve's :class:`EngineBatcher`, driven with plain asyncio (no Ray, no HTTP).

The engine is a real blocking function on the batcher's worker thread: it records the rows of each call,
optionally holds until released (to queue parts while it "runs"), and answers rows that identify their
input, so each caller can check it got exactly its own rows back.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from lipdet.deploy.batching import EngineBatcher


class RecordingEngine:
    """``x (N, D) -> (2 x, x.sum(1))``; records each call's row count; holds each call until ``release``d
    when ``gated`` (the gate is opened by :meth:`release`, once per call)."""

    def __init__(self, gated: bool = False, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.gated = gated
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.sizes.append(len(x))
        self.started.release()
        if self.gated:
            self.gate.acquire(timeout=10)
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise RuntimeError("engine failed on this batch")
        return 2 * x, x.sum(dim=1)

    def release(self) -> None:
        self.gate.release()


async def started(engine: RecordingEngine) -> None:
    """Wait (off the loop) until the engine has entered its next call."""
    assert await asyncio.to_thread(engine.started.acquire, True, 10)


def rows(start: int, n: int) -> torch.Tensor:
    """``n`` rows of width 3 numbered from ``start``: every row says which part it came from."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 3)


def assert_own_rows(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(out[0], 2 * x)
    torch.testing.assert_close(out[1], x.sum(dim=1))


def test_parts_queued_while_the_engine_runs_share_its_next_call():
    """A runs alone; B, C, D arrive while A's call runs and go together into the next call (2 + 3 + 1 rows),
    each caller getting exactly its own rows back."""
    engine = RecordingEngine(gated=True)

    async def main() -> None:
        batcher = EngineBatcher(engine, max_batch=8, wait_s=0.0)
        a = asyncio.create_task(batcher(rows(0, 4)))
        await started(engine)
        parts = [rows(10, 2), rows(20, 3), rows(30, 1)]
        rest = [asyncio.create_task(batcher(x)) for x in parts]
        await asyncio.sleep(0.05)  # the three parts are queued; the engine still holds A
        engine.release()
        assert_own_rows(rows(0, 4), await a)
        await started(engine)
        engine.release()
        for x, task in zip(parts, rest):
            assert_own_rows(x, await task)
        assert (batcher.calls, batcher.rows) == (2, 10)

    asyncio.run(main())
    assert engine.sizes == [4, 6]


def test_a_batch_never_exceeds_max_batch_and_keeps_arrival_order():
    """Queued parts of 3, 3, 3, 1 rows with max_batch 6: the first two fill a call, the part of 3 that does
    not fit waits for the next (first in, first out), the part of 1 joins it."""
    engine = RecordingEngine(gated=True)

    async def main() -> None:
        batcher = EngineBatcher(engine, max_batch=6, wait_s=0.0)
        first = asyncio.create_task(batcher(rows(0, 1)))
        await started(engine)
        parts = [rows(10 * (i + 1), n) for i, n in enumerate((3, 3, 3, 1))]
        tasks = [asyncio.create_task(batcher(x)) for x in parts]
        await asyncio.sleep(0.05)
        for _ in range(3):
            engine.release()
        await first
        for x, task in zip(parts, tasks):
            assert_own_rows(x, await task)

    asyncio.run(main())
    assert engine.sizes == [1, 6, 4]


def test_an_idle_engine_waits_for_a_batch_to_fill_up_to_wait_s():
    """With the engine free, a part waits up to wait_s for company: a second part 20 ms later joins it."""
    engine = RecordingEngine()

    async def main() -> None:
        batcher = EngineBatcher(engine, max_batch=8, wait_s=1.0)
        a = asyncio.create_task(batcher(rows(0, 2)))
        await asyncio.sleep(0.02)
        b = asyncio.create_task(batcher(rows(10, 6)))  # 8 rows queued: the batch is full, no more waiting
        assert_own_rows(rows(0, 2), await a)
        assert_own_rows(rows(10, 6), await b)

    asyncio.run(main())
    assert engine.sizes == [8]


def test_an_engine_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    engine = RecordingEngine(gated=True, fail_on=2)

    async def main() -> None:
        batcher = EngineBatcher(engine, max_batch=8, wait_s=0.0)
        a = asyncio.create_task(batcher(rows(0, 1)))
        await started(engine)
        doomed = [asyncio.create_task(batcher(rows(10 * i, 2))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        engine.release()
        await a
        await started(engine)
        engine.release()
        for task in doomed:
            with pytest.raises(RuntimeError, match="engine failed on this batch"):
                await task
        c = asyncio.create_task(batcher(rows(40, 3)))
        await started(engine)
        engine.release()
        assert_own_rows(rows(40, 3), await c)

    asyncio.run(main())
    assert engine.sizes == [1, 4, 3]


def test_a_cancelled_caller_is_dropped_before_its_batch_forms():
    """A client that goes away (its request task cancelled) costs no engine rows."""
    engine = RecordingEngine(gated=True)

    async def main() -> None:
        batcher = EngineBatcher(engine, max_batch=8, wait_s=0.0)
        a = asyncio.create_task(batcher(rows(0, 1)))
        await started(engine)
        gone = asyncio.create_task(batcher(rows(10, 5)))
        kept = asyncio.create_task(batcher(rows(20, 2)))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        engine.release()
        await a
        await started(engine)
        engine.release()
        assert_own_rows(rows(20, 2), await kept)
        assert gone.cancelled()

    asyncio.run(main())
    assert engine.sizes == [1, 2]


@pytest.mark.parametrize("n", [0, 9])
def test_a_part_outside_1_to_max_batch_rows_is_refused(n):
    async def main() -> None:
        await EngineBatcher(RecordingEngine(), max_batch=8, wait_s=0.0)(torch.zeros(n, 3))

    with pytest.raises(ValueError, match=r"1\.\.8 rows"):
        asyncio.run(main())
