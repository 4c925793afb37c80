"""``mtrank init``: a starting config written from the data files' schema.

The log (and the optional users / videos tables) are read the way training reads them (the log
through ``LogSource``: the same CSV type inference; the tables whole), and every column is
profiled on a sample of the log's first rows (the tables: every row):

* **keys** -- a column shared by the log and a table, unique in the table (one row per entity);
* **labels** -- the log's 0/1 columns (``--label`` names them instead: a 0/1 column, a numeric
  column for a regression head, or a text column with the positive value, ``col=value``);
* **features** -- text, booleans, ids and integer columns with few values are categorical; floats
  and wide-range integers are numeric, ``log1p`` when non-negative and skewed (counts). A log with
  entity tables is a recommendation log: its features come from the tables, and of its own columns
  only the categorical ones become ``context`` features (its numeric columns are often outcomes,
  e.g. a watch time, that would leak the labels: they are written commented out). A table without
  keys is scored from its own columns: every usable column is a ``context`` feature;
* **split** -- a day-like column (``20240131`` integers, ``"2024-01-31"`` strings, dates) with at
  least 3 distinct values makes a time split testing on its last days; otherwise a seeded random
  split. The day column is scanned whole (its distinct values and their rows), everything else is
  read from the sample.

Every choice is written with a comment saying why, and the text is parsed back as a ``Config``
before it is returned: ``mtrank init`` never writes a config that does not load.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from model.config import Config, ConfigError, DataConfig
from model.data.source import DataError, LogSource, read_table

SAMPLE_ROWS = 100_000  # log rows profiled
MAX_CATEGORIES = 50  # an integer column with at most this many distinct values is categorical
MAX_TASKS = 8  # 0/1 columns made heads when --label is not given (the others are listed, commented)
MIN_DAYS = 3  # a time split needs a day column with at least this many distinct values
RARE_MIN_COUNT = 5  # min_count of a categorical with many distinct values
MANY_VALUES = 1000  # ... "many"
HASH_ABOVE = 1_000_000  # a categorical with more distinct values than this is hashed
HASH_BUCKETS = 1 << 20
SKEW_LOG1P = 2.0  # a non-negative numeric column skewed above this gets log1p
# an integer column whose distinct values fill less than this share of their range, and that is not
# skewed like a count, holds ids (an author id, a music id) rather than quantities
ID_DENSITY = 0.01

Kind = Literal["binary", "categorical", "numeric", "day", "time", "identifier", "constant", "empty"]


class ScaffoldError(ValueError):
    """The files cannot be turned into a config (no label, no key, unreadable file, ...)."""


# --------------------------------------------------------------------------------------------
# column profiles


@dataclass
class Profile:
    """What the sample says about one column."""

    name: str
    kind: Kind
    dtype: str
    rows: int  # non-missing values in the sample
    distinct: int
    note: str  # why the kind: goes into the config's comment
    integral: bool = False  # numeric values are all whole numbers
    skew: float = 0.0
    nonneg: bool = False
    values: list[Any] = field(default_factory=list)  # the most frequent values (categorical, binary)
    positive_share: float | None = None  # binary: share of 1s

    @property
    def text(self) -> bool:
        return self.dtype in ("text", "bool")


def _is_day_int(x: np.ndarray) -> bool:
    """All values look like YYYYMMDD dates."""
    if not len(x) or x.min() < 19000101 or x.max() > 21001231:
        return False
    month, day = (x // 100) % 100, x % 100
    return bool(((month >= 1) & (month <= 12) & (day >= 1) & (day <= 31)).all())


ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}|\d{8}")


def _is_day_text(values: Sequence[str]) -> bool:
    """All (distinct) values are ISO days (``2024-01-31`` or ``20240131``): text that sorts in time."""
    if not values:
        return False
    for v in values:
        if not ISO_DAY.fullmatch(v):
            return False
        try:
            dt.date.fromisoformat(v if "-" in v else f"{v[:4]}-{v[4:6]}-{v[6:]}")
        except ValueError:
            return False
    return True


def _epoch_like(x: np.ndarray) -> bool:
    """Values in the range of Unix times in seconds or milliseconds (2001..2103)."""
    if not len(x):
        return False
    lo, hi = float(x.min()), float(x.max())
    return (lo >= 1e9 and hi <= 4.2e9) or (lo >= 1e12 and hi <= 4.2e12)


def profile(name: str, col: pd.Series) -> Profile:
    """Profile one column of a sample."""
    s = col.dropna()
    n, distinct = len(s), int(s.nunique()) if len(s) else 0
    if n == 0:
        return Profile(name, "empty", str(col.dtype), 0, 0, "no value in the sample")
    top = [_plain(v) for v in s.value_counts().index[:20]]
    if distinct == 1:
        return Profile(
            name, "constant", str(col.dtype), n, 1, f"one value ({top[0]!r}) in the sample", values=top
        )
    kind = col.dtype.kind
    if kind == "M":
        return Profile(name, "time", "timestamp", n, distinct, "timestamps")
    if kind == "b" or (kind in "iuf" and set(np.unique(s.to_numpy())) <= {0, 1}):
        share = float(s.astype(float).mean())
        return Profile(
            name,
            "binary",
            "bool" if kind == "b" else "number",
            n,
            2,
            f"0/1, {100 * share:.1f}% ones in the sample",
            integral=True,
            values=top,
            positive_share=share,
        )
    if kind in "iuf":
        x = s.to_numpy(dtype=np.float64)
        integral = bool(np.all(np.isfinite(x)) and np.all(x == np.round(x)))
        if integral and _is_day_int(x.astype(np.int64)):
            return Profile(name, "day", "number", n, distinct, "YYYYMMDD days", integral=True, values=top)
        if _epoch_like(x) and distinct > MAX_CATEGORIES:
            return Profile(name, "time", "number", n, distinct, "Unix times", integral=integral)
        finite = x[np.isfinite(x)]
        skew = float(pd.Series(finite).skew()) if len(finite) > 2 else 0.0  # type: ignore[arg-type]
        p = Profile(
            name,
            "numeric",
            "number",
            n,
            distinct,
            "",
            integral=integral,
            skew=0.0 if math.isnan(skew) else skew,
            nonneg=bool(len(finite) and finite.min() >= 0),
            values=top,
        )
        span = float(finite.max() - finite.min()) + 1.0
        if integral and distinct <= MAX_CATEGORIES:
            p.kind, p.note = "categorical", f"whole numbers, {distinct} values"
        elif integral and distinct == n and n >= 100:
            p.kind, p.note = "identifier", "whole numbers, unique in every row: an identifier"
        elif kind in "iu" and distinct / span < ID_DENSITY and p.skew < SKEW_LOG1P / 2:
            p.kind = "categorical"
            lo, hi = _num(finite.min()), _num(finite.max())
            p.note = f"integers, {distinct} values spread thinly over {lo} .. {hi}: ids"
        else:
            what = "whole numbers" if integral else "floats"
            p.note = f"{what}, {distinct} values, range {_num(finite.min())} .. {_num(finite.max())}"
        return p
    # text (strings, or objects such as dates read from Parquet)
    strings = [str(v) for v in s.unique()[:10_000]]
    if all(isinstance(v, dt.date) for v in s.iloc[:100]) or _is_day_text(strings):
        return Profile(name, "day", "text", n, distinct, "days", values=top)
    if distinct == n and n >= 100:
        return Profile(name, "identifier", "text", n, distinct, "text, unique in every row: an identifier")
    return Profile(name, "categorical", "text", n, distinct, f"text, {distinct} values", values=top)


def _plain(v: Any) -> Any:
    """A numpy scalar as a Python value (TOML / JSON friendly)."""
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _num(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# TOML text


def toml_value(v: Any) -> str:
    """A value as TOML: strings (JSON escapes are TOML's), numbers, booleans, lists, inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"no TOML for {v!r}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"no TOML for {type(v).__name__}")


def _line(key: str, value: Any, comment: str = "") -> str:
    text = f"{key} = {toml_value(value)}"
    return f"{text}  # {comment}" if comment else text


def _comment(text: str) -> list[str]:
    return [f"# {line}" if line else "#" for line in text.splitlines()]


# --------------------------------------------------------------------------------------------
# the scaffold


@dataclass
class Feature:
    name: str
    group: str
    kind: str
    note: str
    extra: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True

    def lines(self) -> list[str]:
        body = [
            "[[data.features]]",
            _line("name", self.name),
            _line("group", self.group),
            _line("kind", self.kind, self.note),
        ]
        body += [_line(k, v) for k, v in self.extra.items()]
        return body if self.enabled else ["# " + b for b in body]


@dataclass
class Task:
    name: str
    kind: str
    label: Any
    note: str
    transform: str | None = None
    enabled: bool = True

    def lines(self) -> list[str]:
        body = [
            "[[tasks]]",
            _line("name", self.name),
            _line("kind", self.kind),
            _line("label", self.label, self.note),
        ]
        if self.transform:
            body.append(_line("transform", self.transform))
        return body if self.enabled else ["# " + b for b in body]


@dataclass
class LabelSpec:
    """One ``--label``: a column, and for a text column the positive value."""

    column: str
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> LabelSpec:
        col, sep, value = text.partition("=")
        if not col.strip():
            raise ScaffoldError(f"--label {text!r}: want COLUMN or COLUMN=VALUE")
        return cls(col.strip(), value if sep else None)


@dataclass
class Scaffold:
    """What ``init`` decided; ``text`` is the config file."""

    text: str
    config: Config
    tasks: list[str]
    features: dict[str, list[str]]  # group -> feature names
    split: str
    user_key: str | None
    video_key: str | None
    skipped: dict[str, str]  # column -> why it is not used


def _data_ref(path: Path, data_dir: Path) -> str:
    """A file name relative to data_dir when it is inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(data_dir))
    except ValueError:
        return str(path.resolve())


def _sample_log(source: LogSource, rows: int) -> tuple[pd.DataFrame, bool]:
    """The log's first ``rows`` rows (every file's columns in common), and whether that is all of it."""
    cols = source.columns()
    parts, have = [], 0
    for frag in source.fragments:
        for df in source.batches(frag, cols):
            parts.append(df.iloc[: rows - have])
            have += len(parts[-1])
            if have >= rows:
                return pd.concat(parts, ignore_index=True), False
    if not parts:
        return pd.DataFrame({c: [] for c in cols}), True
    return pd.concat(parts, ignore_index=True), True


def _day_counts(source: LogSource, column: str) -> dict[Any, int]:
    """Rows per distinct value of the day column, over the whole log (one column read)."""
    counts: dict[Any, int] = {}
    for frag in source.fragments:
        for df in source.batches(frag, [column]):
            for v, c in df[column].value_counts().items():
                key = _plain(v)
                counts[key] = counts.get(key, 0) + int(c)
    return counts


def _categorical_extra(p: Profile, table_rows: int | None = None) -> dict[str, Any]:
    distinct = max(p.distinct, table_rows or 0)
    if distinct > HASH_ABOVE:
        return {"hash_buckets": HASH_BUCKETS}
    if distinct > MANY_VALUES:
        return {"min_count": RARE_MIN_COUNT}
    return {}


def _numeric(p: Profile, group: str) -> Feature:
    if p.nonneg and p.skew > SKEW_LOG1P:
        return Feature(
            p.name, group, "numeric", f"{p.note}; non-negative, skewed ({p.skew:.1f}): log1p", {"log1p": True}
        )
    return Feature(p.name, group, "numeric", p.note)


def _feature(p: Profile, group: str, table_rows: int | None = None) -> Feature | None:
    """A feature for a profiled column (None: not a feature)."""
    if p.kind == "categorical" or p.kind == "binary":
        note = p.note if p.kind == "categorical" else f"0/1 values ({p.distinct} kinds)"
        extra = _categorical_extra(p, table_rows)
        if "min_count" in extra:
            note += f"; values seen fewer than {RARE_MIN_COUNT} times share the unknown row"
        if "hash_buckets" in extra:
            note += "; too many values for a vocabulary: hashed"
        return Feature(p.name, group, "categorical", note, extra)
    if p.kind == "numeric":
        return _numeric(p, group)
    return None


SKIP_REASON = {
    "constant": "a single value: carries no information",
    "empty": "no value in the sample",
    "identifier": "unique in every row: an identifier, not a feature",
    "day": "a date: derive a number from it (e.g. days since) to use it",
    "time": "a time: derive a number from it to use it",
}


def _read_table(path: Path, what: str) -> pd.DataFrame:
    df = read_table(path)
    if df.empty:
        raise ScaffoldError(f"the {what} table {path} has no rows")
    return df


def _find_key(
    table: pd.DataFrame, log_columns: Sequence[str], sample: pd.DataFrame, what: str, path: Path
) -> tuple[str, str]:
    shared = [c for c in table.columns if c in log_columns]
    unique = [c for c in shared if table[c].notna().all() and table[c].is_unique]
    if not unique:
        hint = (
            f"the columns it shares with the log ({', '.join(shared)}) repeat in it"
            if shared
            else "it shares no column with the log"
        )
        raise ScaffoldError(
            f"cannot tell the {what} key of {path}: a key is a column of the log that is unique in the "
            f"table (one row per {what}); {hint}"
        )
    key = max(unique, key=lambda c: sample[c].nunique())
    others = [c for c in unique if c != key]
    note = f"a column of the log, unique in {path.name}" + (
        f" (so are {', '.join(others)})" if others else ""
    )
    return key, note


def scaffold(
    log: str | Path,
    users: str | Path | None = None,
    videos: str | Path | None = None,
    labels: Sequence[str] = (),
    name: str | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> Scaffold:
    """Profile the files and write a config for them (``ScaffoldError`` / ``DataError`` on bad input)."""
    log_path = Path(log)
    paths = [log_path] + [Path(p) for p in (users, videos) if p is not None]
    for path in paths:
        if not path.exists():
            raise ScaffoldError(f"file not found: {path}")
    data_dir = Path(os.path.commonpath([f.resolve().parent for f in paths]))
    dcfg = DataConfig(source="tables", data_dir=str(data_dir), log=str(log_path.resolve()))
    source = LogSource(dcfg, min(sample_rows, 1 << 16))
    sample, complete = _sample_log(source, sample_rows)
    if sample.empty:
        raise ScaffoldError(f"the log {log_path} has no rows")
    log_columns = list(sample.columns)
    profiles = {c: profile(c, sample[c]) for c in log_columns}
    skipped: dict[str, str] = {}
    used: set[str] = set()  # log columns with a role (key, label, split, time)

    # -- keys and tables -------------------------------------------------------------------
    tables: dict[str, tuple[Path, pd.DataFrame, str, str]] = {}
    for group, given in (("user", users), ("video", videos)):
        if given is None:
            continue
        path = Path(given)
        df = _read_table(path, f"{group}s")
        key, note = _find_key(df, log_columns, sample, group, path)
        if any(key == t[2] for t in tables.values()):
            raise ScaffoldError(
                f"the users and videos tables both have the key {key!r}: give them distinct keys"
            )
        tables[group] = (path, df, key, note)
        used.add(key)
    keyed = bool(tables)

    # -- labels ------------------------------------------------------------------------------
    tasks: list[Task] = []
    specs = [LabelSpec.parse(t) for t in labels]
    for spec in specs:
        tasks.append(_task_of(spec, profiles, log_path))
        used.add(spec.column)
    binaries = [p for p in profiles.values() if p.kind == "binary" and p.name not in used]
    if not specs:
        for i, p in enumerate(binaries):
            tasks.append(Task(p.name, "binary", p.name, p.note, enabled=i < MAX_TASKS))
            used.add(p.name)
        if not tasks:
            two = [p.name for p in profiles.values() if p.kind == "categorical" and p.distinct == 2]
            hint = f"; two-valued text columns: {', '.join(two)}" if two else ""
            raise ScaffoldError(
                f"no 0/1 column in {log_path.name} to use as a label: name the label column(s) with "
                f"--label COLUMN (0/1 or numeric) or --label COLUMN=VALUE (text: the positive value){hint}"
            )
    elif keyed:
        for p in binaries:  # other outcomes of a recommendation log: listed, never features
            tasks.append(Task(p.name, "binary", p.name, p.note, enabled=False))
            used.add(p.name)
    if len({t.name for t in tasks}) != len(tasks):
        raise ScaffoldError("--label names a column twice")

    # -- split -------------------------------------------------------------------------------
    days = [p for p in profiles.values() if p.kind == "day" and p.name not in used]
    times = sorted(
        (p for p in profiles.values() if p.kind == "time" and p.name not in used and p.dtype == "number"),
        key=lambda p: -p.distinct,
    )
    split_lines: list[str]
    counts = _day_counts(source, days[0].name) if days else {}
    if days and len(counts) >= MIN_DAYS:
        split_lines = _time_split(days[0], counts, times[0] if times else None)
        used.add(days[0].name)
        if times:
            used.add(times[0].name)
    else:
        why = (
            f"{days[0].name!r} has {len(counts)} distinct day(s): a time split needs {MIN_DAYS}"
            if days
            else "no day-like column (YYYYMMDD numbers or YYYY-MM-DD text) to test on the last days"
        )
        split_lines = [
            *_comment(f"split: random, seeded ({why})"),
            _line("split", "random"),
            _line("test_fraction", 0.2),
            _line("valid_fraction", 0.1, "held out for early stopping"),
            _line("split_seed", 0),
        ]

    # -- features ----------------------------------------------------------------------------
    features: list[Feature] = []
    table_columns: dict[str, set[str]] = {}
    for group, (path, df, key, _) in tables.items():
        feats: list[Feature] = []
        key_p = profile(key, df[key])
        extra = _categorical_extra(key_p, len(df))
        extra.setdefault("min_count", 3)
        feats.append(
            Feature(
                key,
                group,
                "categorical",
                f"the {group} key as a feature: ids seen fewer than {extra.get('min_count')} times in "
                "training share the unknown row"
                if "hash_buckets" not in extra
                else f"the {group} key as a feature, hashed (too many ids for a vocabulary)",
                extra,
            )
        )
        other_table = [t for g, t in tables.items() if g != group]
        for c in df.columns:
            if c == key:
                continue
            where = f"{path.name}:{c}"
            if c in log_columns:
                skipped[where] = (
                    "also a column of the log: training would read one, serving the other (rename one)"
                )
                continue
            if group == "video" and other_table and c in other_table[0][1].columns:
                skipped[where] = "also a column of the users table (rename one)"
                continue
            p = profile(c, df[c])
            f = _feature(p, group)
            if f is None:
                skipped[where] = SKIP_REASON.get(p.kind, p.note)
            else:
                feats.append(f)
        table_columns[group] = {f.name for f in feats}
        features += feats
    context: list[Feature] = []
    for c in log_columns:
        if c in used:
            continue
        p = profiles[c]
        f = _feature(p, "context")
        if f is None:
            skipped[c] = SKIP_REASON.get(p.kind, p.note)
            continue
        if keyed and f.kind == "numeric":
            f.enabled = False
            f.note += "; a numeric log column: uncomment if known when ranking (an outcome leaks the labels)"
        context.append(f)
    features += context
    if not any(f.enabled for f in features):
        raise ScaffoldError(
            f"no column of {', '.join(f.name for f in paths)} can be a feature: "
            + "; ".join(f"{c}: {r}" for c, r in skipped.items())
        )

    # -- text ------------------------------------------------------------------------------------
    cfg_name = name or re.sub(r"[^A-Za-z0-9_]+", "_", log_path.name.split(".")[0]) or "mtrank"
    out: list[str] = [
        *_comment(
            f"Written by `mtrank init` from {', '.join(str(f) for f in paths)}.\n"
            f"Every choice below is a guess from the files' schema and the log's first {len(sample)} rows"
            f"{' (all of it)' if complete else ''}:\n"
            "read the comments, then edit. Reference: docs/data-and-config.md"
        ),
        _line("name", cfg_name),
        "",
        "[data]",
        _line("source", "tables"),
        _line("data_dir", str(data_dir), "the files' folder ($MTRANK_DATA_DIR overrides it)"),
        _line("log", _data_ref(log_path, data_dir)),
    ]
    for group in ("user", "video"):
        if group in tables:
            path, df, key, note = tables[group]
            out.append(_line(f"{group}s", _data_ref(path, data_dir), f"{len(df)} rows"))
            out.append(_line(f"{group}_key", key, note))
        else:
            out.append(_line(f"{group}s", "", "no table"))
            out.append(_line(f"{group}_key", "", f"no {group} ids"))
    if not keyed:
        out += _comment(
            "no users / videos table: every row is scored from its own columns (features are context);\n"
            "GAUC and NDCG@10 need list groups (group_by) and are skipped"
        )
    out += split_lines
    out += _comment("rows identical in every column are kept (set drop_duplicates = true to drop them)")
    for group, title in (
        ("user", "user features: the users table, joined by the key (the feature store serves them)"),
        ("video", "video features: the videos table, joined by the key (the feature store serves them)"),
        (
            "context",
            "context features: columns of the log, sent with each /rank request"
            if keyed
            else "features: the row's own columns (context: sent with each /rank request)",
        ),
    ):
        block = [f for f in features if f.group == group]
        if not block:
            continue
        out += ["", *_comment(title)]
        for f in block:
            out += f.lines()
    if skipped:
        out += ["", *_comment("not used:")]
        out += _comment("\n".join(f"  {c}: {r}" for c, r in skipped.items()))
    out += ["", *_comment(_tasks_comment(specs, keyed, len(binaries)))]
    for t in tasks:
        out += t.lines()
    suggestions = _text_label_suggestions(profiles, used)
    if suggestions:
        out += ["", *suggestions]
    out += _model_and_train(complete, len(sample))
    text = "\n".join(out) + "\n"
    try:
        raw = tomllib.loads(text)
        config = Config.from_dict(raw)
        config.check_monitor()
    except (tomllib.TOMLDecodeError, ConfigError) as e:  # a bug here, not bad input
        raise RuntimeError(f"mtrank init wrote a config that does not load: {e}\n{text}") from e
    return Scaffold(
        text,
        config,
        [t.name for t in config.tasks],
        {g: [f.name for f in config.data.features if f.group == g] for g in ("user", "video", "context")},
        config.data.split,
        config.data.user_key,
        config.data.video_key,
        skipped,
    )


def _tasks_comment(specs: Sequence[LabelSpec], keyed: bool, n_binary: int) -> str:
    if specs:
        return "tasks: the labels --label named" + (
            "; the log's other 0/1 columns are listed commented out (outcomes, never features)"
            if keyed
            else ""
        )
    extra = f" (the first {MAX_TASKS}; the others are commented out)" if n_binary > MAX_TASKS else ""
    return (
        f"tasks: one binary head per 0/1 column of the log{extra}.\n"
        "Keep the ones you want to predict: a 0/1 column is never used as a feature here"
    )


def _task_of(spec: LabelSpec, profiles: dict[str, Profile], log_path: Path) -> Task:
    p = profiles.get(spec.column)
    if p is None:
        raise ScaffoldError(
            f"--label {spec.column!r}: no such column in {log_path.name} (has {', '.join(profiles)})"
        )
    if p.kind in ("empty", "constant"):
        raise ScaffoldError(f"--label {spec.column!r}: {SKIP_REASON[p.kind]}, nothing to predict")
    if spec.value is not None:
        value: Any = spec.value
        if not p.text:
            try:
                num = float(spec.value)
            except ValueError:
                raise ScaffoldError(
                    f"--label {spec.column}={spec.value}: {spec.column!r} holds numbers, not text"
                ) from None
            value = int(num) if num.is_integer() else num
        seen = value in p.values or str(value) in [str(v) for v in p.values]
        note = f"1 where {spec.column} is {value!r}" + ("" if seen else " (a value not seen in the sample)")
        return Task(spec.column, "binary", {"column": spec.column, "equals": value}, note)
    if p.kind == "binary":
        return Task(spec.column, "binary", spec.column, p.note)
    if p.text:
        if p.distinct == 2:
            counts = p.values  # most frequent first: the rarer value is the positive class
            pos = counts[-1]
            return Task(
                spec.column,
                "binary",
                {"column": spec.column, "equals": pos},
                f"text with two values: 1 where it is the rarer {pos!r} (not {counts[0]!r})",
            )
        shown = ", ".join(repr(v) for v in p.values[:8])
        raise ScaffoldError(
            f"--label {spec.column!r} is text with {p.distinct} values ({shown}, ...): name the positive "
            f"one, --label {spec.column}=VALUE"
        )
    if p.kind in ("numeric", "categorical", "identifier", "time", "day"):
        if p.nonneg and p.skew > SKEW_LOG1P:
            return Task(spec.column, "regression", spec.column, f"{p.note}; skewed: log1p target", "log1p")
        return Task(spec.column, "regression", spec.column, f"{p.note}: a regression head")
    raise ScaffoldError(f"--label {spec.column!r}: cannot be a label ({p.note})")


def _text_label_suggestions(profiles: dict[str, Profile], used: set[str]) -> list[str]:
    """Commented ``{column, equals}`` tasks for the log's few-valued text columns."""
    out: list[str] = []
    for p in profiles.values():
        if p.name in used or p.kind != "categorical" or not p.text or p.distinct > 10:
            continue
        if not out:
            out += _comment(
                "a text column can be a label too: 1 where it holds a value. To predict one, uncomment its\n"
                "task and delete its [[data.features]] entry (a label must not be a feature)"
            )
        value = p.values[-1] if p.distinct == 2 else p.values[0]
        out += [
            "# [[tasks]]",
            "# " + _line("name", p.name),
            "# "
            + _line(
                "label",
                {"column": p.name, "equals": value},
                f"{p.distinct} values: {', '.join(map(repr, p.values[:5]))}",
            ),
        ]
    return out


