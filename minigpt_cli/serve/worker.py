"""The engine on its own thread, and the bridge that carries its events into asyncio.

The HTTP side never runs the model: it queues sequences and awaits their events. The engine
thread steps continuously, so a slow client only fills its own queue and stalls nobody.
"""

from __future__ import annotations

import asyncio
import threading

from minigpt_cli.engine import Engine, Sequence, TokenEvent
from minigpt_cli.serve.metrics import Metrics

SHUTDOWN = "the server is shutting down"


class Worker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = Metrics(engine.counts)
        engine.on_step = self.metrics.batch.observe
        self._stop = threading.Event()
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

        def on_event(seq: Sequence, event: TokenEvent) -> None:  # on the engine thread
            self.metrics.on_token(seq, event)
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, (seq, event))

        for seq in seqs:
            seq.on_event = on_event
        self.engine.add(*seqs)
        return events

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if not seq.finished:
                self.engine.cancel(seq)
