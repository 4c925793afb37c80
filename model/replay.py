"""Replay: a split's logged impressions as ranking requests, and what each ranking policy's order
of them is worth under the ``[objective]``.

``logged_lists`` reads the log once (the same passes, duplicates and splits as training) and turns
the split's rows into request-like lists: the rows sharing ``objective.group_by`` (e.g. one user's
videos of one day in one tab), in time order. A list becomes one request: its user, its videos
(a video shown twice in a list is ranked once, at its first impression), and the context of its
first impression -- a request has one context, so rows logged later in another context (say, the
next hour) are scored in the list's. Only the lists that count (``objective.min_list_size`` videos
or more, some positive gain) are kept.

The policies are scored elsewhere (the service's own path: ``service.replay``); here they are
judged: NDCG@k, recall@k and the mean gain of the top k per list, their means with percentile
bootstrap intervals over lists, and each policy's paired difference from popularity.

**Popularity** is the training days' smoothed per-video mean gain,
``(sum of gains + m * overall mean) / (impressions + m)`` (an unseen video gets the overall mean);
the prior strength m is chosen on the validation lists from the train rows' rates, then the rates
are recomputed from all training days (train and validation rows).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.config import Config
from model.data.history import load_event_tables
from model.data.prepare import SPLIT_NAMES, Exchange, Preparer, build_labels
from model.data.source import DataError, LogSource
from model.features import SequenceSpec, canonical_str, hash_column
from model.objective import NAMES, ListMetrics, Lists, ObjectiveError, bootstrap_ci, describe, row_gain

log = logging.getLogger(__name__)

PRIORS: tuple[float, ...] = tuple(float(a * 10**e) for e in range(5) for a in (1, 2, 5))  # 1 .. 50000
POPULARITY, RANDOM, SERVED = "popularity", "random", "served"
UNFITTED = "every weight 1"  # the heads' product (binary heads) or sum with weight 1 each


def json_id(value: Any) -> int | str | None:
    """A logged id as a request sends it: ints as ints, anything else as its canonical string."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    return canonical_str(value)


def json_value(value: Any) -> Any:
    """A logged feature value as JSON (None for missing)."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return canonical_str(value)


@dataclass
class LoggedLists:
    """A split's request-like lists: per list a user and a context, per row a video and its gain."""

    users: list[int | str]  # (L,) request user ids
    contexts: list[dict[str, Any]]  # (L,) request contexts (the first impression's)
    starts: np.ndarray  # (L + 1,) row offsets of each list
    videos: list[int | str]  # (n,) candidate video ids, list by list
    gain: np.ndarray  # (n,)
    video_codes: np.ndarray  # (n,) stable hashes of the video ids
    split_rows: np.ndarray  # (n,) each row's position in the split (rows in shard order)
    same_context: np.ndarray  # (n,) the row was logged in its list's request context
    counts: dict[str, int] = field(default_factory=dict)
    popularity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) popularity score
    popularity_info: dict[str, Any] = field(default_factory=dict)
    split_times: np.ndarray | None = None  # (N,) the split's time column, every row (alignment)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def rows(self) -> int:
        return len(self.videos)

    def list_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.starts))

    def request(self, i: int) -> dict[str, Any]:
        """List i as a /rank request body (every candidate ranked)."""
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return {"user_id": self.users[i], "candidates": self.videos[a:b], "context": self.contexts[i]}

    def take(self, n: int) -> LoggedLists:
        """The first n lists (quick runs)."""
        end = int(self.starts[n])
        return LoggedLists(
            self.users[:n],
            self.contexts[:n],
            self.starts[: n + 1],
            self.videos[:end],
            self.gain[:end],
            self.video_codes[:end],
            self.split_rows[:end],
            self.same_context[:end],
            {**self.counts, "lists": n, "rows": end},
            self.popularity[:end],
            self.popularity_info,
            self.split_times,
        )


def _passes(cfg: Config, tmp: Path) -> Iterator[tuple[pd.DataFrame, np.ndarray, Preparer]]:
    """The log's kept rows (duplicates dropped as configured) batch by batch, with each row's split
    id (``model.data.prepare``: TRAIN, VALID, TEST or UNUSED), in the order training encodes them."""
    source = LogSource(cfg.data, cfg.data.read_batch_rows)
    prep = Preparer(cfg, tmp, None, Exchange(), source)
    scan_dir = tmp / "scan"
    scan_dir.mkdir()
    scan = prep.scan(scan_dir)
    prep.drops = prep.dedup(scan_dir) if cfg.data.dedup else {}
    prep.plan = prep.plan_split([scan])
    for frag, row0, df in prep.batches(prep.needed_columns()):
        df = prep.derive(df)
        sid = prep.plan.assign(df, cfg.data, frag.index, row0)
        keep = prep.kept(frag, row0, len(df))
        if keep.all():
            yield df, sid, prep
        else:
            yield df.loc[keep].reset_index(drop=True), sid[keep], prep


