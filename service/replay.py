"""``mtrank replay``: a split's logged lists sent through the service's own ranking path, judged
by the model's ``[objective]`` (``model.replay``).

In process, each list is one /rank request handled exactly as the route handles it -- the JSON
body parsed and planned against the served model (``service.ranking``), features fetched from the
embedded store, inline features applied, scored and combined (``score_plan``) -- without HTTP. With
``url``, the requests go to a running server instead. Either way every candidate is ranked, and
the response's combined score (the served default) and each head's score are kept per row.

The in-process replay also scores the split offline (``model.train.predict`` on the encoded rows)
and reports the largest difference per head on the rows logged in their list's request context:
the service path and offline evaluation must agree (train/serve parity).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from model import (
    CheckpointError,
    Config,
    combine_scores,
    load_checkpoint,
    prepare_data,
    resolve_checkpoint,
    sharded,
)
from model.replay import (
    POPULARITY,
    RANDOM,
    SERVED,
    UNFITTED,
    HistoriesAsOf,
    LoggedLists,
    judge,
    list_times,
    logged_lists,
    parity,
    random_scores,
    report,
)
from service.metrics import Metrics
from service.ranking import apply_inline_features, parse_rank_request, plan_request, score_plan
from service.reload import ModelHolder
from service.settings import Settings
from service.store import EmbeddedStore

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class ReplayError(Exception):
    """A replay that cannot run (no such model, a server that refuses the requests, ...)."""


@dataclass
class Served:
    """What the service returned for every replayed row: the combined score and each head's."""

    version: str
    scores: np.ndarray  # (n,)
    heads: dict[str, np.ndarray]  # head -> (n,)
    scoring: dict[str, Any]  # the served combination (GET /model's "scoring")


async def _serve_in_process(
    settings: Settings, version: str, lists: LoggedLists, progress: ProgressFn | None
) -> Served:
    store = EmbeddedStore(settings.data_dir)
    holder = ModelHolder(settings, store, Metrics())
    try:
        active = await holder.activate(version, "startup")
        specs = active.ranker.schema.sequences
        as_of, times = None, list_times(lists)
        if specs:  # the histories each list would have had, not the whole log's
            if times is None:
                raise ReplayError("a model with user histories needs the log's time column to replay")
            cfg = active.ranker.config  # the data the store itself would build histories from
            as_of = await asyncio.to_thread(HistoriesAsOf, cfg, specs, settings.data_dir)
        n = lists.rows
        scores = np.empty(n)
        heads = {h: np.empty(n) for h in active.heads}
        for i in range(len(lists)):
            a, b = int(lists.starts[i]), int(lists.starts[i + 1])
            req = parse_rank_request(orjson.dumps(lists.request(i)))
            plan = plan_request(req, active, settings)
            fetched = await store.fetch(plan.user_id, plan.ids, active.columns)
            if as_of is not None and times is not None:
                fetched.history = as_of.at(plan.user_id, float(times[i]))
            apply_inline_features(fetched.videos, plan, active.ranker.schema)
            scored = score_plan(active, fetched, plan, active.combine)
            scores[a:b] = scored.scores
            for h in active.heads:
                heads[h][a:b] = scored.heads[h]
            if progress is not None and (i + 1) % 500 == 0:
                progress(i + 1, len(lists))
        scoring = holder.describe()["scoring"]
        return Served(active.version, scores, heads, scoring)
    finally:
        await store.close()


def serve_in_process(
    settings: Settings, version: str, lists: LoggedLists, progress: ProgressFn | None = None
) -> Served:
    """Every list through the service's ranking path, in this process (embedded store)."""
    big = max(int(np.diff(lists.starts).max()), settings.max_candidates)
    settings = settings.model_copy(update={"feature_store": "embedded", "max_candidates": big})
    return asyncio.run(_serve_in_process(settings, version, lists, progress))


class _Client:
    """A keep-alive HTTP/1.1 connection to a running server."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ReplayError(f"--url must be http(s)://host[:port], got {url!r}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(parts.hostname, parts.port, timeout=timeout)
        self.base = parts.path.rstrip("/")

    def call(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {"content-type": "application/json"} if body is not None else {}
        try:
            self.conn.request(method, self.base + path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            raise ReplayError(f"{method} {path}: {e}") from e
        if resp.status != 200:
            raise ReplayError(f"{method} {path}: HTTP {resp.status}: {data[:500].decode(errors='replace')}")
        return orjson.loads(data)


def server_model(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """A running server's GET /model."""
    info: dict[str, Any] = _Client(url, timeout).call("GET", "/model")
    if not info.get("version"):
        raise ReplayError(f"{url} serves no model yet")
    return info


