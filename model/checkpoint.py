"""Checkpoints: one folder per version, written atomically, loaded without pickle.

Layout under an artifacts directory::

    models/
      LATEST                      # text file holding the current version id (replaced atomically)
      20261126-101500-3fa2c1/
        manifest.json             # format version, config, feature schema + vocabularies, metrics,
                                  # data fingerprint, tensor shapes, payload files, digest
        weights.safetensors       # the state dict

A version folder is first written as ``models/.tmp-*``, fsynced, then renamed into place, so a
reader never sees half a checkpoint; ``LATEST`` is written to a temp file and ``os.replace``d.
Files are written with the mode ``open`` gives a new file (0666 less the umask). Temp folders and
files that a crash left behind are removed by ``clean_stale_temp`` once they are old enough.

Tamper evidence: the manifest lists every payload file with its size and SHA-256 (``files``) and
carries ``digest`` = SHA-256 of its canonical JSON (sorted keys, no whitespace) without the
``digest`` and ``signature`` keys. So any edit of the manifest (config, feature statistics,
vocabularies, metrics, the file list) or of a listed file breaks it. With a deployment key
(``MTRANK_CHECKPOINT_KEY``, or ``key=``) the manifest also carries ``signature`` = HMAC-SHA256 of
the same bytes; a loader with a key accepts only manifests signed with it. The digest alone
catches accidental and careless edits; only the signature stops someone who can write the
artifacts and recompute a digest. Manifests from before the digest (no ``digest`` key) still load
when no key is configured.

Loading checks the format version, the digest (and signature), the manifest's JSON types, every
listed file's size and SHA-256, and every tensor name, shape and dtype against the manifest and
against the network the manifest describes. That network is first built on the ``meta`` device
(shapes only, no memory), so a manifest that claims huge layers is rejected before anything is
allocated; it is materialised only once it fits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from model.config import (
    DATA_DIR_ENV,
    Config,
    ConfigError,
    MMoEConfig,
    PLEConfig,
    describe_error,
    is_malformed,
)
from model.features import FeatureError, FeatureSchema, schema_from_arrays, schema_to_arrays
from model.files import sha256_file
from model.nets import MultiTaskNet, build_model

FORMAT_VERSION = 1
# A vocabulary longer than this is stored in VOCAB (hashes and strings as arrays) instead of the
# manifest's JSON; such a checkpoint has format version 2, which older builds refuse cleanly.
VOCAB_INLINE_MAX = 100_000
VOCAB = "vocab.safetensors"
SIDECAR_FORMAT_VERSION = 2
READ_FORMAT_VERSIONS = (FORMAT_VERSION, SIDECAR_FORMAT_VERSION)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
LATEST = "LATEST"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
LATEST_MAX_BYTES = 256  # a version id and a newline fit many times over
DIGEST = "digest"  # manifest key: "sha256:<hex>" of the canonical manifest
SIGNATURE = "signature"  # manifest key: "hmac-sha256:<hex>" of the same bytes, with a deployment key
FILES = "files"  # manifest key: {file name: {"sha256": <hex>, "bytes": <size>}} of every payload file
KEY_ENV = "MTRANK_CHECKPOINT_KEY"  # the deployment key (signing and checking), when not passed
STALE_TEMP_AGE_S = 3600.0  # a temp folder or file this old is a crash's leftover
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

log = logging.getLogger(__name__)


_ENTRY = ConfigDict(strict=True)  # manifest entries: JSON types checked, unknown keys ignored


class CheckpointError(Exception):
    """Base class: a checkpoint that cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class IncompleteCheckpointError(CorruptCheckpointError):
    """A version folder that looks still being copied: a listed file shorter than its recorded
    size, or a manifest cut off mid-JSON. It may become loadable without anyone changing it."""


class TamperedCheckpointError(CorruptCheckpointError):
    """The manifest's digest or signature does not match its content (or a required signature is
    missing)."""


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


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set + restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# tamper evidence


def checkpoint_key(key: bytes | str | None = None) -> bytes | None:
    """The deployment key: ``key`` when given, else ``$MTRANK_CHECKPOINT_KEY``; None when unset or blank."""
    if key is None:
        key = os.environ.get(KEY_ENV)
    if isinstance(key, str):
        key = key.strip().encode()
    return key or None


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest and signature cover: the manifest without them, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k not in (DIGEST, SIGNATURE)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def seal_manifest(manifest: dict[str, Any], key: bytes | str | None = None) -> dict[str, Any]:
    """``manifest`` with a fresh ``digest`` (and ``signature`` with a key; none without one)."""
    out = {k: v for k, v in manifest.items() if k not in (DIGEST, SIGNATURE)}
    canonical = canonical_manifest(out)
    out[DIGEST] = "sha256:" + hashlib.sha256(canonical).hexdigest()
    k = checkpoint_key(key)
    if k is not None:
        out[SIGNATURE] = "hmac-sha256:" + hmac.new(k, canonical, hashlib.sha256).hexdigest()
    return out


