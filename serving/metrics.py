"""`GET /metrics`: the server's Prometheus metrics (prometheus-client, text format), in a registry of the app's
own - requests by route and status, request latency and time to first token histograms, tokens generated, and
the rows each model is decoding and has waiting."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# seconds: from a token's time at the small size on a CPU to a long summary of the 124M model
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RowsCollector:
    """The rows each model is decoding and has waiting, read when scraped."""

    def __init__(self, models):
        self.models = models

    def collect(self):
        running = GaugeMetricFamily("serve_running_rows", "Rows being decoded", labels=["model"])
        waiting = GaugeMetricFamily("serve_waiting_rows", "Rows submitted and not yet admitted to a batch", labels=["model"])
        for name, engine in self.models.engines.items():
            running.add_metric([name], engine.running)
            waiting.add_metric([name], engine.waiting)
        yield running
        yield waiting


class Metrics:
    def __init__(self, models):
        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("serve_request_seconds", "Time from a request's arrival to the end of its response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "Time from a row's submission to its first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("serve_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.registry.register(RowsCollector(models))

    def request_done(self, route: str, method: str, status: int, seconds: float):
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def rows_done(self, model: str, results):
        for r in results:
            self.tokens.labels(model).inc(r.generated)
            if r.ttft is not None:
                self.ttft.labels(model).observe(r.ttft)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
