"""Checkpoint hardening: tamper-evident manifests (digest, optional HMAC), payload files covered
generically, legacy checkpoints still loading, readable weights, stale temp cleanup, disk full."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from modelkit import ROOT, tiny_toml
from typer.testing import CliRunner

import model.checkpoint as ck
from model import Ranker
from model.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    load_checkpoint,
    read_latest,
    resolve_checkpoint,
)
from service.cli import app as cli_app

LEGACY = ROOT / "tests" / "fixtures" / "legacy_checkpoints" / "models"
MANIFEST = "manifest.json"


@pytest.fixture
def version_dir(trained_artifacts: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny trained checkpoint's version folder."""
    src = resolve_checkpoint(trained_artifacts)
    dst = tmp_path / "models" / src.name
    shutil.copytree(src, dst)
    return dst


KEY_ENV = "MTRANK_CHECKPOINT_KEY"


@pytest.fixture(autouse=True)
def _no_deployment_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / MANIFEST).read_text()))


def write(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _numeric(m: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in m["feature_schema"]["features"] if f["kind"] == "numeric")


def _categorical(m: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in m["feature_schema"]["features"] if f["kind"] == "categorical" and f["vocab"])


def _swap_vocab(m: dict[str, Any]) -> None:
    vocab = _categorical(m)["vocab"]
    vocab[0], vocab[-1] = vocab[-1], vocab[0]


# One edit per class of manifest field. Each leaves a manifest every other check accepts (the
# served scores change, or nothing the loader reads does): only the digest can catch it.
EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "config: a training hyper-parameter": lambda m: m["config"]["train"].update(lr=0.5),
    "config: a task weight": lambda m: m["config"]["tasks"][0].update(weight=3.0),
    "feature schema: a numeric mean": lambda m: _numeric(m).update(mean=_numeric(m)["mean"] + 1.0),
    "feature schema: a numeric std": lambda m: _numeric(m).update(std=_numeric(m)["std"] * 2.0),
    "feature schema: a vocabulary": _swap_vocab,
    "metrics": lambda m: m["metrics"].update({"test/engagement/auc": 0.99}),
    "data fingerprint": lambda m: m["data_fingerprint"].update(log_rows=1),
    "created_at": lambda m: m.update(created_at="2000-01-01T00:00:00+00:00"),
    "a free-form key added": lambda m: m.update(note="promoted by hand"),
    "a free-form key removed": lambda m: m.pop("software"),
    "the digest itself": lambda m: m.update(digest="sha256:" + "0" * 64),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_any_manifest_edit_breaks_the_digest(version_dir: Path, edit: str) -> None:
    load_checkpoint(version_dir)  # loads as written
    m = read(version_dir)
    EDITS[edit](m)
    write(version_dir, m)
    with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
        load_checkpoint(version_dir)


def test_the_digest_covers_content_not_formatting(version_dir: Path) -> None:
    m = read(version_dir)
    assert m["digest"].startswith("sha256:") and "signature" not in m
    assert set(m["files"]) == {"weights.safetensors"}
    assert m["files"]["weights.safetensors"]["sha256"] == m["weights"]["sha256"]
    (version_dir / MANIFEST).write_text(json.dumps(dict(reversed(list(m.items())))))  # keys reordered
    load_checkpoint(version_dir)
    m.pop("digest")  # a stripped digest looks like a legacy manifest: accepted without a key ...
    write(version_dir, m)
    load_checkpoint(version_dir)


def test_every_listed_payload_file_is_checked(version_dir: Path) -> None:
    """A further payload file (e.g. the large vocabularies) is covered by being listed."""
    extra = version_dir / "notes.bin"
    extra.write_bytes(b"\x01" * 1000)
    m = read(version_dir)
    m["files"]["notes.bin"] = {"sha256": ck.sha256_file(extra), "bytes": 1000}
    write(version_dir, ck.seal_manifest(m))
    load_checkpoint(version_dir)

    extra.write_bytes(b"\x02" + b"\x01" * 999)  # same size, other bytes
    with pytest.raises(CorruptCheckpointError, match="notes.bin: SHA-256"):
        load_checkpoint(version_dir)
    extra.write_bytes(b"\x01" * 400)  # still being copied: transient
    with pytest.raises(ck.IncompleteCheckpointError, match="400 of 1000 bytes"):
        load_checkpoint(version_dir)
    extra.unlink()
    with pytest.raises(CheckpointNotFoundError, match="no notes.bin"):
        load_checkpoint(version_dir)
    # a listed name is a plain file name in the folder, never a path
    del m["files"]["notes.bin"]
    m["files"]["../weights.safetensors"] = m["files"]["weights.safetensors"]
    write(version_dir, ck.seal_manifest(m))
    with pytest.raises(CorruptCheckpointError, match="not a payload file name"):
        load_checkpoint(version_dir)


def test_weights_edits_are_caught_by_size_or_digest(version_dir: Path) -> None:
    w = version_dir / "weights.safetensors"
    data = bytearray(w.read_bytes())
    w.write_bytes(bytes(data[:-10]))
    with pytest.raises(ck.IncompleteCheckpointError, match="still being copied"):
        load_checkpoint(version_dir)
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_checkpoint(version_dir)
    w.write_bytes(bytes(data) + b"\x00")
    with pytest.raises(CorruptCheckpointError, match="bytes, the manifest says"):
        load_checkpoint(version_dir)


def test_a_manifest_cut_off_mid_copy_is_incomplete(version_dir: Path) -> None:
    raw = (version_dir / MANIFEST).read_bytes()
    (version_dir / MANIFEST).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ck.IncompleteCheckpointError, match="cut off"):
        load_checkpoint(version_dir)
    (version_dir / MANIFEST).write_bytes(b"{not json}")  # broken, not cut off
    with pytest.raises(CorruptCheckpointError, match="not valid JSON") as info:
        load_checkpoint(version_dir)
    assert not isinstance(info.value, ck.IncompleteCheckpointError)


