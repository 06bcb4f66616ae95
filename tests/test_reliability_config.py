"""Every field of SAEConfig and TrainConfig is checked at construction: type, finiteness and
range, with an error naming the field, the bad value and the fix (issue 13, items 2, 3, 7, 8)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from adaptive_sae import ConfigError, SAEConfig, TrainConfig
from hypothesis import given, settings
from hypothesis import strategies as st

# ----------------------------------------------------------------------------- item 2: numpy


def test_numpy_scalars_are_converted_to_python_numbers():
    cfg = SAEConfig(
        d_in=np.int64(16), n_features=np.int32(64), k=np.int64(4), zipf_alpha=np.float32(1.5)
    )
    tcfg = TrainConfig(
        batch_size=np.int64(32),
        total_tokens=np.int64(320),
        lr=np.float32(3e-3),
        gamma=np.float64(0.5),
        adam_betas=np.array([0.9, 0.99]),
        seed=np.int16(3),
    )
    assert type(cfg.d_in) is int and type(cfg.n_features) is int and type(cfg.k) is int
    assert type(cfg.zipf_alpha) is float and cfg.zipf_alpha == 1.5
    assert type(tcfg.batch_size) is int and type(tcfg.total_tokens) is int
    assert type(tcfg.lr) is float and tcfg.lr == pytest.approx(3e-3)
    assert tcfg.adam_betas == (0.9, 0.99) and all(type(b) is float for b in tcfg.adam_betas)
    # JSON works and round-trips
    assert SAEConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_json(tcfg.to_json()) == tcfg


def test_integral_floats_become_ints():
    cfg = SAEConfig(d_in=8.0, n_features=32.0, k=4)
    tcfg = TrainConfig(batch_size=64.0, total_tokens=1e4)
    assert (cfg.d_in, cfg.n_features) == (8, 32) and type(cfg.d_in) is int
    assert (tcfg.batch_size, tcfg.total_tokens) == (64, 10_000)
    assert type(tcfg.total_tokens) is int


# ----------------------------------------------------------------------------- items 3, 7, 8

BAD_SAE = [
    ("d_in", "16", "string"),
    ("d_in", 8.5, "whole number"),
    ("d_in", 0, ">= 1"),
    ("d_in", float("nan"), "whole number"),
    ("n_features", -4, ">= 1"),
    ("n_features", True, "bool"),
    ("k", "4", "string"),
    ("k", float("inf"), "finite"),
    ("k", float("nan"), "finite"),
    ("k", 0, "> 0"),
    ("k", None, "number"),
    ("zipf_alpha", -1.0, ">= 0"),
    ("zipf_beta", float("nan"), ">= 0"),
    ("threshold_momentum", 1.0, "[0, 1)"),
    ("threshold_momentum", "0.9", "string"),
    ("input_scaling", ["global"], "choose one of"),
    ("b_dec_init", "median", "choose one of"),
    ("capacity_ranking", None, "choose one of"),
]

BAD_TRAIN = [
    ("batch_size", 1, "no variance"),
    ("batch_size", 64.5, "whole number"),
    ("batch_size", "64", "string"),
    ("total_tokens", "1000000", "string"),
    ("total_tokens", float("inf"), "whole number"),
    ("total_tokens", float("nan"), "whole number"),
    ("total_tokens", 10, "less than one batch"),
    ("lr", float("nan"), "lr=nan"),
    ("lr", -1e-3, "> 0"),
    ("lr", "3e-3", "string"),
    ("adam_betas", (0.9,), "two numbers"),
    ("adam_betas", (0.9, 1.5), "adam_betas[1]"),
    ("adam_betas", "0.9,0.99", "two numbers"),
    ("warmup_fraction", float("nan"), "[0, 1]"),
    ("decay_fraction", -0.1, "[0, 1]"),
    ("grad_clip", float("nan"), "0 disables"),
    ("grad_clip", "1", "string"),
    ("aux_loss", "aux_zpf", "choose one of"),
    ("aux_coef", -1, ">= 0"),
    ("aux_coef", float("inf"), "finite"),
    ("k_aux", 0, ">= 1"),
    ("k_aux", 2.5, "whole number"),
    ("aux_allocation", 1, "choose one of"),
    ("dead_window_tokens", 0, ">= 1"),
    ("density_window_tokens", float("inf"), "whole number"),
    ("gamma", 0, "(0, 1]"),
    ("zipf_head_fraction", float("nan"), "(0, 1]"),
    ("zipf_refit_every", 0, ">= 1"),
    ("demand_rerank_every", -3, ">= 1"),
    ("l1_coefficient", -1, ">= 0"),
    ("l1_adapt_rate", -1, ">= 0"),
    ("l1_adapt_rate", float("nan"), "0 keeps it fixed"),
    ("init_sample_tokens", 0, ">= 1"),
    ("seed", -1, ">= 0"),
    ("seed", 1.5, "whole number"),
    ("log_every", 0, ">= 1"),
    ("checkpoint_every", -2, ">= 0"),
    ("checkpoint_every", float("nan"), "whole number"),
    ("keep_checkpoints", 0, ">= 1"),
    ("keep_checkpoints", -1, ">= 1"),
    ("device", "gpu", "not a torch device"),
    ("device", 0, "device name"),
    ("autocast_bf16", "no", "True or False"),
    ("autocast_bf16", 1, "True or False"),
]


@pytest.mark.parametrize("field,value,fix", BAD_SAE)
def test_bad_sae_field_is_named_with_its_value_and_fix(field, value, fix):
    kwargs = {"d_in": 8, "n_features": 32, "k": 4, field: value}
    with pytest.raises(ConfigError) as err:
        SAEConfig(**kwargs)
    message = str(err.value)
    assert f"{field}=" in message and fix in message


@pytest.mark.parametrize("field,value,fix", BAD_TRAIN)
def test_bad_train_field_is_named_with_its_value_and_fix(field, value, fix):
    kwargs = {"batch_size": 32, "total_tokens": 3200, field: value}
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    message = str(err.value)
    assert field.split("[")[0] in message and fix in message


def test_non_finite_values_from_json_are_rejected():
    with pytest.raises(ConfigError, match="total_tokens=inf"):
        TrainConfig.from_json('{"total_tokens": Infinity}')
    with pytest.raises(ConfigError, match="grad_clip=nan"):
        TrainConfig.from_json('{"grad_clip": NaN}')


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="fast_pth"):
        TrainConfig.from_dict({"fast_pth": False})


# ----------------------------------------------------------------------------- property test

BAD_VALUES = st.one_of(
    st.sampled_from(
        [None, "", "1", "3e-3", "yes", "no", True, False, [], [1, 2], {}, (0.9,), object()]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=5).map(np.int64),
    st.floats(min_value=-2, max_value=2, width=32).map(np.float32),
)


def _check_valid(cfg) -> None:
    """A config that constructed must be usable: JSON round trip, finite numbers, Python types."""
    d = cfg.to_dict()
    assert type(cfg).from_json(cfg.to_json()) == cfg
    for name, v in d.items():
        assert not isinstance(v, np.generic), name
        if isinstance(v, float):
            assert math.isfinite(v), name


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), value=BAD_VALUES)
def test_any_train_value_gives_a_valid_config_or_names_the_field(field, value):
    try:
        cfg = TrainConfig(**{"batch_size": 32, "total_tokens": 3200, field: value})
    except ConfigError as e:
        assert field in str(e)
        return
    _check_valid(cfg)


SAE_FIELDS = [f.name for f in dataclasses.fields(SAEConfig) if f.name != "rule"]


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(SAE_FIELDS), value=BAD_VALUES)
def test_any_sae_value_gives_a_valid_config_or_names_the_field(field, value):
    kwargs = {"d_in": 8, "n_features": 32, "k": 4, "rule": "mutual_choice", field: value}
    try:
        cfg = SAEConfig(**kwargs)
    except ConfigError as e:
        assert field in str(e)
        return
    _check_valid(cfg)
    json.dumps(cfg.to_dict())
