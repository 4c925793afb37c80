import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from model.features import (
    NULL_CODE,
    CanonicalRows,
    FeatureError,
    FeatureSchema,
    FeatureSpec,
    canonical_str,
    hash_series,
    stable_hash,
)


def test_canonical_str_agrees_across_types():
    assert canonical_str(3) == canonical_str(3.0) == canonical_str("3") == canonical_str(np.int64(3)) == "3"
    assert canonical_str(True) == "1"
    assert canonical_str(None) is None and canonical_str(float("nan")) is None and canonical_str("") is None
    # a float32 table column and a request's JSON number name the same category
    for x in (0.1, 2.5, -1.75, 1e-7, 123.456):
        assert canonical_str(np.float32(x)) == canonical_str(x) == canonical_str(np.float64(x)), x


def test_a_float32_categorical_column_encodes_like_request_values():
    """Fitting and encoding a float32 table column (e.g. Parquet) use the float32 value's shortest
    decimal, the string a request's JSON number gives: no silent train/serve skew."""
    spec = FeatureSpec("ratio", "video", "categorical")
    schema = FeatureSchema([FeatureSpec("video_id", "video", "categorical"), spec])
    df = pd.DataFrame({"video_id": [1, 2, 3], "ratio": np.array([0.1, 0.7, 0.1], dtype=np.float32)})
    fitted = schema.fit({"video": schema.canonicalize_frame("video", df)}, {"video": df})
    assert [f.vocab for f in fitted.features if f.name == "ratio"] == [["0.1", "0.7"]]
    table = fitted.encode("video", fitted.canonicalize_frame("video", df))[0][:, 1]
    records = fitted.canonicalize_records("video", [{"ratio": 0.1}, {"ratio": 0.7}])
    request = fitted.encode("video", records)[0][:, 1]
    assert table.tolist() == [request[0], request[1], request[0]] and 0 not in table
    assert canonical_str(2.5) == "2.5"


@pytest.mark.slow
def test_stable_hash_is_process_independent():
    values = ["full_active", 7, "日本語", 3.25]
    here = [stable_hash(v) for v in values]
    code = (
        "from model.features import stable_hash; "
        "print([stable_hash(v) for v in ['full_active', 7, '日本語', 3.25]])"
    )
    env = {"PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(here)
    assert stable_hash(None) == NULL_CODE and len(set(here)) == len(here)


def test_hash_series_matches_scalar_hash():
    vals = pd.Series([1, 2, None, 2, "x", float("nan")], dtype=object)
    got = hash_series(vals)
    assert got.dtype == np.int64
    assert list(got) == [stable_hash(v) for v in vals]


def _schema() -> FeatureSchema:
    return FeatureSchema(
        [
            FeatureSpec("user_id", "user", "categorical"),
            FeatureSpec("fans", "user", "numeric", log1p=True),
            FeatureSpec("video_id", "video", "categorical", min_count=2),
            FeatureSpec("tab", "context", "categorical"),
        ]
    )


def test_fit_uses_train_rows_only_and_encodes_unknowns_as_zero():
    train = pd.DataFrame(
        {"user_id": [1, 1, 2], "fans": [0, 10, 100], "video_id": [5, 5, 6], "tab": [0, 1, 1]}
    )
    schema = _schema()
    canon = {g: schema.canonicalize_frame(g, train) for g in ("user", "video", "context")}
    fitted = schema.fit(canon, {g: train for g in ("user", "video", "context")})
    spec = {f.name: f for f in fitted.features}
    assert spec["user_id"].vocab == ["1", "2"]
    assert spec["video_id"].vocab == ["5"]  # min_count=2 drops video 6
    fans = np.log1p([0, 10, 100])
    assert spec["fans"].mean == pytest.approx(fans.mean()) and spec["fans"].std == pytest.approx(fans.std())

    test = pd.DataFrame({"user_id": [2, 99], "fans": [np.nan, 10], "video_id": [6, 5], "tab": [1, 7]})
    cats, nums = fitted.encode("user", fitted.canonicalize_frame("user", test))
    assert cats[:, 0].tolist() == [2, 0]  # user 99 never seen in train -> 0
    assert nums[0, 0] == 0.0  # missing numeric -> mean -> 0
    assert nums[1, 0] == pytest.approx((np.log1p(10) - fans.mean()) / fans.std(), rel=1e-5)
    vcats, _ = fitted.encode("video", fitted.canonicalize_frame("video", test))
    assert vcats[:, 0].tolist() == [0, 1]


def test_schema_round_trips_through_dict():
    schema = _schema()
    df = pd.DataFrame({"user_id": [1, 2], "fans": [1.0, 2.0], "video_id": [5, 5], "tab": [0, 1]})
    canon = {g: schema.canonicalize_frame(g, df) for g in ("user", "video", "context")}
    fitted = schema.fit(canon, {g: df for g in ("user", "video", "context")})
    again = FeatureSchema.from_dict(fitted.to_dict())
    assert again.to_dict() == fitted.to_dict()
    rows = again.canonicalize_frame("user", df)
    for a, b in zip(again.encode("user", rows), fitted.encode("user", rows), strict=True):
        np.testing.assert_array_equal(a, b)


def test_records_validation_and_defaults():
    schema = _schema()
    rows = schema.canonicalize_records("context", [{"tab": 3, "unrelated": "x"}, {}])
    assert rows.cats[:, 0].tolist() == [stable_hash(3), NULL_CODE]
    with pytest.raises(FeatureError, match="must be a number"):
        schema.canonicalize_records("user", [{"fans": "lots"}])
    with pytest.raises(FeatureError, match="finite"):
        schema.canonicalize_records("user", [{"fans": float("inf")}])
    with pytest.raises(FeatureError, match="must be a number"):
        schema.canonicalize_records("user", [{"fans": [1, 2]}])
    with pytest.raises(FeatureError, match="out of range"):
        schema.canonicalize_records("user", [{"fans": 10**400}])
    with pytest.raises(FeatureError, match="out of range"):
        schema.canonicalize_records("user", [{"fans": 1e300}])
    with pytest.raises(FeatureError) as e:
        schema.canonicalize_records("user", [{"fans": "x" * 100_000}])
    assert len(str(e.value)) < 120  # the value is not echoed whole
    d = schema.default_rows("video", 3)
    assert isinstance(d, CanonicalRows) and len(d) == 3 and (d.cats == NULL_CODE).all()


def test_bad_schema_is_rejected():
    with pytest.raises(FeatureError, match="duplicate"):
        FeatureSchema([FeatureSpec("a", "user", "numeric"), FeatureSpec("a", "video", "numeric")])
    with pytest.raises(FeatureError, match="group"):
        FeatureSpec("a", "item", "numeric")  # type: ignore[arg-type]
    with pytest.raises(FeatureError, match="lacks"):
        _schema().canonicalize_frame("user", pd.DataFrame({"user_id": [1]}))