def _context_codes(df: pd.DataFrame, cats: Sequence[str], nums: Sequence[str]) -> np.ndarray:
    """(N, C) int64 identity of each row's context (categorical hashes, numeric float bits)."""
    cols = [hash_column(df[c]).codes for c in cats]
    for c in nums:
        x = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        cols.append(np.where(np.isnan(x), np.float64(np.nan), x).view(np.int64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(df), 0), np.int64)


def logged_lists(cfg: Config, split: str = "test") -> LoggedLists:
    """The split's lists that count, as requests, with the popularity baseline's scores."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    target = SPLIT_NAMES.index(split)
    d, obj = cfg.data, cfg.objective
    if not d.user_key or not d.video_key:
        raise DataError("replay needs user and video ids (data.user_key, data.video_key)")
    list_cols = obj.lists(d)
    if not list_cols:
        raise DataError("replay needs request-like lists: set objective.group_by (or data.group_by)")
    ctx_cats = [f.name for f in d.features if f.group == "context" and f.kind == "categorical"]
    ctx_nums = [f.name for f in d.features if f.group == "context" and f.kind == "numeric"]
    fit_parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {0: [], 1: []}
    frames: list[pd.DataFrame] = []
    offset, timed = 0, False
    with tempfile.TemporaryDirectory(prefix="mtrank-replay-") as tmp:
        for df, sid, prep in _passes(cfg, Path(tmp)):
            try:
                gain = row_gain(df, cfg, build_labels(df, cfg.tasks))
            except ObjectiveError as e:
                raise DataError(str(e)) from None
            lists = prep.group_ids(df, list_cols)
            codes = hash_column(df[d.video_key]).codes
            for s in (0, 1):  # train, valid: the popularity baseline
                m = sid == s
                if m.any():
                    fit_parts[s].append((codes[m], gain[m], lists[m]))
            m = sid == target
            if not m.any():
                continue
            part = df.loc[m].reset_index(drop=True)
            timed = prep.timed
            time = (
                pd.to_numeric(part[d.time_column], errors="coerce").to_numpy(dtype=np.float64)
                if prep.timed
                else np.zeros(len(part))
            )
            frames.append(
                pd.DataFrame(
                    {
                        "list": lists[m],
                        "time": time,
                        "row": np.arange(offset, offset + len(part)),
                        "user": part[d.user_key].to_numpy(dtype=object),
                        "video": part[d.video_key].to_numpy(dtype=object),
                        "code": codes[m],
                        "gain": gain[m],
                    }
                )
                .join(pd.DataFrame(_context_codes(part, ctx_cats, ctx_nums)).add_prefix("ctx_code"))
                .join(part[ctx_cats + ctx_nums].add_prefix("ctx:"))
            )
            offset += len(part)
    if not frames:
        raise DataError(f"the {split} split has no rows")
    rows = pd.concat(frames, ignore_index=True)
    split_times = rows["time"].to_numpy() if timed else None
    rows = rows.sort_values(["list", "time", "row"], kind="stable").reset_index(drop=True)
    counts = {"split_rows": len(rows), "split_lists": int(rows["list"].nunique())}
    repeated = rows.duplicated(["list", "code"], keep="first").to_numpy()
    counts["repeated_impressions"] = int(repeated.sum())
    rows = rows.loc[~repeated].reset_index(drop=True)
    size = rows.groupby("list")["list"].transform("size").to_numpy()
    positive = rows.groupby("list")["gain"].transform("max").to_numpy() > 0
    counts["lists_too_short"] = int(rows.loc[size < obj.min_list_size, "list"].nunique())
    counts["lists_without_gain"] = int(rows.loc[(size >= obj.min_list_size) & ~positive, "list"].nunique())
    rows = rows.loc[(size >= obj.min_list_size) & positive].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"no list of the {split} split counts (objective.min_list_size, a positive gain)")
    first = np.flatnonzero(np.r_[True, rows["list"].to_numpy()[1:] != rows["list"].to_numpy()[:-1]])
    starts = np.r_[first, len(rows)]
    code_cols = [c for c in rows.columns if str(c).startswith("ctx_code")]
    codes = rows[code_cols].to_numpy(dtype=np.int64) if code_cols else np.zeros((len(rows), 0), np.int64)
    owner = np.repeat(first, np.diff(starts))
    same = (codes == codes[owner]).all(axis=1)
    heads = rows.iloc[first]
    contexts = [
        {c: v for c in ctx_cats + ctx_nums if (v := json_value(r[f"ctx:{c}"])) is not None}
        for _, r in heads.iterrows()
    ]
    users = [json_id(u) for u in heads["user"]]
    videos = [json_id(v) for v in rows["video"]]
    if any(u is None for u in users) or any(v is None for v in videos):
        raise DataError("replay: some logged rows have no user or video id")
    counts.update({"lists": len(first), "rows": len(rows), "rows_in_request_context": int(same.sum())})
    out = LoggedLists(
        users,  # type: ignore[arg-type]
        contexts,
        starts,
        videos,  # type: ignore[arg-type]
        rows["gain"].to_numpy(dtype=np.float64),
        rows["code"].to_numpy(dtype=np.int64),
        rows["row"].to_numpy(dtype=np.int64),
        same,
        counts,
        split_times=split_times,
    )
    out.popularity, out.popularity_info = popularity_scores(fit_parts, out.video_codes, cfg)
    return out


# --------------------------------------------------------------------------------------------
# popularity


def _rates(codes: np.ndarray, gain: np.ndarray, prior: float) -> tuple[np.ndarray, np.ndarray, float]:
    uniq, inv = np.unique(codes, return_inverse=True)
    mean = float(gain.mean()) if len(gain) else 0.0
    sums = np.bincount(inv, weights=gain, minlength=len(uniq))
    n = np.bincount(inv, minlength=len(uniq))
    return uniq, (sums + prior * mean) / (n + prior), mean


def _lookup(uniq: np.ndarray, rates: np.ndarray, mean: float, codes: np.ndarray) -> np.ndarray:
    at = np.clip(np.searchsorted(uniq, codes), 0, max(len(uniq) - 1, 0))
    hit = (uniq[at] == codes) if len(uniq) else np.zeros(len(codes), bool)
    return np.where(hit, rates[at] if len(uniq) else mean, mean)


def popularity_scores(
    parts: Mapping[int, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]], codes: np.ndarray, cfg: Config
) -> tuple[np.ndarray, dict[str, Any]]:
    """Smoothed per-video mean gain of the training days for ``codes``; the prior strength is the
    one whose train-row rates rank the validation lists best."""

    def cat(s: int, j: int) -> np.ndarray:
        return np.concatenate([p[j] for p in parts[s]]) if parts[s] else np.zeros(0)

    train_codes, train_gain = cat(0, 0).astype(np.int64), cat(0, 1)
    valid_codes, valid_gain, valid_lists = cat(1, 0).astype(np.int64), cat(1, 1), cat(1, 2)
    if not len(train_codes):
        raise DataError("popularity: the train split has no rows")
    prior = PRIORS[len(PRIORS) // 2]
    info: dict[str, Any] = {"chosen_on": "default"}
    vl = Lists(valid_lists, valid_gain, k=cfg.objective.k, min_size=cfg.objective.min_list_size)
    if vl.n_lists:
        by_prior = {}
        for m in PRIORS:
            u, r, mean = _rates(train_codes, train_gain, m)
            by_prior[m] = vl.ndcg(_lookup(u, r, mean, valid_codes))
        prior = max(by_prior, key=lambda m: (by_prior[m], -m))
        info = {"chosen_on": "validation lists", f"valid_ndcg@{cfg.objective.k}": by_prior[prior]}
    u, r, mean = _rates(np.r_[train_codes, valid_codes], np.r_[train_gain, valid_gain], prior)
    info.update({"prior": prior, "videos": len(u), "mean_gain": mean})
    return _lookup(u, r, mean, codes), info


# --------------------------------------------------------------------------------------------
# judging policies


def judge(
    lists: LoggedLists,
    scores: Mapping[str, np.ndarray],
    cfg: Config,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per policy: mean NDCG@k, recall@k and top-k gain over the lists with bootstrap intervals,
    and the paired difference from popularity (``scores``: policy -> a score per row)."""
    k = cfg.objective.k
    ls = Lists(lists.list_index(), lists.gain, k=k, min_size=1, seed=seed)
    assert ls.n_lists == len(lists), "every replayed list counts"
    per: dict[str, ListMetrics] = {name: ls.metrics(s) for name, s in scores.items()}
    base = per.get(POPULARITY)
    out: dict[str, Any] = {}
    for name, m in per.items():
        entry: dict[str, Any] = {}
        for metric in NAMES:
            v = getattr(m, metric)
            low, high = bootstrap_ci(v, resamples=resamples, confidence=confidence, seed=seed)
            entry[f"{metric}@{k}"] = {"mean": float(v.mean()), "low": low, "high": high}
        if base is not None and name != POPULARITY:
            diff = m.ndcg - base.ndcg
            low, high = bootstrap_ci(diff, resamples=resamples, confidence=confidence, seed=seed)
            entry[f"ndcg@{k}_minus_popularity"] = {"mean": float(diff.mean()), "low": low, "high": high}
        out[name] = entry
    return out


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, 7]).random(n)


