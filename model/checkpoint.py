"""Checkpoints: one folder per version, written atomically, loaded without pickle.

Layout under an artifacts directory::

    models/
      LATEST                      # text file holding the current version id (replaced atomically)
      20261126-101500-3fa2c1/
        manifest.json             # format version, config, feature schema + vocabularies, metrics,
                                  # data fingerprint, weight digest and tensor shapes
        weights.safetensors       # the state dict

A version folder is first written as ``models/.tmp-*``, fsynced, then renamed into place, so a
reader never sees half a checkpoint; ``LATEST`` is written to a temp file and ``os.replace``d.
Loading checks the format version, the weights' SHA-256 and every tensor name, shape and dtype
against the manifest and against the network the manifest describes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import Config, ConfigError
from model.features import FeatureError, FeatureSchema
from model.nets import MultiTaskNet, build_model

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
LATEST = "LATEST"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class CheckpointError(Exception):
    """Base class: a checkpoint that cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class IncompatibleCheckpointError(CheckpointError):
    pass


def models_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "models"


def new_version(now: dt.datetime | None = None) -> str:
    """Sortable by creation time (millisecond resolution), unique by its random suffix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def check_version_id(version: str) -> str:
    """A version id is a plain name, never a path."""
    if not VERSION_RE.match(version) or version.startswith(".tmp"):
        raise CheckpointNotFoundError(f"invalid model version id {version!r}")
    return version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# writing


def save_checkpoint(
    artifacts: str | Path,
    model: MultiTaskNet,
    config: Config,
    schema: FeatureSchema,
    *,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    version: str | None = None,
    set_latest: bool = True,
) -> Path:
    """Write ``models/<version>/`` atomically (temp folder + rename); optionally point LATEST at it."""
    root = models_dir(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    version = check_version_id(version or new_version())
    final = root / version
    if final.exists():
        raise CheckpointError(f"model version {version} already exists at {final}")
    tmp = root / f".tmp-{version}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "mtrank", "version": version})
        with (tmp / WEIGHTS).open("rb") as f:
            os.fsync(f.fileno())
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "feature_schema": schema.to_dict(),
            "metrics": metrics or {},
            "data_fingerprint": data_fingerprint or {},
            "weights": {
                "file": WEIGHTS,
                "sha256": sha256_file(tmp / WEIGHTS),
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in state.items()},
            },
            "software": {"torch": torch.__version__},
            **(extra or {}),
        }
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if set_latest:
        write_latest(artifacts, version)
    return final


def write_latest(artifacts: str | Path, version: str) -> None:
    """Point LATEST at an existing version (atomic replace)."""
    root = models_dir(artifacts)
    check_version_id(version)
    if not (root / version / MANIFEST).is_file():
        raise CheckpointNotFoundError(f"no model version {version} under {root}")
    tmp = root / f".{LATEST}.{secrets.token_hex(4)}.tmp"
    _write_file(tmp, (version + "\n").encode())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def read_latest(artifacts: str | Path) -> str:
    path = models_dir(artifacts) / LATEST
    try:
        version = path.read_text().strip()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no {LATEST} pointer at {path}: train a model first") from None
    return check_version_id(version)


def list_versions(artifacts: str | Path) -> list[str]:
    root = models_dir(artifacts)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file() and VERSION_RE.match(p.name)
    )


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    config: Config
    schema: FeatureSchema
    model: MultiTaskNet  # in eval mode

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointNotFoundError(f"no {MANIFEST} in {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{mpath}: manifest must be a JSON object")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{mpath}: format_version {fv!r}, this build reads {FORMAT_VERSION}"
        )
    for key in ("version", "config", "feature_schema", "weights"):
        if key not in manifest:
            raise CorruptCheckpointError(f"{mpath}: missing key {key!r}")
    return manifest


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate one version folder. Raises a CheckpointError subclass on any problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder not found: {path}")
    manifest = read_manifest(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CheckpointNotFoundError(f"no {WEIGHTS} in {path}")
    expected = manifest["weights"].get("sha256")
    actual = sha256_file(wpath)
    if expected != actual:
        raise CorruptCheckpointError(f"{wpath}: SHA-256 {actual[:12]}… does not match the manifest")
    try:
        config = Config.from_dict(manifest["config"])
        schema = FeatureSchema.from_dict(manifest["feature_schema"])
    except (ConfigError, FeatureError, TypeError, ValueError) as e:
        raise IncompatibleCheckpointError(f"{path}: manifest config/schema unusable: {e}") from e
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{wpath}: unreadable safetensors file ({e})") from e
    declared = manifest["weights"].get("tensors", {})
    for name, t in state.items():
        d = declared.get(name)
        if d is None or list(t.shape) != d.get("shape") or str(t.dtype) != d.get("dtype"):
            raise CorruptCheckpointError(f"{wpath}: tensor {name} does not match the manifest")
    if set(declared) != set(state):
        raise CorruptCheckpointError(f"{wpath}: tensors {sorted(set(declared) ^ set(state))} missing")
    model = build_model(config.model, schema, config.tasks)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise IncompatibleCheckpointError(f"{path}: weights do not fit the configured network: {diff[:5]}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return Checkpoint(path, manifest, config, schema, model)


def resolve_checkpoint(artifacts: str | Path, version: str | None = None) -> Path:
    """Folder of ``version``, or of the version LATEST points at."""
    v = check_version_id(version) if version else read_latest(artifacts)
    path = models_dir(artifacts) / v
    if not path.is_dir():
        raise CheckpointNotFoundError(f"model version {v} not found")
    return path
