"""The config API (model.config): an architecture's keys in ``[model.<arch>]``, a task weighting's in
``[train.weighting.<kind>]``, strict types, old flat keys refused in a config file but migrated from
an old checkpoint's manifest (``legacy=True``), ``apply_overrides``, and the error messages."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
from modelkit import ROOT, tiny_config

from model.config import (
    ARCHS,
    WEIGHTINGS,
    ConditionedConfig,
    Config,
    ConfigError,
    GradNormConfig,
    MMoEConfig,
    ModelConfig,
    PlainWeighting,
    PLEConfig,
    SeparateConfig,
    SharedBottomConfig,
    TrainConfig,
    WorstCaseConfig,
    apply_overrides,
    load_config,
    weighting_name,
)

HEAD = """\
name = "t"
[data]
train_range = [1, 2]
test_range = [3, 3]
[[tasks]]
name = "engagement"
"""


def load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(HEAD + text)
    return load_config(p)


def base(**sections: Any) -> dict[str, Any]:
    """A minimal config in its dict (TOML) form, with ``sections`` added."""
    return {
        "tasks": [{"name": "engagement"}],
        "data": {"train_range": [1, 2], "test_range": [3, 3]},
        **sections,
    }


# one non-default instance of every architecture and every task weighting
NETS = {
    "separate": SeparateConfig(bottom_dims=[12, 6]),
    "shared_bottom": SharedBottomConfig(bottom_dims=[9]),
    "mmoe": MMoEConfig(n_experts=3, expert_dims=[8, 4], gate_dropout=0.2),
    "ple": PLEConfig(levels=3, n_shared_experts=1, n_task_experts=2, expert_dims=[6], gate_dropout=0.1),
    "conditioned": ConditionedConfig(bottom_dims=[8, 8], conditioning="film", task_embed_dim=5),
}
SCHEMES = {
    "static": PlainWeighting("static"),
    "uncertainty": PlainWeighting("uncertainty"),
    "mgda": PlainWeighting("mgda"),
    "pcgrad": PlainWeighting("pcgrad"),
    "worst_case": WorstCaseConfig(temperature=0.0, reference="initial"),
    "gradnorm": GradNormConfig(alpha=2.5, lr=0.05, reference="initial"),
}


def test_every_architecture_and_weighting_has_its_part() -> None:
    assert set(NETS) == set(ARCHS) and set(SCHEMES) == set(WEIGHTINGS)
    assert all(n.arch == a for a, n in NETS.items()) and all(w.kind == k for k, w in SCHEMES.items())


# -- the nested TOML form ----------------------------------------------------------------------------


def test_nested_toml_parses(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[model]
arch = "ple"
embed_dim = 8
tower_dims = [4]
[model.ple]
levels = 3
n_shared_experts = 1
expert_dims = [16, 8]
[train]
epochs = 2
[train.weighting.gradnorm]
alpha = 2.0
reference = "initial"
""",
    )
    assert cfg.model.net == PLEConfig(levels=3, n_shared_experts=1, expert_dims=[16, 8])  # the rest defaults
    assert cfg.model.arch == "ple" and cfg.model.embed_dim == 8 and cfg.model.tower_dims == [4]
    assert cfg.model.net_args() == {
        "levels": 3,
        "n_shared_experts": 1,
        "n_task_experts": 1,
        "expert_dims": [16, 8],
        "gate_dropout": 0.0,
    }
    assert cfg.train.weighting == GradNormConfig(alpha=2.0, reference="initial")
    assert cfg.train.weighting.kind == "gradnorm" and cfg.train.epochs == 2


