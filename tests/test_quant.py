"""Quantized bases (QLoRA): NF4/int8/int4 against a NumPy reference of the paper's algorithm and
against bitsandbytes' NF4, the factored forward over a quantized base, files, shardings, bad input."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP, Scanned, leaf_pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax._ops import quantize as _quantize
from lora_jax._ops.quantize import NF4


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


@pytest.mark.slow
@pytest.mark.parametrize("method, block", [("nf4", 64), ("int8", 64), ("int4", 32), ("nf4", 16)])
def test_round_trip_equals_the_reference(method, block):
    w = jax.random.normal(jax.random.key(0), (256, 48))
    q = lj.quantize({"k": {"kernel": w}}, method=method, block_size=block, double_quant=False)["k"]["kernel"]
    got = np.asarray(lj.dequantize(q))
    np.testing.assert_allclose(got, _reference(w, method, block), rtol=1e-6, atol=1e-7)
    assert q.codes.dtype == (jnp.int8 if method == "int8" else jnp.uint8)
    assert q.codes.shape == ((256, 48) if method == "int8" else (128, 48))
    jitted = jax.jit(lambda w: lj.quantize({"k": {"kernel": w}}, method=method, block_size=block))(w)
    for a, b in leaf_pairs(jitted, lj.quantize({"k": {"kernel": w}}, method=method,
                                                                          block_size=block)):  # fmt: skip
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_leading_axes_too_small_for_a_block_are_flattened():
    """An attention output (heads 4, head_dim 32, features 16): blocks run along heads·head_dim."""
    w = jax.random.normal(jax.random.key(0), (4, 32, 16))
    q = lj.quantize({"out": {"kernel": w}}, double_quant=False)["out"]["kernel"]
    assert q.codes.shape == (64, 16) and q.absmax.shape == (2, 16)
    want = _reference(np.asarray(w).reshape(128, 16), "nf4", 64).reshape(4, 32, 16)
    np.testing.assert_allclose(lj.dequantize(q), want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.interop
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
    # Double quantization (both bitsandbytes' dynamic 8-bit code) adds almost nothing to NF4's own error.
    assert errors["ours"] < 1.01 * single and errors["bnb"] < 1.01 * single


def test_the_double_quantization_code_is_bitsandbytes_dynamic_map():
    code = _quantize.DYNAMIC8
    # Its definition, checked independently: 256 sorted values in [-1, 1] with 0 and 1; for each
    # decimal exponent 10^(e-6), e = 0..6, 2^e fractions of each sign.
    assert code.shape == (256,) and (np.diff(code) > 0).all() and {0.0, 1.0} <= set(code.tolist())
    for e in range(7):
        n = ((np.abs(code) > 0.1 * 10.0 ** (e - 6)) & (np.abs(code) < 10.0 ** (e - 6))).sum()
        assert n == 2 * 2**e
    bnb = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes computes it in float32 torch arithmetic, lora_jax in float64: within one ulp.
    np.testing.assert_allclose(code, bnb.create_dynamic_map(signed=True).numpy(), rtol=1.2e-7, atol=0)


def _outlier_kernel(factor):
    """256 blocks of 64 (one group of double quantization's 256 scales), one weight scaled."""
    w = np.array(jax.random.normal(jax.random.key(0), (256, 64)))
    w[5, 7] *= factor
    others = np.ones(w.shape, bool)
    others[0:64, 7] = False  # every entry but the outlier's own block
    return w, others


@pytest.mark.slow
@pytest.mark.parametrize("factor", [250, 1000])
def test_an_outlier_block_leaves_the_other_blocks_as_accurate_as_without_double_quantization(factor):
    """One weight 250× (1000×) the others: its block's scale must not wipe out the scales of the
    other blocks of its group (a linear int8 code of the absmaxes did: 3.1× (16×) the error
    without double quantization; the dynamic code's relative precision: 1.02× (1.18×))."""
    w, others = _outlier_kernel(factor)
    error = {}
    for double in (False, True):
        q = lj.quantize({"k": jnp.asarray(w)}, targets="k", double_quant=double)["k"]
        error[double] = np.abs(np.asarray(lj.dequantize(q)) - w)[others].mean()
    assert error[True] < 1.25 * error[False]


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("factor", [250, 1000])
def test_an_outlier_block_against_bitsandbytes(factor):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    w, others = _outlier_kernel(factor)
    packed, state = bnb.quantize_4bit(torch.tensor(w.T.copy()), blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnb.dequantize_4bit(packed, state).numpy().T
    ours = np.asarray(lj.dequantize(lj.quantize({"k": jnp.asarray(w)}, targets="k")["k"]))
    # Per block of 64, the mean error relative to the block's mean magnitude, outside the outlier's block.
    def per_block(x):
        err = np.abs(x - w).reshape(4, 64, 64).mean(1) / np.abs(w).reshape(4, 64, 64).mean(1)
        return np.delete(err.reshape(-1), 7)  # block (0, 7) holds the outlier
    # Within 10% of bitsandbytes' (the issue's bar), on average and for the worst block; a linear
    # int8 code of the absmaxes gave 3x (250x outlier) to 15x (1000x) bitsandbytes' average.
    assert per_block(ours).mean() <= 1.1 * per_block(theirs).mean()
    assert per_block(ours).max() <= 1.1 * per_block(theirs).max()


def test_non_finite_kernels_are_refused_and_huge_ones_stay_finite():
    w = np.array(jax.random.normal(jax.random.key(0), (128, 16)))
    for bad in (np.nan, np.inf):
        x = w.copy()
        x[3, 4] = bad
        with pytest.raises(ValueError, match=r"'d/kernel': holds NaN or infinite weights"):
            lj.quantize({"d": {"kernel": jnp.asarray(x)}})
    w = w / np.abs(w).max()
    huge = w * 3e38  # absmaxes near float32's maximum: their mean (the offset) must not overflow
    got = np.asarray(lj.dequantize(lj.quantize({"k": jnp.asarray(huge)}, targets="k")["k"]), np.float64)
    unit = np.asarray(lj.dequantize(lj.quantize({"k": jnp.asarray(w)}, targets="k")["k"]), np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got / 3e38, unit, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
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
    for g, w in leaf_pairs(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("width, sliced", [(256, True), (64, False)])
def test_a_stacked_quantized_kernel_is_dequantized_per_layer_inside_the_scan(width, sliced):
    """Each step of the scan dequantizes its own layer's blocks (when blocks and double
    quantization's groups stay within a layer; else the whole kernel, before the loop)."""
    model, x = Scanned(use_bias=False), jax.random.normal(jax.random.key(1), (4, width))
    params = model.init(jax.random.key(0), x)["params"]
    quantized = lj.quantize(params, method="nf4")
    q = quantized["blocks"]["mix"]["kernel"]
    stacked = _quantize.leading_slices(q)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_files_and_shardings(tmp_path, monkeypatch):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 32)), "bias": jnp.zeros(32)}}
    for options in ({}, {"method": "int4", "block_size": 32}):
        quantized = lj.quantize(params, **options)
        lj.save_params(tmp_path / "q.safetensors", quantized)
        loaded = lj.load_params(tmp_path / "q.safetensors")
        assert jax.tree.structure(loaded) == jax.tree.structure(quantized)
        for a, b in leaf_pairs(loaded, quantized):
            np.testing.assert_array_equal(a, b)
    from jax.sharding import PartitionSpec as P

    specs = lj.quantized_shardings({"dense": {"kernel": P("fsdp", "tp"), "bias": P("tp")}}, lj.quantize(params))
    q = specs["dense"]["kernel"]
    assert (q.codes, q.absmax, q.absmax_scale, specs["dense"]["bias"]) == (P("fsdp", "tp"), P("fsdp", "tp"), P(), P("tp"))
    # A file quantized with another NF4 codebook (written by a build with other levels) is refused.
    other = NF4.copy()
    other[3] += 0.01
    monkeypatch.setattr("lora_jax._ops.quantize.NF4", other)
    lj.save_params(tmp_path / "other.safetensors", lj.quantize(params))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'dense/kernel': quantized with another NF4 codebook"):
        lj.load_params(tmp_path / "other.safetensors")


