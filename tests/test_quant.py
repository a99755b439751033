"""Quantized bases (QLoRA): NF4/int8/int4 against a NumPy reference of the paper's algorithm and
against bitsandbytes' NF4, the factored forward over a quantized base, files, shardings, bad input."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP

import lora_jax as lj
from lora_jax import _quant
from lora_jax._quant import NF4


def _reference(w, method, block, nf4=NF4):
    """Blockwise absmax quantization along axis 0 in float64 NumPy, then back (no double quant)."""
    w = np.asarray(w, np.float64)
    blocks = w.reshape((w.shape[0] // block, block) + w.shape[1:])
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    x = blocks / np.where(absmax == 0, 1, absmax)
    if method == "nf4":
        q = np.asarray(nf4, np.float64)[np.abs(x[..., None] - np.asarray(nf4, np.float64)).argmin(-1)]
    else:
        top = 127 if method == "int8" else 7
        q = np.clip(np.round(x * top), -top, top) / top
    return (q * absmax).reshape(w.shape)


@pytest.mark.parametrize("method, block", [("nf4", 64), ("int8", 64), ("int4", 32), ("nf4", 16)])
def test_round_trip_equals_the_reference(method, block):
    w = jax.random.normal(jax.random.key(0), (256, 48))
    q = lj.quantize({"k": {"kernel": w}}, method=method, block_size=block, double_quant=False)["k"]["kernel"]
    got = np.asarray(lj.dequantize(q))
    np.testing.assert_allclose(got, _reference(w, method, block), rtol=1e-6, atol=1e-7)
    assert q.codes.dtype == (jnp.int8 if method == "int8" else jnp.uint8)
    assert q.codes.shape == ((256, 48) if method == "int8" else (128, 48))
    jitted = jax.jit(lambda w: lj.quantize({"k": {"kernel": w}}, method=method, block_size=block))(w)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(lj.quantize({"k": {"kernel": w}}, method=method,
                                                                          block_size=block))):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_leading_axes_too_small_for_a_block_are_flattened():
    """An attention output (heads 4, head_dim 32, features 16): blocks run along heads·head_dim."""
    w = jax.random.normal(jax.random.key(0), (4, 32, 16))
    q = lj.quantize({"out": {"kernel": w}}, double_quant=False)["out"]["kernel"]
    assert q.codes.shape == (64, 16) and q.absmax.shape == (2, 16)
    want = _reference(np.asarray(w).reshape(128, 16), "nf4", 64).reshape(4, 32, 16)
    np.testing.assert_allclose(lj.dequantize(q), want, rtol=1e-6, atol=1e-7)


def test_nf4_equals_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_array_equal(NF4, bnb.get_4bit_type("nf4", device="cpu").numpy())
    w = jax.random.normal(jax.random.key(0), (512, 96))  # Flax (in, out): bitsandbytes quantizes wᵀ (out, in)
    theirs = {}
    for double in (False, True):
        packed, state = bnb.quantize_4bit(torch.tensor(np.asarray(w).T.copy()), blocksize=64, quant_type="nf4",
                                          compress_statistics=double)  # fmt: skip
        theirs[double] = bnb.dequantize_4bit(packed, state).numpy().T
    ours = {d: np.asarray(lj.dequantize(lj.quantize({"k": w}, targets="k", double_quant=d)["k"])) for d in (False, True)}
    np.testing.assert_allclose(ours[False], theirs[False], rtol=1e-6, atol=1e-7)  # the same codes and absmaxes
    errors = {name: np.abs(x[True] - np.asarray(w)).mean() for name, x in (("ours", ours), ("bnb", theirs))}
    single = np.abs(ours[False] - np.asarray(w)).mean()
    # Double quantization (ours int8-linear, bitsandbytes' 8-bit dynamic) adds almost nothing to NF4's own error.
    assert errors["ours"] < 1.01 * single and errors["bnb"] < 1.01 * single


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_forward_and_gradients_equal_the_float_model_on_the_dequantized_base(method):
    model = MLP(hidden=64, out=32)
    x = jax.random.normal(jax.random.key(1), (6, 64))
    params = model.init(jax.random.key(0), x)["params"]
    quantized = lj.quantize(params, method=method)
    lora = jax.tree.map(lambda t: t + 0.05, lj.init(jax.random.key(2), quantized, lj.LoraConfig(rank=4)))
    dense = lj.dequantize(quantized)
    apply = lj.wrap(model.apply)

    def loss(lora, base):
        return jnp.sum(apply({"params": base, "lora": lora}, x) ** 2)

    got, grads = jax.jit(jax.value_and_grad(loss))(lora, quantized)
    want, want_grads = jax.value_and_grad(loss)(lora, dense)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(x.shape[-1], use_bias=False)(x)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layer(name="layers")(x, None)[0]


@pytest.mark.parametrize("width, sliced", [(256, True), (64, False)])
def test_a_stacked_quantized_kernel_is_dequantized_per_layer_inside_the_scan(width, sliced):
    """Each step of the scan dequantizes its own layer's blocks (when blocks and double
    quantization's groups stay within a layer; else the whole kernel, before the loop)."""
    model, x = _Scanned(), jax.random.normal(jax.random.key(1), (4, width))
    params = model.init(jax.random.key(0), x)["params"]
    quantized = lj.quantize(params, method="nf4")
    q = quantized["layers"]["Dense_0"]["kernel"]
    stacked = _quant.leading_slices(q)
    assert (stacked is not None) == sliced
    if stacked is not None:
        arrays, rebuild = stacked
        for i in range(3):
            one = rebuild(jax.tree.map(lambda a: a[i], arrays))  # noqa: B023
            np.testing.assert_array_equal(lj.dequantize(one), lj.dequantize(q)[i])
    roles = lj.axis_roles(model, x)
    lora = jax.tree.map(lambda t: t + 0.05, lj.init(jax.random.key(2), params, lj.LoraConfig(rank=4), roles=roles))
    apply = lj.wrap(model.apply, compute="factored")

    def loss(lora, base):
        return jnp.sum(apply({"params": base, "lora": lora}, x) ** 2)

    got = jax.jit(jax.value_and_grad(loss))(lora, quantized)
    # The reference dequantizes under jit too: XLA's fused dequantization rounds differently from
    # the eager one (1e-8), which this deep tanh stack amplifies in a few gradients.
    want = jax.jit(jax.value_and_grad(loss))(lora, jax.jit(lj.dequantize)(quantized))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_merge_for_serving_float_or_requantized():
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (256, 64))}}
    quantized = lj.quantize(params)
    lora = jax.tree.map(lambda t: t + 0.1, lj.init(jax.random.key(1), quantized, lj.LoraConfig(rank=4)))
    merged, errors = lj.merge_quantized(quantized, lora, requantize=False)
    np.testing.assert_array_equal(merged["d"]["kernel"], lj.apply_lora(lj.dequantize(quantized), lora)["d"]["kernel"])
    assert errors == {}
    again, errors = lj.merge_quantized(quantized, lora)
    assert again["d"]["kernel"].method == "nf4" and again["d"]["kernel"].absmax_scale is not None
    diff = np.asarray(lj.dequantize(again)["d"]["kernel"]) - np.asarray(merged["d"]["kernel"])
    rms = np.sqrt(np.mean(diff**2) / np.mean(np.asarray(merged["d"]["kernel"]) ** 2))
    np.testing.assert_allclose(errors["d/kernel"], rms, rtol=1e-5)
    assert 0.05 < errors["d/kernel"] < 0.15  # NF4's error on a Gaussian matrix, about 10% RMS