def test_a_table_alone_selects_its_arch_and_a_name_alone_a_weighting(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[model.conditioned]\nconditioning = "add"\n[train]\nweighting = "mgda"\n')
    assert cfg.model.net == ConditionedConfig(conditioning="add") and cfg.model.arch == "conditioned"
    assert cfg.train.weighting == PlainWeighting("mgda")
    # an arch named without a table takes that arch's defaults; nothing named: MMoE, static
    assert load(tmp_path, '[model]\narch = "separate"\n').model.net == SeparateConfig()
    plain = load(tmp_path, "")
    assert plain.model.net == MMoEConfig() and plain.train.weighting == PlainWeighting("static")
    # a scheme with keys may be named alone too (its defaults), and its table may be empty
    assert load(tmp_path, '[train]\nweighting = "worst_case"\n').train.weighting == WorstCaseConfig()
    assert load(tmp_path, "[train.weighting.gradnorm]\n").train.weighting == GradNormConfig()


def test_another_architectures_key_in_a_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown keys: \['levels'\]"):
        load(tmp_path, "[model.mmoe]\nn_experts = 2\nlevels = 2\n")
    with pytest.raises(ConfigError, match=r"unknown keys: \['n_experts'\]"):
        load(tmp_path, '[model]\narch = "ple"\n[model.ple]\nn_experts = 4\n')
    with pytest.raises(ConfigError, match=r"unknown keys: \['bottom_dims'\]"):
        load(tmp_path, "[model.mmoe]\nbottom_dims = [8]\n")
    with pytest.raises(ConfigError, match=r"\[train\.weighting\.worst_case\] unknown keys: \['alpha'\]"):
        load(tmp_path, "[train.weighting.worst_case]\nalpha = 2.0\n")
    with pytest.raises(ConfigError, match=r"\[train\.weighting\.mgda\] unknown keys: \['alpha'\]"):
        load(tmp_path, "[train.weighting.mgda]\nalpha = 2.0\n")


def test_an_arch_and_another_archs_table_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[model\] arch = 'ple' but the table is \[model\.mmoe\]"):
        load(tmp_path, '[model]\narch = "ple"\n[model.mmoe]\nn_experts = 8\n')
    with pytest.raises(ConfigError, match=r"one of the tables \['model\.mmoe', 'model\.ple'\], not several"):
        load(tmp_path, "[model.mmoe]\nn_experts = 8\n[model.ple]\nlevels = 3\n")
    with pytest.raises(ConfigError, match=r"\[train\.weighting\] takes one table"):
        load(tmp_path, "[train.weighting.gradnorm]\nalpha = 2.0\n[train.weighting.worst_case]\n")
    with pytest.raises(ConfigError, match=r"\[train\.gradnorm\] is \[train\.weighting\.gradnorm\]"):
        load(tmp_path, "[train.gradnorm]\nalpha = 2.0\n")
    with pytest.raises(ConfigError, match=r"\[model\] mmoe: expected a table, got 3") as info:
        Config.from_dict(base(model={"mmoe": 3}))
    assert info.value.malformed


def test_unknown_architecture_or_weighting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"Input tag 'transformer' found using 'arch' does not match"
    ) as info:
        load(tmp_path, '[model]\narch = "transformer"\n')
    assert not info.value.malformed  # a newer build's arch: incompatible rather than corrupt
    with pytest.raises(
        ConfigError, match=r"train\.weighting: Input tag 'bogus' found using 'kind' does not match"
    ):
        load(tmp_path, '[train]\nweighting = "bogus"\n')
    with pytest.raises(ConfigError, match=r"conditioning: Input should be 'concat', 'add' or 'film'"):
        load(tmp_path, '[model.conditioned]\nconditioning = "mul"\n')


# -- the old flat keys -----------------------------------------------------------------------------------

FLAT = [  # (section, flat key, value, another key of the section, where the key went)
    ("model", "n_experts", 8, {}, "[model.mmoe] n_experts"),
    ("model", "gate_dropout", 0.1, {}, "[model.mmoe] gate_dropout"),
    ("model", "expert_dims", [8], {"arch": "ple"}, "[model.ple] expert_dims"),
    ("model", "ple_levels", 3, {}, "[model.ple] levels"),
    ("model", "n_shared_experts", 3, {}, "[model.ple] n_shared_experts"),
    ("model", "n_task_experts", 3, {}, "[model.ple] n_task_experts"),
    ("model", "bottom_dims", [8], {"arch": "shared_bottom"}, "[model.shared_bottom] bottom_dims"),
    ("model", "bottom_dims", [8], {"arch": "separate"}, "[model.separate] bottom_dims"),
    ("model", "bottom_dims", [8], {"arch": "conditioned"}, "[model.conditioned] bottom_dims"),
    ("model", "conditioning", "film", {}, "[model.conditioned] conditioning"),
    ("model", "task_embed_dim", 4, {}, "[model.conditioned] task_embed_dim"),
    ("train", "worst_case_temperature", 0.0, {}, "[train.weighting.worst_case] temperature"),
    ("train", "worst_case_reference", "initial", {}, "[train.weighting.worst_case] reference"),
    ("train", "gradnorm_alpha", 2.0, {"weighting": "gradnorm"}, "[train.weighting.gradnorm] alpha"),
    ("train", "gradnorm_lr", 0.1, {}, "[train.weighting.gradnorm] lr"),
    ("train", "gradnorm_reference", "initial", {}, "[train.weighting.gradnorm] reference"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "other", "where"), FLAT, ids=[f"{f[1]}{f[3]}" for f in FLAT]
)
def test_a_flat_key_is_refused_naming_its_table(section, key, value, other, where) -> None:
    with pytest.raises(ConfigError, match=rf"^\[{section}\] {key} is now {re.escape(where)}$"):
        Config.from_dict(base(**{section: {**other, key: value}}))


