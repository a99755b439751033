import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def test_defaults_and_normalisation():
    cfg = lj.LoraConfig(targets=["a", "b"], rank_pattern={"x": 4}, alpha_pattern={"y": 2})
    assert (cfg.rank, cfg.alpha, cfg.init, cfg.dropout, cfg.use_rslora) == (8, 8.0, "lora", 0.0, False)
    assert cfg.dtype == np.dtype("float32")
    assert cfg.targets == ("a", "b")
    assert cfg.rank_pattern == (("x", 4),) and cfg.alpha_pattern == (("y", 2.0),)


def test_hashable_and_usable_as_static_arg():
    cfg = lj.LoraConfig(rank=2, rank_pattern={"d/kernel": 3})
    assert hash(cfg) == hash(lj.LoraConfig(rank=2, rank_pattern={"d/kernel": 3}))
    params = {"d": {"kernel": jnp.ones((4, 4))}}
    init = jax.jit(lj.init, static_argnames="config")
    ad = init(jax.random.key(0), params, config=cfg)
    assert ad["d"]["kernel"].a.shape == (4, 3)


def test_frozen():
    cfg = lj.LoraConfig()
    with pytest.raises(AttributeError):
        cfg.rank = 3


def test_rank_and_alpha_for_first_match_wins():
    cfg = lj.LoraConfig(rank=4, alpha=8, rank_pattern={".*q/kernel": 2, ".*/kernel": 3}, alpha_pattern={"x": 1})
    assert cfg.rank_for("attn/q/kernel") == 2
    assert cfg.rank_for("attn/k/kernel") == 3
    assert cfg.rank_for("bias") == 4
    assert cfg.alpha_for("x") == 1.0 and cfg.alpha_for("xx") == 8.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, r"rank must be >= 1, found 0"),
        (dict(rank=-2), ValueError, r"rank must be >= 1"),
        (dict(rank=2.5), TypeError, r"rank must be an int"),
        (dict(rank=True), TypeError, r"rank must be an int"),
        (dict(alpha=0), ValueError, r"alpha must be > 0"),
        (dict(alpha="1"), TypeError, r"alpha must be a number"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.1), ValueError, r"dropout"),
        (dict(targets="("), ValueError, r"targets pattern '\(' is not a valid regex"),
        (dict(targets=[3]), TypeError, r"targets must be a regex string"),
        (dict(exclude="[a"), ValueError, r"exclude pattern"),
        (dict(rank_pattern={"(": 2}), ValueError, r"rank_pattern key '\(' is not a valid regex"),
        (dict(rank_pattern={"x": 0}), ValueError, r"rank_pattern\['x'\] must be >= 1"),
        (dict(alpha_pattern={"x": -1.0}), ValueError, r"alpha_pattern\['x'\] must be > 0"),
        (dict(rank_pattern=5), TypeError, r"rank_pattern must be a dict"),
        (dict(init="kaiming"), ValueError, r"init must be one of \('lora', 'gaussian', 'pissa', 'olora'\) or 'pissa_niter_K'"),
        (dict(use_rslora=1), TypeError, r"use_rslora must be a bool"),
        (dict(dtype=jnp.int32), TypeError, r"dtype must be a floating dtype"),
        (dict(dtype="nonsense"), TypeError, r"dtype must be a floating dtype"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        lj.LoraConfig(**kwargs)


def test_bf16_dtype_accepted():
    assert lj.LoraConfig(dtype=jnp.bfloat16).dtype == jnp.bfloat16
