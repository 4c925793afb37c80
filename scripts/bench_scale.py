"""Training at scale: peak memory vs log size, step cost vs vocabulary size, streaming vs the old trainer.

    python scripts/bench_scale.py memory --rows 5000000 50000000     # `make bench-scale`
    python scripts/bench_scale.py ids --reps 3                       # `make bench-ids`
    python scripts/bench_scale.py baseline --baseline /path/to/old/checkout --seeds 3
    python scripts/bench_scale.py step --reps 5                      # one training step in isolation

- ``memory``: KuaiRand-Pure replicated to N rows (``mtrank data scale``, cached under
  artifacts/scale/N), one epoch of ``configs/kuairand_mmoe_scale.toml`` per size in a fresh process
  under ``/usr/bin/time -v``: peak RSS, data-preparation time, training samples/s, user ids.
- ``ids``: the same KuaiRand-Pure training with the user-id table at its vocabulary (27k rows) and
  hashed to 1M / 16M rows (``hash_buckets``), sparse and dense embedding updates, ``--epochs`` per
  run on one thread, the variants interleaved per repetition; medians and the 16M / 27k ratio.
- ``step``: one training step alone (forward, backward, the optimisers) of the shipped config's MMoE
  on random batches of its batch size, the user-id table at 27k / 1M / 16M rows, sparse (SparseAdam)
  and dense (Adam) updates, interleaved per repetition, one thread: what the vocabulary costs a step,
  without the data path, the evaluation or the noise of whole runs.
- ``baseline``: the shipped config trained by this checkout and by another (e.g. the commit before
  the streaming trainer, with its own .venv), seeds interleaved: test AUCs and samples/s.

Every run is a separate process (``--worker``), so memory and threads do not leak between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MTRANK_DATA_DIR") or ROOT.parent / "shared" / "data" / "kuairand-pure")


def worker(spec: dict[str, Any]) -> None:
    """One training run in this process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    os.environ.pop("MTRANK_DATA_DIR", None)  # the spec's data_dir is the one to read
    from model.config import apply_overrides, load_config
    from model.train import train

    cfg = load_config(spec["config"])
    cfg.data.data_dir = spec.get("data_dir", cfg.data.data_dir)
    cfg = apply_overrides(cfg, spec.get("set", []))
    for name, buckets in spec.get("hash", {}).items():
        for f in cfg.data.features:
            if f.name == name:
                f.hash_buckets = buckets
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    phase = ["prepare"]
    peaks: dict[str, float] = {}

    def sample() -> None:  # peak RSS per phase (prepare, train, evaluate + write)
        while True:
            with open("/proc/self/status") as f:
                rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1e6
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), round(rss, 2))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()

    epoch_seconds: list[float] = []  # training time at the end of each epoch (cumulative)

    def progress(kind: str, info: Any) -> None:
        if kind == "data" and "data" not in marks:
            marks["data"] = time.perf_counter() - t0
            phase[0] = "train"
        if kind == "epoch":
            epoch_seconds.append(float(info["seconds"]))
            if int(info["epoch"]) == cfg.train.epochs:
                phase[0] = "test+write"

    artifacts = spec.get("artifacts")
    res = train(cfg, artifacts, progress)
    users = [f for f in res.model.feature_embeddings()]
    after_first = None  # the epochs after the first: without its one-time costs (optimiser state)
    if len(epoch_seconds) > 1 and epoch_seconds[-1] > epoch_seconds[0]:
        per_epoch = res.samples_per_sec * epoch_seconds[-1] / len(epoch_seconds)  # rows per epoch
        after_first = per_epoch * (len(epoch_seconds) - 1) / (epoch_seconds[-1] - epoch_seconds[0])
    out = {
        "samples_per_sec": res.samples_per_sec,
        "samples_per_sec_after_first_epoch": after_first,
        "data_seconds": round(marks.get("data", float("nan")), 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "embedding_rows": int(users[0].emb.num_embeddings) if users else 0,
        "rss_gb_by_phase": peaks,
        **{k: v for k, v in res.metrics.items() if k.startswith("test/") and k.endswith("auc")},
    }
    print("RESULT " + json.dumps(out), flush=True)


def run(
    spec: dict[str, Any], timed: bool = False, python: str = sys.executable, cwd: Path = ROOT
) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {spec}\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out: dict[str, Any] = json.loads(line[len("RESULT ") :])
    if timed:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        out["peak_rss_gb"] = round(int(m.group(1)) / 1e6, 2) if m else None
    return out


def memory(args: argparse.Namespace) -> None:
    print(
        f"{'log rows':>12} {'user ids':>10} {'peak RSS GB':>12} {'data s':>8} {'samples/s':>10} {'total s':>8}"
    )
    for rows in args.rows:
        folder = Path(args.artifacts) / "scale" / str(rows)
        if not (folder / "meta.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "service.cli", "data", "scale", "--rows", str(rows), "--out", str(folder),
                 "--source", str(DATA)],
                cwd=ROOT, check=True,
            )  # fmt: skip
        with tempfile.TemporaryDirectory(dir=args.artifacts) as art:
            spec = {
                "config": str(ROOT / "configs" / "kuairand_mmoe_scale.toml"),
                "data_dir": str(folder),
                "set": ["train.epochs=1", f'data.cache_dir="{art}/cache"'],
                "artifacts": art,
            }
            r = run(spec, timed=True)
        print(
            f"{rows:>12,} {r['embedding_rows']:>10,} {r['peak_rss_gb']:>12} {r['data_seconds']:>8} "
            f"{r['samples_per_sec']:>10,.0f} {r['total_seconds']:>8}   peak RSS by phase {r['rss_gb_by_phase']}",
            flush=True,
        )


