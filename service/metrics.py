"""Prometheus metrics, one registry per app (``create_app`` can be called many times, e.g. in tests).

With several worker processes (``mtrank serve --workers N``) the metrics are in prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set before the workers start, every process
writes its values to files there, and ``/metrics`` (whichever worker answers) adds up the counters
and histograms of all of them. Gauges are combined per their ``multiprocess_mode``: one sample per
live worker (``pid`` label) for the served model, the sum for requests in flight, the worst for the
feature store's health.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when this process is in it."""
    return os.environ.get(MULTIPROC_ENV) or None


# /rank takes a few milliseconds: resolve 0.5 ms .. 1 s
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

RANK_OUTCOMES = ("ok", "invalid", "unavailable", "shed", "error")
DEGRADED_REASONS = (
    "timeout",
    "connection",
    "breaker_open",
    "error",
    "layout_mismatch",
    "meta_missing",
    "evicted",
    "unknown_rate",
    "history_malformed",
    "history_missing",
)
EVENT_OUTCOMES = ("accepted", "duplicate")
STORE_PROBLEMS = ("meta_missing", "evicted")


class Metrics:
    def __init__(self) -> None:
        self._multiproc = multiprocess_dir()
        self._model_labels: list[tuple[str, str]] = []
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "mtrank_request_seconds",
            "Total /rank handling time: body read, validation, feature fetch, forward, response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feature_fetch_seconds = Histogram(
            "mtrank_feature_fetch_seconds",
            "Feature store fetch of one /rank request (user + all candidates)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_forward_seconds = Histogram(
            "mtrank_model_forward_seconds",
            "Encode + model forward + score combination of one /rank request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rank_requests = Counter(
            "mtrank_rank_requests", "/rank requests by outcome", ["outcome"], registry=r
        )
        self.candidates_scored = Counter("mtrank_candidates_scored", "Candidates scored", registry=r)
        self.unknown_users = Counter(
            "mtrank_unknown_users", "Requests whose user is not in the feature store", registry=r
        )
        self.unknown_videos = Counter(
            "mtrank_unknown_videos",
            "Candidates not in the feature store (served default features)",
            registry=r,
        )
        self.degraded_requests = Counter(
            "mtrank_degraded_requests",
            "Requests answered with default features because the feature store failed",
            ["reason"],
            registry=r,
        )
        self.model_reloads = Counter(
            "mtrank_model_reload", "Model (re)load attempts by result", ["result"], registry=r
        )
        self.model_info = Gauge(
            "mtrank_model_info",
            "The model being served (value 1; with workers one sample per worker, 0 for a version it "
            "no longer serves)",
            ["version", "arch"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_loaded_timestamp = Gauge(
            "mtrank_model_loaded_timestamp_seconds",
            "When the served model was activated",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.in_flight = Gauge(
            "mtrank_in_flight_requests",
            "/rank requests admitted and not answered yet (all workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_problem = Gauge(
            "mtrank_feature_store_problem",
            "1 while the feature store has this data problem (wiped, evicted): the service is not ready",
            ["problem"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.store_sample_present = Gauge(
            "mtrank_feature_store_sampled_keys_present_ratio",
            "Share of the entity keys sampled at materialisation that exist in Redis (last check)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.unknown_rate = Gauge(
            "mtrank_unknown_rate",
            "Unknown users / videos (no row in the feature store) over the last window of requests",
            ["group"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.events = Counter(
            "mtrank_events",
            "Events of POST /events: accepted (new) or duplicate (an event id seen before)",
            ["result"],
            registry=r,
        )
        self.events_requests = Counter(
            "mtrank_events_requests", "POST /events requests by outcome", ["outcome"], registry=r
        )
        self.history_events = Counter(
            "mtrank_history_events", "Events appended to a user history, by history", ["history"], registry=r
        )
        for problem in STORE_PROBLEMS:
            self.store_problem.labels(problem).set(0)
        for group in ("user", "video"):  # NaN until a window of requests is complete (Redis store)
            self.unknown_rate.labels(group).set(float("nan"))
        self.store_sample_present.set(float("nan"))
        for outcome in RANK_OUTCOMES:
            self.rank_requests.labels(outcome)
        for reason in DEGRADED_REASONS:
            self.degraded_requests.labels(reason)
        for result in ("ok", "error"):
            self.model_reloads.labels(result)
        for result in EVENT_OUTCOMES:
            self.events.labels(result)
        for outcome in RANK_OUTCOMES:
            self.events_requests.labels(outcome)

    def set_model(self, version: str, arch: str, loaded_at: float) -> None:
        if self._multiproc is None:
            self.model_info.clear()
        else:  # values live in files there, clear() would not drop them: the old version goes to 0
            for old in self._model_labels:
                self.model_info.labels(*old).set(0)
        self._model_labels = [(version, arch)]
        self.model_info.labels(version, arch).set(1)
        self.model_loaded_timestamp.set(loaded_at)

    def set_store_health(self, problem: str | None, present: float | None, rates: dict[str, float]) -> None:
        for p in STORE_PROBLEMS:
            self.store_problem.labels(p).set(1 if p == problem else 0)
        self.store_sample_present.set(present if present is not None else float("nan"))
        for group, rate in rates.items():
            self.unknown_rate.labels(group).set(rate)

    def render(self) -> tuple[bytes, str]:
        if self._multiproc is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()  # every worker's values, from the shared directory
        MultiProcessCollector(registry, path=self._multiproc)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This worker stops: its live gauges leave the multiprocess view."""
        if self._multiproc is not None:
            mark_process_dead(os.getpid(), self._multiproc)  # type: ignore[no-untyped-call]
