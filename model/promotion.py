"""The promotion gate: a newly trained version becomes LATEST only if it can replace the current one.

``decide`` compares a new version (its config, fitted feature schema, test metrics and data
fingerprint) with the version LATEST names, reading only LATEST's manifest:

- **heads**: the same head names and kinds (a service's weights and its clients name them);
- **schema**: the same entity keys; every user / video column the new version reads was read by
  LATEST too (so a feature store materialised for LATEST serves it); every context feature LATEST
  accepts is still accepted (clients sending it would get 422 otherwise); no feature changed kind;
- **split**: test metrics are comparable only on the same test split: the same log file (SHA-256)
  and the same split definition and row count. On another split the comparison is not possible:
  ``promotion.different_split = "refuse"`` (the default) keeps LATEST, ``"promote"`` decides on the
  heads and schema checks alone;
- **metrics**: each compared test metric may be worse than LATEST's by at most
  ``promotion.max_regression`` (relative), in the metric's own direction.

There is nothing to compare with when there is no LATEST yet, or when LATEST cannot be read: the
new version is promoted. ``force`` promotes whatever the checks say (they are still recorded).
The decision is recorded in the new version's manifest (``promotion``) whether or not it is promoted.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import CheckpointError, CheckpointNotFoundError, models_dir, read_latest, read_manifest
from model.config import Config
from model.features import FeatureError, FeatureSchema
from model.metrics import higher_is_better

log = logging.getLogger(__name__)

# the metric that stands for a head in listings and in the gate's default comparison
PRIMARY_METRIC = {"binary": "auc", "regression": "rmse"}


def head_metric_keys(tasks: Sequence[Mapping[str, Any]], prefix: str = "test/") -> dict[str, str]:
    """{"<head>/<metric>": "<prefix><head>/<metric>"} of each head's primary metric (tasks as dicts)."""
    out = {}
    for t in tasks:
        metric = PRIMARY_METRIC.get(str(t.get("kind", "binary")), "auc")
        out[f"{t['name']}/{metric}"] = f"{prefix}{t['name']}/{metric}"
    return out


