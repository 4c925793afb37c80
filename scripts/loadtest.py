"""`make loadtest`: a bounded, headless locust run against a real `mtrank serve` on loopback.

Starts the service (embedded feature store unless --redis-url), drives it at a fixed request rate
(users x per-user rate) with candidate lists of a fixed size, writes locust's CSV and HTML reports to
artifacts/loadtest/, records the server's CPU use and memory, stops everything and exits with locust's
verdict (non-zero on any failed request or a p99 above the SLO).

    python scripts/loadtest.py --rps 100 --candidates 500 --duration 60 --slo-p99-ms 100 --workers 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.serverctl import (  # noqa: E402
    MTRANK,
    delete_redis_keys,
    ensure_model,
    final_stats,
    run_locust,
    start_server,
    stop_server,
    tree_cpu_seconds,
    tree_rss_mb,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--rps", type=float, default=100.0, help="total requests/s")
    ap.add_argument("--users", type=int, default=10, help="simulated users (rate is split evenly)")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2, help="`mtrank serve --workers`")
    ap.add_argument("--duration", type=int, default=60, help="seconds (bounded run)")
    ap.add_argument("--slo-p99-ms", type=float, default=100.0)
    ap.add_argument(
        "--redis-url", default=None, help="serve from Redis (materialized first) instead of embedded"
    )
    ap.add_argument("--out", type=Path, default=None, help="reports folder (default: <artifacts>/loadtest)")
    a = ap.parse_args()
    a.out = a.out or a.artifacts / "loadtest"

    ensure_model(a.artifacts, a.config)
    env = {"MTRANK_FEATURE_STORE": "embedded"}
    if a.redis_url:
        env = {
            "MTRANK_FEATURE_STORE": "redis",
            "MTRANK_REDIS_URL": a.redis_url,
            "MTRANK_REDIS_PREFIX": "mtrank-loadtest:",
        }
        subprocess.run(
            [MTRANK, "materialize", "--artifacts", str(a.artifacts)], env={**os.environ, **env}, check=True
        )
    a.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(a.artifacts, env, workers=a.workers)
    try:
        cpu0, t0, rss0 = tree_cpu_seconds(proc.pid), time.perf_counter(), tree_rss_mb(proc.pid)
        verdict = run_locust(
            url,
            a.out / "run",
            duration=a.duration,
            users=a.users,
            rps=a.rps,
            candidates=a.candidates,
            slo_p99_ms=a.slo_p99_ms,
            html=a.out / "report.html",
        )
        wall = time.perf_counter() - t0
        cpu = (tree_cpu_seconds(proc.pid) - cpu0) / wall
        rss1 = tree_rss_mb(proc.pid)
    finally:
        stop_server(proc)
        if a.redis_url:
            delete_redis_keys(a.redis_url, env["MTRANK_REDIS_PREFIX"])

    total = final_stats(a.out / "run")
    events = total.get("events_requests", 0)
    print(
        f"\n/rank at {total['requests_per_s']:.1f} req/s, {a.candidates} candidates, {a.duration} s: "
        f"{total['requests']} requests ({events} of them /events), {total['failures']} failures, "
        f"p50 {total['p50_ms']} ms, p95 {total['p95_ms']} ms, p99 {total['p99_ms']} ms, max {total['max_ms']:.0f} ms; "
        f"server CPU {cpu * 100:.0f}% of one core ({a.workers} workers), RSS {rss0:.0f} -> {rss1:.0f} MB"
    )
    print(f"reports: {a.out}/run_stats.csv, {a.out}/report.html; verdict exit code {verdict}")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
