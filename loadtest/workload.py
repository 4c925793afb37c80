"""Workload model and response checks for the /rank load test.

Deliberately free of any ``locust`` import: importing locust runs ``gevent.monkey.patch_all()``, which
would leak into whatever process imports it (e.g. the pytest run). The locustfile imports this module;
the unit tests import it directly.

Workload: a user id drawn uniformly from the KuaiRand-Pure user table, and a candidate list of distinct
video ids drawn without replacement from a Zipf popularity distribution over the video table (a handful of
head videos appear in almost every request, the long tail rarely), like the output of a real retrieval
stage. A share of the rankings is followed by feedback (``POST /events``): the user watched one to three
of the top items, each label drawn with its own probability (``parse_event_labels``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Where the KuaiRand-Pure files live beside a checkout; in containers MTRANK_DATA_DIR=/data.
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "kuairand-pure"
USER_TABLE = "user_features_pure.csv"
VIDEO_TABLE = "video_features_basic_pure.csv"
# Id ranges of KuaiRand-Pure, used when the tables are not available (e.g. a bare load-generator box).
FALLBACK_NUM_USERS = 27285  # user_id 0..27284
FALLBACK_NUM_VIDEOS = 7583  # video_id 0..7582

MIN_CANDIDATES = 100
MAX_CANDIDATES = 1000
NUM_TABS = 15  # KuaiRand `tab` takes values 0..14


@dataclass(frozen=True)
class Catalog:
    users: np.ndarray  # int64 user ids
    videos: np.ndarray  # int64 video ids, most popular first
    source: str  # where the ids came from, for the log


def read_id_column(path: Path, column: str) -> np.ndarray | None:
    """Distinct integer ids of ``column`` in a CSV file, in first-seen order; None if unreadable."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or column not in reader.fieldnames:
                log.warning("%s has no %r column", path, column)
                return None
            ids = [int(float(row[column])) for row in reader if row[column] not in ("", None)]
    except (OSError, ValueError) as exc:
        log.warning("cannot read ids from %s: %s", path, exc)
        return None
    if not ids:
        return None
    return np.asarray(list(dict.fromkeys(ids)), dtype=np.int64)


def resolve_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = env.get("MTRANK_DATA_DIR")
    return Path(value) if value else DEFAULT_DATA_DIR


def load_catalog(data_dir: Path | None = None, seed: int = 0) -> Catalog:
    """User and video ids from the KuaiRand-Pure tables, or the known id ranges if they are absent.

    Video popularity order is a fixed (seeded) permutation of the catalog, so popularity is unrelated to
    id order and every load-generator process agrees on which videos are "hot".
    """
    data_dir = resolve_data_dir() if data_dir is None else data_dir
    users = read_id_column(data_dir / USER_TABLE, "user_id")
    videos = read_id_column(data_dir / VIDEO_TABLE, "video_id")
    sources = []
    if users is None:
        users = np.arange(FALLBACK_NUM_USERS, dtype=np.int64)
        sources.append(f"users: range(0, {FALLBACK_NUM_USERS})")
    else:
        sources.append(f"users: {data_dir / USER_TABLE}")
    if videos is None:
        videos = np.arange(FALLBACK_NUM_VIDEOS, dtype=np.int64)
        sources.append(f"videos: range(0, {FALLBACK_NUM_VIDEOS})")
    else:
        sources.append(f"videos: {data_dir / VIDEO_TABLE}")
    videos = np.random.default_rng(seed).permutation(videos)
    return Catalog(users=users, videos=videos, source="; ".join(sources))