def test_flat_keys_in_a_file_and_in_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[model\] n_experts is now \[model\.mmoe\] n_experts"):
        load(tmp_path, '[model]\narch = "mmoe"\nn_experts = 8\n')
    with pytest.raises(
        ConfigError, match=r"\[train\] gradnorm_alpha is now \[train\.weighting\.gradnorm\] alpha"
    ):
        load(tmp_path, '[train]\nweighting = "gradnorm"\ngradnorm_alpha = 2.0\n')
    cfg = tiny_config()
    for flat, where in (
        ("model.n_experts=8", "[model.mmoe] n_experts"),
        ("model.ple_levels=3", "[model.ple] levels"),
        ("train.gradnorm_alpha=2", "[train.weighting.gradnorm] alpha"),
    ):
        with pytest.raises(ConfigError, match=rf"is now {re.escape(where)}$"):
            apply_overrides(cfg, [flat])


def _old_flat(arch: str, weighting: str, **values: Any) -> dict[str, Any]:
    """A config as checkpoints stored it before the parts had tables: every key flat."""
    model = {
        "arch": arch,
        "embed_dim": 4,
        "bottom_dims": [10],
        "n_experts": 5,
        "expert_dims": [7],
        "tower_dims": [4],
        "dropout": 0.1,
        "gate_dropout": 0.05,
        "ple_levels": 4,
        "n_shared_experts": 3,
        "n_task_experts": 2,
        "conditioning": "add",
        "task_embed_dim": 6,
    }
    train = {
        "epochs": 1,
        "weighting": weighting,
        "worst_case_temperature": 0.25,
        "worst_case_reference": "initial",
        "gradnorm_alpha": 0.5,
        "gradnorm_lr": 0.2,
        "gradnorm_reference": "initial",
    }
    return base(model={**model, **values}, train=train)


LEGACY = {
    "separate": SeparateConfig(bottom_dims=[10]),
    "shared_bottom": SharedBottomConfig(bottom_dims=[10]),
    "mmoe": MMoEConfig(n_experts=5, expert_dims=[7], gate_dropout=0.05),
    "ple": PLEConfig(levels=4, n_shared_experts=3, n_task_experts=2, expert_dims=[7], gate_dropout=0.05),
    "conditioned": ConditionedConfig(bottom_dims=[10], conditioning="add", task_embed_dim=6),
}
LEGACY_WEIGHTING = {
    "static": PlainWeighting("static"),
    "mgda": PlainWeighting("mgda"),
    "worst_case": WorstCaseConfig(temperature=0.25, reference="initial"),
    "gradnorm": GradNormConfig(alpha=0.5, lr=0.2, reference="initial"),
}


@pytest.mark.parametrize("arch", list(LEGACY))
@pytest.mark.parametrize("weighting", list(LEGACY_WEIGHTING))
def test_legacy_flat_keys_migrate_to_their_tables(arch: str, weighting: str) -> None:
    d = _old_flat(arch, weighting)
    with pytest.raises(ConfigError, match="is now"):
        Config.from_dict(d)
    cfg = Config.from_dict(d, legacy=True)
    assert cfg.model.net == LEGACY[arch]  # its own keys; the other archs' are dropped
    assert cfg.train.weighting == LEGACY_WEIGHTING[weighting]
    assert (cfg.model.embed_dim, cfg.model.tower_dims, cfg.train.epochs) == (4, [4], 1)
    # written back, it is the nested form, which reads the same with or without legacy
    again = cfg.to_dict()
    assert again["model"][arch] == cfg.model.net_args() and "n_experts" not in again["model"]
    assert Config.from_dict(again) == cfg == Config.from_dict(again, legacy=True)


