"""Prometheus metrics in the text exposition format (0.0.4), written by hand.

Updated from the event loop and the generation thread, so every update takes one lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

Labels = tuple[tuple[str, str], ...]


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels:
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{key}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self._values.items()) or [((), 0.0)]:
            yield f"{self.name}{_format_labels(labels)} {_format_value(value)}"


class Gauge:
    """A gauge read from a callback at scrape time (the engine owns the number)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        self.name, self.help, self._read = name, help_text, read

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_format_value(self._read())}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help_text
        self._bounds = tuple(buckets) + (math.inf,)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self._bounds):
            if value <= bound:
                self._counts[i] += 1
                break
        self._sum += value
        self._count += 1

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        cumulative = 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            yield f'{self.name}_bucket{{le="{_format_value(bound)}"}} {cumulative}'
        yield f"{self.name}_sum {_format_value(self._sum)}"
        yield f"{self.name}_count {self._count}"


class ServerMetrics:
    """All of swan-serve's metrics; gauges read the engine through callbacks."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        active_sequences: Callable[[], float],
        prefix_cache_bytes: Callable[[], float] = lambda: 0,
        prefix_cache_entries: Callable[[], float] = lambda: 0,
    ):
        self._lock = threading.Lock()
        self.requests = Counter("swan_requests_total", "HTTP requests by route and status code.")
        self.prompt_tokens = Counter("swan_prompt_tokens_total", "Prompt tokens admitted.")
        self.generation_tokens = Counter("swan_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("swan_sequences_finished_total", "Sequences ended, by reason.")
        self.prefix_cache_queries = Counter(
            "swan_prefix_cache_queries_total", "Prompt prefix-cache lookups."
        )
        self.prefix_cache_hits = Counter(
            "swan_prefix_cache_hits_total", "Prompt prefix-cache lookups that found a prefix."
        )
        self.prefix_cache_misses = Counter(
            "swan_prefix_cache_misses_total", "Prompt prefix-cache lookups that found nothing."
        )
        self.prefix_cache_hit_tokens = Counter(
            "swan_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache."
        )
        self.prefix_cache_evictions = Counter(
            "swan_prefix_cache_evictions_total", "States evicted from the prefix cache."
        )
        self.prefix_cache_tier_hits = Counter(
            "swan_prefix_cache_tier_hits_total",
            "Prompt prefix-cache hits by the tier that gave the state (memory or disk).",
        )
        self.prefix_cache_spills = Counter(
            "swan_prefix_cache_spills_total", "States written to disk as memory evicted them."
        )
        self.prefix_cache_load_seconds = Histogram(
            "swan_prefix_cache_load_seconds", "Time to read a state from disk (its count: "
            "the loads).", _LATENCY_BUCKETS,
        )
        self.prefix_lookahead_tokens = Counter(
            "swan_prefix_lookahead_tokens_total",
            "Turn-separator tokens computed ahead onto finished chat turns while idle.",
        )
        self.adapter_seconds = Counter(
            "swan_request_to_engine_seconds_total",
            "Time from a chat request's arrival to its submission to the engine (body, "
            "translation, prompt, constraints), by API route.",
        )
        self.adapter_requests = Counter(
            "swan_request_to_engine_total", "Chat requests submitted to the engine, by route."
        )
        self.ttft = Histogram(
            "swan_time_to_first_token_seconds", "Request arrival to first token.",
            _LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "swan_time_per_output_token_seconds", "Mean time per output token after the first.",
            _TOKEN_TIME_BUCKETS,
        )
        self.latency = Histogram(
            "swan_request_duration_seconds", "Request arrival to last token.", _LATENCY_BUCKETS
        )
        self._gauges = [
            Gauge("swan_queue_depth", "Sequences waiting for a decode slot.", queue_depth),
            Gauge("swan_active_sequences", "Sequences in the running batch.", active_sequences),
            Gauge("swan_prefix_cache_bytes", "Bytes of KV states the prefix cache holds.",
                  prefix_cache_bytes),
            Gauge("swan_prefix_cache_entries", "KV states the prefix cache holds.",
                  prefix_cache_entries),
        ]

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.append(Gauge(name, help_text, read))

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests.inc(route=route, status=str(status))

    def count_prompt(self, tokens: int, cached_tokens: int, tier: str | None = None) -> None:
        with self._lock:
            self.prompt_tokens.inc(tokens)
            self.prefix_cache_queries.inc()
            if cached_tokens:
                self.prefix_cache_hits.inc()
                self.prefix_cache_tier_hits.inc(tier=tier or "memory")
                self.prefix_cache_hit_tokens.inc(cached_tokens)
            else:
                self.prefix_cache_misses.inc()

    def count_adapter(self, route: str, seconds: float) -> None:
        with self._lock:
            self.adapter_seconds.inc(seconds, route=route)
            self.adapter_requests.inc(route=route)

    def count_prefix_eviction(self) -> None:
        with self._lock:
            self.prefix_cache_evictions.inc()

    def count_prefix_spill(self) -> None:
        with self._lock:
            self.prefix_cache_spills.inc()

    def prefix_load(self, seconds: float) -> None:
        with self._lock:
            self.prefix_cache_load_seconds.observe(seconds)

    def count_lookahead(self, tokens: int) -> None:
        with self._lock:
            self.prefix_lookahead_tokens.inc(tokens)

    def count_tokens(self, tokens: int) -> None:
        with self._lock:
            self.generation_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def sequence_finished(
        self, reason: str, total_seconds: float, decode_seconds: float, tokens: int
    ) -> None:
        with self._lock:
            self.finished.inc(reason=reason)
            self.latency.observe(total_seconds)
            if tokens > 1:
                self.tpot.observe(decode_seconds / (tokens - 1))

    def render(self) -> str:
        families = [
            self.requests, self.prompt_tokens, self.generation_tokens, self.finished,
            self.prefix_cache_queries, self.prefix_cache_hits, self.prefix_cache_misses,
            self.prefix_cache_hit_tokens, self.prefix_cache_evictions,
            self.prefix_cache_tier_hits, self.prefix_cache_spills, self.prefix_cache_load_seconds,
            self.prefix_lookahead_tokens, self.adapter_seconds, self.adapter_requests,
            self.ttft, self.tpot, self.latency,
        ]
        with self._lock:
            lines = [line for family in families for line in family.lines()]
        for gauge in self._gauges:
            lines.extend(gauge.lines())
        return "\n".join(lines) + "\n"