def serve_url(
    url: str, lists: LoggedLists, progress: ProgressFn | None = None, timeout: float = 30.0
) -> Served:
    """Every list as a POST /rank to a running server."""
    client = _Client(url, timeout)
    info = client.call("GET", "/model")
    n = lists.rows
    scores = np.empty(n)
    heads: dict[str, np.ndarray] = {h: np.empty(n) for h in info.get("heads", [])}
    versions: set[str] = set()
    for i in range(len(lists)):
        a = int(lists.starts[i])
        body = lists.request(i)
        out = client.call("POST", "/rank", orjson.dumps(body))
        versions.add(out["model_version"])
        pos = {v: j for j, v in enumerate(body["candidates"])}
        for item in out["items"]:
            j = a + pos[item["video_id"]]
            scores[j] = item["score"]
            for h, v in item["heads"].items():
                heads.setdefault(h, np.full(n, np.nan))[j] = v
        if progress is not None and (i + 1) % 500 == 0:
            progress(i + 1, len(lists))
    if len(versions) > 1:
        raise ReplayError(f"the server switched model versions during the replay: {sorted(versions)}")
    return Served(versions.pop(), scores, heads, info.get("scoring", {}))


def offline_heads(
    artifacts: Path, version: str, cfg: Config, split: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Offline evaluation's per-head scores of every row of the split (``model.train.predict`` on
    the encoded rows), and the rows' times (None: the log has no time column)."""
    from model import predict

    ckpt = load_checkpoint(resolve_checkpoint(artifacts, version))
    rows = getattr(sharded(prepare_data(cfg, artifacts, schema=ckpt.schema)), split)
    times = [p.times for p in rows.parts()]
    both = times and all(t is not None for t in times)
    return predict(ckpt.model, rows, ckpt.config.tasks), np.concatenate(times) if both else None


def run_replay(
    *,
    artifacts: Path,
    version: str | None = None,
    url: str | None = None,
    config: Config | None = None,
    settings: Settings | None = None,
    split: str = "test",
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_lists: int | None = None,
    check_parity: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Replay a split through the service (in process, or at ``url``) and judge every policy.

    The data (log, split, objective) is the model's config (with ``url``: the config of the version
    the server serves, from ``artifacts``), or ``config`` when given."""
    t0 = time.perf_counter()
    local: str | None = None
    if url is not None:
        info = server_model(url)  # the public view: version, heads, scoring (no config)
        try:
            local = resolve_checkpoint(artifacts, info["version"]).name
        except CheckpointError:  # the server's version is not in these artifacts: no offline parity
            local = None
        if config is not None:
            cfg = config
        elif local is not None:
            cfg = load_checkpoint(resolve_checkpoint(artifacts, local)).config
        else:
            raise ReplayError(
                f"{url} serves model {info['version']}, which is not under {artifacts}: pass the artifacts "
                "holding it, or --config with its data and objective"
            )
    else:
        path = resolve_checkpoint(artifacts, version)
        cfg, local = config if config is not None else load_checkpoint(path).config, path.name
    lists = logged_lists(cfg, split)
    if max_lists is not None and max_lists < len(lists):
        lists = lists.take(max_lists)
    log.info("replay: %d lists, %d rows of the %s split", len(lists), lists.rows, split)
    if url is not None:
        served = serve_url(url, lists, progress)
        via = f"POST {url.rstrip('/')}/rank"
    else:
        assert local is not None
        settings = settings if settings is not None else Settings(artifacts=artifacts)
        served = serve_in_process(
            settings.model_copy(update={"artifacts": artifacts}), local, lists, progress
        )
        via = "the service's ranking path in process (embedded store)"
    policies: dict[str, np.ndarray] = {SERVED: served.scores}
    binary = all(t.kind == "binary" for t in cfg.tasks)  # every weight 1: the unfitted default
    policies[UNFITTED] = combine_scores(
        served.heads, dict.fromkeys(served.heads, 1.0), "product" if binary else "sum"
    )
    policies.update({f"head:{h}": s for h, s in served.heads.items()})
    policies[POPULARITY] = lists.popularity
    policies[RANDOM] = random_scores(lists.rows, seed)
    judged = judge(lists, policies, cfg, resamples=resamples, confidence=confidence, seed=seed)
    parity_check = None
    if check_parity and local is not None and local == served.version:
        offline, times = offline_heads(artifacts, local, cfg, split)
        logged = lists.split_times
        if times is not None and logged is not None and not np.array_equal(times, logged, equal_nan=True):
            raise ReplayError(f"the {split} split's encoded rows are not the logged rows (times differ)")
        parity_check = parity(lists, served.heads, offline, histories=bool(cfg.data.sequences))
    out = report(
        lists,
        cfg,
        judged,
        version=served.version,
        via=via,
        split=split,
        served=served.scoring,
        parity_check=parity_check,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