def test_legacy_keeps_its_defaults_and_still_checks() -> None:
    # the oldest checkpoints have no weighting keys at all, and fewer model keys
    old = base(
        model={"arch": "mmoe", "embed_dim": 4, "n_experts": 3, "expert_dims": [8], "gate_dropout": 0.1}
    )
    cfg = Config.from_dict(old, legacy=True)
    assert cfg.model.net == MMoEConfig(n_experts=3, expert_dims=[8], gate_dropout=0.1)
    assert cfg.train.weighting == PlainWeighting("static")
    # its own keys are still checked: types, values and unknown keys
    with pytest.raises(ConfigError, match=r"n_experts: expected integer, got string 'x'") as info:
        Config.from_dict(_old_flat("mmoe", "static", n_experts="x"), legacy=True)
    assert info.value.malformed
    with pytest.raises(
        ConfigError, match=r"model\.ple: levels, n_shared_experts and n_task_experts must be >= 1"
    ):
        Config.from_dict(_old_flat("ple", "static", ple_levels=0), legacy=True)
    with pytest.raises(ConfigError, match=r"unknown keys: \['wat'\]"):
        Config.from_dict(_old_flat("mmoe", "static", wat=1), legacy=True)


# -- to_dict / from_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(NETS))
@pytest.mark.parametrize("weighting", list(SCHEMES))
def test_to_dict_from_dict_round_trips_every_arch_and_weighting(arch: str, weighting: str) -> None:
    cfg = tiny_config()
    cfg.model.net, cfg.train.weighting = NETS[arch], SCHEMES[weighting]
    cfg = cfg.validated()
    d = cfg.to_dict()
    # the TOML form: [model] arch = ... + [model.<arch>]; a weighting's name, or its table
    assert d["model"]["arch"] == arch and d["model"][arch] == cfg.model.net_args()
    assert not set(ARCHS) - {arch} & set(d["model"]) and "net" not in d["model"]
    w = d["train"]["weighting"]
    if weighting in ("worst_case", "gradnorm"):
        assert w == {
            weighting: {k: v for k, v in dataclasses.asdict(SCHEMES[weighting]).items() if k != "kind"}
        }
    else:
        assert w == weighting
    assert weighting_name(d["train"]) == weighting
    back = Config.from_dict(copy.deepcopy(d))
    assert back == cfg and back.model.net == NETS[arch] and back.train.weighting == SCHEMES[weighting]
    assert back.to_dict() == d


def test_every_shipped_config_round_trips() -> None:
    paths = sorted((ROOT / "configs").glob("*.toml"))
    assert paths
    for p in paths:
        cfg = load_config(p)
        assert Config.from_dict(cfg.to_dict()) == cfg, p.name
        assert cfg.validated() == cfg, p.name


# -- apply_overrides ------------------------------------------------------------------------------------


def test_apply_overrides_returns_a_new_validated_config() -> None:
    cfg = tiny_config()
    assert cfg.model.net == MMoEConfig(n_experts=4, expert_dims=[16], gate_dropout=0.1)
    out = apply_overrides(cfg, ["model.mmoe.n_experts=8", "model.mmoe.expert_dims=[32, 8]", "train.lr=0.01"])
    assert out.model.net == MMoEConfig(n_experts=8, expert_dims=[32, 8], gate_dropout=0.1)  # the rest kept
    assert out.train.lr == 0.01 and out.model.embed_dim == cfg.model.embed_dim
    assert cfg.model.net == MMoEConfig(n_experts=4, expert_dims=[16], gate_dropout=0.1)  # untouched
    assert apply_overrides(cfg, ["model.arch=mmoe"]).model.net == cfg.model.net  # no switch: kept
    with pytest.raises(ConfigError, match=r"model\.mmoe: n_experts must be >= 1"):
        apply_overrides(cfg, ["model.mmoe.n_experts=0"])
    with pytest.raises(ConfigError, match=r"no config key 'model\.mmoe\.levels'"):
        apply_overrides(cfg, ["model.mmoe.levels=3"])