VARIANTS: dict[str, dict[str, Any]] = {
    "sparse vocab (27k)": {"set": ["train.sparse_embeddings=true", "train.embed_weight_decay=0.0"]},
    "sparse hashed 1M": {
        "set": ["train.sparse_embeddings=true", "train.embed_weight_decay=0.0"],
        "hash": {"user_id": 1 << 20},
    },
    "sparse hashed 16M": {
        "set": ["train.sparse_embeddings=true", "train.embed_weight_decay=0.0"],
        "hash": {"user_id": 1 << 24},
    },
    "dense vocab (27k)": {"set": []},
    "dense hashed 1M": {"set": [], "hash": {"user_id": 1 << 20}},
}


def ids(args: argparse.Namespace) -> None:
    base = {"config": str(ROOT / "configs" / "kuairand_mmoe.toml"), "data_dir": str(DATA)}
    results: dict[str, list[float]] = {k: [] for k in VARIANTS}
    later: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for rep in range(args.reps):
        for name, v in VARIANTS.items():  # interleaved: every variant once per repetition
            sets = [f"train.epochs={args.epochs}", "train.num_threads=1", "train.patience=100", *v["set"]]
            spec = {**base, "set": sets, "hash": v.get("hash", {})}
            r = run(spec)
            results[name].append(r["samples_per_sec"])
            if r.get("samples_per_sec_after_first_epoch"):
                later[name].append(r["samples_per_sec_after_first_epoch"])
            print(
                f"rep {rep} {name:>20}: {r['samples_per_sec']:,.0f} samples/s, "
                f"{r.get('samples_per_sec_after_first_epoch') or float('nan'):,.0f} after the first epoch "
                f"({r['embedding_rows']:,} rows)",
                flush=True,
            )
    for title, got in (("whole runs", results), ("epochs after the first", later)):
        if not all(got.values()):
            continue
        med = {k: statistics.median(v) for k, v in got.items()}
        print(f"\nmedians, {title} (samples/s):")
        for k, m in med.items():
            print(f"  {k:>20}: {m:,.0f}")
        print(f"sparse 16M / sparse 27k: {med['sparse hashed 16M'] / med['sparse vocab (27k)']:.2f}")
        print(f"dense 1M / dense 27k:    {med['dense hashed 1M'] / med['dense vocab (27k)']:.2f}")


def baseline(args: argparse.Namespace) -> None:
    other = Path(args.baseline)
    spec = {"config": str(ROOT / "configs" / "kuairand_mmoe.toml"), "data_dir": str(DATA)}
    rows: list[tuple[int, str, dict[str, Any]]] = []
    for seed in range(args.seeds):
        for label, python, cwd in (
            ("this", sys.executable, ROOT),
            ("baseline", str(other / ".venv/bin/python"), other),
        ):
            s = {**spec, "set": [f"train.seed={seed}"]}
            r = run(s, python=python, cwd=cwd) if label == "this" else run_baseline(other, seed)
            rows.append((seed, label, r))
            print(f"seed {seed} {label:>8}: {json.dumps(r)}", flush=True)
    for label in ("this", "baseline"):
        rs = [r for _, lab, r in rows if lab == label]
        aucs = {k: statistics.mean(r[k] for r in rs) for k in rs[0] if k.endswith("auc")}
        print(
            label,
            {k: round(v, 4) for k, v in aucs.items()},
            "samples/s median",
            round(statistics.median(r["samples_per_sec"] for r in rs)),
        )


def sparse_quality(args: argparse.Namespace) -> None:
    """The shipped KuaiRand-Pure config with dense embeddings (coupled decay) against sparse ones
    (lazy Adam, batch-aware L2, the scale config's training), seeds interleaved: test AUCs."""
    spec = {"config": str(ROOT / "configs" / "kuairand_mmoe.toml"), "data_dir": str(DATA)}
    sparse = ["train.sparse_embeddings=true", "train.embed_weight_decay=0.0", "train.embed_batch_l2=0.06"]
    got: dict[str, list[dict[str, Any]]] = {"dense": [], "sparse": []}
    for seed in range(args.seeds):
        for name, extra in (("dense", []), ("sparse", sparse)):
            r = run({**spec, "set": [f"train.seed={seed}", *extra]})
            got[name].append(r)
            print(f"seed {seed} {name:>6}: {json.dumps(r)}", flush=True)
    for name, rs in got.items():
        keys = [k for k in rs[0] if k.endswith("auc")]
        stats = {k: (statistics.mean(r[k] for r in rs), statistics.stdev(r[k] for r in rs)) for k in keys}
        print(name, {k: f"{m:.4f} +- {sd:.4f}" for k, (m, sd) in stats.items()})


