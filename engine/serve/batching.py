"""Micro-batching: concurrent requests share one scorer call.

    batcher = MicroBatcher(service.search_texts, max_batch=16, max_wait_ms=5)
    await batcher.start()                     # inside the running event loop (the app's lifespan)
    result = await batcher.submit(TextQuery("a dog"))
    await batcher.stop()                      # finishes what is queued, then stops

The first request of a batch waits at most `max_wait_ms` for others (or until `max_batch` are
there), but only when other requests are in flight (queued or running): a lone request (one
client) runs at once, without the wait. Then the whole batch runs in ONE call of
`run_batch(items) -> results` on a worker thread, while the next batch gathers. `workers` batches may run at once (default 2: one gathers
and encodes while the other is in the pair graphs; on a shared machine a lone worker thread also
gets a small share of the cores against other processes' threads). Requests that arrive during a call join the next batch,
so under load batches fill without waiting. If a batched call raises, its items are re-run one
by one, so one bad request (an image that fails to decode) fails only itself.

`enabled=False` runs each request by itself on the event loop's thread pool (concurrently,
no queue): the baseline that benchmarks/load_test.py compares against.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0  # a text query costs ~20-60 ms at K=100 on 2 cores: 5 ms more wait is small beside it
DEFAULT_WORKERS = 2


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list], list], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, enabled: bool = True,
                 on_batch: Callable[[int, float], None] | None = None, workers: int = DEFAULT_WORKERS):
        if max_batch < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError(f"max_batch {max_batch}, max_wait_ms {max_wait_ms}, workers {workers}: expected >= 1, >= 0, >= 1")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.enabled, self.on_batch, self.workers = enabled, on_batch, workers
        self.queue: asyncio.Queue | None = None
        self.tasks: list[asyncio.Task] = []
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="microbatch") if enabled else None
        self.waiting = 0  # requests submitted and not yet running: the queue depth metric
        self.running = 0

    async def start(self) -> None:
        if self.enabled and not self.tasks:
            self.queue = asyncio.Queue()
            self.tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Run what is queued, then stop the workers."""
        if self.tasks:
            for _ in self.tasks:
                await self.queue.put(None)  # one sentinel per worker, after everything queued
            await asyncio.gather(*self.tasks)
            self.tasks = []
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self.running += 1
            start = time.perf_counter()
            try:
                from starlette.concurrency import run_in_threadpool

                return (await run_in_threadpool(self._run_one, item))
            finally:
                self.running -= 1
                if self.on_batch is not None:
                    self.on_batch(1, time.perf_counter() - start)
        if not self.tasks:
            raise RuntimeError("MicroBatcher.submit before start() (or after stop())")
        future = loop.create_future()
        self.waiting += 1
        await self.queue.put((item, future))
        return await future

    def _run_one(self, item):
        result = self.run_batch([item])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_batch_safely(self, items: list) -> list:
        """Results or exceptions, one per item; a failed batch is retried one item at a time."""
        try:
            return list(self.run_batch(items))
        except Exception as exc:  # noqa: BLE001 - re-raised per item below
            if len(items) == 1:
                return [exc]
        out = []
        for item in items:
            try:
                out.append(self.run_batch([item])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is None:
                break
            batch = [first]
            # others in flight (running, or queued behind this one): wait a little for a fuller batch; else go now
            wait = self.max_wait if self.running or self.waiting > 1 else 0.0
            deadline = loop.time() + wait
            while len(batch) < self.max_batch:
                try:
                    if self.queue.qsize():
                        nxt = self.queue.get_nowait()
                    elif wait <= 0:
                        break
                    else:
                        nxt = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self.waiting -= len(batch)
            self.running += len(batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self._run_batch_safely, [item for item, _ in batch])
            finally:
                self.running -= len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            for (_, future), result in zip(batch, results):
                if future.cancelled():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
