"""The streaming data path (``model.data``): equal to the in-memory loader it replaced on KuaiRand-Pure,
the same for CSV and Parquet, for one file and for many, bounded state (histogram, dedup partitions),
the split modes, label expressions and tables without ids, and the shard cache."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import reference_data
from modelkit import DATA_DIR, FIXTURE_LOG, tiny_config

import model.data.prepare as prep
from model.config import Config, ConfigError, DataConfig, FeatureDecl, MMoEConfig, TaskConfig, load_config
from model.data import DataError, load_dataset
from model.data.loader import ShardedSplit, Stream, materialize, stream_rng
from model.data.prepare import numpy_linear_quantile, prepare
from model.train import train

SPLITS = ("train", "valid", "test")


def assert_same_rows(a, b) -> None:
    """Two datasets hold the same encoded rows (and the same list groups, up to their ids)."""
    for name in SPLITS:
        x, y = getattr(a, name), getattr(b, name)
        for k in ("cats", "nums", "labels"):
            assert np.array_equal(getattr(x, k), getattr(y, k), equal_nan=True), (name, k)
        assert np.array_equal(pd.factorize(x.users)[0], pd.factorize(y.users)[0]), name
        if x.times is not None:
            assert np.array_equal(x.times, y.times), name


def assert_same_schema(a, b, rel: float = 1e-12) -> None:
    for fa, fb in zip(a.features, b.features, strict=True):
        da, db = fa.to_dict(), fb.to_dict()
        for k in ("mean", "std"):
            if k in da:
                assert db[k] == pytest.approx(da[k], rel=rel), (fa.name, k)
                da.pop(k), db.pop(k)
        assert da == db, fa.name


# --------------------------------------------------------------------------------------------
# equality with the in-memory loader


def full_config() -> Config:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "kuairand_mmoe.toml")
    cfg.data.data_dir = str(DATA_DIR)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("cfg_of", [tiny_config, full_config], ids=["fixture", "kuairand-pure"])
def test_streamed_rows_equal_the_in_memory_loader(cfg_of):
    """The same splits (time ranges, validation tail, duplicates), vocabularies, statistics and
    encoded rows as the pandas loader mtrank trained with before (kept in tests/reference_data.py)."""
    cfg = cfg_of()
    old, new = reference_data.load_dataset(cfg), load_dataset(cfg)
    assert_same_schema(old.schema, new.schema)
    assert_same_rows(old, new)
    for k in ("log_rows", "duplicates_dropped", "train_rows", "valid_rows", "test_rows"):
        assert new.fingerprint[k] == old.fingerprint[k], k
    assert new.fingerprint["log"] == old.fingerprint["log"]


@pytest.mark.slow
def test_parquet_files_and_row_groups_give_the_csv_rows(tmp_path):
    df = pd.read_csv(DATA_DIR / FIXTURE_LOG)
    (tmp_path / "log").mkdir()
    for i, idx in enumerate(np.array_split(np.arange(len(df)), 4)):
        pq.write_table(
            pa.Table.from_pandas(df.iloc[idx], preserve_index=False),
            tmp_path / "log" / f"p{i}.parquet",
            row_group_size=150,
        )
    a = load_dataset(tiny_config())
    for log in (str(tmp_path / "log"), str(tmp_path / "log" / "p*.parquet")):
        cfg = tiny_config()
        cfg.data.log = log
        b = load_dataset(cfg)
        assert_same_schema(a.schema, b.schema, rel=1e-9)  # moments merged by fragment: last-bit differences
        assert_same_rows(a, b)
        assert b.fingerprint["log"]["files"] == 4 and b.fingerprint["fragments"] == 4 * math.ceil(
            len(df) / 4 / 150
        )


@pytest.mark.slow
def test_small_batches_and_shards_change_nothing(tmp_path):
    """Record batches of 100 rows, shards of 64 rows: the same rows, in the same order."""
    a = load_dataset(tiny_config())
    cfg = tiny_config()
    cfg.data.read_batch_rows, cfg.data.shard_rows = 100, 64
    p = prepare(cfg, tmp_path)
    assert max(s.rows for s in p.shards) == 64 and len(p.split_shards("train")) > 10
    assert_same_rows(a, materialize(p))


@pytest.mark.slow
def test_a_coarsened_time_histogram_still_finds_the_exact_validation_cut(monkeypatch):
    """When the train rows' distinct times exceed the histogram's budget it coarsens, and the two
    order statistics are read back in one more pass: the validation tail is unchanged."""
    a = load_dataset(tiny_config())
    monkeypatch.setattr(prep, "HIST_MAX", 50)
    reads: list[int] = []
    exact = prep.Preparer._bucket_times

    def counted(self, *args):  # the extra pass over the time column, counted
        out = exact(self, *args)
        reads.append(len(out))
        return out

    monkeypatch.setattr(prep.Preparer, "_bucket_times", counted)
    b = load_dataset(tiny_config())
    assert len(reads) == 1 and 0 < reads[0] < len(a.train) + len(a.valid)  # one bucket's times, not all
    assert_same_rows(a, b)


def test_the_quantile_helper_is_numpys():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 60))
        a = np.sort(rng.integers(1_650_000_000_000, 1_650_000_100_000, n))
        q = float(rng.random())
        lo = math.floor((n - 1) * q)
        assert numpy_linear_quantile(a[lo], a[min(lo + 1, n - 1)], n, q) == np.quantile(a, q)


@pytest.mark.slow
def test_shard_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, caplog):
    df = pd.read_csv(DATA_DIR / FIXTURE_LOG)
    df.to_csv(tmp_path / "log.csv", index=False)
    cfg = tiny_config()
    cfg.data.log = str(tmp_path / "log.csv")
    first = prepare(cfg, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="model.data.prepare"):
        again = prepare(cfg, tmp_path / "cache")
    assert again.root == first.root and "reusing" in caplog.text
    df.iloc[:2000].to_csv(tmp_path / "log.csv", index=False)  # new data: a new key
    changed = prepare(cfg, tmp_path / "cache")
    assert changed.root != first.root and changed.fingerprint["log_rows"] == 2000


# --------------------------------------------------------------------------------------------
# streams


def test_a_stream_larger_than_its_buffer_reads_every_row_once_per_epoch(tmp_path):
    cfg = tiny_config()
    cfg.data.shard_rows = 40
    p = prepare(cfg, tmp_path)
    split = ShardedSplit(p.root, p.split_shards("train"))
    ids = np.concatenate([part.cats for part in split.parts()])
    key = lambda a: [tuple(r) for r in a]  # noqa: E731
    s = Stream(split, 0, 1, stream_rng(0, 0, 1), buffer_rows=100)  # 1054 rows through 100
    epochs = []
    for _ in range(2):
        batches = list(s.epoch(32))
        assert all(len(b) == 32 for b in batches[:-1])
        rows = np.concatenate([b.cats for b in batches])
        assert sorted(key(rows)) == sorted(key(ids))  # every row once
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    again = np.concatenate(
        list(b.cats for b in Stream(split, 0, 1, stream_rng(0, 0, 1), buffer_rows=100).epoch(32))
    )
    assert np.array_equal(again, epochs[0])  # seeded


# --------------------------------------------------------------------------------------------
# splits, duplicates, labels (issue: any multi-task table)


def write_log(tmp_path: Path, df: pd.DataFrame) -> str:
    path = tmp_path / "log.parquet"
    df.to_parquet(path)
    return str(path)


def table_config(tmp_path: Path, df: pd.DataFrame, **data: object) -> Config:
    """A config for a table without ids: every feature from the rows themselves."""
    feats = [FeatureDecl("color", "context", "categorical"), FeatureDecl("size", "context", "numeric")]
    d = DataConfig(
        source="tables",
        data_dir=str(tmp_path),
        log=write_log(tmp_path, df),
        users=None,
        videos=None,
        user_key=None,
        video_key=None,
        features=feats,
        **data,  # type: ignore[arg-type]
    )
    cfg = Config(
        data=d, tasks=[TaskConfig("a", label="y1"), TaskConfig("b", label={"column": "y2", "equals": "yes"})]
    )
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 4, 64, 0.01
    cfg.model.net, cfg.model.tower_dims, cfg.model.embed_dim = MMoEConfig(expert_dims=[8]), [4], 4
    return cfg


def table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    color = rng.choice(["red", "green", "blue"], n)
    size = rng.normal(size=n)
    return pd.DataFrame(
        {
            "color": color,
            "size": size,
            "y1": (size + (color == "red") + rng.normal(size=n) > 0.5).astype(int),
            "y2": np.where(rng.random(n) < 0.5 + 0.3 * (color == "blue"), "yes", "no"),
            "day": np.repeat(np.arange(6), math.ceil(n / 6))[:n],
            "t": np.arange(n),
            "which": rng.choice(["train", "valid", "test", "other"], n, p=[0.6, 0.15, 0.2, 0.05]),
        }
    )


@pytest.mark.slow
def test_a_table_without_ids_trains_from_a_random_split_with_text_labels(tmp_path):
    df = table()
    cfg = table_config(tmp_path, df, split="random", valid_fraction=0.2, test_fraction=0.2)
    res = train(cfg, tmp_path / "art")
    fp = res_fp = load_dataset(cfg).fingerprint
    assert fp["train_rows"] + fp["valid_rows"] + fp["test_rows"] == len(df)
    assert 0.15 < fp["test_rows"] / len(df) < 0.25 and 0.15 < fp["valid_rows"] / len(df) < 0.25
    m = res.metrics
    assert m["test/a/auc"] > 0.6 and m["test/b/auc"] > 0.55  # both heads learned their signal
    assert "test/a/gauc" not in m and "test/ndcg@10" not in m  # no list groups: no per-list metrics
    assert res_fp["duplicates_dropped"] == 0  # tables: duplicates are data, not artefacts
    # the random split is seeded by split_seed
    other = load_dataset(
        table_config(tmp_path, df, split="random", split_seed=1, valid_fraction=0.2, test_fraction=0.2)
    )
    same = load_dataset(table_config(tmp_path, df, split="random", valid_fraction=0.2, test_fraction=0.2))
    assert np.array_equal(same.test.nums, load_dataset(cfg).test.nums)
    assert not np.array_equal(other.test.nums, same.test.nums)


def test_a_column_split_reads_train_valid_test_from_the_rows(tmp_path):
    df = table()
    ds = load_dataset(table_config(tmp_path, df, split="column", split_column="which"))
    counts = df["which"].value_counts()
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (counts["train"], counts["valid"], counts["test"])
    assert ds.fingerprint["rows_unused"] == counts["other"]


def test_relative_days_take_the_last_distinct_values(tmp_path):
    df = table()
    ds = load_dataset(
        table_config(tmp_path, df, split_column="day", time_column="t", train_days=3, test_days=2)
    )
    assert len(ds.test) == int(df["day"].isin([4, 5]).sum())
    assert len(ds.train) + len(ds.valid) == int(df["day"].isin([1, 2, 3]).sum())
    assert ds.fingerprint["rows_unused"] == int((df["day"] == 0).sum())


def test_empty_splits_are_errors_that_name_the_fix(tmp_path):
    """Today's silent fallbacks: a validation split emptied by tied times, an empty test range."""
    df = table().assign(t=0)  # every train row has the same time: no tail to hold out
    with pytest.raises(DataError, match=r"validation split is empty.*tied.*random"):
        load_dataset(
            table_config(
                tmp_path, df, split_column="day", time_column="t", train_range=(0, 3), test_range=(4, 5)
            )
        )
    with pytest.raises(DataError, match=r"test split is empty: check data.train_range / test_range"):
        load_dataset(
            table_config(
                tmp_path, table(), split_column="day", time_column="t", train_range=(0, 3), test_range=(7, 9)
            )
        )
    # a Config built directly: pydantic's ValidationError carries the ConfigError's message
    with pytest.raises(pydantic.ValidationError, match="needs train_range and test_range"):
        table_config(tmp_path, table(), split_column="day", time_column="t")
    with pytest.raises(DataError, match="validation split is empty"):
        load_dataset(
            table_config(
                tmp_path,
                table()
                .assign(which="train")
                .pipe(lambda d: d.assign(which=np.where(d.t % 3 == 0, "test", "train"))),
                split="column",
                split_column="which",
            )
        )


