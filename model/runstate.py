"""Resumable training state: written after every epoch, read by ``mtrank train --resume``.

A run's folder (``<artifacts>/runs/<run id>/``, the id a digest of the config and the fine-tuning
source) holds one sub-folder per rank, ``rank<r>/``, with the newest complete epoch's state::

    state.json          # epoch, step counters, history, step log, early-stopping bookkeeping,
                        # random-number generator states, and the JSON part of every state dict
    tensors.safetensors # every tensor of those state dicts (model, optimisers, best weights, ...)

No pickle: nested state dicts are split into a JSON tree whose tensors are replaced by references
into the safetensors file (``flatten`` / ``unflatten``). Each file is written to a temporary name
and renamed, tensors first, so a kill at any moment leaves the previous epoch's state readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import Config
from model.files import sha256_file

STATE = "state.json"
TENSORS = "tensors.safetensors"
_REF = "__tensor__"


def run_id(cfg: Config, init_from: str | None = None) -> str:
    blob = json.dumps({"config": cfg.to_dict(), "init_from": init_from}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_dir(artifacts: str | Path, cfg: Config, init_from: str | None = None) -> Path:
    return Path(artifacts) / "runs" / run_id(cfg, init_from)


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is all of its storage (not a view into a larger one)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (keyed by its path).

    Tensors are not copied (the state is written before training goes on; an embedding table's
    Adam state is three times its size) unless safetensors needs it: a view into a larger storage,
    or a storage already stored under another path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if not _owns_storage(t) or any(
            u.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for u in tensors.values()
        ):
            t = t.clone()
        tensors[path] = t
        return {_REF: path}
    if isinstance(obj, Mapping):
        if any(not isinstance(k, str | int) for k in obj):
            raise TypeError(f"state keys must be str or int at {path}")
        # int keys (optimizer state) are kept as such: {"__int_keys__": [[k, v], ...]}
        if any(isinstance(k, int) for k in obj):
            return {"__int_keys__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
        return {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path}")


def unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            return tensors[obj[_REF]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): unflatten(v, tensors) for k, v in obj["__int_keys__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state(folder: Path, state: Mapping[str, Any]) -> None:
    """Write a state (any nesting of dicts, lists, tensors and JSON scalars) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(dict(state), tensors)
    token = secrets.token_hex(4)
    tmp_t, tmp_s = folder / f".{TENSORS}.{token}.tmp", folder / f".{STATE}.{token}.tmp"
    try:
        save_file(tensors, str(tmp_t))
        digest = sha256_file(tmp_t)  # streamed: the file can be several GB
        tmp_s.write_text(json.dumps({"tree": tree, "tensors_sha256": digest}))
        with tmp_t.open("rb") as f:
            os.fsync(f.fileno())
        # the tensors under a name of their own first, then the JSON that names them
        named = folder / f"{TENSORS}.{digest[:12]}"
        os.replace(tmp_t, named)
        os.replace(tmp_s, folder / STATE)
    finally:
        tmp_t.unlink(missing_ok=True)
        tmp_s.unlink(missing_ok=True)
    for old in folder.glob(f"{TENSORS}.*"):
        if old.name != f"{TENSORS}.{digest[:12]}" and not old.name.endswith(".tmp"):
            old.unlink(missing_ok=True)


def load_state(folder: Path) -> dict[str, Any] | None:
    """The newest complete state in ``folder``, or None when there is none."""
    path = folder / STATE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    tpath = folder / f"{TENSORS}.{meta['tensors_sha256'][:12]}"
    if sha256_file(tpath) != meta["tensors_sha256"]:
        raise ValueError(f"{tpath}: the training state's tensors do not match their digest")
    out: dict[str, Any] = unflatten(meta["tree"], load_file(str(tpath)))
    return out


def remove_run(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