def test_apply_overrides_switches_arch_and_weighting_to_their_defaults() -> None:
    cfg = tiny_config()
    assert apply_overrides(cfg, ["model.arch=ple"]).model.net == PLEConfig()
    out = apply_overrides(cfg, ["model.arch=ple", "model.ple.levels=3"])
    assert out.model.net == PLEConfig(levels=3) and out.model.arch == "ple"
    assert apply_overrides(cfg, ["model.ple.levels=3"]).model.net == PLEConfig(levels=3)  # its key switches
    assert apply_overrides(cfg, ["model.arch=conditioned"]).model.net == ConditionedConfig()
    back = apply_overrides(cfg, ["model.ple.levels=3", "model.mmoe.n_experts=2"])
    assert back.model.net == MMoEConfig(n_experts=2)  # back to MMoE: its defaults, not the file's
    # weightings: by name, or by one of its keys
    assert apply_overrides(cfg, ["train.weighting=mgda"]).train.weighting == PlainWeighting("mgda")
    assert apply_overrides(cfg, ["train.weighting=gradnorm"]).train.weighting == GradNormConfig()
    g = apply_overrides(cfg, ["train.weighting.gradnorm.alpha=2", "train.weighting.gradnorm.lr=0.5"])
    assert g.train.weighting == GradNormConfig(alpha=2.0, lr=0.5)
    assert isinstance(g.train.weighting.alpha, float)  # an integer is a number
    w = apply_overrides(g, ["train.weighting.worst_case.temperature=0"])
    assert w.train.weighting == WorstCaseConfig(temperature=0.0)
    assert apply_overrides(w, ["train.weighting=static"]).train.weighting == PlainWeighting("static")
    with pytest.raises(ConfigError, match=r"train\.weighting\.gradnorm: lr must be > 0"):
        apply_overrides(cfg, ["train.weighting.gradnorm.lr=0"])
    with pytest.raises(ConfigError, match=r"Input tag 'ple2' found using 'arch'"):
        apply_overrides(cfg, ["model.arch=ple2"])