class HistoriesAsOf:
    """Every user's events of each sequence, to give a replayed request the histories it would
    have had: the events strictly before a time (the list's first impression), the latest
    ``max_len`` of them -- what a live service holds when each impression's feedback arrives after
    it. A store loaded from the whole log would show a test list its own and later events."""

    def __init__(
        self, cfg: Config, specs: Sequence[SequenceSpec], data_dir: str | Path | None = None
    ) -> None:
        self.specs = list(specs)
        self.tables = load_event_tables(cfg.data, self.specs, data_dir, keep_all=True)
        self.index = {name: {u: i for i, u in enumerate(t.users)} for name, t in self.tables.items()}

    def at(self, user_id: str, time: float) -> dict[str, np.ndarray]:
        """sequence -> canonical item codes (L, K), oldest first, of the events before ``time``."""
        out: dict[str, np.ndarray] = {}
        for q in self.specs:
            i = self.index[q.name].get(user_id)
            if i is None:
                out[q.name] = np.zeros((0, q.width), np.int64)
                continue
            h = self.tables[q.name].history(i)
            end = int(np.searchsorted(h.times, time, side="left"))  # strictly earlier
            out[q.name] = h.codes[max(0, end - q.max_len) : end]
        return out


def list_times(lists: LoggedLists) -> np.ndarray | None:
    """(L,) each list's first impression time (None: the log has no time column)."""
    if lists.split_times is None or len(lists) == 0:
        return None
    row_t = lists.split_times[lists.split_rows]
    return np.minimum.reduceat(row_t, lists.starts[:-1].astype(np.int64))


