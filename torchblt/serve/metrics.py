"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

``blt_requests_total{endpoint, status}``, ``blt_prompt_bytes_total``, ``blt_generated_bytes_total``,
``blt_queue_depth`` (requests waiting), ``blt_running_rows`` (rows decoding now), ``blt_prefilling_rows``
(rows whose prompt is being prefilled), ``blt_engine_batches``
(batches the engine steps per byte: 1, every running row in one batch), ``blt_cache_bytes``,
``blt_scheduler_seconds_total{phase}`` (where the scheduler thread's time goes),
``blt_prefill_thread_seconds_total`` (time the prefill thread spent prefilling, when it runs), and the histograms ``blt_time_to_first_byte_seconds``
(request arrival to its first new byte) and ``blt_inter_byte_latency_seconds`` (between two new bytes of
one completion).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("blt_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_bytes = Counter("blt_prompt_bytes", "Prompt bytes prefilled (once per choice)", registry=r)
        self.generated_bytes = Counter("blt_generated_bytes", "New bytes generated", registry=r)
        self.queue_depth = Gauge("blt_queue_depth", "Requests waiting for a decoding slot", registry=r)
        self.running_rows = Gauge("blt_running_rows", "Rows (completions) decoding now", registry=r)
        self.prefilling_rows = Gauge("blt_prefilling_rows", "Rows whose prompt is being prefilled (chunk by chunk)",
                                     registry=r)
        self.batches = Gauge("blt_engine_batches", "Batches the engine steps per byte (1: every running row in one batch)", registry=r)
        self.scheduler_seconds = Counter(
            "blt_scheduler_seconds", "Time the scheduler thread spent, by phase of its ticks: admit (leave, score, "
            "queue), prefill, sample (and stop checks, text), step (the engine), deliver (events to the event loop)",
            ["phase"], registry=r)
        self.prefill_thread_seconds = Counter(
            "blt_prefill_thread_seconds", "Time the prefill thread spent prefilling prompts (--prefill-thread)",
            registry=r)
        self.cache_bytes = Gauge("blt_cache_bytes", "Bytes held by the decoding caches", registry=r)
        self.ttfb = Histogram("blt_time_to_first_byte_seconds", "Request arrival to its first new byte",
                              buckets=_TTFB_BUCKETS, registry=r)
        self.inter_byte = Histogram("blt_inter_byte_latency_seconds", "Time between two new bytes of a completion",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
