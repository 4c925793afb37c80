"""`make bench`: the serving path measured the way a client sees it, every comparison interleaved.

Sections (each printed as a table, all written to artifacts/reports/bench.json):

* **forward floor** (in-process, one thread): the request forward for 100-2000 candidates, eager
  as it was (the request-split weight columns gathered on every call), eager with the gathers
  cached, and the ONNX Runtime graph the service builds; plus encode + forward as served;
* **/rank latency**: real `mtrank serve` processes (one worker each) on the embedded store, on
  Redis and on a local 3-primary Redis Cluster, driven over one kept-alive connection with
  pre-serialised bodies. Each repetition runs the floor, then every store, size after size, so
  that a slower phase of the shared machine hits all of them; the tables give medians over the
  repetitions and ratios taken within a repetition;
* **throughput sweep**: open-loop Poisson arrivals at rising rates against 500-candidate requests
  (latency from the scheduled send time, no coordinated omission), one and two workers; the
  highest rate with p99 <= 50 ms and nothing shed, then an overload run at twice that rate
  (admission control: what the admitted requests get, how fast the shed ones are answered);
* **GC**: a full garbage collection of the loaded app, with and without ``gc.freeze()``;
* **training** samples/s (one epoch per architecture; ``--skip-training``) and the per-architecture
  request-forward table (``--archs-only`` for that alone);
* **user history** (``--skip-history``; ``--history-only`` for that alone): MMoE with the last 50
  long views (configs/kuairand_mmoe_history.toml, trained into <artifacts>/history-bench) against
  the model without them, 500 candidates: the forward floor in process, then /rank on the embedded
  store and on Redis, the two servers interleaved per repetition (which goes first alternates);
  every request's user holds a full history (max_len events posted through /events first).

The machine's load average is recorded before and after: compare figures within one run only.
Trains a model first if artifacts/models/LATEST does not exist.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, get_args

import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model.nets.base  # noqa: E402
from model import Ranker, resolve_checkpoint  # noqa: E402
from model.config import apply_overrides, load_config  # noqa: E402
from model.data import load_dataset, load_entity_table  # noqa: E402
from model.features import GROUPS  # noqa: E402
from model.nets import RequestBatch  # noqa: E402
from model.train import fit  # noqa: E402
from scripts.loadgen import RawClient, open_loop, post_bytes, timed  # noqa: E402
from scripts.redis_cluster import LocalRedisCluster  # noqa: E402
from scripts.serverctl import (  # noqa: E402
    MTRANK,
    delete_redis_keys,
    ensure_model,
    start_server,
    stop_server,
    tree_cpu_seconds,
)

SIZES = (100, 500, 1000, 2000)
SLO_P99_MS = 50.0
DEFAULT_THREADS = torch.get_num_threads()  # before the forward benchmarks pin one thread


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50": pct(ms, 50), "p95": pct(ms, 95), "p99": pct(ms, 99), "mean": statistics.fmean(ms)}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------------
# in-process forward


def _tables(ranker: Ranker) -> tuple[Any, Any]:
    users = load_entity_table(ranker.config.data, "user")
    videos = load_entity_table(ranker.config.data, "video")
    assert users is not None and videos is not None
    return users, videos


def _request(ranker: Ranker, users: Any, videos: Any, n: int) -> tuple[Any, Any, Any, RequestBatch, Any, Any]:
    """One request of n videos (sampled with replacement beyond the catalog): (u, v, c frames,
    RequestBatch, broadcast cats, nums)."""
    s = ranker.schema
    v = s.canonicalize_frame("video", videos.sample(n, random_state=0, replace=n > len(videos)))
    u = s.canonicalize_frame("user", users.iloc[:1])
    c = s.canonicalize_records("context", [{"tab": 1, "hour": 18}])
    cats, nums = ranker.encode(u, v, c)
    ct, nt = torch.from_numpy(np.ascontiguousarray(cats)), torch.from_numpy(np.ascontiguousarray(nums))
    t = torch.from_numpy
    (uc, un), (vc, vn), (cc, cn) = (s.encode(g, r) for g, r in zip(GROUPS, (u, v, c), strict=True))
    return u, v, c, RequestBatch(t(uc), t(vc), t(cc), t(un), t(vn), t(cn)), ct, nt


def _uncached(net: Any, req: RequestBatch) -> Any:
    """The request forward as it was before the gathers were cached: every call re-gathers."""
    model.nets.base._SPLIT_CACHE.clear()
    for emb in net.feature_embeddings():
        emb._split_indices.clear()
    return net.forward_request(req)


class Floors:
    """The in-process forward variants per size, timed in blocks (one block per repetition)."""

    def __init__(self, ckpt: Path) -> None:
        torch.set_num_threads(1)
        self.eager = Ranker.load(ckpt)
        self.onnx = Ranker.load(ckpt)
        self.onnx.compile("onnx")
        users, videos = _tables(self.eager)
        self.requests = {n: _request(self.eager, users, videos, n) for n in SIZES}

    def block(self, n: int, calls: int) -> dict[str, list[float]]:
        u, v, c, req, _, _ = self.requests[n]
        net, onnx = self.eager.model, self.onnx._compiled
        assert onnx is not None
        out = {}
        with torch.inference_mode():
            for name, fn in (
                ("eager_uncached", partial(_uncached, net, req)),
                ("eager", partial(net.forward_request, req)),
                ("onnx", partial(onnx, req)),
                ("score_onnx", partial(self.onnx.score, u, v, c)),
            ):
                fn()
                out[name] = timed(fn, calls)
        return out


def bench_torch_compile(ckpt: Path, reps: int, rounds: int = 5) -> dict[str, Any]:
    """torch.compile (inductor, dynamic shapes, frozen weights) of the same request forward against
    the ONNX Runtime graph and eager, interleaved per size: build times and p50s (the reason the
    service uses ONNX Runtime)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants, as ONNX Runtime folds them
    torch.set_num_threads(1)
    r = Ranker.load(ckpt)
    users, videos = _tables(r)
    reqs = {n: _request(r, users, videos, n)[3] for n in SIZES}
    out: dict[str, Any] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled = torch.compile(r.model.forward_request, dynamic=True)
        compiled(reqs[500])
        out["compile_build_s"] = time.perf_counter() - t0
        onnx = Ranker.load(ckpt)
        t0 = time.perf_counter()
        onnx.compile("onnx")
        out["onnx_build_s"] = time.perf_counter() - t0
        assert onnx._compiled is not None
        variants = {"eager": r.model.forward_request, "torch_compile": compiled, "onnx": onnx._compiled}
        for n, req in reqs.items():
            p50s: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():
                fn(req)
            for _ in range(rounds):
                for k, fn in variants.items():
                    p50s[k].append(pct(timed(partial(fn, req), reps), 50))
            out[str(n)] = {k: median(v) for k, v in p50s.items()}
    return out