# -- types and values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"lr": "a"}, r"^train\.lr: expected number, got string 'a'$"),
        ({"epochs": 4.0}, r"^train\.epochs: expected integer, got number 4\.0$"),
        ({"batch_size": True}, r"^train\.batch_size: expected integer, got boolean True$"),
        ({"seed": "1"}, r"^train\.seed: expected integer, got string '1'$"),
        ({"freeze": "embed"}, r"^train\.freeze: expected list, got string 'embed'$"),
        ({"weighting": {"gradnorm": {"alpha": "2"}}}, r"^train\.weighting\.gradnorm\.alpha: expected number"),
        ({"weighting": {"worst_case": {"temperature": False}}}, r"temperature: expected number, got boolean"),
        ({"wat": 1}, r"^\[train\] unknown keys: \['wat'\]$"),
    ],
)
def test_types_are_strict(train: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_dict(base(train=train))
    assert info.value.malformed == ("unknown" not in message)


def test_an_integer_is_a_number_but_not_the_reverse() -> None:
    cfg = Config.from_dict(base(train={"lr": 1, "weighting": {"gradnorm": {"alpha": 2}}}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match=r"n_experts: expected integer, got number 4\.0"):
        Config.from_dict(base(model={"mmoe": {"n_experts": 4.0}}))
    with pytest.raises(ConfigError, match=r"n_experts: expected integer, got boolean True"):
        Config.from_dict(base(model={"mmoe": {"n_experts": True}}))
    with pytest.raises(ConfigError, match=r"expert_dims\[1\]: expected integer, got string '8'"):
        Config.from_dict(base(model={"mmoe": {"expert_dims": [16, "8"]}}))


def test_a_missing_key_names_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"^tasks\[0\]: missing key 'name'$") as info:
        Config.from_dict({**base(), "tasks": [{"kind": "binary"}]})
    assert info.value.malformed
    with pytest.raises(
        ConfigError, match=r"tasks\[0\]\.kind: Input should be 'binary' or 'regression', got 'ordinal'"
    ):
        Config.from_dict({**base(), "tasks": [{"name": "e", "kind": "ordinal"}]})


@pytest.mark.parametrize(
    ("model", "train", "message"),
    [
        ({"mmoe": {"n_experts": 0}}, {}, r"model\.mmoe: n_experts must be >= 1 and gate_dropout in \[0, 1\)"),
        (
            {"mmoe": {"gate_dropout": 1.0}},
            {},
            r"model\.mmoe: n_experts must be >= 1 and gate_dropout in \[0, 1\)",
        ),
        ({"ple": {"levels": 0}}, {}, r"model\.ple: levels, n_shared_experts and n_task_experts must be >= 1"),
        ({"ple": {"n_task_experts": 0}}, {}, r"model\.ple: levels, n_shared_experts and n_task_experts"),
        ({"ple": {"gate_dropout": -0.1}}, {}, r"model\.ple: gate_dropout must be in \[0, 1\)"),
        (
            {"conditioned": {"bottom_dims": []}},
            {},
            r"model\.conditioned: bottom_dims \(its shared trunk\) must not",
        ),
        ({}, {"weighting": {"gradnorm": {"lr": 0.0}}}, r"train\.weighting\.gradnorm: lr must be > 0"),
        ({}, {"weighting": {"worst_case": {"temperature": -1.0}}}, r"worst_case: temperature must be >= 0"),
        # the rules that span parts keep their messages
        ({"arch": "conditioned"}, {"tower_l2": 0.1}, r"conditioned arch has no per-task towers"),
        ({}, {"sparse_embeddings": True, "embed_weight_decay": 0.0, "weighting": "pcgrad"}, r"PCGrad"),
    ],
)
def test_each_part_checks_its_values(model: dict, train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_dict(base(model=model, train=train))
    assert not info.value.malformed


def test_direct_construction_validates() -> None:
    """The dataclasses check on construction: pydantic's ValidationError (a ValueError) carrying the
    part's own message."""
    for make, message in [
        (lambda: MMoEConfig(n_experts=0), r"n_experts must be >= 1"),
        (lambda: MMoEConfig(n_experts=4.0), r"n_experts"),  # type: ignore[arg-type]
        (lambda: PLEConfig(levels=True), r"levels"),  # type: ignore[arg-type]
        (lambda: GradNormConfig(lr=0.0), r"lr must be > 0"),
        (lambda: WorstCaseConfig(reference="first"), r"reference"),  # type: ignore[arg-type]
        (lambda: ModelConfig(dropout="a"), r"dropout"),  # type: ignore[arg-type]
        (lambda: ModelConfig(net=MMoEConfig(), levels=2), r"levels"),  # type: ignore[call-arg]
        (lambda: TrainConfig(weighting="mgda"), r"weighting"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(pydantic.ValidationError, match=message):
            make()
    assert issubclass(pydantic.ValidationError, ValueError)
    m = ModelConfig(net=MMoEConfig(n_experts=3))
    with pytest.raises(pydantic.ValidationError, match="bias_dropout must be in"):
        dataclasses.replace(m, bias_dropout=1.0)
    assert dataclasses.replace(m, net=PLEConfig(levels=3)).arch == "ple"


def test_arch_is_read_only_and_net_args_are_the_archs_own_keys() -> None:
    cfg = tiny_config()
    with pytest.raises(AttributeError):
        cfg.model.arch = "ple"  # type: ignore[misc]
    for arch, net in NETS.items():
        m = ModelConfig(net=net)
        assert m.arch == arch
        assert m.net_args() == {k: v for k, v in dataclasses.asdict(net).items() if k != "arch"}
    # assigning a part, then validating: the way to change a config in place
    cfg.model.net = PLEConfig(levels=3)
    cfg.train.weighting = GradNormConfig(alpha=1.0)
    cfg = cfg.validated()
    assert cfg.model.arch == "ple" and cfg.train.weighting.kind == "gradnorm"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dropout": "a"}, r"^model\.dropout: expected number, got string 'a'$"),
        ({"embed_dim": True}, r"^model\.embed_dim: expected integer, got boolean True$"),
        ({"mmoe": {"n_experts": 4.0}}, r"^model\.mmoe\.n_experts: expected integer, got number 4\.0$"),
        ({"wat": 1}, r"^\[model\] unknown keys: \['wat'\]$"),
        ({"mmoe": {"levels": 2}}, r"^\[model\.mmoe\] unknown keys: \['levels'\]$"),
        ({"arch": "transformer"}, r"^model: Input tag 'transformer' found using 'arch'"),
    ],
)
def test_model_errors_name_the_model_section(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(base(model=model))
