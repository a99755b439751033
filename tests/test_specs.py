"""The factored forward of every known layer type equals the merged forward, values and gradients."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaf_pairs, randomize

import lora_jax as lj

K = jax.random.split(jax.random.key(42), 4)
X3 = jax.random.normal(K[0], (2, 5, 6))  # (batch, sequence, features)
IMG = jax.random.normal(K[1], (2, 7, 7, 3))
IDS = jnp.array([[1, 2, 3, 9], [0, 4, 4, 8]])


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x)


class EmbedTied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(10, 6, name="emb")
        return emb.attend(jnp.tanh(emb(ids)))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(6, name="dense")(x)
        return jnp.tanh(nn.DenseGeneral((2, 3), name="qkv")(h).reshape(x.shape)), None


class Scanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ScanBlock) if self.remat else ScanBlock
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):  # an ensemble of 2 Dense layers over a leading axis of x
        ens = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)
        return ens(4, name="ens")(x)


CASES = {
    # name: (model, inputs, expected roles)
    "dense": (nn.Dense(4), (X3,), {"kernel": ("in", "out")}),
    "dense_general_qkv": (nn.DenseGeneral((2, 3)), (X3,), {"kernel": ("in", "out", "out")}),
    "dense_general_out": (nn.DenseGeneral(4, axis=(-2, -1)), (X3,), {"kernel": ("in", "in", "out")}),
    "dense_general_axis0": (nn.DenseGeneral(4, axis=1), (X3,), {"kernel": ("in", "out")}),
    "dense_general_batch": (nn.DenseGeneral(4, axis=-1, batch_dims=0), (X3,), {"kernel": ("stack", "in", "out")}),
    "attention": (
        Attention(),
        (X3,),
        {f"attn/{n}/kernel": ("in", "out", "out") for n in ("query", "key", "value")}
        | {"attn/out/kernel": ("in", "in", "out")},
    ),
    "einsum": (nn.Einsum((6, 2, 3), "btd,dhk->bthk"), (X3,), {"kernel": ("in", "out", "out")}),
    "einsum_batched": (nn.Einsum((2, 6, 4), "bsd,bde->bse"), (X3,), {"kernel": ("stack", "in", "out")}),
    "einsum_ellipsis": (nn.Einsum((6, 4), "...d,de->...e"), (X3,), {"kernel": ("in", "out")}),
    "einsum_transposed_out": (nn.Einsum((6, 2, 3), "btd,dhk->bhtk"), (X3,), {"kernel": ("in", "out", "out")}),
    "einsum_summed_x_axis": (nn.Einsum((6, 4), "btd,de->be"), (X3,), {"kernel": ("in", "out")}),
    "conv2d": (nn.Conv(4, (3, 3), strides=2, padding="SAME"), (IMG,), {"kernel": ("in", "in", "in", "out")}),
    "conv1d_dilated": (nn.Conv(4, (3,), kernel_dilation=2, padding="VALID"), (X3,), {"kernel": ("in", "in", "out")}),
    "conv_circular": (nn.Conv(5, (3, 3), padding="CIRCULAR"), (IMG,), {"kernel": ("in", "in", "in", "out")}),
    "embed": (nn.Embed(10, 6), (IDS,), {"embedding": ("in", "out")}),
    "embed_attend": (EmbedTied(), (IDS,), {"emb/embedding": ("in", "out")}),
    "scan": (
        Scanned(),
        (X3,),
        {"layers/dense/kernel": ("stack", "in", "out"), "layers/qkv/kernel": ("stack", "in", "out", "out")},
    ),
    "scan_remat": (
        Scanned(remat=True),
        (X3,),
        {"layers/dense/kernel": ("stack", "in", "out"), "layers/qkv/kernel": ("stack", "in", "out", "out")},
    ),
    "vmap": (Vmapped(), (X3,), {"ens/kernel": ("stack", "in", "out")}),
}
TARGETS = r"(.*/)?(kernel|embedding)"


def _setup(name, rank=2, dtype=jnp.float32):
    model, inputs, _ = CASES[name]
    params = model.init(jax.random.key(0), *inputs)["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    roles = lj.axis_roles(model, *inputs)
    cfg = lj.LoraConfig(rank=rank, alpha=3.0, targets=TARGETS)
    fresh = lj.init(jax.random.key(1), params, cfg, roles=roles)
    return model, inputs, params, fresh, randomize(fresh, jax.random.key(2), 0.3)


@pytest.mark.parametrize("name", list(CASES))
def test_axis_roles_are_the_documented_ones(name):
    model, inputs, expected = CASES[name]
    assert lj.axis_roles(model, *inputs) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_factored_equals_merged_values_and_gradients(name):
    model, inputs, params, _, lora = _setup(name)
    factored = lj.wrap(model.apply, compute="factored")

    def loss_factored(lora):
        return jnp.sum(jnp.sin(factored({"params": params, "lora": lora}, *inputs)))

    def loss_merged(lora):
        return jnp.sum(jnp.sin(model.apply({"params": lj.apply_lora(params, lora)}, *inputs)))

    y_f = factored({"params": params, "lora": lora}, *inputs)
    y_m = model.apply({"params": lj.apply_lora(params, lora)}, *inputs)
    assert not np.allclose(y_m, model.apply({"params": params}, *inputs), atol=1e-3)  # the adapter matters
    np.testing.assert_allclose(y_f, y_m, rtol=1e-5, atol=1e-5)
    g_f = jax.jit(jax.grad(loss_factored))(lora)
    g_m = jax.grad(loss_merged)(lora)
    for u, v in leaf_pairs(g_f, g_m):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * (1 + np.abs(v).max()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "attention", "scan_remat", "conv2d", "embed_attend"])
def test_fresh_adapter_is_a_noop(name):
    model, inputs, params, fresh, _ = _setup(name)
    y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": fresh}, *inputs)
    np.testing.assert_array_equal(y, model.apply({"params": params}, *inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "attention", "einsum", "conv2d", "embed_attend"])
def test_bf16_base_keeps_its_dtype(name):
    model, inputs, params, _, lora = _setup(name, dtype=jnp.bfloat16)
    model = model.clone(dtype=jnp.bfloat16) if hasattr(model, "dtype") else model
    y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, *inputs)
    y_m = model.apply({"params": lj.apply_lora(params, lora)}, *inputs)
    assert y.dtype == y_m.dtype
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_m, np.float32), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_conv_transpose_is_a_dilated_conv_and_factored():
    """Nobody registered nn.ConvTranspose: it is a conv_general_dilated with input dilation."""
    model = nn.ConvTranspose(4, (3, 3), strides=(2, 2))
    params = model.init(jax.random.key(0), IMG)["params"]
    roles = lj.axis_roles(model, IMG)
    assert roles == {"kernel": ("in", "in", "in", "out")}
    lora = randomize(lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(2))
    apply = lj.wrap(model.apply, compute="factored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = apply({"params": params, "lora": lora}, IMG)
        g = jax.grad(lambda ad: jnp.sum(apply({"params": params, "lora": ad}, IMG) ** 2))(lora)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, IMG), rtol=1e-5, atol=1e-5)
    g_m = jax.grad(lambda ad: jnp.sum(model.apply({"params": lj.apply_lora(params, ad)}, IMG) ** 2))(lora)
    chex.assert_trees_all_close(g, g_m, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grouped_conv_falls_back_to_merge():
    model = nn.Conv(6, (3, 3), feature_group_count=3)
    img = jnp.ones((1, 5, 5, 3))
    params = model.init(jax.random.key(0), img)["params"]
    lora = randomize(
        lj.init(jax.random.key(1), params, lj.LoraConfig(rank=1), roles={"kernel": ("in", "in", "in", "out")}),
        jax.random.key(2),
    )
    with pytest.warns(UserWarning, match="merged"):
        y = lj.wrap(model.apply, compute="factored")({"params": params, "lora": lora}, img)
    np.testing.assert_allclose(y, model.apply({"params": lj.apply_lora(params, lora)}, img), rtol=1e-5, atol=1e-5)