def data_set_name(config: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> str:
    """A short name of the data a version was trained on: log file name and the start of its SHA-256."""
    log_fp = fingerprint.get("log") if isinstance(fingerprint.get("log"), Mapping) else {}
    assert isinstance(log_fp, Mapping)
    name = Path(str(log_fp.get("path") or config.get("data", {}).get("log", "?"))).name
    sha = log_fp.get("sha256")
    return f"{name}@{sha[:8]}" if isinstance(sha, str) else name


@dataclass
class Check:
    name: str  # heads | schema | split | metrics
    ok: bool | None  # None: not comparable
    detail: str


@dataclass
class Decision:
    promoted: bool
    reason: str
    against: str | None = None  # the LATEST version compared with
    forced: bool = False
    checks: list[Check] = field(default_factory=list)
    at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_identity(config: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """What makes two test splits the same rows, or None when a manifest does not say.

    A fingerprint's own ``test_split`` entry is used when it has one; otherwise the log's SHA-256,
    the split definition of the data config and the test row count.
    """
    own = fingerprint.get("test_split")
    if own is not None:
        return {"test_split": own}
    log_fp = fingerprint.get("log")
    data = config.get("data", {})
    sha = log_fp.get("sha256") if isinstance(log_fp, Mapping) else None
    if sha is None or fingerprint.get("test_rows") is None or not isinstance(data, Mapping):
        return None
    keys = ("source", "split_column", "test_range", "max_rows", "drop_duplicates")
    ident = {"log_sha256": sha, "test_rows": fingerprint.get("test_rows")}
    ident.update({k: _plain(data.get(k)) for k in keys})
    return ident


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v


def _check_heads(new: Sequence[Mapping[str, Any]], old: Sequence[Mapping[str, Any]]) -> Check:
    a = sorted((str(t["name"]), str(t.get("kind", "binary"))) for t in new)
    b = sorted((str(t["name"]), str(t.get("kind", "binary"))) for t in old)
    if a == b:
        return Check("heads", True, f"same heads {[n for n, _ in a]}")
    return Check("heads", False, f"heads differ: LATEST has {_heads(b)}, this version {_heads(a)}")


def _heads(heads: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{n} ({k})" for n, k in heads)


def _check_schema(new: FeatureSchema, old: FeatureSchema) -> Check:
    new, old = new.serving(), old.serving()
    problems = []
    if (new.user_key, new.video_key) != (old.user_key, old.video_key):
        problems.append(
            f"entity keys {new.user_key}/{new.video_key} differ from LATEST's {old.user_key}/{old.video_key}"
        )
    kinds_old = {(f.group, f.name): f.kind for f in old.features}
    kinds_new = {(f.group, f.name): f.kind for f in new.features}
    changed = [f"{g}.{n}" for (g, n), k in kinds_new.items() if kinds_old.get((g, n), k) != k]
    if changed:
        problems.append(f"features changed kind: {changed}")
    added = [f"{g}.{n}" for (g, n) in kinds_new if g in ("user", "video") and (g, n) not in kinds_old]
    if added:
        problems.append(
            f"reads entity columns LATEST did not ({added}): a feature store materialised for LATEST "
            "lacks them (materialise first, then promote with --force)"
        )
    dropped = [n for (g, n) in kinds_old if g == "context" and (g, n) not in kinds_new]
    if dropped:
        problems.append(f"no longer accepts context features {dropped} that LATEST's clients send")
    if problems:
        return Check("schema", False, "; ".join(problems))
    return Check("schema", True, "compatible with LATEST's feature store and clients")


def _metric_keys(config: Config, pick: Sequence[str]) -> list[str]:
    if pick:
        return list(pick)
    monitor = config.train.monitor.split("/", 1)
    keys = ["test/" + monitor[1]] if len(monitor) == 2 else []
    keys += head_metric_keys([asdict(t) for t in config.tasks]).values()
    return list(dict.fromkeys(keys))


def _check_metrics(
    keys: Sequence[str], new: Mapping[str, Any], old: Mapping[str, Any], tolerance: float
) -> Check:
    worse, compared, skipped = [], [], []
    for key in keys:
        a, b = new.get(key), old.get(key)
        if not (_finite(a) and _finite(b)):
            skipped.append(key)
            continue
        try:
            up = higher_is_better(key)
        except ValueError:
            skipped.append(key)
            continue
        assert isinstance(a, int | float) and isinstance(b, int | float)
        slack = tolerance * abs(b)
        bad = a < b - slack if up else a > b + slack
        compared.append(f"{key} {a:.4f} vs {b:.4f}")
        if bad:
            worse.append(f"{key} {a:.4f} is worse than LATEST's {b:.4f} (tolerance {tolerance:g} relative)")
    if worse:
        return Check("metrics", False, "; ".join(worse))
    if not compared:
        return Check("metrics", None, f"no test metric both versions report (looked for {list(keys)})")
    note = f" (not compared: {skipped})" if skipped else ""
    return Check("metrics", True, "; ".join(compared) + note)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def decide(
    artifacts: str | Path,
    config: Config,
    schema: FeatureSchema,
    metrics: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    *,
    force: bool = False,
) -> Decision:
    """Whether a new version (described by its parts) may replace the version LATEST names."""
    pc = config.promotion
    if not pc.enabled:
        return Decision(True, "promotion gate disabled ([promotion] enabled = false)")
    try:
        current = read_latest(artifacts)
    except CheckpointNotFoundError:
        return Decision(True, "no LATEST yet: the first model")
    except CheckpointError as e:
        return Decision(True, f"LATEST is unusable, replaced: {e}")
    try:
        old = read_manifest(models_dir(artifacts) / current)
        old_schema = FeatureSchema.from_dict(old["feature_schema"])
        old_tasks = list(old["config"]["tasks"])
    except (CheckpointError, FeatureError, KeyError, TypeError) as e:
        return Decision(True, f"LATEST ({current}) is unreadable, replaced: {e}", current)

    checks = [_check_heads([asdict(t) for t in config.tasks], old_tasks), _check_schema(schema, old_schema)]
    here = split_identity(config.to_dict(), fingerprint)
    there = split_identity(old["config"], old.get("data_fingerprint") or {})
    if here is None or there is None:
        checks.append(Check("split", None, "a data fingerprint does not identify its test split"))
    elif here != there:
        diff = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k))
        checks.append(Check("split", None, f"another test split than LATEST's (differs in {diff})"))
    else:
        checks.append(Check("split", True, "the same test split as LATEST's"))
    if checks[-1].ok:
        keys = _metric_keys(config, pc.metrics)
        checks.append(_check_metrics(keys, metrics, old.get("metrics") or {}, pc.max_regression))
    else:
        checks.append(Check("metrics", None, "not comparable: " + checks[-1].detail))

    failed = [c for c in checks if c.ok is False]
    unknown = [c for c in checks if c.ok is None and c.name == "metrics"]
    if failed:
        ok, reason = False, "; ".join(f"{c.name}: {c.detail}" for c in failed)
    elif unknown and pc.different_split == "refuse":
        ok = False
        reason = (
            f"metrics: {unknown[0].detail}; the comparison with LATEST is not possible, so LATEST is kept "
            '(set [promotion] different_split = "promote" to decide on heads and schema alone)'
        )
    else:
        ok, reason = True, "; ".join(f"{c.name}: {c.detail}" for c in checks)
    if force and not ok:
        return Decision(True, f"forced over: {reason}", current, True, checks)
    return Decision(ok, reason, current, False, checks)


def manifest_entry(decision: Decision | None) -> dict[str, Any]:
    """The ``promotion`` entry of a new version's manifest ({} when LATEST was not to be moved)."""
    return {} if decision is None else {"promotion": decision.to_dict()}


def promoted(decision: Decision | None) -> bool:
    return decision is not None and decision.promoted


def log_decision(decision: Decision | None, version: str) -> None:
    if decision is None:
        return
    if decision.promoted:
        log.info("model %s promoted to LATEST: %s", version, decision.reason)
    else:
        log.warning(
            "model %s written but NOT promoted (LATEST stays %s): %s",
            version,
            decision.against,
            decision.reason,
        )
