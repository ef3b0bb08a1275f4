"""Service metrics in Prometheus text format: requests, errors, latency histogram, tokens, routed tokens per
adapter. Thread-safe; no dependency beyond the standard library."""
from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # endpoint -> completed requests
        self.errors = defaultdict(int)  # (endpoint, status) -> count
        self.buckets = defaultdict(lambda: [0] * len(BUCKETS))  # endpoint -> cumulative counts per bucket
        self.lat_sum = defaultdict(float)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.routed = defaultdict(float)  # adapter -> generated tokens routed to it (share-weighted)
        self.outside = 0  # routing decisions outside a request's allowed set (the isolation invariant: 0)

    def done(self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int,
             routing: dict[str, float], outside: int = 0) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.lat_sum[endpoint] += seconds
            b = self.buckets[endpoint]
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    b[i] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.outside += outside
            for name, share in routing.items():
                self.routed[name] += share * (prompt_tokens + completion_tokens)

    def error(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.errors[(endpoint, status)] += 1

    def render(self) -> str:
        with self._lock:
            out = ["# HELP seqr_requests_total Completed generation requests.", "# TYPE seqr_requests_total counter"]
            out += [f'seqr_requests_total{{endpoint="{e}"}} {n}' for e, n in sorted(self.requests.items())]
            out += ["# HELP seqr_errors_total Requests answered with an error status.",
                    "# TYPE seqr_errors_total counter"]
            out += [f'seqr_errors_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.errors.items())]
            out += ["# HELP seqr_request_seconds Latency of completed requests.",
                    "# TYPE seqr_request_seconds histogram"]
            for e in sorted(self.requests):
                out += [f'seqr_request_seconds_bucket{{endpoint="{e}",le="{edge:g}"}} {c}'
                        for edge, c in zip(BUCKETS, self.buckets[e])]
                out += [f'seqr_request_seconds_bucket{{endpoint="{e}",le="+Inf"}} {self.requests[e]}',
                        f'seqr_request_seconds_sum{{endpoint="{e}"}} {self.lat_sum[e]:.6f}',
                        f'seqr_request_seconds_count{{endpoint="{e}"}} {self.requests[e]}']
            out += ["# TYPE seqr_prompt_tokens_total counter", f"seqr_prompt_tokens_total {self.prompt_tokens}",
                    "# TYPE seqr_completion_tokens_total counter",
                    f"seqr_completion_tokens_total {self.completion_tokens}",
                    "# HELP seqr_routed_tokens_total Tokens routed to each adapter (share of decisions x tokens).",
                    "# TYPE seqr_routed_tokens_total counter"]
            out += [f'seqr_routed_tokens_total{{adapter="{a}"}} {v:.3f}' for a, v in sorted(self.routed.items())]
            out += ["# HELP seqr_routed_outside_total Routing decisions outside the request's allowed set (always 0).",
                    "# TYPE seqr_routed_outside_total counter", f"seqr_routed_outside_total {self.outside}"]
            return "\n".join(out) + "\n"
