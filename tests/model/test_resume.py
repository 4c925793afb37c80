"""Resuming training: a run killed with SIGKILL mid-epoch and continued with ``mtrank train --resume``
ends with exactly the weights of an uninterrupted run; the state is safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from modelkit import ROOT, tiny_toml

from model.checkpoint import load_checkpoint, resolve_checkpoint
from model.runstate import flatten, load_state, save_state, unflatten


def resumable_toml(tmp_path: Path) -> Path:
    """Four epochs of many small steps (so a kill lands inside an epoch), with everything that
    carries state across epochs: dropout, gate dropout, cold-start dropout and GradNorm's weights."""
    src = Path(tiny_toml(tmp_path)).read_text()
    for old, new in [
        ("epochs = 1", 'epochs = 4\nweighting = "gradnorm"\nunknown_dropout = 0.1'),
        ("batch_size = 1024", "batch_size = 8"),
        ("patience = 1", "patience = 10"),
    ]:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    path = tmp_path / "resume.toml"
    path.write_text(src)
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from service.cli import app; app()", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    config = resumable_toml(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(
        cli("train", "--config", str(config), "--artifacts", str(whole)),
        env=ENV,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )

    proc = subprocess.Popen(
        cli("train", "--config", str(config), "--artifacts", str(killed)),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        states = list((killed / "runs").glob("*/rank0/state.json"))
        if states:
            state = states[0]
            break
        time.sleep(0.005)
    assert state is not None and proc.poll() is None, "the run ended before its first epoch's state"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = load_state(state.parent)
    assert kept is not None and 1 <= kept["epoch"] < 4  # killed inside a later epoch
    assert not (killed / "models").exists() or not any((killed / "models").glob("2*"))

    done = subprocess.run(
        cli("train", "--config", str(config), "--artifacts", str(killed), "--resume"),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(resolve_checkpoint(whole))
    b = load_checkpoint(resolve_checkpoint(killed))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert diff <= 1e-6, diff
    assert [h["epoch"] for h in b.manifest["history"]] == [1, 2, 3, 4]
    for x, y in zip(a.manifest["history"], b.manifest["history"], strict=True):
        assert y["valid/loss"] == x["valid/loss"] and y["weight/satisfaction"] == x["weight/satisfaction"]
    assert a.manifest["step_log"] == b.manifest["step_log"]
    assert not list((killed / "runs").glob("*/rank0"))  # the run's state is removed once it is done


def test_state_files_round_trip_nested_state_without_pickle(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"optim": opt.state_dict(), "rng": torch.get_rng_state(), "hist": [{"a": 1.5}], "n": None}
    save_state(tmp_path, state)
    got = load_state(tmp_path)
    assert got is not None
    assert torch.equal(got["optim"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert got["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(got["rng"], state["rng"]) and got["hist"] == [{"a": 1.5}] and got["n"] is None
    tree = json.loads((tmp_path / "state.json").read_text())
    assert "tensors_sha256" in tree  # JSON and safetensors only
    tensors: dict[str, torch.Tensor] = {}
    assert unflatten(flatten({1: torch.zeros(2)}, tensors), tensors)[1].shape == (2,)


def test_a_state_with_views_and_shared_tensors_round_trips(tmp_path):
    """Tensors are written without a copy, except where safetensors needs one: a view into a larger
    storage, or the same storage under two paths."""
    from model.runstate import load_state, save_state

    big = torch.arange(12, dtype=torch.float32)
    t = torch.randn(3, 4)
    state = {"t": t, "again": t, "view": big[2:5], "rows": big.view(3, 4)[1], "n": 3, "pair": (1, "x")}
    save_state(tmp_path / "run", state)
    back = load_state(tmp_path / "run")
    assert back is not None
    for k in ("t", "again", "view", "rows"):
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)
    assert back["n"] == 3 and back["pair"] == (1, "x")
