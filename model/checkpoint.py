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
Loading checks the format version, the manifest's JSON types, the weights' SHA-256 and every tensor
name, shape and dtype against the manifest and against the network the manifest describes. That
network is first built on the ``meta`` device (shapes only, no memory), so a manifest that claims
huge layers is rejected before anything is allocated; it is materialised only once it fits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import DATA_DIR_ENV, Config, ConfigError
from model.features import FeatureError, FeatureSchema
from model.nets import MultiTaskNet, build_model

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
LATEST = "LATEST"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
LATEST_MAX_BYTES = 256  # a version id and a newline fit many times over


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


def is_version_id(version: object) -> bool:
    """A plain name (never a path, never a temp folder's name)."""
    return isinstance(version, str) and bool(VERSION_RE.match(version)) and not version.startswith(".tmp")


def check_version_id(version: str) -> str:
    """A version id is a plain name, never a path."""
    if not is_version_id(version):
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
            "config": _portable_config(config),
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


def _portable_config(config: Config) -> dict[str, Any]:
    """The config as a manifest stores it: ``data.data_dir`` absolute (the directory the data was read
    from, $MTRANK_DATA_DIR included), so the checkpoint finds its tables whatever the working
    directory of whoever loads it."""
    out = config.to_dict()
    out["data"]["data_dir"] = os.path.abspath(os.environ.get(DATA_DIR_ENV) or config.data.data_dir)
    return out


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
    """The version LATEST names. CheckpointNotFoundError when there is no LATEST yet;
    CorruptCheckpointError when it cannot be read or does not hold one version id."""
    path = models_dir(artifacts) / LATEST
    try:
        with path.open("rb") as f:
            raw = f.read(LATEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no {LATEST} pointer at {path}: train a model first") from None
    except OSError as e:  # a directory, no permission, models/ is a file, an I/O error, ...
        raise CorruptCheckpointError(f"cannot read the {LATEST} pointer {path}: {e.strerror or e}") from e
    if len(raw) > LATEST_MAX_BYTES:
        raise CorruptCheckpointError(f"{path}: longer than {LATEST_MAX_BYTES} bytes, not a version id")
    try:
        version = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not UTF-8 text, not a version id") from e
    if not is_version_id(version):
        raise CorruptCheckpointError(f"{path}: {version!r} is not a model version id")
    return version


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


# The manifest keys the loader reads, with their JSON types (checked before anything is built from
# them; ``config`` and ``feature_schema`` down to every field of their dataclasses). Other keys, e.g.
# a trainer's history or step log, are free-form.


@dataclass
class _TensorEntry:
    shape: list[int]
    dtype: str


@dataclass
class _WeightsEntry:
    sha256: str
    tensors: dict[str, _TensorEntry]
    file: str = WEIGHTS


@dataclass
class _ManifestEntry:
    format_version: int
    version: str
    config: Config
    feature_schema: FeatureSchema
    weights: _WeightsEntry
    created_at: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: dict[str, Any] = field(default_factory=dict)


_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "list",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits_scalar(value: Any, tp: type) -> bool:
    if tp is float:  # an int is a number too (a TOML config may say weight = 1)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "object"
    if origin in (list, tuple):
        return "list"
    if origin is Literal:
        names = [_JSON_TYPES.get(type(a), type(a).__name__) for a in args]
    elif origin in (Union, types.UnionType):
        names = [_describe(a) for a in args]
    else:
        names = [_JSON_TYPES.get(tp, getattr(tp, "__name__", str(tp)))]
    return " or ".join(dict.fromkeys(names))


def _mismatch(where: str, tp: Any, value: Any) -> str:
    got = _JSON_TYPES.get(type(value), type(value).__name__)
    if not isinstance(value, dict | list):
        r = repr(value)
        got += f" {r if len(r) <= 40 else r[:37] + '...'}"
    return f"{where}: expected {_describe(tp)}, got {got}"


def _type_error(value: Any, tp: Any, where: str) -> str | None:
    """Why the parsed JSON ``value`` does not fit the annotation ``tp``; None when it does.

    Checks JSON types only (plus the required keys of a dataclass): which strings a ``Literal``
    allows and every other value rule are the constructors' checks (an unknown arch may be a newer
    build's: an incompatible rather than a corrupt manifest). Unknown annotations pass.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return _mismatch(where, tp, value)
        required = [
            f.name
            for f in dataclasses.fields(tp)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for key in required:
            if key not in value:
                return f"{where}: missing key {key!r}"
        hints = _field_types(tp)
        for key, item in value.items():  # unknown keys: the constructors' (clearer) error
            if key in hints and (err := _type_error(item, hints[key], f"{where}.{key}")):
                return err
        return None
    if origin in (Union, types.UnionType):
        errors = [_type_error(value, a, where) for a in args]
        if None in errors:
            return None
        # an arm that fits at this level but not inside (a list with a bad item, a list of the wrong
        # length) says more than "expected X or Y"
        deeper = [e for e, a in zip(errors, args, strict=True) if e and e != _mismatch(where, a, value)]
        return deeper[0] if deeper else _mismatch(where, tp, value)
    if origin is Literal:
        fits = any(_fits_scalar(value, type(a)) for a in args)
        return None if fits else _mismatch(where, tp, value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            return _mismatch(where, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"{where}: expected a list of {len(args)} items, got {len(value)}"
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        for i, (item, item_tp) in enumerate(zip(value, item_types, strict=True)):
            if err := _type_error(item, item_tp, f"{where}[{i}]"):
                return err
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return _mismatch(where, tp, value)
        value_tp = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            if err := _type_error(item, value_tp, f"{where}[{key!r}]"):
                return err
        return None
    if tp in _JSON_TYPES:
        return None if _fits_scalar(value, tp) else _mismatch(where, tp, value)
    return None


def _first_line(e: BaseException) -> str:
    """An exception as one short line (torch appends C++ stack traces to some messages)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a version folder, its JSON types checked (not yet its values)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointNotFoundError(f"no {MANIFEST} in {path}")
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{mpath}: cannot read ({e.strerror or e})") from e
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of 5000 digits, [[[[...
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({_first_line(e)})") from e
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{mpath}: manifest must be a JSON object")
    fv = manifest.get("format_version")
    if type(fv) is not int or fv != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{mpath}: format_version {fv!r}, this build reads {FORMAT_VERSION}"
        )
    for key in ("version", "config", "feature_schema", "weights"):
        if key not in manifest:
            raise CorruptCheckpointError(f"{mpath}: missing key {key!r}")
    err = _type_error(manifest, _ManifestEntry, "manifest")
    if err:
        raise CorruptCheckpointError(f"{mpath}: {err.removeprefix('manifest.')}")
    if not is_version_id(manifest["version"]):
        raise CorruptCheckpointError(f"{mpath}: version {manifest['version']!r} is not a model version id")
    return manifest


# Errors the constructors raise on values that do not make sense (after the type check): they
# describe a bad manifest. Anything else (AttributeError, NameError, ...) is a bug and propagates.
_VALUE_ERRORS = (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError)


def _parse_parts(path: Path, manifest: dict[str, Any]) -> tuple[Config, FeatureSchema]:
    """The manifest's config and fitted feature schema, their values validated."""
    try:
        config = Config.from_dict(manifest["config"])
        schema = FeatureSchema.from_dict(manifest["feature_schema"])
    except (ConfigError, FeatureError) as e:
        raise IncompatibleCheckpointError(f"{path}: manifest config/schema unusable: {e}") from e
    except _VALUE_ERRORS as e:
        raise CorruptCheckpointError(f"{path}: manifest config/schema malformed: {_first_line(e)}") from e
    for f in schema.features:
        if f.kind == "numeric" and not (math.isfinite(f.mean) and math.isfinite(f.std) and f.std > 0):
            raise CorruptCheckpointError(
                f"{path}: feature_schema: numeric feature {f.name!r} has mean {f.mean!r} and std "
                f"{f.std!r} (training writes finite statistics, std > 0)"
            )
    return config, schema


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(wpath: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, torch dtype name) from the safetensors header; no tensor is read."""
    try:
        with safe_open(str(wpath), framework="pt") as f:
            out: dict[str, tuple[list[int], str]] = {}
            names: list[str] = f.keys()  # a safe_open handle is not iterable
            for name in names:
                sl = f.get_slice(name)
                code = sl.get_dtype()
                dtype = _SAFETENSORS_DTYPES.get(code)
                out[name] = (list(sl.get_shape()), str(dtype) if dtype is not None else code)
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{wpath}: unreadable safetensors file ({e})") from e


def _loop_units(config: Config) -> tuple[str, int]:
    """(name, lower bound on the parameter count) from the model counts that drive Python loops
    while a network is built (one module or init call per unit, even on the meta device): every
    unit owns at least one gate output per task, so the weights file must hold as many numbers."""
    m, n_tasks = config.model, len(config.tasks)
    if m.arch == "mmoe":
        return "model.n_experts", n_tasks * max(m.n_experts, 0)
    if m.arch == "ple":
        per_level = max(m.n_task_experts, 0) + max(m.n_shared_experts, 0)
        return "model.ple_levels x experts per gate", n_tasks * max(m.ple_levels, 0) * per_level
    return "", 0


def _check_network(
    path: Path, config: Config, schema: FeatureSchema, header: dict[str, tuple[list[int], str]]
) -> None:
    """The network the manifest describes has exactly the file's tensors (names, shapes, dtypes).

    Built on the meta device: shapes only, nothing allocated, so a manifest claiming huge layers
    (or vocabularies) costs nothing before it is rejected.
    """
    n_weights = sum(math.prod(shape) for shape, _ in header.values())
    what, units = _loop_units(config)
    if units > n_weights:
        raise IncompatibleCheckpointError(
            f"{path}: weights do not fit the configured network: {what} needs at least {units} "
            f"parameters, the file holds {n_weights}"
        )
    try:
        with torch.device("meta"):
            skeleton = build_model(config.model, schema, config.tasks)
        want = {k: (list(v.shape), str(v.dtype)) for k, v in skeleton.state_dict().items()}
    except _VALUE_ERRORS as e:
        raise CorruptCheckpointError(
            f"{path}: the manifest's model config builds no network: {_first_line(e)}"
        ) from e
    if want != header:
        diff = sorted(k for k in set(want) | set(header) if want.get(k) != header.get(k))
        raise IncompatibleCheckpointError(f"{path}: weights do not fit the configured network: {diff[:5]}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate one version folder. Raises a CheckpointError subclass on any problem.

    Order: manifest JSON and its types; the weights' SHA-256; config and schema values; the
    safetensors header against the manifest's tensor list; the header against the network the
    config describes (built on the meta device); only then are the weights read and the network
    materialised.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder not found: {path}")
    manifest = read_manifest(path)
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise CheckpointNotFoundError(f"no {WEIGHTS} in {path}")
    try:
        actual = sha256_file(wpath)
    except OSError as e:
        raise CorruptCheckpointError(f"{wpath}: cannot read ({e.strerror or e})") from e
    if manifest["weights"]["sha256"] != actual:
        raise CorruptCheckpointError(f"{wpath}: SHA-256 {actual[:12]}… does not match the manifest")
    config, schema = _parse_parts(path, manifest)
    header = _read_header(wpath)
    declared: dict[str, dict[str, Any]] = manifest["weights"]["tensors"]
    for name, (shape, dtype) in header.items():
        d = declared.get(name)
        if d is None or d["shape"] != shape or d["dtype"] != dtype:
            raise CorruptCheckpointError(f"{wpath}: tensor {name} does not match the manifest")
    if set(declared) != set(header):
        raise CorruptCheckpointError(f"{wpath}: tensors {sorted(set(declared) ^ set(header))} missing")
    _check_network(path, config, schema, header)
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{wpath}: unreadable safetensors file ({e})") from e
    model = build_model(config.model, schema, config.tasks)
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