def test_duplicates_are_counted_and_dropped_only_where_they_are_artefacts(tmp_path, caplog):
    df = table()
    df = pd.concat([df, df.iloc[:750]], ignore_index=True)  # 20% legitimately repeated rows
    kwargs = {"split": "random", "valid_fraction": 0.2, "test_fraction": 0.2}
    kept = load_dataset(table_config(tmp_path, df, **kwargs))
    assert kept.fingerprint["duplicates_dropped"] == 0
    assert len(kept.train) + len(kept.valid) + len(kept.test) == len(df)
    with caplog.at_level(logging.WARNING, logger="model.data.prepare"):
        dropped = load_dataset(table_config(tmp_path, df, drop_duplicates=True, **kwargs))
    assert dropped.fingerprint["duplicates_dropped"] == 750
    assert "dropped 750 duplicate rows (20.0% of the log" in caplog.text


def test_a_text_label_without_an_expression_is_a_clear_error(tmp_path):
    cfg = table_config(tmp_path, table(), split="random")
    cfg.tasks[1] = TaskConfig("b", label="y2")
    with pytest.raises(DataError, match=r"label column 'y2' holds .* values \(e.g. '(yes|no)'\).*equals"):
        load_dataset(cfg)
    with pytest.raises(pydantic.ValidationError, match="label expression"):
        Config(data=cfg.data, tasks=[TaskConfig("b", label={"column": "y2", "is": "yes"})])
    d = cfg.to_dict()
    d["tasks"] = [{"name": "b", "label": {"column": "y2", "is": "yes"}}]
    with pytest.raises(ConfigError, match="label expression"):
        Config.from_dict(d)


