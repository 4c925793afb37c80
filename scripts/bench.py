"""`make bench`: training throughput, model-forward floor and /rank latency, in one run.

Prints (and writes to artifacts/reports/bench.json):
  * training samples/s on KuaiRand-Pure for MMoE and shared-bottom (one epoch each);
  * the pure model time for 100/500/1000 candidates: network forward only, and encode + forward;
  * /rank latency p50/p95/p99 and candidates/s against a real `mtrank serve` (one uvicorn worker,
    loopback, sequential keep-alive requests), embedded feature store, then Redis;
  * the ratio of /rank p50 to the forward floor;
  * the cost of a user history (configs/kuairand_mmoe_history.toml, trained into
    <artifacts>/history-bench): /rank at 500 candidates of the model with and without it, requests
    interleaved between the two servers, every request's user holding a full history (max_len
    events posted through /events first), on the embedded store and on Redis.

Trains a model first if artifacts/models/LATEST does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, get_args

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import Ranker, resolve_checkpoint  # noqa: E402
from model.config import load_config  # noqa: E402
from model.data import load_dataset, load_entity_table  # noqa: E402
from model.features import GROUPS  # noqa: E402
from model.nets import RequestBatch  # noqa: E402
from model.train import fit  # noqa: E402
from scripts.serverctl import MTRANK, delete_redis_keys, ensure_model, start_server, stop_server  # noqa: E402

SIZES = (100, 500, 1000)
WARMUP = 5  # calls timed but not counted
DEFAULT_THREADS = torch.get_num_threads()  # before the forward benchmarks pin one thread


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50": pct(ms, 50), "p95": pct(ms, 95), "p99": pct(ms, 99), "mean": statistics.fmean(ms)}


def bench_training(config: Path) -> dict[str, float]:
    """One epoch per architecture with torch's default thread count (the forward benchmarks set
    one thread; a training job runs with the default, which is faster here)."""
    out: dict[str, float] = {}
    torch.set_num_threads(DEFAULT_THREADS)
    out["threads"] = DEFAULT_THREADS
    cfg = load_config(config)
    t0 = time.perf_counter()
    ds = load_dataset(cfg)
    out["data_load_s"] = time.perf_counter() - t0
    for arch in ("mmoe", "shared_bottom"):
        cfg = load_config(config)
        cfg.model.arch = arch
        cfg.train.epochs = 1
        res = fit(cfg, ds)
        out[f"{arch}_samples_per_s"] = res.samples_per_sec
        print(
            f"training {arch:14s} {res.samples_per_sec:>10,.0f} samples/s ({DEFAULT_THREADS} threads)",
            flush=True,
        )
    return out


def _tables(ranker: Ranker) -> tuple[Any, Any]:
    """The KuaiRand-Pure user and video tables the benchmark requests draw from (read once)."""
    users = load_entity_table(ranker.config.data, "user")
    videos = load_entity_table(ranker.config.data, "video")
    assert users is not None and videos is not None
    return users, videos


def _request(ranker: Ranker, users: Any, videos: Any, n: int) -> tuple[Any, Any, Any, RequestBatch, Any, Any]:
    """One request of n videos for the first user: (u, v, c frames, RequestBatch, broadcast cats, nums)."""
    import torch

    s = ranker.schema
    v = s.canonicalize_frame("video", videos.sample(n, random_state=0))
    u = s.canonicalize_frame("user", users.iloc[:1])
    c = s.canonicalize_records("context", [{"tab": 1, "hour": 18}])
    cats, nums = ranker.encode(u, v, c)
    ct, nt = torch.from_numpy(np.ascontiguousarray(cats)), torch.from_numpy(np.ascontiguousarray(nums))
    t = torch.from_numpy
    (uc, un), (vc, vn), (cc, cn) = (s.encode(g, r) for g, r in zip(GROUPS, (u, v, c), strict=True))
    return u, v, c, RequestBatch(t(uc), t(vc), t(cc), t(un), t(vn), t(cn)), ct, nt


def _time_ms(fn: Any, reps: int) -> list[float]:
    import torch

    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out[WARMUP:]


def bench_forward(ckpt: Path, reps: int) -> dict[int, dict[str, Any]]:
    import torch

    ranker = Ranker.load(ckpt)
    torch.set_num_threads(1)
    users, videos = _tables(ranker)
    out: dict[int, dict[str, Any]] = {}
    for n in SIZES:
        u, v, c, req, ct, nt = _request(ranker, users, videos, n)
        # the service's request forward, the plain forward on the broadcast batch, and encode + forward
        out[n] = {
            "forward_ms": summary(_time_ms(partial(ranker.model.forward_request, req), reps)),
            "broadcast_forward_ms": summary(_time_ms(partial(ranker.model, ct, nt), reps)),
            "encode_forward_ms": summary(_time_ms(partial(ranker.score, u, v, c), reps)),
        }
    return out


def bench_archs(ckpt: Path, reps: int, n: int = 500) -> dict[str, dict[str, Any]]:
    """Every architecture (untrained, the checkpoint's schema and sizes): the service's request
    forward (first layer's user/context share computed once) against the broadcast forward."""
    import torch

    from model.config import Arch
    from model.nets import build_model

    ranker = Ranker.load(ckpt)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    *_, req, ct, nt = _request(ranker, *_tables(ranker), n)
    out = {}
    for arch in get_args(Arch):
        net = build_model(replace(ranker.config.model, arch=arch), ranker.schema, ranker.config.tasks).eval()
        out[arch] = {
            "request_forward_ms": summary(_time_ms(partial(net.forward_request, req), reps)),
            "broadcast_forward_ms": summary(_time_ms(partial(net, ct, nt), reps)),
            "params": sum(p.numel() for p in net.parameters()),
        }
    return out


def print_archs(res: dict[str, dict[str, Any]], n: int = 500) -> None:
    print(f"\n{n} candidates, one thread, untrained nets of the checkpoint's sizes")
    print("| arch | parameters | broadcast forward p50 ms | request forward p50 ms | speed-up |")
    print("|---|---|---|---|---|")
    for arch, r in res.items():
        b, f = r["broadcast_forward_ms"]["p50"], r["request_forward_ms"]["p50"]
        print(f"| {arch} | {r['params']:,} | {b:.2f} | {f:.2f} | {b / f:.1f}x |")


def bench_http(url: str, ckpt: Path, sizes: tuple[int, ...], reps: int) -> dict[int, dict[str, Any]]:
    ranker_cfg = json.loads((ckpt / "manifest.json").read_text())["config"]["data"]
    cfg = load_config(ROOT / "configs" / "kuairand_mmoe.toml").data
    cfg.data_dir = ranker_cfg["data_dir"]
    videos = load_entity_table(cfg, "video")
    users = load_entity_table(cfg, "user")
    assert videos is not None and users is not None
    vids = videos[cfg.video_key].to_numpy()
    uids = users[cfg.user_key].to_numpy()
    rng = np.random.default_rng(0)
    out: dict[int, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in sizes:
            lat, degraded = [], 0
            for i in range(reps + 20):
                body = {
                    "user_id": int(rng.choice(uids)),
                    "candidates": [int(x) for x in rng.choice(vids, size=n, replace=False)],
                    "context": {"tab": int(rng.integers(0, 15)), "hour": int(rng.integers(0, 24))},
                }
                t0 = time.perf_counter()
                r = client.post("/rank", json=body)
                ms = (time.perf_counter() - t0) * 1e3
                r.raise_for_status()
                if i >= 20:  # warm-up requests are not counted
                    lat.append(ms)
                    degraded += bool(r.json().get("degraded"))
            s = summary(lat)
            out[n] = {"latency_ms": s, "candidates_per_s": n / (s["mean"] / 1e3), "degraded": degraded}
    return out


HISTORY_USERS = 50  # users whose histories the history benchmark fills to max_len


def fill_histories(url: str, ranker: Ranker, users: list[int], videos: np.ndarray) -> None:
    """POST /events until each user's histories hold max_len events (the worst case per request)."""
    rng = np.random.default_rng(1)
    labels = {c: 1 for q in ranker.schema.sequences for c in q.labels}
    n = max(q.max_len for q in ranker.schema.sequences)
    with httpx.Client(base_url=url, timeout=30) as client:
        for u in users:
            events = [
                {
                    "event_id": f"bench-{u}-{k}",
                    "user_id": u,
                    "video_id": int(v),
                    "timestamp": 2e12 + k,
                    "labels": labels,
                }
                for k, v in enumerate(rng.choice(videos, size=n, replace=False))
            ]
            client.post("/events", json={"events": events}).raise_for_status()


def bench_history_http(
    base_url: str, hist_url: str, users: list[int], videos: np.ndarray, n: int, reps: int
) -> dict[str, Any]:
    """The same /rank requests to both servers, interleaved (alternating which goes first)."""
    rng = np.random.default_rng(0)
    lat: dict[str, list[float]] = {"base": [], "history": []}
    with httpx.Client(base_url=base_url, timeout=10) as a, httpx.Client(base_url=hist_url, timeout=10) as b:
        for i in range(reps + 20):
            body = {
                "user_id": int(rng.choice(users)),
                "candidates": [int(x) for x in rng.choice(videos, size=n, replace=False)],
                "context": {"tab": int(rng.integers(0, 15)), "hour": int(rng.integers(0, 24))},
            }
            order = [("base", a), ("history", b)] if i % 2 == 0 else [("history", b), ("base", a)]
            for name, client in order:
                t0 = time.perf_counter()
                r = client.post("/rank", json=body)
                ms = (time.perf_counter() - t0) * 1e3
                r.raise_for_status()
                assert not r.json()["degraded"], r.json()["degraded_reason"]
                if i >= 20:
                    lat[name].append(ms)
    out: dict[str, Any] = {k: summary(v) for k, v in lat.items()}
    out["p99_ratio"] = out["history"]["p99"] / out["base"]["p99"]
    out["p50_ratio"] = out["history"]["p50"] / out["base"]["p50"]
    return out


def bench_history_forward(base_ckpt: Path, hist_ckpt: Path, n: int, reps: int) -> dict[str, Any]:
    """Encode + request forward of the two models in process (interleaved), a full history."""
    import torch

    base, hist = Ranker.load(base_ckpt), Ranker.load(hist_ckpt)
    torch.set_num_threads(1)
    u, v, c, *_ = _request(base, *_tables(base), n)
    q = hist.schema.sequences[0]
    specs = {f.name: f for f in hist.schema.cats("video")}
    codes = np.stack([np.resize(specs[name].vocab_codes(), q.max_len) for name in q.items], axis=1)
    history = {s.name: codes for s in hist.schema.sequences}
    times: dict[str, list[float]] = {"base": [], "history": []}
    for i in range(reps):
        for name in ("base", "history") if i % 2 == 0 else ("history", "base"):
            t0 = time.perf_counter()
            if name == "base":
                base.score(u, v, c)
            else:
                hist.score(u, v, c, history)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: summary(x[WARMUP:]) for k, x in times.items()}


def bench_history(a: argparse.Namespace, base_artifacts: Path, n: int = 500) -> dict[str, Any]:
    """What a user history costs /rank at ``n`` candidates (see the module doc)."""
    hist_artifacts = a.artifacts / "history-bench"
    ensure_model(hist_artifacts, a.history_config)
    base_ckpt, hist_ckpt = resolve_checkpoint(base_artifacts), resolve_checkpoint(hist_artifacts)
    ranker = Ranker.load(hist_ckpt)
    users_df, videos_df = _tables(ranker)
    rng = np.random.default_rng(2)
    users = [int(x) for x in rng.choice(users_df["user_id"].to_numpy(), HISTORY_USERS, replace=False)]
    videos = videos_df["video_id"].to_numpy()
    out: dict[str, Any] = {"candidates": n, "model": hist_ckpt.name, "users": HISTORY_USERS}
    out["forward"] = bench_history_forward(base_ckpt, hist_ckpt, n, a.reps)
    stores: list[tuple[str, dict[str, str], dict[str, str]]] = [
        ("embedded", {"MTRANK_FEATURE_STORE": "embedded"}, {"MTRANK_FEATURE_STORE": "embedded"})
    ]
    prefixes: list[str] = []
    if not a.skip_redis:
        envs = []
        for name, art in (("base", base_artifacts), ("history", hist_artifacts)):
            prefix = f"mtrank-bench-{name}-{os.getpid()}:"
            prefixes.append(prefix)
            env = {
                "MTRANK_FEATURE_STORE": "redis",
                "MTRANK_REDIS_URL": a.redis_url,
                "MTRANK_REDIS_PREFIX": prefix,
            }
            subprocess.run(
                [MTRANK, "materialize", "--artifacts", str(art), "--redis-url", a.redis_url],
                env={**os.environ, **env},
                check=True,
                stdout=subprocess.DEVNULL,
            )
            envs.append(env)
        stores.append(("redis", envs[0], envs[1]))
    try:
        for store, env_base, env_hist in stores:
            pa, url_a = start_server(base_artifacts, env_base)
            try:
                pb, url_b = start_server(hist_artifacts, env_hist)
                try:
                    fill_histories(url_b, ranker, users, videos)
                    out[store] = bench_history_http(url_a, url_b, users, videos, n, a.reps)
                finally:
                    stop_server(pb)
            finally:
                stop_server(pa)
    finally:
        for prefix in prefixes:
            delete_redis_keys(a.redis_url, prefix)
    return out


def print_history(res: dict[str, Any]) -> None:
    n = res["candidates"]
    f = res["forward"]
    print(
        f"\nuser history ({res['model']}, {res['users']} users with full histories), {n} candidates, "
        "requests interleaved between the model without and with it"
    )
    print("| | without p50 / p99 ms | with p50 / p99 ms | p50 ratio | p99 ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| encode + request forward | {f['base']['p50']:.2f} / {f['base']['p99']:.2f} | "
        f"{f['history']['p50']:.2f} / {f['history']['p99']:.2f} | {f['history']['p50'] / f['base']['p50']:.2f} | "
        f"{f['history']['p99'] / f['base']['p99']:.2f} |"
    )
    for store in ("embedded", "redis"):
        if store in res:
            r = res[store]
            print(
                f"| /rank, {store} | {r['base']['p50']:.2f} / {r['base']['p99']:.2f} | "
                f"{r['history']['p50']:.2f} / {r['history']['p99']:.2f} | {r['p50_ratio']:.2f} | {r['p99_ratio']:.2f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--reps", type=int, default=300, help=f"timed calls per row (> {WARMUP} warm-up calls)")
    ap.add_argument(
        "--redis-url", default=os.environ.get("MTRANK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--archs-only", action="store_true", help="only the per-architecture forward table")
    ap.add_argument("--history-config", type=Path, default=ROOT / "configs" / "kuairand_mmoe_history.toml")
    ap.add_argument("--skip-history", action="store_true", help="skip the user-history cost")
    ap.add_argument("--history-only", action="store_true", help="only the user-history cost")
    a = ap.parse_args()
    if a.reps <= WARMUP:
        ap.error(f"--reps must be more than the {WARMUP} warm-up calls")

    ensure_model(a.artifacts, a.config)
    ckpt = resolve_checkpoint(a.artifacts)
    report: dict[str, Any] = {"model": ckpt.name, "cpus": os.cpu_count()}
    out = a.artifacts / "reports" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.history_only:
        report["history"] = hist = bench_history(a, a.artifacts)
        print_history(hist)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")
        return
    report["archs"] = archs = bench_archs(ckpt, a.reps)
    print_archs(archs)
    if a.archs_only:
        return
    if not a.skip_training:
        report["training"] = bench_training(a.config)
    report["forward"] = fwd = bench_forward(ckpt, a.reps)

    proc, url = start_server(a.artifacts, {"MTRANK_FEATURE_STORE": "embedded"})
    try:
        report["rank_embedded"] = emb = bench_http(url, ckpt, SIZES, a.reps)
    finally:
        stop_server(proc)

    red: dict[int, dict[str, Any]] = {}
    if not a.skip_redis:
        prefix = f"mtrank-bench-{os.getpid()}:"
        env = {
            "MTRANK_FEATURE_STORE": "redis",
            "MTRANK_REDIS_URL": a.redis_url,
            "MTRANK_REDIS_PREFIX": prefix,
        }
        subprocess.run(
            [MTRANK, "materialize", "--artifacts", str(a.artifacts), "--redis-url", a.redis_url],
            env={**os.environ, **env},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        proc, url = start_server(a.artifacts, env)
        try:
            report["rank_redis"] = red = bench_http(url, ckpt, SIZES, a.reps)
        finally:
            stop_server(proc)
            delete_redis_keys(a.redis_url, prefix)

    print(
        f"\nmodel {ckpt.name}, {os.cpu_count()} CPUs, one uvicorn worker, {a.reps} sequential requests per row"
    )
    print(
        "| candidates | broadcast forward p50 ms | request forward p50 ms | encode+forward p50 ms "
        "| /rank p50 | p95 | p99 ms | cand/s | p50 ÷ request forward |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for store, res in (("embedded", emb), ("redis", red)):
        for n in SIZES:
            if n not in res:
                continue
            lat = res[n]["latency_ms"]
            f = fwd[n]["forward_ms"]["p50"]
            print(
                f"| {n} ({store}) | {fwd[n]['broadcast_forward_ms']['p50']:.2f} | {f:.2f} | "
                f"{fwd[n]['encode_forward_ms']['p50']:.2f} | {lat['p50']:.2f} | "
                f"{lat['p95']:.2f} | {lat['p99']:.2f} | {res[n]['candidates_per_s']:,.0f} | {lat['p50'] / f:.1f} |"
            )
    if not a.skip_history:
        report["history"] = hist = bench_history(a, a.artifacts)
        print_history(hist)
    if "training" in report:
        t = report["training"]
        print(
            f"\ntraining: MMoE {t['mmoe_samples_per_s']:,.0f} samples/s, "
            f"shared-bottom {t['shared_bottom_samples_per_s']:,.0f} samples/s (data load {t['data_load_s']:.1f} s)"
        )
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
