"""Dynamic batching: concurrent encode requests merged into few encoder calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from matryoshka.serve.metrics import Metrics

__all__ = ["DynamicBatcher", "EncodeFn"]

#: ``n`` inputs (texts, or token-id lists: whatever the encoder takes) -> ``(n, d)`` float32
#: embeddings, called in the batcher's one worker thread.
EncodeFn = Callable[[list[Any]], np.ndarray]


class DynamicBatcher:
    """Merge concurrent encode requests into few encoder calls.

    Requests wait in an asyncio queue; a worker takes the first one, then gathers more until the
    batch holds ``max_batch_size`` texts or ``max_wait_ms`` has passed, and runs ``encode`` on
    all their texts in one worker thread: ``n`` texts -> ``(n, d)`` float32. With
    ``enabled=False`` every request is its own encoder call (same thread, so calls never overlap).
    """

    def __init__(
        self,
        encode: EncodeFn,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.metrics = metrics or Metrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-encode")
        self._queue: asyncio.Queue[tuple[list[Any], asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        if self.enabled:
            self._worker = asyncio.create_task(self._run(), name="mrl-batcher")

    async def stop(self) -> None:
        """Stop the worker and the encoder thread; pending requests get an error."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[Any]) -> np.ndarray:
        """``n`` inputs -> ``(n, d)`` embeddings, possibly computed with other requests' inputs."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            out = await loop.run_in_executor(self._executor, self.encode, texts)
            self.metrics.observe_batch(1, len(texts))
            return out
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not awaited: start the app's lifespan.")
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        await self._queue.put((texts, fut))
        return await fut

    async def _run(self) -> None:
        """The worker: take a request, gather company until full or timed out, encode, split."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    item = self._queue.get_nowait()
                batch.append(item)
                n += len(item[0])
            texts = [t for chunk, _ in batch for t in chunk]
            try:
                out = await loop.run_in_executor(self._executor, self.encode, texts)
            except Exception as e:  # hand the failure to every waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.metrics.observe_batch(len(batch), len(texts))
            start = 0
            for chunk, fut in batch:
                if not fut.done():
                    fut.set_result(out[start : start + len(chunk)])
                start += len(chunk)
