"""Prometheus metrics, named like vLLM's so existing dashboards read them.

Each app has its own registry (tests start several servers in one process). Latencies are
observed on the engine thread the moment a token is sampled, not when the client reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from minigpt_cli.inference.engine import Sequence, TokenEvent

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        r = self.registry = CollectorRegistry()
        running = Gauge("minigpt_num_requests_running", "Requests in a KV-cache slot now",
                        registry=r)
        waiting = Gauge("minigpt_num_requests_waiting", "Requests queued for a slot", registry=r)
        running.set_function(lambda: counts()[0])
        waiting.set_function(lambda: counts()[1])
        self.ttft = Histogram("minigpt_time_to_first_token_seconds",
                              "Arrival to first sampled token", buckets=LATENCY, registry=r)
        self.itl = Histogram("minigpt_inter_token_latency_seconds",
                             "Between consecutive tokens of one request", buckets=LATENCY,
                             registry=r)
        self.e2e = Histogram("minigpt_e2e_request_latency_seconds",
                             "Arrival to the last token", buckets=LATENCY, registry=r)
        self.batch = Histogram("minigpt_batch_size", "Sequences computed per engine step",
                               buckets=BATCH, registry=r)
        self.generated = Counter("minigpt_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("minigpt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.cached = Counter("minigpt_prompt_tokens_cached", "Prompt tokens a slot's cache "
                              "held already (prefix reuse), not computed", registry=r)
        self.joined = Counter("minigpt_requests_joined_mid_step", "Requests that started in "
                              "a step already under way (--join-mid-step)", registry=r)
        self.finished = Counter("minigpt_request_success", "Finished requests by reason",
                                ["finish_reason"], registry=r)
        self.drafted = Counter("minigpt_spec_draft_tokens", "Draft tokens verified (prompt "
                               "lookup or a draft model)", registry=r)
        self.accepted = Counter("minigpt_spec_accepted_tokens", "Draft tokens kept (acceptance "
                                "rate = accepted / draft)", registry=r)
        self.verifies = Counter("minigpt_spec_verify_steps", "Steps that verified drafts "
                                "(tokens per verify step = generated / verify steps)",
                                registry=r)
        self._last: dict[int, float] = {}

    def on_token(self, seq: Sequence, event: TokenEvent) -> None:
        """Called on the engine thread for every event of every request; first-token and
        finish times are the engine's own stamps on the sequence."""
        now = time.perf_counter()
        if event.finish_reason != "error" and event.token >= 0:
            self.generated.inc()
            last = self._last.get(seq.id)
            if last is None and seq.first_token_at is not None:
                self.ttft.observe(seq.first_token_at - seq.arrival)
                self.prompt.inc(len(seq.prompt))
                self.cached.inc(seq.cached_tokens)
                if seq.joined_mid_step:
                    self.joined.inc()
            elif last is not None:
                self.itl.observe(now - last)
            self._last[seq.id] = now
        if event.finish_reason is not None:
            self._last.pop(seq.id, None)
            self.e2e.observe((seq.finished_at or now) - seq.arrival)
            self.finished.labels(finish_reason=event.finish_reason).inc()
            self.drafted.inc(seq.drafted)
            self.accepted.inc(seq.accepted)
            self.verifies.inc(seq.verifies)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