@pytest.mark.slow
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


# ---- validation: hand-built kernels and tampered files ---------------------------------------

_W = jax.random.normal(jax.random.key(0), (128, 16))
_GOOD = {m: lj.quantize({"k": _W}, targets="k", method=m)["k"] for m in ("nf4", "int8", "int4")}
_NF4 = _GOOD["nf4"]
_FLOAT_ABSMAX = lj.quantize({"k": _W}, targets="k", double_quant=False)["k"]


def _fields(q, **changes):
    fields = dict(codes=q.codes, absmax=q.absmax, absmax_scale=q.absmax_scale, absmax_offset=q.absmax_offset,
                  shape=q.shape, dtype=q.dtype, method=q.method, block=q.block)  # fmt: skip
    return {**fields, **changes}


@pytest.mark.parametrize("changes, error, match", [
    (dict(block=0), ValueError, r"block must be an even int >= 2, found 0"),
    (dict(block=3), ValueError, r"block must be an even int >= 2, found 3"),
    (dict(block=48), ValueError, r"no leading axes of \(128, 16\) hold a multiple of the block size 48"),
    (dict(block=32), ValueError, r"absmax is uint8\[2, 16\], expected uint8\[4, 16\]"),
    (dict(shape=None), TypeError, r"shape must be a non-empty tuple of ints, found None"),
    (dict(shape=(128.0, 16)), TypeError, r"shape must be a non-empty tuple of ints"),
    (dict(shape=(128,)), ValueError, r"shape \(128,\) must have at least 2 axes"),
    (dict(shape=(128, 0)), ValueError, r"none of them empty"),
    (dict(shape=(128, 8)), ValueError, r"codes is uint8\[64, 16\], expected uint8\[64, 8\]"),
    (dict(method="fp4"), ValueError, r"method must be one of"),
    (dict(method=["nf4"]), ValueError, r"method must be one of"),
    (dict(dtype="int8"), ValueError, r"dtype must name a floating dtype.*'int8'"),
    (dict(dtype="nonsense"), ValueError, r"dtype must name a floating dtype"),
    (dict(dtype=None), ValueError, r"dtype must name a floating dtype"),
    (dict(method="int8"), ValueError, r"codes is uint8\[64, 16\], expected int8\[128, 16\]"),
    (dict(absmax_scale=None, absmax_offset=None), ValueError, r"absmax is uint8\[2, 16\], expected float32"),
    (dict(absmax_offset=None), ValueError, r"double quantization needs both absmax_scale and absmax_offset"),
    (dict(absmax_scale=jnp.ones((2,))), ValueError, r"absmax_scale is float32\[2\], expected float32\[1\]"),
    (dict(absmax_scale=jnp.ones((1,), jnp.int8)), ValueError, r"absmax_scale is int8\[1\], expected float32\[1\]"),
    (dict(absmax_offset=jnp.ones(3)), ValueError, r"absmax_offset is float32\[3\], expected float32\[\]"),
    (dict(absmax=jnp.ones((2, 1), jnp.uint8)), ValueError, r"absmax is uint8\[2, 1\], expected uint8\[2, 16\]"),
    (dict(codes=jnp.ones((64, 16), jnp.int32)), ValueError, r"codes is int32\[64, 16\], expected uint8\[64, 16\]"),
    (dict(codes=None), ValueError, r"codes is missing"),
])  # fmt: skip
def test_a_hand_built_quantized_kernel_is_checked_at_construction(changes, error, match):
    with pytest.raises(error, match=r"lora_jax\.Quantized: .*" + match):
        lj.Quantized(**_fields(_NF4, **changes))