def bench_archs(ckpt: Path, reps: int, n: int = 500) -> dict[str, dict[str, Any]]:
    """Every architecture (untrained, the checkpoint's schema and sizes): the service's request
    forward (first layer's user/context share computed once) against the broadcast forward."""
    from model.config import Arch
    from model.nets import build_model

    ranker = Ranker.load(ckpt)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    *_, req, ct, nt = _request(ranker, *_tables(ranker), n)
    out = {}
    with torch.inference_mode():
        for arch in get_args(Arch):
            cfg = apply_overrides(ranker.config, [f"model.arch={arch}"])
            net = build_model(cfg.model, ranker.schema, cfg.tasks).eval()
            out[arch] = {
                "request_forward_ms": summary(timed(partial(net.forward_request, req), reps)),
                "broadcast_forward_ms": summary(timed(partial(net, ct, nt), reps)),
                "params": sum(p.numel() for p in net.parameters()),
            }
    return out


def print_archs(res: dict[str, dict[str, Any]], n: int = 500) -> None:
    print(f"\n{n} candidates, one thread, untrained nets of the checkpoint's sizes (eager)")
    print("| arch | parameters | broadcast forward p50 ms | request forward p50 ms | speed-up |")
    print("|---|---|---|---|---|")
    for arch, r in res.items():
        b, f = r["broadcast_forward_ms"]["p50"], r["request_forward_ms"]["p50"]
        print(f"| {arch} | {r['params']:,} | {b:.2f} | {f:.2f} | {b / f:.1f}x |")


