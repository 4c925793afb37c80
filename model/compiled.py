"""The serving forward, compiled: ONNX Runtime runs a network's request graph.

``OnnxForward.build(net, schema)`` exports ``net.forward_request`` (one user row, one context row,
B candidates; B is a dynamic dimension) with torch.onnx's tracing exporter, in memory, and opens an
ONNX Runtime session on the graph (which folds the request-split weight gathers into constants).
Nothing is written to disk and nothing is unpickled: the graph is traced again from the weights of
the loaded safetensors checkpoint at every model load.

A model with user histories (``[[data.sequences]]``) gets two more inputs per history, its items
(1, max_len, K) and its length (1,): the history's embeddings, attention keys and pooling are part
of the graph, like the rest of the request forward.

Before it is handed out, ``build`` runs the session and the eager ``forward_request`` on probe
requests of several sizes (random valid feature indices, random numerics) and refuses a graph
whose raw outputs differ by more than ``ATOL + RTOL * |eager|``. ``Ranker.compile`` catches any
failure here and keeps the eager forward (model.scoring).

Why ONNX Runtime and not ``torch.compile``: both run the request graph faster than eager, but the
ONNX graph builds in about a second where ``torch.compile`` takes tens of seconds, and each worker
process builds its own at start and at every hot reload (figures: docs/performance.md). The
tracing exporter (``dynamo=False``) is used because it builds
in 0.3 s against 4-7 s for the dynamo exporter on the same graph; it is deprecated in torch 2.x:
should a later torch drop it, the export fails, is logged, and the eager forward serves.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.features import GROUPS, FeatureSchema, Group
from model.nets import MultiTaskNet, RequestBatch

log = logging.getLogger(__name__)

INPUTS = ("user_cats", "video_cats", "context_cats", "user_nums", "video_nums", "context_nums")
PROBE_SIZES = (1, 7, 256)  # candidates per probe request (1: the dynamic dimension's edge)
ATOL, RTOL = 1e-4, 1e-4  # raw outputs (logits, transformed regression values)


class CompileError(Exception):
    """The request graph could not be exported, opened or validated against eager."""


class _RequestGraph(nn.Module):
    """``forward_request`` with plain tensor inputs and one stacked (T, B) output; after the six
    feature inputs, each history's items and length (``sequences``' order)."""

    def __init__(self, net: MultiTaskNet, sequences: list[str]) -> None:
        super().__init__()
        self.net, self.sequences = net, sequences

    def forward(
        self, uc: Tensor, vc: Tensor, cc: Tensor, un: Tensor, vn: Tensor, cn: Tensor, *hist: Tensor
    ) -> Tensor:
        history = {name: (hist[2 * i], hist[2 * i + 1]) for i, name in enumerate(self.sequences)}
        out = self.net.forward_request(RequestBatch(uc, vc, cc, un, vn, cn, history or None))
        return torch.stack([out[t] for t in self.net.tasks])


def input_names(sequences: list[str]) -> list[str]:
    return [*INPUTS, *(f"{name}.{part}" for name in sequences for part in ("items", "len"))]


def batch_arrays(r: RequestBatch, schema: FeatureSchema | None = None) -> tuple[Tensor, ...]:
    """The graph's inputs of a request: the six feature tensors, then each history's items and
    length (an empty history when the request has none)."""
    out = [r.user_cats, r.video_cats, r.context_cats, r.user_nums, r.video_nums, r.context_nums]
    for q in schema.sequences if schema is not None else []:
        got = r.history.get(q.name) if r.history is not None else None
        if got is None:
            got = (torch.zeros(1, q.max_len, q.width, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        out += [got[0], got[1]]
    return tuple(out)


def probe_request(schema: FeatureSchema, b: int, gen: torch.Generator) -> RequestBatch:
    """A request of ``b`` candidates with random valid encoded features (indices below each
    field's cardinality, numerics ~ N(0, 1)) and random histories (valid item indices, a random
    length from empty to full)."""
    cards = iter(f.cardinality for f in schema.cats())
    parts: dict[str, Tensor] = {}
    for g, rows in zip(GROUPS, (1, b, 1), strict=True):
        cat_names, num_names = schema.columns(g)
        cols = [torch.randint(0, next(cards), (rows,), generator=gen) for _ in cat_names]
        parts[f"{g}_cats"] = torch.stack(cols, 1) if cols else torch.zeros(rows, 0, dtype=torch.long)
        parts[f"{g}_nums"] = torch.randn(rows, len(num_names), generator=gen)
    history = {}
    by_name = {f.name: f.cardinality for f in schema.cats("video")}
    for q in schema.sequences:
        items = torch.stack(
            [torch.randint(0, by_name[c], (1, q.max_len), generator=gen) for c in q.items], dim=2
        )
        history[q.name] = (items, torch.randint(0, q.max_len + 1, (1,), generator=gen))
    return RequestBatch(**parts, history=history or None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines and warnings stay out of the service's log."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_widths(net: MultiTaskNet, schema: FeatureSchema) -> None:
    """CompileError for a request whose candidate part or whose request-constant part (user +
    context) has no columns at all: ONNX Runtime's MatMul with an empty inner dimension stops the
    process (SIGFPE) instead of raising, so such a graph is never run; eager serves it."""
    dims = {m.emb.embedding_dim for m in net.feature_embeddings()} or {0}
    d = max(dims)

    def width(*groups: Group) -> int:
        return sum(len(schema.columns(g)[0]) * d + len(schema.columns(g)[1]) for g in groups)

    if width("video") == 0 or width("user", "context") == 0:
        raise CompileError("the request has no candidate or no user/context columns: eager serves it")


class OnnxForward:
    """A network's request forward in an ONNX Runtime session. Thread-safe (``run`` is)."""

    def __init__(
        self,
        session: Any,
        tasks: list[str],
        build_seconds: float,
        max_abs_diff: float,
        schema: FeatureSchema | None = None,
    ) -> None:
        self._session = session
        self._schema = schema
        self._inputs = input_names([q.name for q in schema.sequences] if schema is not None else [])
        self._names = [i.name for i in session.get_inputs()]
        self.tasks = tasks
        self.build_seconds = build_seconds
        self.max_abs_diff = max_abs_diff  # against eager, over the probe requests

    @classmethod
    def build(cls, net: MultiTaskNet, schema: FeatureSchema, threads: int = 1) -> OnnxForward:
        """Export, open and validate; CompileError on any failure."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise CompileError(f"onnxruntime is not installed ({e})") from None
        t0 = time.perf_counter()
        _check_widths(net, schema)
        sequences = [q.name for q in schema.sequences]
        graph = _RequestGraph(net, sequences).eval()
        gen = torch.Generator().manual_seed(0)
        example = batch_arrays(probe_request(schema, 32, gen), schema)
        dynamic = {
            "video_cats": {0: "candidates"},
            "video_nums": {0: "candidates"},
            "outputs": {1: "candidates"},
        }
        buf = io.BytesIO()
        try:
            with _quiet(), torch.inference_mode():
                torch.onnx.export(
                    graph,
                    example,
                    buf,  # type: ignore[arg-type]  # (the tracing exporter writes to a file object)
                    dynamo=False,
                    input_names=input_names(sequences),
                    output_names=["outputs"],
                    dynamic_axes=dynamic,
                )
            proto = buf.getvalue()
        except Exception as e:  # the exporter raises many kinds; any of them means eager
            raise CompileError(f"export failed: {type(e).__name__}: {e}") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only
        try:
            session = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CompileError(f"ONNX Runtime cannot open the graph: {type(e).__name__}: {e}") from e
        out = cls(session, list(net.tasks), 0.0, 0.0, schema)
        out.max_abs_diff = out._validate(net, schema, gen)
        out.build_seconds = time.perf_counter() - t0
        return out

    def _validate(self, net: MultiTaskNet, schema: FeatureSchema, gen: torch.Generator) -> float:
        worst = 0.0
        for b in PROBE_SIZES:
            r = probe_request(schema, b, gen)
            with torch.inference_mode():
                ref = torch.stack([v for v in (net.forward_request(r)[t] for t in net.tasks)]).numpy()
            try:
                got = self.run(r)
            except Exception as e:
                raise CompileError(f"running the graph failed: {type(e).__name__}: {e}") from e
            if got.shape != ref.shape:
                raise CompileError(f"outputs of shape {got.shape}, eager {ref.shape} ({b} candidates)")
            if not (np.isfinite(got).all() and np.isfinite(ref).all()):
                raise CompileError(f"non-finite outputs ({b} candidates)")  # eager, to be judged as such
            diff = np.abs(got - ref)
            if (diff > ATOL + RTOL * np.abs(ref)).any():
                raise CompileError(
                    f"outputs differ from eager by up to {float(diff.max()):.3g} ({b} candidates)"
                )
            worst = max(worst, float(diff.max(initial=0.0)))
        return worst

    def run(self, r: RequestBatch) -> np.ndarray:
        """Raw outputs (T, B) float32 of one request."""
        arrays = dict(zip(self._inputs, batch_arrays(r, self._schema), strict=True))
        feeds = {n: arrays[n].numpy() for n in self._names}  # (an input the graph never reads is dropped)
        out: np.ndarray = self._session.run(None, feeds)[0]
        return out

    def __call__(self, r: RequestBatch) -> dict[str, Tensor]:
        y = torch.from_numpy(self.run(r))
        return {t: y[i] for i, t in enumerate(self.tasks)}
