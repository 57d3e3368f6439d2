"""Batching for ``effilm serve``: waiting requests go to the engine together, in worker threads.

* ``submit`` admits a request while fewer than ``max_concurrency`` sequences run plus at most
  ``max_queue`` wait; beyond that it raises ``QueueFull`` (the server answers 429).
* A scheduler task wakes when a request arrives or a slot frees, waits ``batch_wait_s`` for the
  rest of a burst, and hands up to the free-slot count of waiting requests to one
  ``Engine.stream`` call in a worker thread. The engine is synchronous torch code, so the event
  loop never runs it. ``Engine.stream`` takes a fixed batch (no continuous batching), so up to
  ``max_batches`` batches run side by side while their sequences fit in ``max_concurrency``: a
  slot freed by a finished (or cancelled) sequence goes to the next batch without waiting for the
  rest of its own. Capping the batches keeps waiting requests together in larger batches instead
  of many batches of one competing for the same cores.
* Events travel from the worker thread to each request's ``asyncio.Queue`` through
  ``call_soon_threadsafe``. A slot is released on the sequence's last event.
* ``Ticket.cancel()`` (a disconnected client, a shutdown) is read by the engine's ``cancelled``
  callback at its next step, which ends that sequence and frees its slot.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


class EngineFailed(Exception):
    """The engine raised while running a batch; delivered to every unfinished request in it."""


@dataclass(eq=False)
class Ticket:
    prompt_ids: list[int]
    params: object
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False
    finished: bool = False
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    def __init__(self, engine, max_concurrency: int, max_queue: int, batch_wait_s: float, max_batches: int = 2):
        self.engine, self.max_batches = engine, max_batches
        self.max_concurrency, self.max_queue, self.batch_wait_s = max_concurrency, max_queue, batch_wait_s
        self.waiting: list[Ticket] = []
        self.active = 0  # sequences admitted to the engine and not yet finished
        self.batches_run = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Future] = set()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="effilm-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._started: set[Ticket] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="effilm-scheduler")

    def stats(self) -> dict:
        return {"active": self.active, "batches_running": len(self._running), "waiting": len(self.waiting), "max_concurrency": self.max_concurrency,
                "max_queue": self.max_queue, "batches_run": self.batches_run}

    def cancel(self, ticket: Ticket) -> None:
        """Cancel ``ticket`` (its client went away) and wake the scheduler to drop or free it."""
        if not ticket.finished:
            ticket.cancel()
            self._wake.set()

    def submit(self, prompt_ids: list[int], params) -> Ticket:
        if self._closing:
            raise QueueFull("the server is shutting down")
        live_waiting = sum(not t.cancelled for t in self.waiting)
        if self.active + live_waiting >= self.max_concurrency + self.max_queue:
            raise QueueFull(f"{self.active} requests running and {live_waiting} queued (limits: --max-concurrency "
                            f"{self.max_concurrency}, --max-queue {self.max_queue})")
        ticket = Ticket(prompt_ids, params)
        self.waiting.append(ticket)
        self._wake.set()
        return ticket

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drop_cancelled_waiting()
            if self._closing and not self.waiting and not self._running:
                return
            if not self.waiting or self.active >= self.max_concurrency or len(self._running) >= self.max_batches:
                continue
            if self.batch_wait_s > 0 and len(self.waiting) < self.max_concurrency - self.active:
                await asyncio.sleep(self.batch_wait_s)  # let the rest of a burst arrive
                self._drop_cancelled_waiting()
            free = self.max_concurrency - self.active
            batch, self.waiting = self.waiting[:free], self.waiting[free:]
            if not batch:
                continue
            for t in batch:
                t.started = True
                self._started.add(t)
            self.active += len(batch)
            self.batches_run += 1
            fut = self._loop.run_in_executor(self._pool, self._run_batch, batch)
            self._running.add(fut)
            fut.add_done_callback(self._batch_done)
            if self.waiting:
                self._wake.set()

    def _drop_cancelled_waiting(self) -> None:
        keep = []
        for t in self.waiting:
            if t.cancelled:
                t.finished = True
                t.events.put_nowait(None)  # nothing was generated
            else:
                keep.append(t)
        self.waiting = keep

    def _batch_done(self, fut) -> None:
        self._running.discard(fut)
        self._wake.set()

    def _run_batch(self, batch: list[Ticket]) -> None:
        """Worker thread: drive one ``Engine.stream`` and forward its events to the loop."""
        post = self._loop.call_soon_threadsafe
        try:
            events = self.engine.stream([t.prompt_ids for t in batch], [t.params for t in batch],
                                        cancelled=lambda i: batch[i].cancelled)
            for ev in events:
                post(self._deliver, batch[ev.index], ev)
        except Exception as exc:  # an engine failure ends this batch's requests with a 500
            err = EngineFailed(f"{type(exc).__name__}: {exc}")
            for t in batch:
                post(self._deliver, t, err)
        else:
            for t in batch:  # an engine that ended without a final event for a sequence
                post(self._deliver, t, EngineFailed("the engine ended a sequence without a finish reason"))

    def _deliver(self, ticket: Ticket, event) -> None:
        if ticket.finished:
            return
        final = isinstance(event, Exception) or event.finish_reason is not None
        ticket.events.put_nowait(event)
        if final:
            ticket.finished = True
            self._started.discard(ticket)
            self.active -= 1
            self._wake.set()

    async def close(self, timeout_s: float) -> None:
        """Cancel whatever is still queued or running, wait for the workers, stop the task."""
        self._closing = True
        for t in self.waiting + list(self._started):
            t.cancel()
        self._wake.set()
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout_s)
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout=timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
