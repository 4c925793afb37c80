"""Deterministic synthetic data sets in the generic ``source = "tables"`` layout.

Every generator takes an output directory and a seed, draws everything from one
``numpy.random.Generator`` (so the same arguments always give byte-identical files), writes
Parquet files that ``model.data.load_raw`` / ``load_dataset`` read, plus a ``meta.json`` with the
generator parameters and summary statistics, and returns ``{role: path}`` of what it wrote.

``make_mmoe_benchmark(out_dir, correlation, n_rows=20000, dim=100, seed=0, *, c=1.0, alpha_std=1.0, m=10,
noise_std=0.1, train_fraction=0.8) -> {"log", "meta"}``
    The task-correlation regression benchmark of Ma et al., KDD 2018 (MMoE), section 3.2.
    u1, u2 are orthonormal in R^dim, w1 = c*u1, w2 = c*(p*u1 + sqrt(1-p^2)*u2), x ~ N(0, I),
    y_i = w_i^T x + sum_{k=1..m} sin(alpha_k w_i^T x + beta_k) + eps_i. The cosine of (w1, w2),
    and so the Pearson correlation of the linear parts, is exactly p. For a fixed seed only p
    changes between runs (same u1, u2, alpha, beta, x and noise), the paper's controlled setting.
    Log columns: user_id (row // 10), video_id (row), day (0 for the first ``train_fraction`` of
    the rows, else 1), time (row), x0..x{dim-1} (float32), y1, y2. No user / video tables.
    Config: ``configs/synth_mmoe_benchmark.toml``.

``make_youtube_log(out_dir, n_users=2000, n_videos=1000, n_impressions=100000, days=7, seed=0)
-> {"log", "users", "videos", "meta"}``
    A YouTube-like impression log. Users and videos have latent factors driven partly by their
    observable features; requests (a user, a time, a device) retrieve 10 videos (Zipf-popular,
    mildly personalised) that a noisy logging policy orders into positions 1..10.
    click ~ Bernoulli(sigmoid(affinity + ... + position_bias(position, device))); watch_time_s
    (0 unless clicked) depends on affinity and duration; long_view = watch_time_s > 0.5 *
    duration_s; like is NaN unless clicked, else Bernoulli in a *satisfaction* score that shares
    only part of the engagement affinity (video quality, a separate user x video taste factor,
    and clickbait, which raises clicks but lowers satisfaction).
    log.parquet: user_id, video_id, day, time (seconds, non-decreasing), hour, position, device,
    click, long_view, watch_time_s, like.
    users.parquet: user_id, age_bucket, country, primary_device, activity.
    videos.parquet: video_id, category, duration_s, upload_days, creator_id.
    (The user's usual device is ``primary_device``: a user-table column named ``device`` would be
    dropped by the log join, which keeps the log's per-impression ``device``.)
    Config: ``configs/synth_youtube_mmoe.toml``.

The benchmark's summaries over seeds (paired loss ratios, the cost of sharing) are experiment code:
``scripts/experiments.py``.

``SYNTH_KINDS`` maps a kind name ("mmoe", "youtube") to its generator for the CLI.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

LOG_FILE = "log.parquet"
USERS_FILE = "users.parquet"
VIDEOS_FILE = "videos.parquet"
META_FILE = "meta.json"

# --------------------------------------------------------------------------------------------
# shared helpers


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic
    return out


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def _write_json(obj: Mapping[str, Any], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# (a) MMoE synthetic benchmark


def make_mmoe_benchmark(
    out_dir: Path,
    correlation: float,
    n_rows: int = 20000,
    dim: int = 100,
    seed: int = 0,
    *,
    c: float = 1.0,
    alpha_std: float = 1.0,
    m: int = 10,
    noise_std: float = 0.1,
    train_fraction: float = 0.8,
) -> dict[str, Path]:
    """Write the Ma et al. (KDD 2018) two-task regression benchmark with task correlation p.

    ``noise_std = 0.1`` reads the paper's N(0, 0.01) as a variance. The paper gives no values for
    alpha and beta; they are drawn once, alpha ~ N(0, alpha_std^2) and beta ~ N(0, 1), and shared by
    both tasks. ``alpha_std`` sets how hard the target is (how many oscillations it has).
    """
    p = float(correlation)
    _check(-1.0 <= p <= 1.0, f"correlation must be in [-1, 1], got {correlation}")
    _check(dim >= 2, f"dim must be >= 2, got {dim}")
    _check(m >= 0, f"m must be >= 0, got {m}")
    _check(alpha_std >= 0, f"alpha_std must be >= 0, got {alpha_std}")
    _check(noise_std >= 0, f"noise_std must be >= 0, got {noise_std}")
    _check(0.0 < train_fraction < 1.0, f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = round(train_fraction * n_rows)
    _check(0 < n_train < n_rows, f"n_rows={n_rows} is too small for a train and a test split")

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1: FloatArray = c * u1
    w2: FloatArray = c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    alphas = alpha_std * rng.standard_normal(m)  # frequencies: larger = a wigglier target
    betas = rng.standard_normal(m)
    x = rng.standard_normal((n_rows, dim)).astype(np.float32)
    noise = noise_std * rng.standard_normal((n_rows, 2))

    xd = x.astype(np.float64)  # labels from the stored float32 features, so they are reproducible

    def label(w: FloatArray, eps: FloatArray) -> FloatArray:
        z = xd @ w  # (N,)
        nonlin: FloatArray = np.sin(np.outer(z, alphas) + betas).sum(axis=1)  # (N,)
        return z + nonlin + eps

    y1, y2 = label(w1, noise[:, 0]), label(w2, noise[:, 1])
    corr_y = float(np.corrcoef(y1, y2)[0, 1])
    rows = np.arange(n_rows, dtype=np.int64)
    cols: dict[str, Any] = {
        "user_id": rows // 10,
        "video_id": rows,
        "day": (rows >= n_train).astype(np.int64),
        "time": rows,
    }
    cols.update({f"x{j}": x[:, j] for j in range(dim)})
    cols.update({"y1": y1, "y2": y2})
    df = pd.DataFrame(cols)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"log": _write_parquet(df, out / LOG_FILE)}
    meta = {
        "kind": "mmoe",
        "params": {
            "correlation": p,
            "n_rows": n_rows,
            "dim": dim,
            "seed": seed,
            "c": c,
            "alpha_std": alpha_std,
            "m": m,
            "noise_std": noise_std,
            "train_fraction": train_fraction,
        },
        "w1": w1.tolist(),
        "w2": w2.tolist(),
        "alphas": alphas.tolist(),
        "betas": betas.tolist(),
        "stats": {
            "train_rows": n_train,
            "test_rows": n_rows - n_train,
            "cos_w1_w2": float(w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2))) if c else 0.0,
            "pearson_y1_y2": corr_y,
        },
    }
    paths["meta"] = _write_json(meta, out / META_FILE)
    log.info(
        "synth mmoe: %d rows, dim=%d, p=%.3f, corr(y1,y2)=%.3f -> %s",
        n_rows,
        dim,
        p,
        corr_y,
        out,
    )
    return paths


# --------------------------------------------------------------------------------------------
# (b) YouTube-like impression log

SLATE = 10  # positions 1..SLATE per request
LATENT_DIM = 8  # engagement taste factors
SAT_DIM = 4  # satisfaction taste factors (independent of the engagement ones)

AGE_BUCKETS = ["13-17", "18-24", "25-34", "35-44", "45-54", "55+"]
AGE_P = [0.08, 0.24, 0.27, 0.18, 0.13, 0.10]
COUNTRIES = ["US", "IN", "BR", "ID", "MX", "JP", "DE", "GB", "FR", "NG"]
COUNTRY_P = [0.22, 0.20, 0.10, 0.09, 0.08, 0.08, 0.07, 0.06, 0.05, 0.05]
DEVICES = ["mobile", "desktop", "tablet", "tv"]
DEVICE_P = [0.60, 0.25, 0.10, 0.05]
CATEGORIES = [
    "music", "gaming", "news", "sports", "education", "comedy",
    "howto", "tech", "food", "travel", "kids", "film",
]  # fmt: skip
# per category: log-median duration shift (music and kids clips are short, gaming and film long)
CATEGORY_DURATION = [-0.6, 0.8, -0.1, 0.1, 0.4, -0.3, 0.2, 0.3, 0.0, 0.3, -0.4, 0.9]

# position bias: logit shift -slope[device] * ln(position); small screens decay fastest
POSITION_SLOPE = {"mobile": 0.9, "desktop": 0.55, "tablet": 0.7, "tv": 0.35}
DEVICE_CLICK = {"mobile": 0.0, "desktop": -0.1, "tablet": 0.05, "tv": 0.2}
DEVICE_WATCH = {"mobile": -0.2, "desktop": 0.0, "tablet": 0.1, "tv": 0.5}
PRIMARY_DEVICE_STAY = 0.75  # chance a request comes from the user's primary device


def position_bias(position: IntArray, device: npt.NDArray[Any]) -> FloatArray:
    """Additive click-logit shift for display positions (1 = top) on each device; 0 at position 1."""
    slope = np.array([POSITION_SLOPE[d] for d in DEVICES])[_device_index(device)]
    out: FloatArray = -slope * np.log(position.astype(np.float64))
    return out


def _device_index(device: npt.NDArray[Any]) -> IntArray:
    lookup = {d: i for i, d in enumerate(DEVICES)}
    return np.array([lookup[str(d)] for d in device], dtype=np.int64)


def _hour_pmf() -> FloatArray:
    h = np.arange(24, dtype=np.float64)
    w = 0.15 + np.exp(-((h - 20.5) ** 2) / 12.0) + 0.5 * np.exp(-((h - 12.5) ** 2) / 6.0)
    w[1:7] *= 0.3  # night
    out: FloatArray = w / w.sum()
    return out


def _mix(parts: list[tuple[float, FloatArray]]) -> FloatArray:
    """sum_i sqrt(share_i) * part_i: unit-variance parts give a unit-variance mix."""
    out: FloatArray = sum((math.sqrt(s) * a for s, a in parts), np.zeros_like(parts[0][1]))
    return out


def make_youtube_log(
    out_dir: Path,
    n_users: int = 2000,
    n_videos: int = 1000,
    n_impressions: int = 100000,
    days: int = 7,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a YouTube-like impression log with users and videos tables (see the module doc)."""
    _check(n_users >= 1, f"n_users must be >= 1, got {n_users}")
    _check(n_videos >= SLATE, f"n_videos must be >= {SLATE}, got {n_videos}")
    _check(n_impressions >= 1, f"n_impressions must be >= 1, got {n_impressions}")
    _check(days >= 2, f"days must be >= 2 (train days 0..days-2, test day days-1), got {days}")
    rng = np.random.default_rng(seed)
    k, ks = LATENT_DIM, SAT_DIM

    # -- users ----------------------------------------------------------------------------------
    age = rng.choice(len(AGE_BUCKETS), size=n_users, p=AGE_P)
    country = rng.choice(len(COUNTRIES), size=n_users, p=COUNTRY_P)
    pdev = rng.choice(len(DEVICES), size=n_users, p=DEVICE_P)
    age_emb = rng.standard_normal((len(AGE_BUCKETS), k))
    country_emb = rng.standard_normal((len(COUNTRIES), k))
    U = _mix([(0.3, age_emb[age]), (0.2, country_emb[country]), (0.5, rng.standard_normal((n_users, k)))])
    age_taste = rng.standard_normal((len(AGE_BUCKETS), ks))
    S_u = _mix([(0.3, age_taste[age]), (0.7, rng.standard_normal((n_users, ks)))])
    activity_true = rng.lognormal(mean=0.0, sigma=0.8, size=n_users)  # expected sessions a day
    activity_obs = np.round(activity_true * rng.lognormal(0.0, 0.3, size=n_users), 2)
    user_click_bias = 0.4 * rng.standard_normal(n_users) + 0.15 * np.log(activity_true)
    user_like_bias = 0.6 * rng.standard_normal(n_users)

    # -- videos ---------------------------------------------------------------------------------
    n_creators = max(1, n_videos // 8)
    creator_w = 1.0 / np.arange(1, n_creators + 1) ** 0.8  # a few prolific creators
    creator = rng.choice(n_creators, size=n_videos, p=creator_w / creator_w.sum())
    creator_cat = rng.choice(len(CATEGORIES), size=n_creators)  # a creator's usual category
    own_cat = rng.random(n_videos) < 0.8
    category = np.where(own_cat, creator_cat[creator], rng.choice(len(CATEGORIES), size=n_videos))
    cat_emb = rng.standard_normal((len(CATEGORIES), k))
    creator_emb = rng.standard_normal((n_creators, k))
    own = rng.standard_normal((n_videos, k))
    V = _mix([(0.5, cat_emb[category]), (0.2, creator_emb[creator]), (0.3, own)])
    cat_taste = rng.standard_normal((len(CATEGORIES), ks))
    S_v = _mix([(0.4, cat_taste[category]), (0.6, rng.standard_normal((n_videos, ks)))])
    creator_quality = rng.standard_normal(n_creators)
    quality = _mix([(0.5, creator_quality[creator]), (0.5, rng.standard_normal(n_videos))])
    creator_bait = rng.standard_normal(n_creators)
    clickbait = 0.6 * _mix([(0.6, creator_bait[creator]), (0.4, rng.standard_normal(n_videos))])
    log_dur = math.log(240.0) + np.array(CATEGORY_DURATION)[category] + 0.7 * rng.standard_normal(n_videos)
    duration = np.clip(np.round(np.exp(log_dur)), 10, 5400)
    upload_days = np.round(rng.exponential(90.0, size=n_videos), 1)
    # Zipf exposure: popularity rank follows a noisy mix of quality, clickbait and freshness
    pop_score = 0.5 * quality + 0.5 * clickbait - 0.2 * np.log1p(upload_days) + rng.standard_normal(n_videos)
    rank = np.empty(n_videos, dtype=np.int64)
    rank[np.argsort(-pop_score, kind="stable")] = np.arange(1, n_videos + 1)
    log_pop = -1.0 * np.log(rank.astype(np.float64))

    # -- requests: (user, time, device), each showing a slate of SLATE videos -------------------
    n_req = -(-n_impressions // SLATE)
    req_user = rng.choice(n_users, size=n_req, p=activity_true / activity_true.sum())
    req_day = rng.integers(0, days, size=n_req)
    req_hour = rng.choice(24, size=n_req, p=_hour_pmf())
    req_time = req_day * 86400 + req_hour * 3600 + rng.integers(0, 3600, size=n_req)
    order = np.argsort(req_time, kind="stable")
    req_user, req_day, req_hour, req_time = req_user[order], req_day[order], req_hour[order], req_time[order]
    stay = rng.random(n_req) < PRIMARY_DEVICE_STAY
    req_dev = np.where(stay, pdev[req_user], rng.choice(len(DEVICES), size=n_req, p=DEVICE_P))

    slates = np.empty((n_req, SLATE), dtype=np.int64)  # video ids, by position
    chunk = 1024
    for start in range(0, n_req, chunk):
        u = req_user[start : start + chunk]
        aff = U[u] @ V.T / math.sqrt(k)  # (c, n_videos)
        # retrieval: sample SLATE videos without replacement ~ pop * exp(0.7 aff) (Gumbel top-k)
        score = log_pop + 0.7 * aff + rng.gumbel(size=aff.shape)
        cand = np.argpartition(-score, SLATE - 1, axis=1)[:, :SLATE]
        cand.sort(axis=1)
        # logging policy: order by a noisy affinity estimate (so position and relevance correlate)
        policy = np.take_along_axis(aff, cand, axis=1) + rng.standard_normal(cand.shape)
        by_policy = np.argsort(-policy, axis=1, kind="stable")
        slates[start : start + len(u)] = np.take_along_axis(cand, by_policy, axis=1)

    n = n_impressions
    req = np.repeat(np.arange(n_req), SLATE)[:n]
    user = req_user[req]
    video = slates.reshape(-1)[:n]
    position = np.tile(np.arange(1, SLATE + 1, dtype=np.int64), n_req)[:n]
    dev_idx = req_dev[req]
    device = np.array(DEVICES, dtype=object)[dev_idx]
    hour = req_hour[req]

    # -- outcomes -------------------------------------------------------------------------------
    aff = np.einsum("nk,nk->n", U[user], V[video]) / math.sqrt(k)
    evening = ((hour >= 18) & (hour <= 23)).astype(np.float64)
    click_logit = (
        -2.3
        + 1.2 * aff
        + user_click_bias[user]
        + clickbait[video]
        + 0.2 * quality[video]
        - 0.1 * np.log1p(upload_days[video])
        + 0.15 * evening
        + np.array([DEVICE_CLICK[d] for d in DEVICES])[dev_idx]
        + position_bias(position, device)
    )
    click = rng.random(n) < _sigmoid(click_logit)

    dur = duration[video]
    watch_logit = (
        -0.9
        + 0.9 * aff
        + 0.5 * quality[video]
        - 0.6 * clickbait[video]
        - 0.5 * np.log(dur / 240.0)
        + np.array([DEVICE_WATCH[d] for d in DEVICES])[dev_idx]
        + 0.7 * rng.standard_normal(n)
    )
    watch = np.where(click, np.round(dur * _sigmoid(watch_logit), 1), 0.0)
    long_view = click & (watch > 0.5 * dur)

    taste = np.einsum("nk,nk->n", S_u[user], S_v[video]) / math.sqrt(ks)
    sat = 0.5 * aff + 0.7 * quality[video] - 0.8 * clickbait[video] + 0.8 * taste
    sat += 0.4 * rng.standard_normal(n)
    like_draw = rng.random(n) < _sigmoid(-2.0 + 1.2 * sat + user_like_bias[user])
    like = np.where(click, like_draw.astype(np.float64), np.nan)

    logdf = pd.DataFrame(
        {
            "user_id": user.astype(np.int64),
            "video_id": video.astype(np.int64),
            "day": req_day[req].astype(np.int64),
            "time": req_time[req].astype(np.int64),
            "hour": hour.astype(np.int64),
            "position": position,
            "device": device,
            "click": click.astype(np.int64),
            "long_view": long_view.astype(np.int64),
            "watch_time_s": watch,
            "like": like,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype=np.int64),
            "age_bucket": np.array(AGE_BUCKETS, dtype=object)[age],
            "country": np.array(COUNTRIES, dtype=object)[country],
            "primary_device": np.array(DEVICES, dtype=object)[pdev],
            "activity": activity_obs,
        }
    )
    videos = pd.DataFrame(
        {
            "video_id": np.arange(n_videos, dtype=np.int64),
            "category": np.array(CATEGORIES, dtype=object)[category],
            "duration_s": duration,
            "upload_days": upload_days,
            "creator_id": creator.astype(np.int64),
        }
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "log": _write_parquet(logdf, out / LOG_FILE),
        "users": _write_parquet(users, out / USERS_FILE),
        "videos": _write_parquet(videos, out / VIDEOS_FILE),
    }
    clicked = logdf[logdf["click"] == 1]
    stats = {
        "impressions": n,
        "requests": n_req,
        "ctr": float(logdf["click"].mean()),
        "long_view_rate": float(logdf["long_view"].mean()),
        "like_rate_given_click": float(clicked["like"].mean()) if len(clicked) else None,
        "ctr_by_position": [float(v) for v in logdf.groupby("position")["click"].mean().to_numpy()],
        "rows_by_day": [int(v) for v in logdf.groupby("day").size().reindex(range(days), fill_value=0)],
    }
    meta = {
        "kind": "youtube",
        "params": {
            "n_users": n_users,
            "n_videos": n_videos,
            "n_impressions": n_impressions,
            "days": days,
            "seed": seed,
        },
        "stats": stats,
    }
    paths["meta"] = _write_json(meta, out / META_FILE)
    log.info(
        "synth youtube: %d impressions, ctr=%.3f, long_view=%.3f, like|click=%s -> %s",
        n,
        stats["ctr"],
        stats["long_view_rate"],
        stats["like_rate_given_click"],
        out,
    )
    return paths


SYNTH_KINDS: dict[str, Callable[..., dict[str, Path]]] = {
    "mmoe": make_mmoe_benchmark,
    "youtube": make_youtube_log,
}
