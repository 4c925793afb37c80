"""`make soak`: a bounded locust soak against a real `mtrank serve`, watching for memory growth.

Runs the load test for --duration seconds (default 300) at a fixed rate, samples the server's RSS
every few seconds, and fails (exit 1) on any failed request, a p99 above the SLO, or RSS growth of
more than --max-growth (default 10%) between the end of the warm-up and the end of the run.

    python scripts/soak.py --duration 300 --rps 30 --candidates 500
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.serverctl import (  # noqa: E402
    ensure_model,
    final_stats,
    rss_mb,
    run_locust,
    start_server,
    stop_server,
)

SAMPLE_EVERY_S = 5.0  # RSS sampling period


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--duration", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30, help="seconds before the RSS baseline is taken")
    ap.add_argument("--rps", type=float, default=30.0)
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--slo-p99-ms", type=float, default=100.0)
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--out", type=Path, default=None, help="reports folder (default: <artifacts>/soak)")
    a = ap.parse_args()
    a.out = a.out or a.artifacts / "soak"
    if a.duration < a.warmup + 2 * SAMPLE_EVERY_S:  # the memory verdict needs two samples after warm-up
        ap.error(f"--duration must be at least --warmup + {2 * SAMPLE_EVERY_S:g} s")

    ensure_model(a.artifacts, a.config)
    a.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(a.artifacts, {"MTRANK_FEATURE_STORE": "embedded"})
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.wait(SAMPLE_EVERY_S):
            samples.append((time.perf_counter() - t0, rss_mb(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        verdict = run_locust(
            url,
            a.out / "soak",
            duration=a.duration,
            users=a.users,
            rps=a.rps,
            candidates=a.candidates,
            slo_p99_ms=a.slo_p99_ms,
        )
    finally:
        stop.set()
        sampler.join(10)
        stop_server(proc)

    base = [r for t, r in samples if t >= a.warmup]
    growth = (base[-1] - base[0]) / base[0] if len(base) >= 2 else float("nan")
    total = final_stats(a.out / "soak")
    (a.out / "rss.json").write_text(json.dumps(samples))
    ok_mem = growth <= a.max_growth
    print(
        f"\nsoak {a.duration} s at {total['requests_per_s']:.1f} req/s x {a.candidates} candidates: "
        f"{total['requests']} requests, {total['failures']} failures, p50 {total['p50_ms']} ms, "
        f"p99 {total['p99_ms']} ms; RSS {base[0] if base else float('nan'):.0f} -> {base[-1] if base else float('nan'):.0f} MB "
        f"after warm-up ({growth * 100:+.1f}%, limit {a.max_growth * 100:.0f}%)"
    )
    if not ok_mem:
        print("FAIL: memory grew more than the limit")
    return 1 if verdict != 0 or not ok_mem else 0


if __name__ == "__main__":
    sys.exit(main())
