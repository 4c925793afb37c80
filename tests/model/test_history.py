"""User behaviour histories (``[[data.sequences]]``) offline: built from the log in time order with no
leakage, checked on hand-made logs against a brute-force reading of the rules; independent of how the
log is split into files and record batches; the same events the stores load for serving; and the
networks' request path equal to their broadcast forward with histories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from modelkit import model_config, tiny_config

from model import stable_hash
from model.config import (
    Config,
    ConfigError,
    DataConfig,
    FeatureDecl,
    MMoEConfig,
    ModelConfig,
    SequenceDecl,
    TaskConfig,
)
from model.data import DataError, load_dataset
from model.data.history import load_event_tables
from model.features import FeatureSchema
from model.nets import ARCHS, MMoE, RequestBatch, SequenceLayout
from model.scoring import Ranker
from model.sequences import UserHistory, pack_events, unpack_events
from model.train import fit, predict

N = 3  # history length of the hand-made configs


def hand_log() -> pd.DataFrame:
    """Two users over three days (day 3 is the test split). Rows are not in time order; user 1 has
    two events at t=10 (they must not see each other), the same event (t=30, video d) logged twice
    in two rows, an event without a time, and a row at t=5 at the end of the file."""
    rows = [
        # uid, vid, author, t, day, lv, tab
        (1, "a", "x", 10.0, 1, 1, 0),
        (1, "b", "y", 10.0, 1, 1, 0),
        (1, "c", "x", 20.0, 1, 0, 0),
        (1, "d", "y", 30.0, 1, 1, 0),
        (1, "d", "y", 30.0, 1, 1, 1),  # the same event again (another tab: not a duplicate row)
        (2, "a", "x", 15.0, 1, 0, 0),
        (1, "e", "x", 40.0, 2, 1, 1),
        (1, "f", "y", 50.0, 2, 0, 0),
        (2, "b", "y", 45.0, 2, 0, 1),
        (1, "g", "x", 60.0, 3, 1, 0),
        (1, "h", "y", np.nan, 3, 1, 0),  # no time: no history, not an event
        (2, "c", "x", 70.0, 3, 1, 1),
        (2, "d", "z", 80.0, 3, 0, 0),
        (1, "c", "x", 90.0, 3, 0, 1),
        (1, "a", "x", 5.0, 1, 0, 0),  # the earliest row, last in the file
    ]
    return pd.DataFrame(rows, columns=["uid", "vid", "author", "t", "day", "lv", "tab"])


def hand_config(tmp_path: Path, df: pd.DataFrame, pooling: str = "attention", max_len: int = N) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "log.csv"
    df.to_csv(path, index=False)
    d = DataConfig(
        source="tables",
        data_dir=str(tmp_path),
        log=str(path),
        users=None,
        videos=None,
        user_key="uid",
        video_key="vid",
        split="time",
        split_column="day",
        time_column="t",
        train_range=(1, 2),
        test_range=(3, 3),
        valid_fraction=0.0,
        features=[
            FeatureDecl("uid", "user", "categorical"),
            FeatureDecl("vid", "video", "categorical"),
            FeatureDecl("author", "video", "categorical"),
            FeatureDecl("tab", "context", "categorical"),
        ],
        sequences=[SequenceDecl("views", "lv", max_len, pooling, ["author"])],  # type: ignore[arg-type]
    )
    cfg = Config(data=d, tasks=[TaskConfig("engagement", label="lv")])
    cfg.model = ModelConfig(net=MMoEConfig(n_experts=2, expert_dims=[8]), embed_dim=4, tower_dims=[4])
    cfg.train.epochs, cfg.train.batch_size = 1, 4
    return cfg


def brute_force(df: pd.DataFrame, max_len: int) -> list[list[tuple[str, str]]]:
    """Each row's history by the rules, read naively: the user's rows with lv > 0 and a time
    strictly before the row's, one per (time, video), ordered by (time, item hashes), the last
    ``max_len``; [] for a row without a time."""
    out = []
    for r in df.itertuples():
        if np.isnan(r.t):
            out.append([])
            continue
        ev = df[(df.uid == r.uid) & (df.lv > 0) & df.t.notna() & (df.t < r.t)]
        ev = ev.drop_duplicates(subset=["t", "vid"])
        key = sorted(ev.itertuples(), key=lambda e: (e.t, stable_hash(e.vid), stable_hash(e.author)))
        out.append([(e.vid, e.author) for e in key][-max_len:] if key else [])
    return out


def decoded(schema: FeatureSchema, items: np.ndarray, n: int) -> list[tuple[str, str]]:
    """A row's encoded history back to (video, author) values through the fitted vocabularies."""
    vid, author = (next(f for f in schema.features if f.name == c) for c in ("vid", "author"))
    out = []
    for i in range(n):
        v, a = int(items[i, 0]), int(items[i, 1])
        out.append((vid.vocab[v - 1] if v else "?", author.vocab[a - 1] if a else "?"))  # type: ignore[index]
    return out