@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.iterdir()))
def test_legacy_checkpoints_load_and_a_claimed_digest_is_checked(name: str, tmp_path: Path) -> None:
    src = LEGACY / name
    assert "digest" not in read(src) and "files" not in read(src)
    Ranker.load(src)  # no digest: accepted (written before manifests carried one)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    m = read(dst)
    m["digest"] = ck.seal_manifest(m)["digest"]
    write(dst, m)
    load_checkpoint(dst)  # the same manifest with its right digest
    _numeric(m)["mean"] += 1.0
    write(dst, m)
    with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
        load_checkpoint(dst)


def test_a_deployment_key_signs_and_is_required(
    version_dir: Path, trained_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "k3y-for-this-deployment"
    ckpt = load_checkpoint(version_dir)
    # written with the key (from the environment, as `mtrank train` would be run)
    monkeypatch.setenv(KEY_ENV, key)
    signed = ck.save_checkpoint(tmp_path / "signed", ckpt.model, ckpt.config, ckpt.schema)
    m = read(signed)
    assert m["signature"].startswith("hmac-sha256:")
    load_checkpoint(signed)  # key from the environment
    # this deployment's key refuses an unsigned checkpoint, and a legacy one
    with pytest.raises(ck.TamperedCheckpointError, match="not signed"):
        load_checkpoint(version_dir)
    with pytest.raises(ck.TamperedCheckpointError, match="not signed"):
        load_checkpoint(LEGACY / "legacy-mmoe")
    monkeypatch.delenv(KEY_ENV)
    load_checkpoint(signed, key=key)
    load_checkpoint(signed)  # without a key the digest is still checked
    with pytest.raises(ck.TamperedCheckpointError, match="signature does not match"):
        load_checkpoint(signed, key="another-key")
    # an edit with a recomputed digest (anyone can compute one) still breaks the signature
    _numeric(m)["std"] *= 2
    m["digest"] = ck.seal_manifest(m)["digest"]
    write(signed, m)
    load_checkpoint(signed)  # what a key-less loader cannot tell ...
    with pytest.raises(ck.TamperedCheckpointError, match="signature does not match"):
        load_checkpoint(signed, key=key)  # ... and a keyed one can
    m = ck.seal_manifest(m)  # no key: the signature is dropped, not kept stale
    assert "signature" not in m


def test_weights_are_readable_like_any_new_file(version_dir: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(version_dir)
    old = os.umask(0o022)
    try:
        p = ck.save_checkpoint(tmp_path / "a", ckpt.model, ckpt.config, ckpt.schema)
        os.umask(0o027)
        q = ck.save_checkpoint(tmp_path / "b", ckpt.model, ckpt.config, ckpt.schema)
    finally:
        os.umask(old)
    for folder, mode in ((p, 0o644), (q, 0o640)):
        for name in ("weights.safetensors", MANIFEST):
            assert (folder / name).stat().st_mode & 0o777 == mode, (folder, name)


def test_stale_temp_entries_are_removed_by_age(version_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    root = ck.models_dir(art)
    root.mkdir(parents=True)
    old = time.time() - 2 * 3600
    stale_dir, fresh_dir = root / ".tmp-20260101-x-1a2b", root / ".tmp-20260102-y-3c4d"
    stale_latest, fresh_latest = root / ".LATEST.0a0b0c0d.tmp", root / ".LATEST.1a1b1c1d.tmp"
    for d in (stale_dir, fresh_dir):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    for f in (stale_latest, fresh_latest):
        f.write_text("v\n")
    keep = root / ".tmpfile-not-ours"
    keep.write_text("x")
    for p in (stale_dir, stale_latest, keep):
        os.utime(p, (old, old))
    assert sorted(ck.clean_stale_temp(art)) == sorted([stale_dir.name, stale_latest.name])
    assert fresh_dir.is_dir() and fresh_latest.is_file() and keep.is_file()
    assert ck.clean_stale_temp(tmp_path / "nowhere") == []
    # writing a checkpoint cleans up too
    ckpt = load_checkpoint(version_dir)
    (root / ".tmp-old-again").mkdir()
    os.utime(root / ".tmp-old-again", (old, old))
    ck.save_checkpoint(art, ckpt.model, ckpt.config, ckpt.schema)
    assert not (root / ".tmp-old-again").exists()


# --------------------------------------------------------------------------------------------
# disk full

# Subprocesses whose files may not grow beyond 16 kB (RLIMIT_FSIZE; SIGXFSZ ignored so a write fails
# with EFBIG instead of killing them): the weights (~60 kB) cannot be written. Works without root,
# unlike a tiny tmpfs (those variants run too where mounting is allowed).
FSIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
"""
CLI_CHILD = (
    FSIZE_LIMIT
    + """
sys.argv = ["mtrank", *sys.argv[1:]]
from service.cli import app
app()
"""
)
SAVE_CHILD = (
    FSIZE_LIMIT
    + """
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
ckpt = load_checkpoint(sys.argv[1])
try:
    save_checkpoint(sys.argv[2], ckpt.model, ckpt.config, ckpt.schema)
except CheckpointError as e:
    print(f"CheckpointError: {e}")
    sys.exit(3)
"""
)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 kB tmpfs (root only; skipped elsewhere: the RLIMIT_FSIZE test covers the same path)."""
    where = tmp_path / "small-disk"
    if not _mount_tmpfs(where, "32k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield where
    finally:
        gc.collect()  # a failed training's traceback may still hold files (mmaps) open there
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], check=True)  # detached now, freed when idle


def _assert_clean_failure(art: Path) -> None:
    """Nothing half-written: no temp folder or file, no version, no LATEST."""
    root = ck.models_dir(art)
    if root.exists():
        assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".LATEST."))]
    assert ck.list_versions(art) == []
    with pytest.raises(CheckpointNotFoundError):
        read_latest(art)


