"""Service metrics in Prometheus text format (prometheus_client, one CollectorRegistry per Metrics, never the
global one): requests, errors, latency histogram, tokens, routed tokens per adapter.

Label sets are bounded: `endpoint` is one of the route templates given at construction (a path matching a
template with {placeholders}, e.g. /admin/adapters/gamma for /admin/adapters/{name}, counts under the template),
anything else under "other"; `status` is an HTTP status 100-599 as a string, else "other"; `adapter` is an
adapter name from the library. Label values are escaped by prometheus_client.

render() is everything (for an admin key); render_public() leaves out the per-adapter series (adapter names
are not for an unauthenticated scraper). Thread-safe: a scrape sees a request's counts all or not at all.
"""
from __future__ import annotations

import re
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/adapters", "/admin/adapters/{name}",
          "/admin/users/{user}", "/health", "/metrics")
OTHER = "other"


class _Series(Collector):
    """Some metrics' families without their *_created samples (start times: noise for this service, and the
    library only drops them process-wide)."""

    def __init__(self, *metrics):
        self.metrics = metrics

    def collect(self):
        for m in self.metrics:
            for fam in m.collect():
                fam.samples = [s for s in fam.samples if not s.name.endswith("_created")]
                yield fam


def _template_re(route: str) -> re.Pattern:
    parts = ["[^/]+" if re.fullmatch(r"\{[^/{}]*\}", seg) else re.escape(seg) for seg in route.split("/")]
    return re.compile("/".join(parts))


class Metrics:
    def __init__(self, routes: tuple[str, ...] = ROUTES):
        if isinstance(routes, str) or not all(isinstance(r, str) and r for r in routes):
            raise ValueError("routes must be a sequence of route templates (non-empty strings)")
        self.routes = tuple(dict.fromkeys(routes))
        self._exact = {r for r in self.routes if "{" not in r}
        self._templates = [(_template_re(r), r) for r in self.routes if "{" in r]
        self._lock = threading.Lock()
        self._requests = Counter("seqr_requests", "Completed generation requests.", ["endpoint"], registry=None)
        self._errors = Counter("seqr_errors", "Requests answered with an error status.", ["endpoint", "status"],
                               registry=None)
        self._latency = Histogram("seqr_request_seconds", "Latency of completed requests.", ["endpoint"],
                                  buckets=BUCKETS, registry=None)
        self._prompt = Counter("seqr_prompt_tokens", "Prompt tokens of completed requests.", registry=None)
        self._completion = Counter("seqr_completion_tokens", "Generated tokens of completed requests.",
                                   registry=None)
        self._routed = Counter("seqr_routed_tokens", "Tokens routed to each adapter (share of decisions x tokens).",
                               ["adapter"], registry=None)
        self._outside = Counter("seqr_routed_outside",
                                "Routing decisions outside the request's allowed set (always 0).", registry=None)
        public = (self._requests, self._errors, self._latency, self._prompt, self._completion, self._outside)
        self.registry = CollectorRegistry(auto_describe=True)  # everything: render()
        self.registry.register(_Series(*public, self._routed))
        self.public_registry = CollectorRegistry(auto_describe=True)  # all but per-adapter: render_public()
        self.public_registry.register(_Series(*public))

    def endpoint_label(self, endpoint) -> str:
        """The route template an endpoint (a path or a template) counts under, or "other"."""
        if not isinstance(endpoint, str):
            return OTHER
        if endpoint in self._exact:
            return endpoint
        for rx, route in self._templates:
            if endpoint == route or rx.fullmatch(endpoint):
                return route
        return OTHER

    @staticmethod
    def status_label(status) -> str:
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            return str(status)
        return OTHER

    def done(self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int,
             routing: dict[str, float], outside: int = 0) -> None:
        e = self.endpoint_label(endpoint)
        tokens = prompt_tokens + completion_tokens
        with self._lock:
            self._requests.labels(e).inc()
            self._latency.labels(e).observe(seconds)
            self._prompt.inc(max(0, prompt_tokens))
            self._completion.inc(max(0, completion_tokens))
            self._outside.inc(max(0, outside))
            for name, share in routing.items():
                self._routed.labels(str(name)).inc(max(0.0, share * tokens))

    def error(self, endpoint: str, status: int) -> None:
        e, s = self.endpoint_label(endpoint), self.status_label(status)
        with self._lock:
            self._errors.labels(e, s).inc()

    def render(self) -> str:
        """Every series, per-adapter routed tokens included (serve it to admins)."""
        with self._lock:
            return generate_latest(self.registry).decode()

    def render_public(self) -> str:
        """Every series except the per-adapter ones (safe for an unauthenticated scraper)."""
        with self._lock:
            return generate_latest(self.public_registry).decode()