def test_construction_accepts_what_transformations_and_files_hand_it():
    q = lj.Quantized(**_fields(_NF4, shape=[np.int64(128), 16]))  # a JSON list, NumPy ints
    assert q.shape == (128, 16) and isinstance(q.shape[0], int)
    np.testing.assert_array_equal(lj.dequantize(q), lj.dequantize(_NF4))
    # Pytree transformations rebuild it around other leaves: gradients (float0), shardings, eval_shape.
    grads = jax.grad(lambda q, x: jnp.sum(lj.dequantize(q) * x), argnums=1)(_NF4, 1.0)
    assert np.isfinite(grads)
    assert jax.eval_shape(lambda q: q, _NF4).codes.shape == (64, 16)
    assert jax.tree.map(lambda x: None, _NF4).codes is None
    int_grads = jax.grad(lambda x, q: x, allow_int=True, argnums=1)(1.0, _NF4)
    assert int_grads.codes.dtype == jax.dtypes.float0


def _write(path, arrays, described):
    """A parameter file as a foreign or tampered writer would make it (no lora_jax checks)."""
    import safetensors.numpy

    meta = {"lora_jax_params": json.dumps([[name, name.split("/")] for name in arrays]),
            "lora_jax_quantized": json.dumps(described)}  # fmt: skip
    safetensors.numpy.save_file({k: np.asarray(v) for k, v in arrays.items()}, str(path), metadata=meta)


def _file_parts(q, path="k"):
    return {f"{path}/{n}": x for n, x in _quantize.parts(q).items()}, {path: _quantize.describe(q)}


