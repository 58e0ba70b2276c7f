"""Dynamic batching for one engine: concurrent requests' image parts merged into engine calls.

:class:`EngineBatcher` forms a batch when the engine is free, as Triton's dynamic batcher does: it takes
the queued parts in arrival order, up to ``max_batch`` images, and when fewer are queued it waits for
more until the oldest part has waited ``wait_s``. Parts that arrive while the engine runs wait in the
queue and go together into the next call, so the busier the engine, the larger its batches.

Why not Ray Serve's ``@serve.batch``: it forms the next batch as soon as its first entry's wait has
expired, also while the previous batch still runs, and queues the formed batches behind a semaphore.
Under load the engine then runs many small batches back to back, each paying the per-call cost. Measured
with ``benchmarks/serve.py`` (8 clients x 8 images, max batch 64, one CPU replica, Intel Xeon with AMX,
2 cores): ``@serve.batch`` ran batches of 8 and 16 images only, while the requests waited about 150 ms
in its queue of formed batches.

Nothing here imports Ray: a replica owns one batcher, and tests drive it with plain asyncio.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

Engine = Callable[[Tensor], tuple[Tensor, ...]]
"""A blocking engine call: ``(N, ...)`` inputs -> a tuple of ``(N, ...)`` outputs, row i for input i."""


@dataclass
class _Part:
    """One queued request part: ``images (n, ...)``, the future its caller awaits, its arrival (loop time, s)."""

    images: Tensor
    future: asyncio.Future
    arrived: float


class EngineBatcher:
    """Merges concurrent calls into engine batches of at most ``max_batch`` rows.

    Args:
        engine: the blocking engine call (:data:`Engine`); it runs on one worker thread of its own, so
            engine calls never overlap and the event loop keeps serving while one runs.
        max_batch: most rows per engine call.
        wait_s: longest time (s) the oldest queued part waits for a batch to fill while the engine is free.

    ``await batcher(images)`` with ``1 <= len(images) <= max_batch`` returns the engine's outputs for exactly
    these rows. A failing engine call raises its exception in every caller of that batch; a cancelled
    caller's part is dropped before its batch forms.
    """

    def __init__(self, engine: Engine, max_batch: int, wait_s: float) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and wait_s >= 0, got {max_batch} and {wait_s}")
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.calls = 0
        """Engine calls made so far; ``rows``: rows they ran (``rows / calls``: the mean batch)."""
        self.rows = 0
        self._queue: deque[_Part] = deque()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lipdet-engine")
        self._arrival: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        if not 1 <= len(images) <= self.max_batch:
            raise ValueError(f"a batcher part has 1..{self.max_batch} rows, got {len(images)}")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrival = asyncio.Event()
            self._task = loop.create_task(self._serve())
        part = _Part(images, loop.create_future(), loop.time())
        self._queue.append(part)
        self._arrival.set()
        return await part.future

    async def _serve(self) -> None:
        """The batching loop: form a batch, run it, repeat (one per event loop)."""
        while True:
            await self._run(await self._next_batch())

    def _queued_rows(self) -> int:
        return sum(len(p.images) for p in self._queue)

    async def _next_batch(self) -> list[_Part]:
        """Wait until ``max_batch`` rows are queued or the oldest part has waited ``wait_s``; take a batch."""
        loop = asyncio.get_running_loop()
        while True:
            self._queue = deque(p for p in self._queue if not p.future.done())  # drop cancelled callers
            if self._queued_rows() >= self.max_batch:
                break
            left = self._queue[0].arrived + self.wait_s - loop.time() if self._queue else None
            if left is not None and left <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except asyncio.TimeoutError:
                pass
        batch, rows = [], 0
        while self._queue and rows + len(self._queue[0].images) <= self.max_batch:
            batch.append(self._queue.popleft())
            rows += len(batch[-1].images)
        return batch

    async def _run(self, batch: list[_Part]) -> None:
        """One engine call on the worker thread; each part's future gets its own rows (or the error)."""
        sizes = [len(p.images) for p in batch]
        self.calls += 1
        self.rows += sum(sizes)
        try:
            outs = await asyncio.get_running_loop().run_in_executor(
                self._worker, self.engine, torch.cat([p.images for p in batch]))
            rows = zip(*(out.split(sizes) for out in outs))
            for part, own in zip(batch, rows):
                if not part.future.done():
                    part.future.set_result(own)
        except Exception as e:  # every caller of this batch gets the engine's error; the loop goes on
            for part in batch:
                if not part.future.done():
                    part.future.set_exception(e)