def _run(code: str, *args: str) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_is_a_clear_error(version_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    code, out = _run(SAVE_CHILD, str(version_dir), str(art))
    assert code == 3, out
    assert "CheckpointError: cannot write model version" in out and "File too large" in out, out
    assert "disk full or over a size limit" in out, out
    _assert_clean_failure(art)


@pytest.mark.slow
def test_disk_full_while_training_is_a_clear_error(tmp_path: Path) -> None:
    """Wherever training first runs out of space (data cache, run state or the checkpoint), one
    error line and exit code 2, no traceback."""
    art = tmp_path / "art"
    code, out = _run(CLI_CHILD, "train", "--config", tiny_toml(tmp_path), "--artifacts", str(art))
    assert code == 2, out
    assert "error:" in out and "File too large" in out and "disk full or over a size limit" in out, out
    assert "Traceback" not in out, out
    _assert_clean_failure(art)


def test_disk_full_on_a_small_tmpfs(version_dir: Path, small_disk: Path) -> None:
    ckpt = load_checkpoint(version_dir)
    with pytest.raises(CheckpointError, match="No space left on device.*disk full"):
        ck.save_checkpoint(small_disk, ckpt.model, ckpt.config, ckpt.schema)
    _assert_clean_failure(small_disk)


def test_cli_train_reports_a_write_error(version_dir: Path, small_disk: Path) -> None:
    r = CliRunner().invoke(
        cli_app,
        ["train", "--config", tiny_toml(version_dir.parent), "--artifacts", str(small_disk)],
    )
    assert r.exit_code == 2 and "No space left on device" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    _assert_clean_failure(small_disk)