def _check_seal(mpath: Path, manifest: dict[str, Any], key: bytes | None) -> None:
    """TamperedCheckpointError unless the digest (and, with a key, the signature) match."""
    digest, signature = manifest.get(DIGEST), manifest.get(SIGNATURE)
    if digest is None and signature is None:
        if key is not None:
            raise TamperedCheckpointError(
                f"{mpath}: not signed, and this deployment loads only checkpoints signed with its key "
                f"({KEY_ENV})"
            )
        return  # written before manifests carried a digest
    canonical = canonical_manifest(manifest)
    if digest is not None:
        want = "sha256:" + hashlib.sha256(canonical).hexdigest()
        if not (isinstance(digest, str) and hmac.compare_digest(digest, want)):
            raise TamperedCheckpointError(
                f"{mpath}: the manifest does not match its digest (edited after it was written)"
            )
    if key is not None:
        want = "hmac-sha256:" + hmac.new(key, canonical, hashlib.sha256).hexdigest()
        if signature is None:
            raise TamperedCheckpointError(
                f"{mpath}: not signed, and this deployment loads only checkpoints signed with its key "
                f"({KEY_ENV})"
            )
        if not (isinstance(signature, str) and hmac.compare_digest(signature, want)):
            raise TamperedCheckpointError(
                f"{mpath}: the signature does not match (edited, or signed with another key)"
            )
    elif digest is None:
        raise TamperedCheckpointError(f"{mpath}: a signature without a digest (the digest was removed)")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every payload file the manifest lists is there, complete, with its recorded SHA-256."""
    files = manifest.get(FILES)
    if files is None:  # before the file list: the weights' own digest
        _check_file(path, WEIGHTS, {"sha256": manifest["weights"]["sha256"]})
        return
    if WEIGHTS not in files or files[WEIGHTS]["sha256"] != manifest["weights"]["sha256"]:
        raise CorruptCheckpointError(f"{path / MANIFEST}: {FILES} does not list {WEIGHTS} with its digest")
    for name, entry in files.items():
        _check_file(path, name, entry)


def _check_file(path: Path, name: str, entry: dict[str, Any]) -> None:
    if not FILE_NAME_RE.match(name) or name == MANIFEST:
        raise CorruptCheckpointError(f"{path / MANIFEST}: {FILES}: {name!r} is not a payload file name")
    fpath = path / name
    try:
        size = fpath.stat().st_size
        if not fpath.is_file():
            raise CorruptCheckpointError(f"{fpath}: not a regular file")
        want = entry.get("bytes")
        if want is not None and size < want:
            raise IncompleteCheckpointError(f"{fpath}: {size} of {want} bytes (still being copied?)")
        if want is not None and size > want:
            raise CorruptCheckpointError(f"{fpath}: {size} bytes, the manifest says {want}")
        actual = sha256_file(fpath)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no {name} in {path}") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{fpath}: cannot read ({e.strerror or e})") from e
    if not hmac.compare_digest(entry["sha256"], actual):
        raise CorruptCheckpointError(f"{fpath}: SHA-256 {actual[:12]}… does not match the manifest")


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
    key: bytes | str | None = None,
) -> Path:
    """Write ``models/<version>/`` atomically (temp folder + rename); optionally point LATEST at it.

    The manifest is sealed (``seal_manifest``): signed when a key is given or ``$MTRANK_CHECKPOINT_KEY``
    is set. Temp leftovers older than an hour are removed first. A write that fails (disk full, no
    permission, ...) raises CheckpointError and leaves nothing behind.
    """
    root = models_dir(artifacts)
    version = check_version_id(version or new_version())
    final = root / version
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(version, root, e) from e
    clean_stale_temp(artifacts)
    if final.exists():
        raise CheckpointError(f"model version {version} already exists at {final}")
    tmp = root / f".tmp-{version}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        wpath = tmp / WEIGHTS
        save_file(state, str(wpath), metadata={"format": "mtrank", "version": version})
        os.chmod(wpath, 0o666 & ~_umask())  # safetensors writes 0600; readable like any other file
        with wpath.open("rb") as f:
            os.fsync(f.fileno())
        weights = _file_entry(wpath)
        files = {WEIGHTS: weights}
        schema_json, vocab_arrays = schema_to_arrays(schema, above=VOCAB_INLINE_MAX)
        if vocab_arrays:
            vpath = tmp / VOCAB
            save_numpy(vocab_arrays, str(vpath))
            os.chmod(vpath, 0o666 & ~_umask())
            with vpath.open("rb") as f:
                os.fsync(f.fileno())
            files[VOCAB] = _file_entry(vpath)
        manifest = {
            "format_version": SIDECAR_FORMAT_VERSION if vocab_arrays else FORMAT_VERSION,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": _portable_config(config),
            "feature_schema": schema_json,
            "metrics": metrics or {},
            "data_fingerprint": data_fingerprint or {},
            "weights": {
                "file": WEIGHTS,
                "sha256": weights["sha256"],
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in state.items()},
            },
            "software": {"torch": torch.__version__},
            **(extra or {}),
            FILES: files,
        }
        manifest = seal_manifest(manifest, key)
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):
            raise _write_error(version, root, e) from e
        raise
    if set_latest:
        write_latest(artifacts, version)
    return final


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def io_error_reason(e: BaseException) -> str:
    """An I/O error (OSError, or safetensors' error, which carries the OS error as text) as one
    short reason, with a hint when the disk is full or a file size limit was hit."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        reason += f": {e.filename}"
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", reason)):
        code = int(m.group(1))
    return reason + (" (disk full or over a size limit: free space and train again)" if code in _FULL else "")


def _write_error(version: str, where: Path, e: BaseException) -> CheckpointError:
    """A failed write as one clear CheckpointError."""
    return CheckpointError(f"cannot write model version {version} under {where}: {io_error_reason(e)}")


def _portable_config(config: Config) -> dict[str, Any]:
    """The config as a manifest stores it: ``data.data_dir`` absolute (the directory the data was read
    from, $MTRANK_DATA_DIR included), so the checkpoint finds its tables whatever the working
    directory of whoever loads it."""
    out = config.to_dict()
    out["data"]["data_dir"] = os.path.abspath(os.environ.get(DATA_DIR_ENV) or config.data.data_dir)
    return out


def write_latest(artifacts: str | Path, version: str) -> None:
    """Point LATEST at an existing version (atomic replace). CheckpointError if it cannot be written."""
    root = models_dir(artifacts)
    check_version_id(version)
    if not (root / version / MANIFEST).is_file():
        raise CheckpointNotFoundError(f"no model version {version} under {root}")
    tmp = root / f".{LATEST}.{secrets.token_hex(4)}.tmp"
    try:
        _write_file(tmp, (version + "\n").encode())
        os.replace(tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = e.strerror or str(e)
        raise CheckpointError(f"cannot point {LATEST} at {version} under {root}: {reason}") from e


def clean_stale_temp(artifacts: str | Path, older_than_s: float = STALE_TEMP_AGE_S) -> list[str]:
    """Remove the ``.tmp-*`` folders and ``.LATEST.*.tmp`` files under models/ that a crash (or a full
    disk) left behind, once older than ``older_than_s`` (a younger one may be a write in progress).
    Returns the names removed. Never raises: a read-only or missing models/ removes nothing."""
    root = models_dir(artifacts)
    cutoff = time.time() - older_than_s
    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        is_dir_tmp = name.startswith(".tmp-")
        is_latest_tmp = name.startswith(f".{LATEST}.") and name.endswith(".tmp")
        if not (is_dir_tmp or is_latest_tmp):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as e:
            log.warning("cannot remove stale %s: %s", entry.path, e.strerror or e)
            continue
        removed.append(name)
    if removed:
        log.info("removed %d stale temp entries under %s: %s", len(removed), root, ", ".join(sorted(removed)))
    return removed


def read_latest(artifacts: str | Path) -> str:
    """The version LATEST names. CheckpointNotFoundError when there is no LATEST yet;
    CorruptCheckpointError when it cannot be read or does not hold one version id."""
    path = models_dir(artifacts) / LATEST
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; it is refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "special"
                raise CorruptCheckpointError(
                    f"cannot read the {LATEST} pointer {path}: not a regular file ({kind})"
                )
            raw = f.read(LATEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no {LATEST} pointer at {path}: train a model first") from None
    except OSError as e:  # no permission, models/ is a file, an I/O error, ...
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


@pydantic_dataclass(config=_ENTRY)
class _TensorEntry:
    shape: list[int]
    dtype: str


@pydantic_dataclass(config=_ENTRY)
class _WeightsEntry:
    sha256: str
    tensors: dict[str, _TensorEntry]
    file: str = WEIGHTS


@pydantic_dataclass(config=_ENTRY)
class _FileEntry:
    sha256: str
    bytes: int | None = None


@pydantic_dataclass(config=_ENTRY)
class _ManifestEntry:
    """The manifest's JSON types (its config is checked by ``Config.from_dict``, its values later)."""

    format_version: int
    version: str
    config: dict[str, Any]
    feature_schema: FeatureSchema
    weights: _WeightsEntry
    created_at: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    files: dict[str, _FileEntry] | None = None
    digest: str | None = None
    signature: str | None = None


_MANIFEST_TYPES: TypeAdapter[_ManifestEntry] = TypeAdapter(_ManifestEntry)


def _type_error(text: str) -> str | None:
    """Why the manifest's JSON does not fit its types; None when it does. Types only: which strings
    are allowed and every other value rule are the constructors' checks (an unknown arch may be a
    newer build's: an incompatible rather than a corrupt manifest)."""
    try:
        _MANIFEST_TYPES.validate_json(text, strict=True)
    except ValidationError as e:
        shape = [err for err in e.errors(include_url=False) if is_malformed(err)]
        return describe_error(shape[0]) if shape else None
    return None


def _first_line(e: BaseException) -> str:
    """An exception as one short line (torch appends C++ stack traces to some messages)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_manifest(path: Path, key: bytes | str | None = None) -> dict[str, Any]:
    """The manifest of a version folder: its digest (and signature, with a key: ``key`` or
    ``$MTRANK_CHECKPOINT_KEY``) and JSON types checked (not yet its values or files)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointNotFoundError(f"no {MANIFEST} in {path}")
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{mpath}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        end = text.rstrip()
        if not end.endswith("}") or e.pos >= len(end):  # cut off: a copy still in progress?
            raise IncompleteCheckpointError(f"{mpath}: not valid JSON, cut off after {len(raw)} bytes") from e
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({_first_line(e)})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, an int of 5000 digits, [[[[...
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({_first_line(e)})") from e
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{mpath}: manifest must be a JSON object")
    fv = manifest.get("format_version")
    if type(fv) is not int or fv not in READ_FORMAT_VERSIONS:
        raise IncompatibleCheckpointError(
            f"{mpath}: format_version {fv!r}, this build reads {' and '.join(map(str, READ_FORMAT_VERSIONS))}"
        )
    _check_seal(mpath, manifest, checkpoint_key(key))
    for k in ("version", "config", "feature_schema", "weights"):
        if k not in manifest:
            raise CorruptCheckpointError(f"{mpath}: missing key {k!r}")
    err = _type_error(text)
    if err:
        raise CorruptCheckpointError(f"{mpath}: {err}")
    if not is_version_id(manifest["version"]):
        raise CorruptCheckpointError(f"{mpath}: version {manifest['version']!r} is not a model version id")
    return manifest


# Errors the constructors raise on values that do not make sense (after the type check): they
# describe a bad manifest. Anything else (AttributeError, NameError, ...) is a bug and propagates.
_VALUE_ERRORS = (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError)


def _parse_parts(path: Path, manifest: dict[str, Any]) -> tuple[Config, FeatureSchema]:
    """The manifest's config and fitted feature schema, their values validated."""
    try:
        config = Config.from_dict(manifest["config"], legacy=True)
        if VOCAB in (manifest.get(FILES) or {}):  # the large vocabularies (listed, so digest-checked)
            try:
                arrays = load_numpy(str(path / VOCAB))
            except (SafetensorError, OSError) as e:
                raise CorruptCheckpointError(f"{path / VOCAB}: unreadable ({e})") from e
            schema = schema_from_arrays(manifest["feature_schema"], arrays)
        else:
            schema = FeatureSchema.from_dict(manifest["feature_schema"])
    except ConfigError as e:
        if e.malformed:
            raise CorruptCheckpointError(f"{path}: manifest config malformed: config.{e}") from e
        raise IncompatibleCheckpointError(f"{path}: manifest config/schema unusable: {e}") from e
    except FeatureError as e:
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
    m, n_tasks = config.model.net, len(config.tasks)
    if isinstance(m, MMoEConfig):
        return "model.mmoe.n_experts", n_tasks * max(m.n_experts, 0)
    if isinstance(m, PLEConfig):
        per_level = max(m.n_task_experts, 0) + max(m.n_shared_experts, 0)
        return "model.ple.levels x experts per gate", n_tasks * max(m.levels, 0) * per_level
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


def load_checkpoint(path: str | Path, key: bytes | str | None = None) -> Checkpoint:
    """Load and validate one version folder. Raises a CheckpointError subclass on any problem.

    Order: manifest JSON, its digest and signature (``key``, default ``$MTRANK_CHECKPOINT_KEY``)
    and its types; every listed file's size and SHA-256; config and schema values; the safetensors
    header against the manifest's tensor list; the header against the network the config
    describes (built on the meta device); only then are the weights read and the network
    materialised.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder not found: {path}")
    manifest = read_manifest(path, key)
    wpath = path / WEIGHTS
    _check_files(path, manifest)
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
