"""Small file helpers shared by the data cache, training state and checkpoints: content digests and
atomic replacement (write a temporary sibling, then ``os.replace``)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_sibling(path: Path) -> Path:
    """A hidden, unique name beside ``path`` for writing it atomically."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary sibling, then rename it over ``path``: readers see the old file or
    the whole new one, never part of it. The temporary file is removed if writing fails."""
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