def step_cost(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from model.config import load_config
    from model.features import FeatureSchema, FeatureSpec
    from model.nets import build_model

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "kuairand_mmoe.toml")
    n_cat = sum(f.kind == "categorical" for f in cfg.data.features) - 1  # besides the user id
    n_num = sum(f.kind == "numeric" for f in cfg.data.features)
    B, steps, warm = cfg.train.batch_size, 30, 5

    def one(rows: int, sparse: bool) -> float:
        torch.manual_seed(0)
        specs = [FeatureSpec("user_id", "user", "categorical", hash_buckets=rows)]
        specs += [
            FeatureSpec(f"c{i}", "video", "categorical", vocab=[str(j) for j in range(50)])
            for i in range(n_cat)
        ]
        specs += [FeatureSpec(f"n{i}", "video", "numeric") for i in range(n_num)]
        net = build_model(cfg.model, FeatureSchema(specs), cfg.tasks)
        tables = [e.emb.weight for e in net.feature_embeddings()]
        for e in net.feature_embeddings():
            e.emb.sparse = sparse
        rest = [p for p in net.parameters() if all(p is not t for t in tables)]
        opts: list[torch.optim.Optimizer] = [torch.optim.Adam(rest, 1e-3)]
        opts.append(torch.optim.SparseAdam(tables, 1e-3) if sparse else torch.optim.Adam(tables, 1e-3))
        took = []
        for k in range(steps):
            users = torch.randint(1, 27_000, (B, 1))  # the same ids at every size: only the table grows
            cats = torch.cat([users, torch.randint(0, 51, (B, n_cat))], dim=1)
            nums = torch.randn(B, n_num)
            t0 = time.perf_counter()
            out = net(cats, nums)
            loss = sum(F.binary_cross_entropy_with_logits(v, torch.rand(B).round()) for v in out.values())
            for o in opts:
                o.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            for o in opts:
                o.step()
            if k >= warm:
                took.append(time.perf_counter() - t0)
        return statistics.median(took) * 1e3

    variants = [(r, sp) for sp in (True, False) for r in (27_000, 1 << 20, 1 << 24) if sp or r <= 1 << 20]
    got: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            got[v].append(one(*v))
        print(
            f"rep {rep}: "
            + ", ".join(
                f"{r:,} {'sparse' if sp else 'dense'} {got[(r, sp)][-1]:.1f} ms" for r, sp in variants
            ),
            flush=True,
        )
    print(f"\nmedian ms per step (batch {B}, one thread):")
    for (r, sp), ms in got.items():
        base = statistics.median(got[(27_000, sp)])
        print(
            f"  {r:>12,} rows {'sparse' if sp else 'dense':>6}: {statistics.median(ms):7.1f}   x{statistics.median(ms) / base:.2f} of 27k"
        )


def run_baseline(other: Path, seed: int) -> dict[str, Any]:
    """The other checkout's trainer (its own API: load_dataset + fit)."""
    code = (
        "import json, sys; from model.config import load_config; from model.data import load_dataset; "
        "from model.train import fit; "
        f"cfg = load_config('configs/kuairand_mmoe.toml'); cfg.data.data_dir = {str(DATA)!r}; cfg.train.seed = {seed}; "
        "r = fit(cfg, load_dataset(cfg)); "
        "print('RESULT ' + json.dumps({'samples_per_sec': r.samples_per_sec, "
        "**{k: v for k, v in r.metrics.items() if k.startswith('test/') and k.endswith('auc')}}))"
    )
    proc = subprocess.run(
        [str(other / ".venv/bin/python"), "-c", code], cwd=other, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, nargs="+", default=[5_000_000, 50_000_000])
    m.add_argument("--artifacts", default="artifacts")
    i = sub.add_parser("ids")
    i.add_argument("--reps", type=int, default=3)
    i.add_argument(
        "--epochs", type=int, default=3, help="per run (SparseAdam's state is made at the first step)"
    )
    b = sub.add_parser("baseline")
    b.add_argument("--baseline", required=True, help="another checkout with its own .venv")
    b.add_argument("--seeds", type=int, default=3)
    q = sub.add_parser("sparse")
    q.add_argument("--seeds", type=int, default=3)
    st = sub.add_parser("step")
    st.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.cmd == "memory":
        Path(args.artifacts).mkdir(parents=True, exist_ok=True)
        memory(args)
    elif args.cmd == "ids":
        ids(args)
    elif args.cmd == "sparse":
        sparse_quality(args)
    elif args.cmd == "step":
        step_cost(args)
    else:
        baseline(args)


if __name__ == "__main__":
    main()
