import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def test_counts_against_independent_arithmetic(mlp):
    _, params, _ = mlp  # fc1: 8x16 + 16, fc2: 16x3 + 3
    cfg = lj.LoraConfig(rank=2, alpha=4, rank_pattern={"fc2/kernel": 1})
    s = lj.summary(params, lj.init(jax.random.key(0), params, cfg))
    base = 8 * 16 + 16 + 16 * 3 + 3
    lora = (8 + 16) * 2 + (16 + 3) * 1
    assert (s.trainable_params, s.total_params) == (lora, base + lora)
    assert (s.trainable_bytes, s.total_bytes) == (4 * lora, 4 * (base + lora))
    assert s.trainable_percent == pytest.approx(100 * lora / (base + lora))
    assert [(t.path, t.kernel_shape, t.rank, t.scale, t.params) for t in s.targets] == [
        ("fc1/kernel", (8, 16), 2, 2.0, 48),
        ("fc2/kernel", (16, 3), 1, 4.0, 19),
    ]
    text = str(s)
    assert "fc1/kernel" in text and f"trainable params: {lora:,} || all params: {base + lora:,}" in text


def test_mixed_dtypes_and_abstract_trees():
    params = {"w": {"kernel": jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)}}
    ad = jax.eval_shape(
        lambda: lj.init(
            jax.random.key(0), {"w": {"kernel": jnp.zeros((1024, 512), jnp.bfloat16)}}, lj.LoraConfig(rank=8)
        )
    )
    s = lj.summary(params, ad)
    assert s.trainable_params == 8 * (1024 + 512)
    assert s.total_bytes == 2 * 1024 * 512 + 4 * 8 * (1024 + 512)
    assert "MiB" in str(s)


def test_rejects_non_adapters():
    with pytest.raises(TypeError, match=r"lora_jax\.summary: adapters must be a tree of lora_jax\.Adapter"):
        lj.summary({}, {"w": np.ones(3)})
