"""Batch scoring: the small public surface the online service uses.

``Ranker.load(path)`` loads a checkpoint; ``Ranker.score(user, videos, context)`` takes canonical
feature rows (see ``model.features``) for one user, B candidate videos and one context and returns
per-head scores: probabilities for binary heads, predictions in label units for regression heads.
``combine_scores`` turns the heads into the one ranking score; ``Ranker.combination`` is the
combination fitted for the checkpoint's ``[objective]`` after training (``model.combination``), if any.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from model.checkpoint import Checkpoint, CorruptCheckpointError, load_checkpoint
from model.config import Config, TaskConfig
from model.features import GROUPS, CanonicalRows, FeatureSchema, Group
from model.nets import History, RequestBatch
from model.objective import Combination, combination_from_manifest
from model.sequences import encode_events

log = logging.getLogger(__name__)

Combine = Literal["product", "sum"]
Backend = Literal["onnx", "eager"]


def head_outputs(raw: Mapping[str, torch.Tensor], tasks: list[TaskConfig]) -> dict[str, np.ndarray]:
    """Network outputs -> scores: sigmoid for binary heads, inverse label transform for regression."""
    out: dict[str, np.ndarray] = {}
    for t in tasks:
        y = raw[t.name].float()
        if t.kind == "binary":
            y = torch.sigmoid(y)
        elif t.transform == "log1p":
            y = torch.expm1(y.clamp(min=0.0))
        out[t.name] = y.detach().cpu().numpy().astype(np.float64)
    return out


def combine_scores(
    heads: Mapping[str, np.ndarray], weights: Mapping[str, float], method: Combine = "product"
) -> np.ndarray:
    """One ranking score per item from the per-head scores.

    ``product``: prod_i s_i ** w_i (a weighted geometric combination, scale-free per head);
    ``sum``:     sum_i w_i * s_i.
    Heads without a weight (or with weight 0) do not contribute.
    """
    n = len(next(iter(heads.values())))
    if method == "product":
        log_score = np.zeros(n)
        for name, w in weights.items():
            if w:
                log_score += w * np.log(np.clip(heads[name], 1e-12, None))
        return np.exp(log_score)
    if method == "sum":
        score = np.zeros(n)
        for name, w in weights.items():
            if w:
                score += w * heads[name]
        return score
    raise ValueError(f"unknown combine method {method!r}")


def combine_for(tasks: list[TaskConfig]) -> Combine:
    """How a model's heads combine when nobody says: the product of probabilities when every head is
    binary, the sum otherwise (a regression head's prediction can be 0 or negative: no product of
    powers)."""
    return "product" if all(t.kind == "binary" for t in tasks) else "sum"


class Ranker:
    """A loaded, validated model ready to score. Immutable; safe to share between threads."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self.model = ckpt.model.eval()
        tasks = ckpt.config.tasks
        try:
            fitted = combination_from_manifest(ckpt.manifest, [t.name for t in tasks])
        except ValueError as e:
            raise CorruptCheckpointError(f"{ckpt.path}: {e}") from None
        if fitted is not None and fitted.method == "product" and any(t.kind != "binary" for t in tasks):
            raise CorruptCheckpointError(f"{ckpt.path}: a product combination of non-probability heads")
        self.combination: Combination | None = fitted  # fitted after training (None: not fitted)
        self._compiled: Callable[[RequestBatch], Mapping[str, torch.Tensor]] | None = None
        self.backend: Backend = "eager"
        self.backend_info: dict[str, Any] = {"backend": "eager"}

    @classmethod
    def load(cls, path: str | Path, key: bytes | str | None = None) -> Ranker:
        """Load a version folder (``key``: the deployment key, see ``load_checkpoint``)."""
        return cls(load_checkpoint(path, key))

    # -- description -------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._ckpt.version

    @property
    def path(self) -> Path:
        return self._ckpt.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self._ckpt.manifest

    @property
    def config(self) -> Config:
        return self._ckpt.config

    @property
    def schema(self) -> FeatureSchema:
        return self._ckpt.schema

    @property
    def tasks(self) -> list[TaskConfig]:
        return self._ckpt.config.tasks

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    # -- compiled forward ----------------------------------------------------------------------
    def compile(self, backend: Backend = "onnx", threads: int = 1) -> None:
        """Serve the request forward through ``backend`` (``model.compiled``) from now on, once it
        matched the eager forward on probe requests; on any failure the eager forward stays (the
        reason is in ``backend_info`` and the log). Call before the ranker is shared."""
        if backend == "eager":
            return
        from model.compiled import CompileError, OnnxForward

        try:
            onnx = OnnxForward.build(self.model, self.schema, threads=threads)
        except CompileError as e:
            log.warning("model %s: the ONNX Runtime forward is not used, eager instead: %s", self.version, e)
            self.backend_info = {"backend": "eager", "wanted": backend, "fallback_reason": str(e)}
            return
        self._compiled, self.backend = onnx, "onnx"
        self.backend_info = {
            "backend": "onnx",
            "build_seconds": round(onnx.build_seconds, 3),
            "max_abs_diff_vs_eager": onnx.max_abs_diff,
        }
        log.info("model %s: ONNX Runtime forward built in %.1fs", self.version, onnx.build_seconds)

    # -- scoring -----------------------------------------------------------------------------
    def score_encoded(
        self, cats: np.ndarray, nums: np.ndarray, history: History | None = None
    ) -> dict[str, np.ndarray]:
        """Encoded rows (B, C) int64 / (B, F) float32 (and histories with B rows) -> per-head
        scores (B,)."""
        with torch.inference_mode():
            raw = self.model(torch.from_numpy(cats), torch.from_numpy(nums), None, history)
        return head_outputs(raw, self.tasks)

    def encode_history(self, history: Mapping[str, np.ndarray] | None) -> History | None:
        """One user's canonical histories (sequence -> codes (L, K) int64, oldest first) -> the
        network's input (1 row per sequence: the latest max_len events); a sequence missing from
        ``history`` is an empty history. None for a model without sequences."""
        if not self.schema.sequences:
            return None
        specs = {f.name: f for f in self.schema.cats("video")}
        out = {}
        for q in self.schema.sequences:
            codes = history.get(q.name) if history is not None else None
            if codes is None:
                codes = np.zeros((0, q.width), dtype=np.int64)
            items, n = encode_events(codes, [specs[c] for c in q.items], q.max_len)
            out[q.name] = (torch.from_numpy(items)[None], torch.tensor([n], dtype=torch.long))
        return out

    def encode(
        self, user: CanonicalRows, videos: CanonicalRows, context: CanonicalRows
    ) -> tuple[np.ndarray, np.ndarray]:
        """Canonical rows -> model inputs. ``user`` and ``context`` have 1 row (broadcast) or B rows."""
        n = len(videos)
        rows: dict[Group, CanonicalRows] = {"user": user, "video": videos, "context": context}
        cats, nums = [], []
        for g in GROUPS:
            c, x = self.schema.encode(g, rows[g])
            if c.shape[0] != n:
                if c.shape[0] != 1:
                    raise ValueError(f"{g} rows: expected 1 or {n}, got {c.shape[0]}")
                c, x = np.broadcast_to(c, (n, c.shape[1])), np.broadcast_to(x, (n, x.shape[1]))
            cats.append(c)
            nums.append(x)
        return np.concatenate(cats, axis=1), np.concatenate(nums, axis=1)

    def score(
        self,
        user: CanonicalRows,
        videos: CanonicalRows,
        context: CanonicalRows,
        history: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-head scores (B,) for B candidates of one request (user and context: 1 row each;
        ``history``: the user's canonical histories, see ``encode_history``)."""
        hist = self.encode_history(history)
        if len(user) != 1 or len(context) != 1:
            n = len(videos)
            full = (
                None
                if hist is None
                else {k: (v.expand(n, -1, -1), m.expand(n)) for k, (v, m) in hist.items()}
            )
            return self.score_encoded(*self.encode(user, videos, context), full)
        t = torch.from_numpy
        (uc, un), (vc, vn), (cc, cn) = (
            self.schema.encode(g, r) for g, r in zip(GROUPS, (user, videos, context), strict=True)
        )
        batch = RequestBatch(t(uc), t(vc), t(cc), t(un), t(vn), t(cn), hist)
        with torch.inference_mode():
            raw = self._compiled(batch) if self._compiled is not None else self.model.forward_request(batch)
        return head_outputs(raw, self.tasks)

    def warmup(self, n: int = 512, rounds: int = 3) -> None:
        """Run a few forward passes at serving batch sizes (allocator, kernels, lazy init)."""
        s = self.schema
        for _ in range(rounds):
            for b in (1, n):
                self.score(
                    s.default_rows("user", 1), s.default_rows("video", b), s.default_rows("context", 1)
                )
