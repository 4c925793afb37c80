"""Load test for POST /rank, with feedback through POST /events.

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:8000

Each simulated user posts realistic ranking requests (KuaiRand-Pure user ids, 100-1000 Zipf-popular
candidate videos, random tab/hour context) and checks every response: HTTP 200, model_version present,
ranks 1..n, items sorted by score descending, the candidate ids returned exactly once. A share of the
rankings is followed by a POST /events of one to three of the top items (fresh event ids: every one
must be accepted), which the next ranking of that user sees. The run exits non-zero if any request
failed or the overall p99 latency (both endpoints) exceeds the SLO.

Environment:
    MTRANK_DATA_DIR             KuaiRand-Pure directory (user/video tables); id ranges are used if absent
    MTRANK_LOADTEST_CANDIDATES  fixed candidate-list size (default: uniform 100..1000 per request)
    MTRANK_LOADTEST_TOP_K       send this top_k with every request (default: none, full ranking)
    MTRANK_LOADTEST_ZIPF_S      Zipf exponent of video popularity (default 1.0)
    MTRANK_LOADTEST_SEED        seed of the popularity order and of per-user request streams (default 0)
    MTRANK_SLO_P99_MS           p99 latency SLO in ms (default 100; also --slo-p99-ms)
    MTRANK_LOADTEST_USER_RPS    requests/s each simulated user sends, as Poisson arrivals (open-loop
                                pacing: exponential gaps between scheduled starts, so users do not
                                fire in lock-step bursts); unset: a random 10-100 ms pause after each
    MTRANK_LOADTEST_SUMMARY     write the final totals (the stats the verdict is taken on) to this
                                JSON file: requests, failures, requests/s, p50/p95/p99/max in ms, and
                                the /rank and /events request counts
    MTRANK_LOADTEST_EVENT_SHARE share of rankings followed by a POST /events (default 0.2; 0 = none)
    MTRANK_LOADTEST_EVENT_LABELS labels of an event and the probability of each being 1
                                (default "long_view:0.3,is_like:0.02")
    MTRANK_EVENTS_TOKEN         bearer token of /events, when the service requires one
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, between, events, task
from locust.runners import WorkerRunner

# The helpers live beside this file (locust itself puts this directory on sys.path while importing the
# locustfile; do the same for any other importer, e.g. importlib from a path).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from workload import (  # noqa: E402
    DEFAULT_EVENT_LABELS,
    ZipfSampler,
    build_events,
    build_request,
    candidate_count,
    env_float,
    env_int,
    load_catalog,
    parse_event_labels,
    slo_violations,
    validate_events_response,
    validate_response,
)

log = logging.getLogger("mtrank.loadtest")

DEFAULT_SLO_P99_MS = env_float("MTRANK_SLO_P99_MS", 100.0)
FIXED_CANDIDATES = env_int("MTRANK_LOADTEST_CANDIDATES")
TOP_K = env_int("MTRANK_LOADTEST_TOP_K")
SEED = env_int("MTRANK_LOADTEST_SEED") or 0
USER_RPS = env_float("MTRANK_LOADTEST_USER_RPS", 0.0)
EVENT_SHARE = env_float("MTRANK_LOADTEST_EVENT_SHARE", 0.2)
EVENT_LABELS = parse_event_labels(os.environ.get("MTRANK_LOADTEST_EVENT_LABELS") or DEFAULT_EVENT_LABELS)
EVENTS_TOKEN = os.environ.get("MTRANK_EVENTS_TOKEN", "").strip()
RUN_ID = uuid.uuid4().hex[:12]  # event ids are fresh in every run, whatever the store remembers
if not 0 <= EVENT_SHARE <= 1:
    raise ValueError(f"MTRANK_LOADTEST_EVENT_SHARE must be in 0..1, got {EVENT_SHARE}")

CATALOG = load_catalog(seed=SEED)
VIDEOS = ZipfSampler(CATALOG.videos, s=env_float("MTRANK_LOADTEST_ZIPF_S", 1.0))
if FIXED_CANDIDATES is not None and not 0 < FIXED_CANDIDATES <= len(VIDEOS):
    raise ValueError(f"MTRANK_LOADTEST_CANDIDATES must be in 1..{len(VIDEOS)}, got {FIXED_CANDIDATES}")
_user_seq = itertools.count()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--slo-p99-ms",
        type=float,
        default=DEFAULT_SLO_P99_MS,
        env_var="MTRANK_SLO_P99_MS",
        include_in_web_ui=True,
        help="Fail the run (exit code 1) if the overall p99 response time exceeds this many ms",
    )


@events.init.add_listener
def _on_init(environment: Any, **_kwargs: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        log.info(
            "rank load test: %d users, %d videos (%s); candidates=%s top_k=%s; events after %.0f%% "
            "of rankings",
            len(CATALOG.users),
            len(VIDEOS),
            CATALOG.source,
            FIXED_CANDIDATES or "uniform 100..1000",
            TOP_K,
            100 * EVENT_SHARE,
        )


@events.quitting.add_listener
def _check_slo(environment: Any, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # only the master (or a standalone runner) sees the aggregated stats
    options = environment.parsed_options
    slo = getattr(options, "slo_p99_ms", None)
    slo = DEFAULT_SLO_P99_MS if slo is None else slo
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0
    if summary := os.environ.get("MTRANK_LOADTEST_SUMMARY"):
        pct = {f"p{round(q * 100)}_ms": total.get_response_time_percentile(q) or 0 for q in (0.5, 0.95, 0.99)}
        final = {"requests": total.num_requests, "failures": total.num_failures, **pct}
        final |= {"max_ms": total.max_response_time or 0, "requests_per_s": total.total_rps}
        for name in ("/rank", "/events"):
            final[f"{name[1:]}_requests"] = environment.stats.get(name, "POST").num_requests
        Path(summary).write_text(json.dumps(final, indent=1) + "\n")
    reasons = slo_violations(total.num_requests, total.fail_ratio, p99, slo)
    if reasons:
        log.error("load test FAILED: %s", "; ".join(reasons))
        environment.process_exit_code = 1
    else:
        log.info(
            "load test passed: %d requests, 0 failures, p99 %d ms <= SLO %g ms", total.num_requests, p99, slo
        )
        environment.process_exit_code = 0


class RankUser(FastHttpUser):
    # total rate = users x MTRANK_LOADTEST_USER_RPS, e.g. 10 users x 5/s = 50 requests/s
    _pause = between(0.01, 0.1)

    def wait_time(self) -> float:
        """Poisson pacing: the next request starts an Exp(1/rate) gap after the previous *start*.

        (A fixed-interval pacing started at the same instant keeps all users in phase: the server
        then sees bursts of `users` simultaneous requests instead of a steady stream.)
        """
        if USER_RPS <= 0:
            return float(self._pause())
        now = time.monotonic()
        self._next_start = max(self._next_start, now - 1.0) + float(self.rng.exponential(1.0 / USER_RPS))
        return max(0.0, self._next_start - now)

    def on_start(self) -> None:
        # One independent, reproducible request stream per simulated user (and per worker process when
        # running distributed, so workers do not replay each other's requests).
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.index = next(_user_seq)
        self.rng = np.random.default_rng([SEED, worker, self.index])
        self._next_start = time.monotonic()
        self._sent = 0
        self._id = f"{RUN_ID}-{worker}-{self.index}"

    @task
    def rank(self) -> None:
        n = candidate_count(self.rng, FIXED_CANDIDATES)
        payload = build_request(self.rng, CATALOG.users, VIDEOS, n, top_k=TOP_K)
        with self.client.post("/rank", json=payload, name="/rank", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                body = resp.json()
            except ValueError as exc:
                resp.failure(f"response is not JSON: {exc}")
                return
            error = validate_response(payload, body)
            if error is None:
                resp.success()
            else:
                resp.failure(error)
                return
        if EVENT_SHARE > 0 and self.rng.random() < EVENT_SHARE:
            self._sent += 1
            events = build_events(
                self.rng, payload, body, EVENT_LABELS, time.time() * 1000, f"{self._id}-{self._sent}"
            )
            self.post_events(events)

    def post_events(self, events: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {EVENTS_TOKEN}"} if EVENTS_TOKEN else None
        with self.client.post(
            "/events", json=events, headers=headers, name="/events", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                body = resp.json()
            except ValueError as exc:
                resp.failure(f"response is not JSON: {exc}")
                return
            error = validate_events_response(events, body)
            if error is None:
                resp.success()
            else:
                resp.failure(error)