def at_list_time(lists: LoggedLists) -> np.ndarray:
    """(n,) the rows logged at their list's first impression time: a history as of the list's
    time is the one offline evaluation gives such a row (events strictly before the row)."""
    lt = list_times(lists)
    if lt is None:
        return np.zeros(lists.rows, dtype=bool)
    out: np.ndarray = lists.split_times[lists.split_rows] == np.repeat(lt, np.diff(lists.starts))  # type: ignore[index]
    return out


def parity(
    lists: LoggedLists,
    served: Mapping[str, np.ndarray],
    offline: Mapping[str, np.ndarray],
    histories: bool = False,
) -> dict[str, Any]:
    """The largest difference per head between the served scores and offline evaluation's of the
    same rows: those logged in their list's request context (the others were scored in it) and,
    for a model with ``histories``, at their list's first impression time (``at_list_time``)."""
    m = lists.same_context & at_list_time(lists) if histories else lists.same_context
    rows = lists.split_rows[m]
    out: dict[str, Any] = {"rows": int(m.sum()), "max_abs_diff": {}}
    for head, s in served.items():
        d = np.abs(np.asarray(s)[m] - np.asarray(offline[head])[rows])
        out["max_abs_diff"][head] = float(d.max()) if len(d) else 0.0
    return out


def report(
    lists: LoggedLists,
    cfg: Config,
    policies: Mapping[str, Mapping[str, Any]],
    *,
    version: str,
    via: str,
    split: str,
    served: Mapping[str, Any],
    parity_check: Mapping[str, Any] | None,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    return {
        "version": version,
        "arch": cfg.model.arch,
        "config": cfg.name,
        "split": split,
        "via": via,
        "objective": describe(cfg),
        "counts": lists.counts,
        "served": dict(served),
        "popularity": lists.popularity_info,
        "policies": {k: dict(v) for k, v in policies.items()},
        "parity": dict(parity_check) if parity_check is not None else None,
        "bootstrap": {"resamples": resamples, "confidence": confidence, "seed": seed, "over": "lists"},
    }


def table_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    """The report as table rows: policy, NDCG@k, recall@k, top-k gain (mean [low, high]) and the
    NDCG difference from popularity."""
    k = rep["objective"]["k"]

    def cell(e: Mapping[str, float] | None, signed: bool = False) -> str:
        if not e:
            return "-"
        f = "{:+.4f}" if signed else "{:.4f}"
        return f"{f.format(e['mean'])} [{f.format(e['low'])}, {f.format(e['high'])}]"

    out = []
    for name, e in rep["policies"].items():
        out.append(
            [
                name,
                cell(e.get(f"ndcg@{k}")),
                cell(e.get(f"recall@{k}")),
                cell(e.get(f"top_gain@{k}")),
                cell(e.get(f"ndcg@{k}_minus_popularity"), signed=True),
            ]
        )
    return out


def table_header(rep: Mapping[str, Any]) -> list[str]:
    k = rep["objective"]["k"]
    return ["policy", f"NDCG@{k}", f"recall@{k}", f"mean gain top {k}", f"NDCG@{k} - popularity"]