def test_load_params_validates_quantized_kernels(tmp_path):
    file = tmp_path / "q.safetensors"
    arrays, described = _file_parts(_NF4)
    _write(file, arrays, described)
    np.testing.assert_array_equal(lj.dequantize(lj.load_params(file)["k"]), lj.dequantize(_NF4))

    def refused(arrays, described, match):
        _write(file, arrays, described)
        with pytest.raises(ValueError, match=r"lora_jax.load_params: .*cannot rebuild the quantized kernels:\n  'k': " + match):
            lj.load_params(file)

    without_scales = {n: x for n, x in arrays.items() if n in ("k/codes", "k/absmax")}
    refused(without_scales, described, r"absmax is uint8\[2, 16\], expected float32\[2, 16\]")  # codes read as scales
    refused({**arrays, "k/absmax": np.ones((1, 16), np.uint8)}, described, r"absmax is uint8\[1, 16\], expected")
    refused({**arrays, "k/absmax_scale": np.ones(1, np.float16)}, described, r"absmax_scale is float16\[1\]")
    refused({**arrays, "k/extra": np.ones(2)}, described, r"arrays \['k/extra'\] are not part of a quantized kernel")
    refused({**arrays, "k/absmax_scale": -np.ones(1, np.float32)}, described, "absmax_scale holds negative")
    refused({**arrays, "k/absmax_offset": np.array(np.nan, np.float32)}, described, "absmax_offset is not finite")
    refused(arrays, {"k": {**described["k"], "block": 0}}, "block must be an even int >= 2, found 0")
    refused(arrays, {"k": {**described["k"], "shape": None}}, "shape must be a non-empty tuple of ints")
    refused(arrays, {"k": {**described["k"], "absmax_codebook": None}}, "its absmaxes are double-quantized with another code")
    # A file written before the dynamic code (int8 linear absmax codes, no absmax codebook) is refused, not misread.
    refused({**arrays, "k/absmax": np.zeros((2, 16), np.int8)}, {"k": {**described["k"]} | {"absmax_codebook": None}},
            "its absmaxes are double-quantized with another code")  # fmt: skip
    int8_arrays, int8_described = _file_parts(_GOOD["int8"])
    refused({**int8_arrays, "k/codes": np.full((128, 16), -128, np.int8)}, int8_described, r"codes hold -128")
    int4_arrays, int4_described = _file_parts(_GOOD["int4"])
    refused({**int4_arrays, "k/codes": np.full((64, 16), 0x18, np.uint8)}, int4_described, r"codes hold -8")
    float_arrays, float_described = _file_parts(_FLOAT_ABSMAX)
    refused({**float_arrays, "k/absmax": np.full((2, 16), np.inf, np.float32)}, float_described, "absmax holds negative")
    with pytest.raises(ValueError, match="invalid quantization metadata"):
        _write(file, arrays, ["not", "a", "dict"])
        lj.load_params(file)


def test_save_params_refuses_a_malformed_kernel_and_keeps_the_good_file(tmp_path):
    file = tmp_path / "q.safetensors"
    lj.save_params(file, {"k": _GOOD["int8"]})
    before = file.read_bytes()
    bad = lj.Quantized(**_fields(_GOOD["int8"], codes=jnp.full((128, 16), -128, jnp.int8)))  # right shapes, bad values
    with pytest.raises(ValueError, match=r"save_params: malformed quantized kernels:\n  'k': codes hold -128"):
        lj.save_params(file, {"k": bad})
    assert file.read_bytes() == before


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
_FIELDS = ("shape", "dtype", "method", "block", "codebook", "absmax_codebook")


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(_GOOD)), data=st.data())
def test_fuzzed_quantized_files_load_exactly_or_raise_a_clear_error(tmp_path, method, data):
    """Metadata fields replaced by any JSON value, arrays dropped, retyped or reshaped: the file
    loads the very kernel it was written from, or load_params raises ValueError."""
    arrays, described = _file_parts(_GOOD[method])
    entry = dict(described["k"])
    for field in data.draw(st.sets(st.sampled_from(_FIELDS), max_size=2)):
        entry[field] = data.draw(_JSON)
    for name in data.draw(st.sets(st.sampled_from(sorted(arrays)), max_size=2)):
        change = data.draw(st.sampled_from(["drop", "float32", "int8", "uint8", "slice", "scalar"]))
        x = arrays.pop(name)
        if change in ("float32", "int8", "uint8"):
            arrays[name] = np.asarray(x).astype(change)
        elif change == "slice":
            arrays[name] = np.asarray(x).reshape(-1)[:1]
        elif change == "scalar":
            arrays[name] = np.asarray(np.asarray(x).reshape(-1)[:1].reshape(()))
    file = tmp_path / f"fuzz-{method}.safetensors"
    _write(file, arrays, {"k": entry})
    try:
        loaded = lj.load_params(file)["k"]
    except ValueError:
        return
    # Accepted: only what describes the same kernel (e.g. an absmax_codebook on a single-quant kernel).
    np.testing.assert_array_equal(lj.dequantize(loaded), lj.dequantize(_GOOD[method]))