def _time_split(day: Profile, counts: dict[Any, int], time: Profile | None) -> list[str]:
    try:
        ordered = sorted(counts)
    except TypeError:
        ordered = sorted(counts, key=str)
    n = len(ordered)
    test_days = max(1, round(n / 5))
    train_days = n - test_days
    lines = [
        *_comment(
            f"split: by day. {day.name!r} holds {n} days ({ordered[0]} .. {ordered[-1]}): test on the last "
            f"{test_days}, train on the {train_days} before\n(relative to the data: a daily retrain on new "
            "files needs no edit; train_days = 7 keeps a week)"
        ),
        _line("split", "time"),
        _line("split_column", day.name),
        _line("train_days", train_days),
        _line("test_days", test_days),
    ]
    if time is not None:
        lines += [
            _line("time_column", time.name, time.note),
            _line("valid_fraction", 0.1, "the latest 10% of the train rows, for early stopping"),
        ]
        return lines
    if day.dtype == "number":
        train = ordered[-test_days - train_days : -test_days]
        total = sum(counts[v] for v in train)
        last, before = counts[train[-1]], counts[train[-2]]
        share = math.ceil(1e6 * (last + before / 2) / total) / 1e6
        lines += [
            _line("time_column", day.name, "no finer time column: the day orders the rows"),
            _line(
                "valid_fraction",
                share,
                f"the last train day ({train[-1]}): its share of the train rows + half the day before's",
            ),
        ]
        return lines
    lines += [
        _line("time_column", day.name),
        _line(
            "valid_fraction",
            0.0,
            "text days cannot order a validation tail: none (early stopping watches the train loss)",
        ),
    ]
    return lines