class ZipfSampler:
    """Sample distinct items without replacement, item k (0-based popularity rank) with weight 1/(k+1)^s.

    Uses the Gumbel-top-k trick (equivalent to successive weighted draws without replacement): one
    vectorised pass over the catalog per request, cheap enough to run inside every simulated user.
    """

    def __init__(self, items: Sequence[int] | np.ndarray, s: float = 1.0) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        if self.items.ndim != 1 or len(self.items) == 0:
            raise ValueError("ZipfSampler needs a non-empty 1-d sequence of items")
        if s < 0 or not math.isfinite(s):
            raise ValueError(f"Zipf exponent must be finite and >= 0, got {s}")
        self.s = s
        self._log_weights = -s * np.log(np.arange(1, len(self.items) + 1, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if not 0 < n <= len(self.items):
            raise ValueError(f"cannot draw {n} distinct items from a catalog of {len(self.items)}")
        keys = self._log_weights + rng.gumbel(size=len(self.items))
        top = np.argpartition(-keys, n - 1)[:n]
        return self.items[top[np.argsort(-keys[top])]]


def candidate_count(
    rng: np.random.Generator, fixed: int | None = None, lo: int = MIN_CANDIDATES, hi: int = MAX_CANDIDATES
) -> int:
    """The fixed size if given, else uniform on [lo, hi]."""
    if fixed is not None:
        if fixed <= 0:
            raise ValueError(f"candidate count must be positive, got {fixed}")
        return fixed
    return int(rng.integers(lo, hi, endpoint=True))


def build_request(
    rng: np.random.Generator,
    users: Sequence[int] | np.ndarray,
    videos: ZipfSampler,
    n: int,
    top_k: int | None = None,
) -> dict[str, Any]:
    """One POST /rank body: a random user, n distinct Zipf-popular candidates, a random context."""
    user_id = int(users[int(rng.integers(len(users)))])
    candidates = [int(v) for v in videos.sample(rng, n)]
    body: dict[str, Any] = {
        "user_id": user_id,
        "candidates": candidates,
        "context": {"tab": int(rng.integers(NUM_TABS)), "hour": int(rng.integers(24))},
    }
    if top_k is not None:
        body["top_k"] = top_k
    return body


DEFAULT_EVENT_LABELS = "long_view:0.3,is_like:0.02"  # KuaiRand-Pure's rates of the two head labels


def parse_event_labels(spec: str) -> dict[str, float]:
    """ "label:probability,..." -> {label: probability}."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, prob = part.strip().partition(":")
        try:
            p = float(prob)
        except ValueError:
            p = -1.0
        if not sep or not name or not 0 <= p <= 1:
            raise ValueError(f"event labels: want label:probability (0..1), got {part.strip()!r}")
        out[name] = p
    return out


def build_events(
    rng: np.random.Generator,
    request: Mapping[str, Any],
    ranked: Mapping[str, Any],
    labels: Mapping[str, float],
    now_ms: float,
    id_prefix: str,
) -> dict[str, Any]:
    """One POST /events body after a ranking: the user engaged with one to three of the top items."""
    items = ranked.get("items") or []
    n = min(len(items), int(rng.integers(1, 4)))
    events = []
    for k, item in enumerate(items[:n]):
        events.append(
            {
                "event_id": f"{id_prefix}-{k}",
                "user_id": request["user_id"],
                "video_id": item["video_id"],
                "timestamp": now_ms + k,
                "labels": {name: int(rng.random() < p) for name, p in labels.items()},
            }
        )
    return {"events": events}


def validate_events_response(req: Mapping[str, Any], body: Any) -> str | None:
    """Check a /events response: every event accepted (the ids are fresh), counts per history."""
    if not isinstance(body, Mapping):
        return f"response body is {type(body).__name__}, not an object"
    n = len(req.get("events", []))
    if body.get("accepted") != n or body.get("duplicates") != 0:
        got = f"{body.get('accepted')!r} / {body.get('duplicates')!r}"
        return f"expected {n} accepted and 0 duplicates, got {got}"
    appended = body.get("appended")
    if not isinstance(appended, Mapping) or any(
        not isinstance(v, int) or not 0 <= v <= n for v in appended.values()
    ):
        return f"appended must map histories to counts in 0..{n}, got {appended!r}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_response(req: Mapping[str, Any], body: Any) -> str | None:
    """Check a /rank response body against the request that produced it; an error message or None.

    Video ids are compared as strings so an id echoed back as "42" for 42 is not reported as a failure.
    """
    if not isinstance(body, Mapping):
        return f"response body is {type(body).__name__}, not an object"
    version = body.get("model_version")
    if not isinstance(version, str) or not version:
        return "model_version missing or empty"
    if not isinstance(body.get("degraded"), bool):
        return "degraded missing or not a boolean"
    items = body.get("items")
    if not isinstance(items, list):
        return "items missing or not a list"

    sent = [str(c["video_id"]) if isinstance(c, Mapping) else str(c) for c in req.get("candidates", [])]
    top_k = req.get("top_k")
    expected_len = len(sent) if top_k is None else min(int(top_k), len(sent))
    if len(items) != expected_len:
        return f"expected {expected_len} items, got {len(items)}"

    returned: list[str] = []
    scores: list[float] = []
    head_names: set[str] | None = None  # the served model's heads: the same for every item
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            return f"items[{i}] is not an object"
        if "video_id" not in item:
            return f"items[{i}] has no video_id"
        if not _is_number(item.get("score")):
            return f"items[{i}].score is not a finite number: {item.get('score')!r}"
        heads = item.get("heads")
        if not isinstance(heads, Mapping) or not heads or any(not _is_number(v) for v in heads.values()):
            return f"items[{i}].heads must map the model's heads to finite scores, got {heads!r}"
        head_names = set(heads) if head_names is None else head_names
        if set(heads) != head_names:
            return f"items[{i}].heads names {sorted(heads)}, items[0] {sorted(head_names)}"
        returned.append(str(item["video_id"]))
        scores.append(float(item["score"]))

    ranks = [item.get("rank") for item in items]
    if ranks != list(range(1, len(items) + 1)):
        bad = next(i for i, r in enumerate(ranks) if r != i + 1)
        return f"ranks are not 1..{len(items)}: items[{bad}].rank = {ranks[bad]!r}"
    for i in range(1, len(scores)):
        if scores[i] > scores[i - 1]:
            return f"items not sorted by score: items[{i}] {scores[i]} > items[{i - 1}] {scores[i - 1]}"

    if top_k is None:
        if Counter(returned) != Counter(sent):
            missing = sorted(set(sent) - set(returned))[:5]
            extra = sorted(set(returned) - set(sent))[:5]
            dup = sorted(v for v, c in Counter(returned).items() if c > 1)[:5]
            return f"ids differ from candidates: missing={missing} unexpected={extra} duplicated={dup}"
    else:
        if len(set(returned)) != len(returned):
            return "duplicate video ids in a top_k response"
        extra = sorted(set(returned) - set(sent))[:5]
        if extra:
            return f"returned ids that were not candidates: {extra}"
    return None


def slo_violations(num_requests: int, fail_ratio: float, p99_ms: float, slo_p99_ms: float) -> list[str]:
    """Reasons the run breaks its SLO (empty list: the run passes)."""
    reasons = []
    if num_requests == 0:
        reasons.append("no requests were made")
    if fail_ratio > 0:
        reasons.append(f"failure ratio {fail_ratio:.2%} > 0")
    if p99_ms > slo_p99_ms:
        reasons.append(f"p99 latency {p99_ms:.0f} ms > SLO {slo_p99_ms:g} ms")
    return reasons


def env_int(name: str, env: Mapping[str, str] | None = None) -> int | None:
    env = os.environ if env is None else env
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def env_float(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