def test_a_monitor_that_names_no_metric_is_a_config_error(tmp_path):
    cfg = table_config(tmp_path, table(), split="random")
    cfg.train.monitor = "valid/engagement/auc"  # the old default: no such task here
    with pytest.raises(ConfigError, match="names no metric"):
        cfg.check_monitor()
    cfg.train.monitor = ""
    assert cfg.monitor == "valid/loss"  # the default fits every config


# --------------------------------------------------------------------------------------------
# the scaled-data generator (benchmarks)


@pytest.mark.slow
def test_scaled_kuairand_has_fresh_user_ids_and_keeps_duplicates(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "scaled"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "scale",
            "--rows",
            "500000",
            "--out",
            str(out),
            "--source",
            str(DATA_DIR),
            "--file-rows",
            "200000",
        ],
    )
    assert res.exit_code == 0, res.output
    src = pd.read_csv(DATA_DIR / "log_standard_20220425_to_20220508_pure.csv.gz")
    log = pd.read_parquet(out / "log")
    assert len(log) == 500_000 and len(list((out / "log").glob("*.parquet"))) == 3
    copies = math.ceil(500_000 / len(src))
    assert log["user_id"].nunique() == sum(
        src.iloc[: min(len(src), 500_000 - c * len(src))]["user_id"].nunique() for c in range(copies)
    )  # every copy's users are new users
    assert (log["time_ms"].to_numpy()[: len(src)] - src["time_ms"].to_numpy()).__abs__().max() <= 30_000
    dup_src = src.duplicated().sum()
    assert log.iloc[: len(src)].duplicated().sum() == dup_src  # duplicate artefacts stay duplicates
    users = pd.read_parquet(out / "user_features.parquet")
    assert set(log["user_id"]) <= set(users["user_id"])


@pytest.mark.slow
def test_parquet_tables_are_read_column_by_column_with_the_last_row_per_key(tmp_path):
    users = pd.read_csv(DATA_DIR / "user_features_pure.csv")
    pd.concat([users.iloc[:100].assign(user_active_degree="stale"), users]).to_parquet(tmp_path / "u.parquet")
    pd.read_csv(DATA_DIR / "video_features_basic_pure.csv").to_parquet(tmp_path / "v.parquet")
    cfg = tiny_config()
    cfg.data.users, cfg.data.videos = str(tmp_path / "u.parquet"), str(tmp_path / "v.parquet")
    b = load_dataset(cfg)
    assert "stale" not in (next(f for f in b.schema.features if f.name == "user_active_degree").vocab or [])
    assert_same_rows(load_dataset(tiny_config()), b)