def test_nnx_functional_over_a_quantized_state():
    from flax import nnx

    model = nnx.Linear(64, 16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    quantized = lj.quantize(state)
    x = jax.random.normal(jax.random.key(1), (3, 64))
    lora = jax.tree.map(lambda t: t + 0.05, lj.init(jax.random.key(2), state, lj.LoraConfig(rank=2)))
    got = lj.wrap(graphdef)(quantized, lora, x)
    want = nnx.merge(graphdef, lj.apply_lora(lj.dequantize(quantized), lora))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_files_and_shardings(tmp_path, monkeypatch):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 32)), "bias": jnp.zeros(32)}}
    for options in ({}, {"method": "int4", "block_size": 32}):
        quantized = lj.quantize(params, **options)
        lj.save_params(tmp_path / "q.safetensors", quantized)
        loaded = lj.load_params(tmp_path / "q.safetensors")
        assert jax.tree.structure(loaded) == jax.tree.structure(quantized)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(quantized)):
            np.testing.assert_array_equal(a, b)
    from jax.sharding import PartitionSpec as P

    specs = lj.quantized_shardings({"dense": {"kernel": P("fsdp", "tp"), "bias": P("tp")}}, lj.quantize(params))
    q = specs["dense"]["kernel"]
    assert (q.codes, q.absmax, q.absmax_scale, specs["dense"]["bias"]) == (P("fsdp", "tp"), P("fsdp", "tp"), P(), P("tp"))
    # A file quantized with another NF4 codebook (written by a build with other levels) is refused.
    other = NF4.copy()
    other[3] += 0.01
    monkeypatch.setattr("lora_jax._quant.NF4", other)
    lj.save_params(tmp_path / "other.safetensors", lj.quantize(params))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'dense/kernel': quantized with another NF4 codebook"):
        lj.load_params(tmp_path / "other.safetensors")


def test_bad_input(tmp_path):
    params = {"a": {"kernel": jnp.ones((96, 8))}, "b": {"kernel": jnp.ones((64, 8), jnp.int32)}, "c": {"bias": jnp.ones(64)}}
    with pytest.raises(ValueError, match=r"'a/kernel': no leading axes of \(96, 8\) hold a multiple of the block "
                                         r"size 64(.|\n)*'b/kernel': dtype int32 is not floating"):  # fmt: skip
        lj.quantize(params)
    with pytest.raises(ValueError, match=r"'c/bias': shape \(64,\) has fewer than 2 axes"):
        lj.quantize(params, targets="c/bias")
    with pytest.raises(ValueError, match="method must be one of"):
        lj.quantize(params, method="fp4")
    with pytest.raises(ValueError, match="block_size must be an even int >= 2, found 33"):
        lj.quantize(params, block_size=33)
    with pytest.raises(ValueError, match="targets matched no kernel"):
        lj.quantize(params, targets="nothing")
    quantized = lj.quantize(params, targets="a/kernel", block_size=32)
    lora = lj.init(jax.random.key(0), quantized, lj.LoraConfig(rank=2, targets="a/kernel"))
    with pytest.raises(ValueError, match=r"apply_lora: params hold quantized kernels \('a/kernel'\).*lj.dequantize"):
        lj.apply_lora(quantized, lora)
    with pytest.raises(ValueError, match="quantized kernels"):
        lj.save_params(tmp_path / "merged.safetensors", quantized, lora)