def _model_and_train(complete: bool, rows: int) -> list[str]:
    if complete and rows < 100_000:
        batch = int(min(1024, max(64, 2 ** round(math.log2(max(rows, 1) / 100)))))
        why = f"~100 steps per epoch over the {rows} rows"
    else:
        batch, why = 1024, ""
    return [
        "",
        "[model]",
        _line("arch", "mmoe", "shared experts, one gate and tower per task (also: shared_bottom, ple, ...)"),
        _line("embed_dim", 16),
        _line("tower_dims", [32]),
        _line("dropout", 0.1),
        "",
        "[model.mmoe]",
        _line("n_experts", 4),
        _line("expert_dims", [64, 32]),
        "",
        "[train]",
        _line("epochs", 10, "at most: early stopping ends sooner"),
        _line("batch_size", batch, why),
        _line("lr", 0.002),
        _line("patience", 2),
        _line("monitor", "valid/loss", "the sum of the task losses on the validation split"),
        _line("seed", 0),
    ]


def write_config(text: str, out: Path, force: bool = False) -> None:
    """Write the config text (refusing to overwrite unless ``force``)."""
    if out.exists() and not force:
        raise ScaffoldError(f"{out} exists: choose another --out, or --force to overwrite it")
    if out.parent and not out.parent.exists():
        raise ScaffoldError(f"no such directory: {out.parent}")
    out.write_text(text)


__all__ = ["DataError", "Scaffold", "ScaffoldError", "scaffold", "write_config"]
