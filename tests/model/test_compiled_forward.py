"""The compiled (ONNX Runtime) request forward: equal to eager for every architecture, checked
before use, and eager whenever it cannot be built or does not match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from modelkit import model_config

import model.compiled
from model import Ranker, resolve_checkpoint
from model.compiled import CompileError, OnnxForward, probe_request
from model.config import MMoEConfig, ModelConfig, TaskConfig
from model.features import FeatureSchema, FeatureSpec
from model.nets import build_model, split_weight

TASKS = [
    TaskConfig("engagement", "binary", "long_view"),
    TaskConfig("watch", "regression", "play_time", transform="log1p"),
]


def schema(bias: bool = False) -> FeatureSchema:
    specs = [
        FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
        FeatureSpec("fans", "user", "numeric"),
        FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
        FeatureSpec("author", "video", "categorical", vocab=[str(i) for i in range(5)]),
        FeatureSpec("dur", "video", "numeric"),
        FeatureSpec("tab", "context", "categorical", vocab=["0", "1"]),
    ]
    if bias:
        specs.append(FeatureSpec("position", "bias", "categorical", vocab=[str(i) for i in range(8)]))
    return FeatureSchema(specs)


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("separate", {}),
        ("shared_bottom", {}),
        ("mmoe", {}),
        ("mmoe", {"bias_features": ["position"], "bias_tasks": ["engagement"]}),
        ("ple", {"levels": 2}),
        ("conditioned", {"conditioning": "concat"}),
        ("conditioned", {"conditioning": "film"}),
    ],
)
@pytest.mark.slow
def test_the_onnx_forward_equals_eager_for_every_architecture(arch: str, extra: dict[str, Any]) -> None:
    bias = "bias_features" in extra
    s = schema(bias)
    cfg = model_config(arch, embed_dim=4, expert_dims=[8, 8], bottom_dims=[8, 8], tower_dims=[4], **extra)
    net = build_model(cfg, s, TASKS).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():  # away from the init (FiLM starts at the identity, biases at 0)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    onnx = OnnxForward.build(net, s)
    assert onnx.max_abs_diff < 1e-4
    for b in (1, 2, 333):  # sizes the export never saw
        r = probe_request(s, b, g)
        with torch.inference_mode():
            ref = net.forward_request(r)
        got = onnx(r)
        assert set(got) == set(ref)
        for t in ref:
            assert got[t].shape == (b,)
            np.testing.assert_allclose(got[t].numpy(), ref[t].numpy(), rtol=1e-5, atol=1e-5)


def test_the_served_ranker_scores_through_onnx_and_equals_eager(trained_artifacts: Path) -> None:
    eager = Ranker.load(resolve_checkpoint(trained_artifacts))
    compiled = Ranker.load(resolve_checkpoint(trained_artifacts))
    compiled.compile("onnx")
    assert compiled.backend == "onnx" and eager.backend == "eager"
    assert compiled.backend_info["max_abs_diff_vs_eager"] < 1e-4
    s = eager.schema
    rng = np.random.default_rng(0)
    videos = s.default_rows("video", 50)
    videos.nums[:] = rng.normal(size=videos.nums.shape)
    args = (s.default_rows("user", 1), videos, s.default_rows("context", 1))
    ref, got = eager.score(*args), compiled.score(*args)
    for head in eager.task_names:
        np.testing.assert_allclose(got[head], ref[head], rtol=1e-5, atol=1e-6)


def test_a_graph_that_does_not_match_eager_is_refused_and_eager_serves(
    trained_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model.compiled, "ATOL", -1.0)  # no graph can be that close
    ranker = Ranker.load(resolve_checkpoint(trained_artifacts))
    ranker.compile("onnx")
    assert ranker.backend == "eager"
    assert "differ from eager" in ranker.backend_info["fallback_reason"]
    s = ranker.schema
    heads = ranker.score(s.default_rows("user", 1), s.default_rows("video", 4), s.default_rows("context", 1))
    assert all(np.isfinite(v).all() and v.shape == (4,) for v in heads.values())


def test_split_weight_is_gathered_once_and_again_after_an_update() -> None:
    w = torch.nn.Parameter(torch.randn(3, 5))
    idx = torch.tensor([4, 0])
    first = split_weight(w, idx, 1)
    assert split_weight(w, idx, 1) is first  # cached
    torch.testing.assert_close(first, w.detach()[:, [4, 0]])
    with torch.no_grad():
        w.mul_(2)  # an optimizer step: the version counter moves
    again = split_weight(w, idx, 1)
    assert again is not first
    torch.testing.assert_close(again, w.detach()[:, [4, 0]])


def test_a_request_without_user_or_context_columns_is_left_to_eager() -> None:
    """ONNX Runtime stops the process on a MatMul over an empty dimension: such a graph is never
    built or run (a table without users or context: all its features are the candidates')."""
    s = FeatureSchema(
        [FeatureSpec("v", "video", "categorical", vocab=["1", "2"]), FeatureSpec("d", "video", "numeric")]
    )
    cfg = ModelConfig(net=MMoEConfig(expert_dims=[8]), embed_dim=4, tower_dims=[4])
    net = build_model(cfg, s, TASKS).eval()
    with pytest.raises(CompileError, match="no candidate or no user/context columns"):
        OnnxForward.build(net, s)