def rows_of(ds, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The log's rows of each split, in file order (as the splits hold them)."""
    return {"train": df[df.day <= 2], "test": df[df.day == 3]}


def test_histories_follow_time_order_without_leakage(tmp_path: Path) -> None:
    df = hand_log()
    cfg = hand_config(tmp_path, df)
    ds = load_dataset(cfg)
    want = brute_force(df, N)
    vocab_vid = next(f for f in ds.schema.features if f.name == "vid").vocab
    for name, part in rows_of(ds, df).items():
        split = getattr(ds, name)
        items, lens = split.seqs["seq.views.items"], split.seqs["seq.views.len"]
        assert items.shape == (len(part), N, 2) and items.dtype == np.int32
        for k, i in enumerate(part.index):
            got = decoded(ds.schema, items[k], int(lens[k]))
            # test-only videos are outside the train vocabulary: compare what the vocabulary knows
            exp = [(v if v in vocab_vid else "?", a) for v, a in want[i]]
            assert got == exp, (name, df.loc[i].to_dict(), got, exp)
            assert (items[k, int(lens[k]) :] == 0).all()  # padding after the history
    # the rules, spelled out on single rows
    by_t = {float(t): k for k, t in enumerate(df[df.day <= 2].t) if not np.isnan(t)}
    train = ds.train.seqs

    def got_at(t: float) -> list[tuple[str, str]]:
        k = by_t[t]
        return decoded(ds.schema, train["seq.views.items"][k], int(train["seq.views.len"][k]))

    assert got_at(5.0) == []  # the earliest row, though last in the file
    assert got_at(10.0) == []  # the two events at t=10 do not see each other
    assert {v for v, _ in got_at(20.0)} == {"a", "b"}
    assert [v for v, _ in got_at(40.0)][-1] == "d" and len(got_at(40.0)) == 3  # d once, though logged twice
    assert [v for v, _ in got_at(50.0)][-2:] == ["d", "e"]
    test_rows = df[df.day == 3].reset_index(drop=True)
    lens_test = ds.test.seqs["seq.views.len"]
    assert lens_test[test_rows.index[test_rows.t.isna()][0]] == 0  # no time, no history
    # test rows see the train days' events, exactly as serving would
    k = int(test_rows.index[test_rows.t == 60.0][0])
    assert [v for v, _ in decoded(ds.schema, ds.test.seqs["seq.views.items"][k], int(lens_test[k]))] == [
        "b" if stable_hash("b") > stable_hash("a") else "a",
        "d",
        "e",
    ][-3:]


def test_histories_do_not_depend_on_files_row_groups_or_batches(tmp_path: Path) -> None:
    """The log shuffled into three Parquet files of small row groups, read in batches of 2 rows:
    every row has the same history as from the one CSV file."""
    df = hand_log()
    a = load_dataset(hand_config(tmp_path / "one", df))
    folder = tmp_path / "many" / "log"
    folder.mkdir(parents=True)
    shuffled = df.sample(frac=1.0, random_state=3)
    for i, idx in enumerate(np.array_split(np.arange(len(df)), 3)):
        part = shuffled.iloc[idx]
        pq.write_table(
            pa.Table.from_pandas(part, preserve_index=False), folder / f"p{i}.parquet", row_group_size=2
        )
    cfg = hand_config(tmp_path / "many", df)
    cfg.data.log, cfg.data.read_batch_rows = str(folder), 2
    b = load_dataset(cfg)  # its rows are in the files' order: the shuffled one

    def by_row(ds, frame):
        out = {}
        for name, part in rows_of(ds, frame).items():
            split = getattr(ds, name)
            for k, i in enumerate(part.index):
                out[i] = decoded(
                    ds.schema, split.seqs["seq.views.items"][k], int(split.seqs["seq.views.len"][k])
                )
        return out

    assert by_row(b, shuffled) == by_row(a, df)


def test_the_stores_load_the_events_training_sees(tmp_path: Path) -> None:
    """``load_event_tables`` (the embedded store's and materialize's reading of the log) holds each
    user's latest events; a row after all of them would see exactly those."""
    df = hand_log()
    cfg = hand_config(tmp_path, df, max_len=2)
    fitted = load_dataset(cfg).schema
    (table,) = load_event_tables(cfg.data, fitted.sequences).values()
    assert sorted(table.users) == ["1", "2"]
    later = df.assign(t=1000.0)  # one row per user after everything
    later = pd.concat([df, later.drop_duplicates("uid")], ignore_index=True)
    want = brute_force(later, 2)
    for uid in (1, 2):
        h = table.history(table.users.index(str(uid)))
        i = later.index[(later.t == 1000.0) & (later.uid == uid)][0]
        assert [tuple(c) for c in h.codes.tolist()] == [(stable_hash(v), stable_hash(a)) for v, a in want[i]]
        assert np.all(np.diff(h.times) >= 0)


def test_packed_events_sort_like_the_event_order() -> None:
    rng = np.random.default_rng(0)
    times = rng.choice([-3.5, 0.0, 2.0, 1e12, 1.5e12 + 0.25], 40)
    codes = rng.integers(-(2**63), 2**63 - 1, (40, 2), dtype=np.int64)
    codes[:8, 0] = codes[8, 0]  # one video seen at several times (the same time: the same event)
    packed = pack_events(times, codes)
    t, c = unpack_events(packed, 2)
    assert np.array_equal(t, times) and np.array_equal(c, codes)
    h = UserHistory.empty(2).add(times, codes, 100)
    want, seen = [], set()  # bytewise order, the first of each (time, video): the first 16 bytes
    for m in sorted(packed):
        if m[:16] not in seen:
            seen.add(m[:16])
            want.append(m)
    assert pack_events(h.times, h.codes) == want
    assert pack_events(*UserHistory.empty(2).add(times, codes, 5).__dict__.values()) == want[-5:]
    with pytest.raises(ValueError):
        unpack_events([packed[0][:-1]], 2)


def test_sequence_configs_are_checked(tmp_path: Path) -> None:
    df = hand_log()
    cfg = hand_config(tmp_path, df)
    for bad, msg in [
        ({"pooling": "max"}, "pooling"),
        ({"max_len": 0}, "max_len"),
        ({"side_features": ["tab"]}, "side_features"),
        ({"side_features": ["vid"]}, "side_features"),
    ]:
        d = {"name": "views", "label": "lv", **bad}
        with pytest.raises(ConfigError, match=msg):
            Config.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "sequences": [d]}})
    no_key = cfg.to_dict()
    no_key["data"]["features"] = [f for f in no_key["data"]["features"] if f["name"] != "vid"]
    with pytest.raises(ConfigError, match="video key"):
        Config.from_dict(no_key)
    cfg.data.sequences[0].label = "missing_column"
    with pytest.raises(DataError, match="missing_column"):
        load_dataset(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_a_model_with_history_trains_saves_loads_and_scores_as_evaluation(
    tmp_path: Path, pooling: str
) -> None:
    """The 300-user fixture with a long-view history: the checkpoint round-trips, and the serving
    path (canonical codes per user, encoded per request) scores a test row as evaluation does."""
    from model.train import train

    cfg = tiny_config(epochs=1)
    cfg.promotion.enabled = False
    cfg.data.sequences = [SequenceDecl("recent", "long_view", 4, pooling, ["author_id", "tag"])]  # type: ignore[arg-type]
    cfg.data.check()
    result = train(cfg, artifacts=tmp_path)
    assert result.checkpoint is not None
    ranker = Ranker.load(result.checkpoint)
    assert [q.name for q in ranker.schema.sequences] == ["recent"]
    ds = load_dataset(ranker.config, schema=ranker.schema)
    offline = predict(ranker.model, ds.test, ranker.tasks)
    lens = ds.test.seqs["seq.recent.len"]
    k = int(np.flatnonzero(lens >= 2)[0])
    # the row's events as canonical codes, found back through the vocabularies
    specs = {f.name: f for f in ranker.schema.cats("video")}
    items = ds.test.seqs["seq.recent.items"][k, : lens[k]]
    codes = np.stack(
        [
            specs[c].vocab_codes()[np.maximum(items[:, j], 1) - 1]
            for j, c in enumerate(["video_id", "author_id", "tag"])
        ],
        axis=1,
    )
    codes[items == 0] = 12345  # an unknown value encodes to 0 again
    t = torch.from_numpy
    cats, nums = ds.test.cats[k : k + 1].astype(np.int64), ds.test.nums[k : k + 1]
    hist = {
        "recent": (
            t(ds.test.seqs["seq.recent.items"][k : k + 1].astype(np.int64)),
            t(lens[k : k + 1].astype(np.int64)),
        )
    }
    direct = ranker.score_encoded(cats, nums, hist)
    for h in offline:
        assert direct[h][0] == pytest.approx(offline[h][k], abs=1e-6)
    enc = ranker.encode_history({"recent": codes})
    assert enc is not None
    assert torch.equal(enc["recent"][0][0, : lens[k]], hist["recent"][0][0, : lens[k]])
    empty = ranker.score_encoded(cats, nums, None)  # no history: scored as an empty one
    assert any(abs(empty[h][0] - direct[h][0]) > 1e-7 for h in direct)


@pytest.mark.slow
def test_request_forward_equals_the_broadcast_forward_with_histories() -> None:
    torch.manual_seed(0)
    cards = [5, 7, 9, 11, 4, 3]  # user: 2 categoricals, video: 3, context: 1
    seqs = [SequenceLayout("a", "attention", 6, [2, 3]), SequenceLayout("m", "mean", 4, [2])]
    for arch in ARCHS:
        cfg = model_config(arch, embed_dim=4, expert_dims=[8, 6], bottom_dims=[8], tower_dims=[4])
        net = ARCHS[arch](
            cards,
            5,
            ["a", "b"],
            seqs,
            embed_dim=cfg.embed_dim,
            tower_dims=cfg.tower_dims,
            dropout=cfg.dropout,
            **cfg.net_args(),
        ).eval()
        for lens in ([4, 2], [0, 0], [6, 4]):
            r = RequestBatch(
                torch.randint(0, 5, (1, 2)),
                torch.randint(0, 7, (9, 3)),
                torch.randint(0, 3, (1, 1)),
                torch.randn(1, 2),
                torch.randn(9, 2),
                torch.randn(1, 1),
                {
                    "a": (torch.randint(0, 7, (1, 6, 2)), torch.tensor([lens[0]])),
                    "m": (torch.randint(0, 7, (1, 4, 1)), torch.tensor([lens[1]])),
                },
            )
            with torch.no_grad():
                got, want = net.forward_request(r), net(*r.full(), None, r.full_history())
            for k in got:
                assert torch.allclose(got[k], want[k], atol=1e-6), (arch, lens)
                assert torch.isfinite(got[k]).all()


def test_padding_and_items_past_the_length_change_nothing() -> None:
    """Only the first ``length`` items of a history count (the rest is padding, whatever it holds)."""
    torch.manual_seed(1)
    seqs = [SequenceLayout("a", "attention", 5, [1])]
    net = MMoE(
        [5, 9, 4],
        0,
        ["a"],
        seqs,
        embed_dim=4,
        tower_dims=[4],
        dropout=0.1,
        n_experts=4,
        expert_dims=[8],
        gate_dropout=0.0,
    ).eval()
    cats = torch.tensor([[1, 2, 3]])
    items = torch.tensor([[[4], [5], [0], [0], [0]]])
    noisy = torch.tensor([[[4], [5], [7], [8], [1]]])
    n = torch.tensor([2])
    with torch.no_grad():  # the network's input: the embeddings and the pooled history
        a = net.embed(cats, torch.zeros(1, 0), {"a": (items, n)})
        b = net.embed(cats, torch.zeros(1, 0), {"a": (noisy, n)})
        c = net.embed(cats, torch.zeros(1, 0), {"a": (noisy, torch.tensor([3]))})
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_configs_without_sequences_keep_their_schema_and_cache(tmp_path: Path) -> None:
    """No sequences: no ``sequences`` key in the schema, no history arrays in the shards."""
    cfg = tiny_config()
    ds = load_dataset(cfg)
    assert "sequences" not in ds.schema.to_dict() and ds.train.seqs == {}
    result = fit(cfg, ds)
    assert "test/engagement/gauc" in result.metrics


def test_tune_folds_keep_the_histories_and_predict_refuses_them(tmp_path: Path) -> None:
    from model.batch import predict_file
    from model.train import train
    from model.tune import folds

    df = hand_log()
    cfg = hand_config(tmp_path, df)
    ds = load_dataset(cfg)
    for fold in folds(ds, 2, "time"):
        for split in (fold.train, fold.valid):
            assert split.seqs["seq.views.items"].shape == (len(split), N, 2)
            assert split.seqs["seq.views.len"].shape == (len(split),)
    cfg.promotion.enabled = False
    result = train(cfg, artifacts=tmp_path / "artifacts")
    assert result.checkpoint is not None
    with pytest.raises(DataError, match="histories"):
        predict_file(Ranker.load(result.checkpoint), tmp_path / "log.csv", tmp_path / "out.csv")


@pytest.mark.parametrize("arch", ["mmoe", "shared_bottom", "ple", "separate", "conditioned"])
def test_the_onnx_forward_reads_the_histories_as_eager_does(arch: str) -> None:
    """The compiled request graph takes each history's items and length as inputs: equal to the
    eager forward for empty, partial and full histories, at sizes the export never saw."""
    from model.compiled import OnnxForward, probe_request
    from model.features import FeatureSpec
    from model.nets import build_model

    specs = [
        FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
        FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
        FeatureSpec("author", "video", "categorical", vocab=[str(i) for i in range(5)]),
        FeatureSpec("dur", "video", "numeric"),
        FeatureSpec("tab", "context", "categorical", vocab=["0", "1"]),
    ]
    from model.features import SequenceSpec

    s = FeatureSchema(
        specs,
        sequences=[
            SequenceSpec("views", ["lv"], 6, "attention", ["video_id", "author"]),
            SequenceSpec("likes", ["like"], 3, "mean", ["video_id"]),
        ],
    )
    cfg = model_config(arch, embed_dim=4, expert_dims=[8, 8], bottom_dims=[8], tower_dims=[4])
    net = build_model(cfg, s, [TaskConfig("engagement", label="lv")]).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    onnx = OnnxForward.build(net, s)
    assert onnx.max_abs_diff < 1e-4
    for b, n in ((1, 0), (3, 6), (257, 2)):
        r = probe_request(s, b, g)
        assert r.history is not None
        r.history = {k: (v, torch.tensor([min(n, v.shape[1])])) for k, (v, _) in r.history.items()}
        with torch.inference_mode():
            ref = net.forward_request(r)
        got = onnx(r)
        np.testing.assert_allclose(got["engagement"].numpy(), ref["engagement"].numpy(), rtol=1e-5, atol=1e-5)
