"""User behaviour histories: the fitted description of a sequence feature and its canonical events.

A sequence feature (``[[data.sequences]]``, e.g. ``recent_long_views``) gives every impression the
user's last ``max_len`` *events* before it: log rows (or ``POST /events`` feedback) whose label
column(s) are > 0. An event is one video the user engaged with, described by its *items*: the video
key feature and the declared side features (author, tag, ...), all categorical video features, so
a history item is embedded with exactly the rows the candidate's own video features use.

Ordering and leakage (the same rules offline and online):

* events are ordered by (time, item codes): the time as a float64 (the log's time column, or an
  event's ``timestamp`` in the same unit), ties broken by the canonical item codes;
* an impression at time t sees the events with time < t only: rows with the same timestamp never
  see each other, across the train / valid / test boundary as serving sees them;
* an event is identified by (user, time, video): the same triple twice is one event.

Canonical events are model-independent: a time and the stable 64-bit hashes of the item values
(``model.features``). ``pack_events`` writes them as fixed-size byte strings whose byte order is
the event order (big-endian, sign bit flipped), which is what the Redis store keeps in a sorted
set per user (score = time, ties ordered by the bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.features import SequenceSpec

__all__ = ["SequenceSpec"]

SIGN = np.uint64(1 << 63)


# --------------------------------------------------------------------------------------------
# event order


def time_order_keys(times: np.ndarray) -> np.ndarray:
    """float64 times -> int64 keys in the same order (the IEEE bits, negative values flipped)."""
    bits = np.ascontiguousarray(times, dtype=np.float64).view(np.int64)
    out: np.ndarray = np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)
    return out


def event_order(users: np.ndarray | None, times: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The permutation sorting events by (user, time, item codes) (``users`` None: one user)."""
    keys = [codes[:, k] for k in reversed(range(codes.shape[1]))]
    keys.append(time_order_keys(times))
    if users is not None:
        keys.append(users)
    out: np.ndarray = np.lexsort(keys)
    return out


def first_of_each_event(users: np.ndarray | None, times: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mask of the events (sorted by ``event_order``) to keep: the first of each (user, time, video)."""
    n = len(times)
    keep = np.ones(n, dtype=bool)
    if n > 1:
        same = (time_order_keys(times[1:]) == time_order_keys(times[:-1])) & (codes[1:, 0] == codes[:-1, 0])
        if users is not None:
            same &= users[1:] == users[:-1]
        keep[1:] = ~same
    return keep


def is_event(labels: Mapping[str, Any], columns: Sequence[str]) -> bool:
    """An event of a sequence: any of its label columns given and > 0."""
    for c in columns:
        v = labels.get(c)
        if isinstance(v, bool):
            if v:
                return True
        elif isinstance(v, int | float) and v > 0:
            return True
    return False


# --------------------------------------------------------------------------------------------
# packed events (the Redis store's sorted-set members)


def pack_events(times: np.ndarray, codes: np.ndarray) -> list[bytes]:
    """Events as byte strings ordered like the events: 8 bytes of time key then 8 per item code,
    big-endian with the sign bit flipped (so bytewise order = numeric order)."""
    n, k = codes.shape
    rec = np.empty((n, 1 + k), dtype=">u8")
    rec[:, 0] = time_order_keys(times).view(np.uint64) ^ SIGN
    rec[:, 1:] = codes.astype(np.int64).view(np.uint64) ^ SIGN
    buf, size = rec.tobytes(), 8 * (1 + k)
    return [buf[i * size : (i + 1) * size] for i in range(n)]


def unpack_events(members: Sequence[bytes], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_events``: (times (n,) float64, codes (n, width) int64). ValueError when a
    member is not ``8 * (1 + width)`` bytes."""
    size = 8 * (1 + width)
    if any(len(m) != size for m in members):
        raise ValueError(f"history members of another layout (want {size} bytes)")
    if not members:
        return np.zeros(0, np.float64), np.zeros((0, width), np.int64)
    rec = np.frombuffer(b"".join(members), dtype=">u8").reshape(len(members), 1 + width)
    keys = (rec[:, 0] ^ SIGN).astype(np.uint64).view(np.int64)
    bits = np.where(keys < 0, keys ^ np.int64(0x7FFFFFFFFFFFFFFF), keys)
    codes = (rec[:, 1:] ^ SIGN).astype(np.uint64).view(np.int64)
    return bits.view(np.float64).copy(), codes.copy()


# --------------------------------------------------------------------------------------------
# canonical histories


@dataclass
class UserHistory:
    """One user's events of one sequence, oldest first: times (L,) float64, codes (L, K) int64."""

    times: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return int(self.times.shape[0])

    @classmethod
    def empty(cls, width: int) -> UserHistory:
        return cls(np.zeros(0, np.float64), np.zeros((0, width), np.int64))

    def add(self, times: np.ndarray, codes: np.ndarray, max_len: int) -> UserHistory:
        """A new history with these events merged in (an event already held is not added twice),
        the latest ``max_len`` kept."""
        t = np.concatenate([self.times, times])
        c = np.concatenate([self.codes, codes.astype(np.int64)])
        order = event_order(None, t, c)
        t, c = t[order], c[order]
        keep = first_of_each_event(None, t, c)
        t, c = t[keep][-max_len:], c[keep][-max_len:]
        return UserHistory(t, c)


@dataclass
class EventTable:
    """Every user's latest events of one sequence: user ids (canonical strings) and per user a
    slice of ``times`` / ``codes`` (sorted by user, then event order)."""

    users: list[str]
    offsets: np.ndarray  # (U + 1,)
    times: np.ndarray  # (E,) float64
    codes: np.ndarray  # (E, K) int64
    source: str = ""
    events_read: int = 0  # qualifying log rows read (before de-duplication and capping)

    def history(self, i: int) -> UserHistory:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return UserHistory(self.times[a:b], self.codes[a:b])

    def as_dict(self) -> dict[str, UserHistory]:
        return {u: self.history(i) for i, u in enumerate(self.users)}


def encode_events(codes: np.ndarray, specs_of_items: Sequence[Any], max_len: int) -> tuple[np.ndarray, int]:
    """One user's canonical codes (L, K), oldest first -> (items (max_len, K) int64, length): the
    latest ``max_len`` events, left-aligned, each code encoded by its feature's vocabulary."""
    codes = codes[-max_len:]
    n = codes.shape[0]
    out = np.zeros((max_len, len(specs_of_items)), dtype=np.int64)
    for k, spec in enumerate(specs_of_items):
        out[:n, k] = spec.encode_codes(codes[:, k])
    return out, n
