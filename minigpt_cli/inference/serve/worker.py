"""The engine on its own thread, and the bridge that carries its events into asyncio.

The HTTP side never runs the model: it queues sequences and awaits their events. The engine
thread steps continuously, so a slow client only fills its own queue and stalls nobody.
"""

from __future__ import annotations

import asyncio
import threading

from minigpt_cli.inference.engine import Engine, Sequence, TokenEvent
from minigpt_cli.inference.serve.metrics import Metrics

SHUTDOWN = "the server is shutting down"


class Worker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = Metrics(engine.counts)
        engine.on_step = self.metrics.batch.observe
        self._stop = threading.Event()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="minigpt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.engine.serve_forever(self._stop)
        finally:  # every open request ends with an error event; none is left hanging
            self.engine.abort_all(SHUTDOWN)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> None:
        """Safe from a signal handler: only sets a flag the engine thread reads."""
        self._stop.set()

    def join(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.engine.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, seqs: list[Sequence]) -> asyncio.Queue[tuple[Sequence, TokenEvent]]:
        """Queue `seqs` on the engine (all or none: QueueFull); their events arrive on the
        returned queue, in order, on the calling event loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Sequence, TokenEvent]] = asyncio.Queue()
        for seq in seqs:
            seq.on_event = self._on_event
        self._queues.update({seq.id: (loop, events) for seq in seqs})
        try:
            self.engine.add(*seqs)
        except Exception:
            for seq in seqs:
                self._queues.pop(seq.id, None)
            raise
        return events

    def _on_event(self, seq: Sequence, event: TokenEvent) -> None:
        """On the engine thread. Events are handed to the event loop in batches: one wake-up
        per engine step carries every token of that step, not one wake-up per token."""
        self.metrics.on_token(seq, event)
        target = self._queues.get(seq.id)
        if target is None:
            return
        if event.finish_reason is not None:
            del self._queues[seq.id]
        loop, queue = target
        with self._pending_lock:
            batch = self._pending.setdefault(loop, [])
            batch.append((queue, seq, event))
            if len(batch) > 1:
                return  # a delivery to this loop is already scheduled
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, loop)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            batch = self._pending.pop(loop, [])
        for queue, seq, event in batch:
            queue.put_nowait((seq, event))

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if not seq.finished:
                self.engine.cancel(seq)