def bench_training(config: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    torch.set_num_threads(DEFAULT_THREADS)
    out["threads"] = DEFAULT_THREADS
    t0 = time.perf_counter()
    ds = load_dataset(load_config(config))
    out["data_load_s"] = time.perf_counter() - t0
    for arch in ("mmoe", "shared_bottom"):
        cfg = apply_overrides(load_config(config), [f"model.arch={arch}", "train.epochs=1"])
        out[f"{arch}_samples_per_s"] = fit(cfg, ds).samples_per_sec
    torch.set_num_threads(1)
    return out


def bench_gc(artifacts: Path) -> dict[str, float]:
    """A full collection of the loaded app (embedded store, the model), unfrozen and frozen."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(artifacts=artifacts, feature_store="embedded", admin_token=None)
    with TestClient(create_app(settings)):
        gc.unfreeze()
        tracked = len(gc.get_objects())
        unfrozen = [timed(gc.collect, 1)[0] for _ in range(3)]
        gc.freeze()
        frozen = [timed(gc.collect, 1)[0] for _ in range(3)]
    return {"tracked_objects": tracked, "full_gc_ms": median(unfrozen), "full_gc_frozen_ms": median(frozen)}


# --------------------------------------------------------------------------------------------
# served


def request_bodies(ckpt: Path, n: int, count: int, seed: int) -> list[bytes]:
    """``count`` pre-serialised /rank requests of ``n`` distinct KuaiRand candidates each."""
    ranker_data = json.loads((ckpt / "manifest.json").read_text())["config"]["data"]
    cfg = load_config(ROOT / "configs" / "kuairand_mmoe.toml").data
    cfg.data_dir = ranker_data["data_dir"]
    videos, users = load_entity_table(cfg, "video"), load_entity_table(cfg, "user")
    assert videos is not None and users is not None
    vids, uids = videos[cfg.video_key].to_numpy(), users[cfg.user_key].to_numpy()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        body = {
            "user_id": int(rng.choice(uids)),
            "candidates": [int(x) for x in rng.choice(vids, size=min(n, len(vids)), replace=False)],
            "context": {"tab": int(rng.integers(0, 15)), "hour": int(rng.integers(0, 24))},
        }
        if n > len(vids):  # beyond the catalog: unknown ids make up the rest (scored with defaults)
            body["candidates"] = [*body["candidates"], *(f"x{i}" for i in range(n - len(vids)))]  # type: ignore[misc]
        out.append(post_bytes("/rank", orjson.dumps(body)))
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def sequential(client: RawClient, bodies: list[bytes], calls: int) -> tuple[list[float], int]:
    """(ms per request, degraded responses) of ``calls`` requests, one after another."""
    out, degraded = [], 0
    for i in range(calls):
        t0 = time.perf_counter()
        status, body = client.send(bodies[i % len(bodies)])
        out.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"/rank answered {status}: {body[:200]!r}")
        degraded += b'"degraded":true' in body
    return out, degraded


def bench_interleaved(
    floors: Floors, servers: dict[str, str], bodies: dict[int, list[bytes]], reps: int, calls: int
) -> dict[str, Any]:
    clients = {name: RawClient("127.0.0.1", port_of(url)) for name, url in servers.items()}
    for c in clients.values():  # warm-up
        for n in SIZES:
            sequential(c, bodies[n], 10)
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        run: dict[str, Any] = {}
        for n in SIZES:
            row: dict[str, Any] = {k: summary(v) for k, v in floors.block(n, calls).items()}
            for name, c in clients.items():
                ms, degraded = sequential(c, bodies[n], calls)
                row[name] = {**summary(ms), "degraded": degraded}
            run[str(n)] = row
        runs.append(run)
        print(f"  repetition {rep + 1}/{reps} done (load {loadavg()})", flush=True)
    for c in clients.values():
        c.close()
    out: dict[str, Any] = {}
    for n in SIZES:
        rows = [r[str(n)] for r in runs]
        med = {k: {q: median([r[k][q] for r in rows]) for q in ("p50", "p95", "p99")} for k in rows[0]}
        ratios: dict[str, Any] = {
            f"{k}_p50_over_{f}": median([r[k]["p50"] / r[f]["p50"] for r in rows])
            for k in servers
            for f in ("eager_uncached", "onnx")
        }
        ratios["onnx_speedup_over_eager_uncached"] = median(
            [r["eager_uncached"]["p50"] / r["onnx"]["p50"] for r in rows]
        )
        ratios["onnx_speedup_over_eager"] = median([r["eager"]["p50"] / r["onnx"]["p50"] for r in rows])
        ratios["rank_p50_minus_eager_uncached_ms"] = {
            k: median([r[k]["p50"] - r["eager_uncached"]["p50"] for r in rows]) for k in servers
        }
        if "redis_cluster" in servers and "redis" in servers:
            ratios["cluster_p99_over_redis_p99"] = median(
                [r["redis_cluster"]["p99"] / r["redis"]["p99"] for r in rows]
            )
        out[str(n)] = {"median": med, "ratios": ratios, "runs": rows}
    return out


def print_interleaved(res: dict[str, Any], servers: list[str], reps: int, calls: int) -> None:
    print(f"\nmedians of {reps} interleaved repetitions, {calls} calls per block (ms)")
    head = "| candidates | eager as was | eager cached | ONNX | encode+ONNX |"
    head += "".join(f" /rank {s} p50 | p99 |" for s in servers)
    print(head)
    print("|---" * (5 + 2 * len(servers)) + "|")
    for n in SIZES:
        m = res[str(n)]["median"]
        line = (
            f"| {n} | {m['eager_uncached']['p50']:.2f} | {m['eager']['p50']:.2f} | {m['onnx']['p50']:.2f} | "
        )
        line += f"{m['score_onnx']['p50']:.2f} |"
        line += "".join(f" {m[s]['p50']:.2f} | {m[s]['p99']:.2f} |" for s in servers)
        print(line)
    print("\nratios (medians of per-repetition ratios)")
    for n in SIZES:
        r = res[str(n)]["ratios"]
        print(
            f"  {n}: " + ", ".join(f"{k}={v if isinstance(v, dict) else round(v, 2)}" for k, v in r.items())
        )


def sweep(
    servers: dict[str, tuple[Any, str]], bodies: list[bytes], rates: list[float], seconds: float
) -> dict[str, list[dict[str, Any]]]:
    """Each rate against every server in turn (interleaved), each point with the server's CPU."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for _, url in servers.values():
        open_loop("127.0.0.1", port_of(url), bodies, 20, 2.0)  # warm-up
    for i, rate in enumerate(rates):
        for name, (proc, url) in servers.items():
            cpu0, t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
            res: dict[str, Any] = dict(
                open_loop("127.0.0.1", port_of(url), bodies, rate, seconds, seed=i).summary()
            )
            res["server_cpu"] = (tree_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
            res["passes"] = res["p99_ms"] <= SLO_P99_MS and res["shed"] == 0 and res["errors"] == 0
            res["load"] = loadavg()
            out[name].append(res)
            print(
                f"  {name:12s} {rate:5.0f}/s: ok {res['ok_rps']:6.1f}/s p50 {res['p50_ms']:6.1f} "
                f"p99 {res['p99_ms']:7.1f} max {res['max_ms']:7.1f} shed {res['shed']:4d} "
                f"(p99 {res['shed_p99_ms']:5.1f}) err {res['errors']} server CPU {res['server_cpu']:.2f} "
                f"generator CPU {res['generator_cpu']:.2f} load {res['load']} "
                f"{'PASS' if res['passes'] else 'miss'}",
                flush=True,
            )
    return out


def best_rate(points: list[dict[str, Any]], shed_share: float = 0.0) -> float:
    """The highest offered rate below which every rate tried held p99 <= SLO with no errors and at
    most ``shed_share`` shed (a rate that passes above a failing one does not count)."""
    best = 0.0
    for p in sorted(points, key=lambda p: p["offered_rps"]):
        if p["p99_ms"] > SLO_P99_MS or p["errors"] > 0 or p["shed"] > shed_share * p["sent"]:
            break
        best = p["offered_rps"]
    return best


# --------------------------------------------------------------------------------------------


HISTORY_USERS = 50  # users whose histories the history benchmark fills to max_len


def fill_histories(url: str, ranker: Ranker, users: list[int], videos: np.ndarray) -> None:
    """POST /events until each user's histories hold max_len events (the worst case per request)."""
    import httpx

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


def history_floor(base_ckpt: Path, hist_ckpt: Path, n: int, calls: int, reps: int) -> dict[str, Any]:
    """Encode + request forward (ONNX Runtime, as served) of the two models in process, a full
    history; blocks interleaved per repetition."""
    torch.set_num_threads(1)
    base, hist = Ranker.load(base_ckpt), Ranker.load(hist_ckpt)
    base.compile("onnx")
    hist.compile("onnx")
    u, v, c, *_ = _request(base, *_tables(base), n)
    q = hist.schema.sequences[0]
    specs = {f.name: f for f in hist.schema.cats("video")}
    codes = np.stack([np.resize(specs[name].vocab_codes(), q.max_len) for name in q.items], axis=1)
    history = {s.name: codes for s in hist.schema.sequences}
    fns = {"base": partial(base.score, u, v, c), "history": partial(hist.score, u, v, c, history)}
    runs = []
    for rep in range(reps):
        order = ("base", "history") if rep % 2 == 0 else ("history", "base")
        row = {}
        for name in order:
            fns[name]()
            row[name] = summary(timed(fns[name], calls))
        runs.append(row)
    out: dict[str, Any] = {k: {q: median([r[k][q] for r in runs]) for q in ("p50", "p99")} for k in fns}
    out["backends"] = {"base": base.backend_info, "history": hist.backend_info}
    return out


def bench_history(a: argparse.Namespace, n: int = 500) -> dict[str, Any]:
    """What a full user history costs at ``n`` candidates (see the module doc)."""
    hist_artifacts = a.artifacts / "history-bench"
    ensure_model(hist_artifacts, a.history_config)
    base_ckpt, hist_ckpt = resolve_checkpoint(a.artifacts), resolve_checkpoint(hist_artifacts)
    ranker = Ranker.load(hist_ckpt)
    users_df, videos_df = _tables(ranker)
    rng = np.random.default_rng(2)
    users = [int(x) for x in rng.choice(users_df["user_id"].to_numpy(), HISTORY_USERS, replace=False)]
    videos = videos_df["video_id"].to_numpy()
    bodies = []
    for _ in range(50):
        body = {
            "user_id": int(rng.choice(users)),
            "candidates": [int(x) for x in rng.choice(videos, size=n, replace=False)],
            "context": {"tab": int(rng.integers(0, 15)), "hour": int(rng.integers(0, 24))},
        }
        bodies.append(post_bytes("/rank", orjson.dumps(body)))
    out: dict[str, Any] = {"candidates": n, "model": hist_ckpt.name, "users": HISTORY_USERS}
    out["floor"] = history_floor(base_ckpt, hist_ckpt, n, a.calls, a.reps)
    stores = [("embedded", {"MTRANK_FEATURE_STORE": "embedded"})]
    if not a.skip_redis:
        stores.append(("redis", {"MTRANK_FEATURE_STORE": "redis", "MTRANK_REDIS_URL": a.redis_url}))
    for store, env in stores:
        procs, clients = [], {}
        prefixes = []
        try:
            for name, art in (("base", a.artifacts), ("history", hist_artifacts)):
                server_env = dict(env)
                if store == "redis":
                    prefix = server_env["MTRANK_REDIS_PREFIX"] = f"mtrank-bench-{name}-{os.getpid()}:"
                    prefixes.append(prefix)
                    subprocess.run(
                        [
                            MTRANK,
                            "materialize",
                            "--artifacts",
                            str(art),
                            "--redis-url",
                            a.redis_url,
                            "--prefix",
                            prefix,
                        ],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                proc, url = start_server(art, server_env)
                procs.append(proc)
                if name == "history":
                    fill_histories(url, ranker, users, videos)
                clients[name] = RawClient("127.0.0.1", port_of(url))
            for c in clients.values():  # warm-up
                sequential(c, bodies, 10)
            runs: list[dict[str, Any]] = []
            pooled: dict[str, list[float]] = {"base": [], "history": []}
            degraded = {"base": 0, "history": 0}  # e.g. a Redis fetch past its deadline on a busy VM
            for rep in range(a.reps):
                order = ("base", "history") if rep % 2 == 0 else ("history", "base")
                row = {}
                for name in order:
                    ms, bad = sequential(clients[name], bodies, a.calls)
                    degraded[name] += bad
                    row[name] = summary(ms)
                    pooled[name] += ms
                runs.append(row)
            # the percentiles over every interleaved request (a block's p99 is its slowest call)
            res: dict[str, Any] = {k: summary(v) for k, v in pooled.items()}
            res["p50_ratio"] = res["history"]["p50"] / res["base"]["p50"]
            res["p99_ratio"] = res["history"]["p99"] / res["base"]["p99"]
            res["p50_ratio_per_repetition"] = [r["history"]["p50"] / r["base"]["p50"] for r in runs]
            res["degraded"] = degraded
            res["runs"] = runs
            out[store] = res
        finally:
            for c in clients.values():
                c.close()
            for proc in procs:
                stop_server(proc)
            for prefix in prefixes:
                delete_redis_keys(a.redis_url, prefix)
    return out


def print_history(res: dict[str, Any], reps: int, calls: int) -> None:
    f = res["floor"]
    print(
        f"\nuser history ({res['model']}, {res['users']} users with full histories), {res['candidates']} "
        f"candidates; {reps} interleaved repetitions x {calls} calls, percentiles over all of them (ms)"
    )
    print("| | without p50 / p99 | with p50 / p99 | p50 ratio | p99 ratio |\n|---|---|---|---|---|")
    print(
        f"| encode + forward ({f['backends']['history']['backend']}) | {f['base']['p50']:.2f} / {f['base']['p99']:.2f} | "
        f"{f['history']['p50']:.2f} / {f['history']['p99']:.2f} | {f['history']['p50'] / f['base']['p50']:.2f} | "
        f"{f['history']['p99'] / f['base']['p99']:.2f} |"
    )
    for store in ("embedded", "redis"):
        if store in res:
            r = res[store]
            print(
                f"| /rank, {store} | {r['base']['p50']:.2f} / {r['base']['p99']:.2f} | "
                f"{r['history']['p50']:.2f} / {r['history']['p99']:.2f} | {r['p50_ratio']:.2f} | {r['p99_ratio']:.2f} |"
                + (f" degraded: {r['degraded']}" if any(r["degraded"].values()) else "")
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--calls", type=int, default=60, help="calls per block (store x size) per repetition")
    ap.add_argument("--sweep-seconds", type=float, default=10.0, help="seconds per rate of the sweep")
    ap.add_argument(
        "--redis-url", default=os.environ.get("MTRANK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-redis", action="store_true", help="no Redis / Redis Cluster rows")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[40, 60, 80, 100, 120, 140, 160, 200],
        help="sweep rates (req/s)",
    )
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a checkout of an earlier revision: its `mtrank serve` (one worker) joins the sweep, interleaved",
    )
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow to build)")
    ap.add_argument(
        "--torch-compile-only", action="store_true", help="the forward backends' comparison alone"
    )
    ap.add_argument("--archs-only", action="store_true", help="only the per-architecture forward table")
    ap.add_argument("--history-config", type=Path, default=ROOT / "configs" / "kuairand_mmoe_history.toml")
    ap.add_argument("--skip-history", action="store_true", help="no user-history section")
    ap.add_argument("--history-only", action="store_true", help="the user-history section alone")
    a = ap.parse_args()
    a.torch_compile = a.torch_compile or a.torch_compile_only

    ensure_model(a.artifacts, a.config)
    ckpt = resolve_checkpoint(a.artifacts)
    report: dict[str, Any] = {"model": ckpt.name, "cpus": os.cpu_count(), "load_before": loadavg()}
    print(f"model {ckpt.name}, {os.cpu_count()} CPUs, load average {loadavg()}", flush=True)
    out = a.artifacts / "reports" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.history_only:
        report["history"] = hist = bench_history(a)
        print_history(hist, a.reps, a.calls)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")
        return
    report["archs"] = archs = bench_archs(ckpt, 200)
    print_archs(archs)
    if a.archs_only:
        return
    if not a.skip_training:
        report["training"] = bench_training(a.config)
        print(f"training: {report['training']}", flush=True)
    if a.torch_compile:
        report["torch_compile"] = tc = bench_torch_compile(ckpt, 40)
        print(
            f"\nbuild: torch.compile {tc['compile_build_s']:.1f} s, ONNX Runtime {tc['onnx_build_s']:.1f} s"
        )
        print("| candidates | eager p50 ms | torch.compile p50 ms | ONNX Runtime p50 ms |\n|---|---|---|---|")
        for n in SIZES:
            x = tc[str(n)]
            print(f"| {n} | {x['eager']:.2f} | {x['torch_compile']:.2f} | {x['onnx']:.2f} |", flush=True)
        if a.torch_compile_only:
            return
    report["gc"] = bench_gc(a.artifacts)
    print(f"gc: {report['gc']}", flush=True)

    procs: dict[str, Any] = {}
    servers: dict[str, str] = {}
    cluster: LocalRedisCluster | None = None
    prefix = f"mtrank-bench-{os.getpid()}:"
    tmp = tempfile.TemporaryDirectory(prefix="mtrank-bench-")
    try:
        procs["embedded"], servers["embedded"] = start_server(
            a.artifacts, {"MTRANK_FEATURE_STORE": "embedded"}
        )
        if not a.skip_redis:
            cluster = LocalRedisCluster(Path(tmp.name), masters=3).start()
            for name, url in (("redis", a.redis_url), ("redis_cluster", cluster.url)):
                env = {
                    "MTRANK_FEATURE_STORE": "redis",
                    "MTRANK_REDIS_URL": url,
                    "MTRANK_REDIS_PREFIX": prefix,
                }
                subprocess.run(
                    [
                        MTRANK,
                        "materialize",
                        "--artifacts",
                        str(a.artifacts),
                        "--redis-url",
                        url,
                        "--prefix",
                        prefix,
                    ],
                    env={**os.environ, **env},
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                procs[name], servers[name] = start_server(a.artifacts, env)
        floors = Floors(ckpt)
        bodies = {n: request_bodies(ckpt, n, 50, seed=n) for n in SIZES}
        print(f"\ninterleaved latency ({', '.join(servers)}), load {loadavg()}", flush=True)
        report["interleaved"] = res = bench_interleaved(floors, servers, bodies, a.reps, a.calls)
        print_interleaved(res, list(servers), a.reps, a.calls)
        del floors
    finally:
        for p in procs.values():
            stop_server(p)
        if cluster is not None:
            cluster.stop()
        if not a.skip_redis:
            delete_redis_keys(a.redis_url, prefix)
        tmp.cleanup()

    if not a.skip_sweep:
        bodies500 = request_bodies(ckpt, 500, 200, seed=7)
        embedded = {"MTRANK_FEATURE_STORE": "embedded"}
        swept: dict[str, tuple[Any, str]] = {}
        try:
            if a.baseline_tree is not None:
                swept["before_w1"] = start_server(a.artifacts, embedded, source_tree=a.baseline_tree)
            swept["w1"] = start_server(a.artifacts, embedded)
            swept["w2"] = start_server(a.artifacts, embedded, workers=2)
            print(f"\nopen-loop sweep, 500 candidates ({', '.join(swept)}), load {loadavg()}", flush=True)
            points = sweep(swept, bodies500, a.rates, a.sweep_seconds)
            best = {name: best_rate(p) for name, p in points.items()}
            best_1pct = {name: best_rate(p, 0.01) for name, p in points.items()}
            report["sweep"] = {
                "points": points,
                "best_rps_p99_le_50ms": best,
                "best_rps_p99_le_50ms_shed_le_1pct": best_1pct,
            }
            # overload: twice the best rate of the two-worker service, against it and the others
            sat = best["w2"] or a.rates[0]
            print(f"\noverload at 2 x {sat:.0f}/s", flush=True)
            report["sweep"]["overload"] = sweep(swept, bodies500, [2 * sat], a.sweep_seconds)
        finally:
            for proc, _ in swept.values():
                stop_server(proc)
        for name, rate in report["sweep"]["best_rps_p99_le_50ms"].items():
            r1 = report["sweep"]["best_rps_p99_le_50ms_shed_le_1pct"][name]
            print(
                f"{name}: highest rate with p99 <= {SLO_P99_MS:.0f} ms: {rate:.0f}/s with nothing shed, "
                f"{r1:.0f}/s with at most 1% shed"
            )

    if not a.skip_history:
        report["history"] = hist = bench_history(a)
        print_history(hist, a.reps, a.calls)
    report["load_after"] = loadavg()
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    random.seed(0)
    main()
