import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import leaf_pairs, randomize, reference_merge
from flax import nnx
from hypothesis import given, settings

import lora_jax as lj

ROLES = {
    "dense/kernel": ("in", "out"),
    "stacked/kernel": ("stack", "in", "out"),
    "qkv/kernel": ("in", "out", "out"),
    "proj/kernel": ("in", "in", "out"),
    "conv/kernel": ("in", "in", "in", "out"),
}
SHAPES = {
    "dense/kernel": (12, 10),
    "stacked/kernel": (3, 12, 10),
    "qkv/kernel": (12, 4, 6),
    "proj/kernel": (4, 6, 12),
    "conv/kernel": (3, 3, 5, 7),
}


def _params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    params = {}
    for k, (path, shape) in zip(keys, SHAPES.items()):
        module = path.split("/")[0]
        params[module] = {"kernel": jax.random.normal(k, shape).astype(dtype), "bias": jnp.ones(shape[-1], dtype)}
    return params


def _trained(params, config, seed=1):
    return randomize(lj.init(jax.random.key(seed), params, config, roles=ROLES), jax.random.key(seed + 1))


CONFIGS = {
    "plain": lj.LoraConfig(rank=3, alpha=6),
    "rslora": lj.LoraConfig(rank=4, alpha=6, use_rslora=True),
    "patterns": lj.LoraConfig(
        rank=2,
        alpha=3,
        rank_pattern={"(qkv|conv)/kernel": 4},
        alpha_pattern={"stacked/kernel": 11.0, "conv/kernel": 0.5},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("jit", [False, True])
def test_merge_matches_float64_reference(name, jit):
    params = _params()
    ad = _trained(params, CONFIGS[name])
    merge = jax.jit(lj.apply_lora) if jit else lj.apply_lora
    merged = merge(params, ad)
    for module in SHAPES:
        m = module.split("/")[0]
        adapter = ad[m]["kernel"]
        assert merged[m]["kernel"].dtype == jnp.float32
        np.testing.assert_allclose(
            merged[m]["kernel"], reference_merge(params[m]["kernel"], adapter), rtol=2e-6, atol=2e-6, err_msg=module
        )
        np.testing.assert_array_equal(merged[m]["bias"], params[m]["bias"])
    if name == "patterns":
        assert ad["qkv"]["kernel"].rank == 4 and ad["stacked"]["kernel"].scale == 11.0 / 2


@pytest.mark.slow
def test_jit_and_eager_agree_bitwise():
    params = _params()
    ad = _trained(params, CONFIGS["plain"])
    for x, y in leaf_pairs(lj.apply_lora(params, ad), jax.jit(lj.apply_lora)(params, ad)):
        np.testing.assert_array_equal(x, y)


def test_fresh_adapter_is_exact_noop():
    params = _params()
    merged = lj.apply_lora(params, lj.init(jax.random.key(0), params, CONFIGS["plain"], roles=ROLES))
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for x, y in leaf_pairs(merged, params):
        np.testing.assert_array_equal(x, y)


def test_untargeted_leaves_are_passed_through_and_inputs_untouched():
    params = _params()
    before = jax.tree.map(np.array, params)
    ad = _trained(params, lj.LoraConfig(rank=2, targets="dense/kernel"))
    merged = lj.apply_lora(params, ad)
    assert merged["qkv"]["kernel"] is params["qkv"]["kernel"]
    assert merged["dense"]["kernel"] is not params["dense"]["kernel"]
    for x, y in leaf_pairs(params, before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
class UnmergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_unmerge_inverts_apply(self):
        params = _params()
        ad = _trained(params, CONFIGS["patterns"])
        back = self.variant(lj.unmerge)(self.variant(lj.apply_lora)(params, ad), ad)
        for x, y in leaf_pairs(back, params):
            np.testing.assert_allclose(x, y, rtol=0, atol=4 * np.finfo(np.float32).eps * (1 + np.abs(y).max()))


@pytest.mark.slow
def test_bf16_base_stays_bf16_within_one_rounding():
    params = _params(jnp.bfloat16)
    ad = _trained(params, CONFIGS["plain"])
    merged = lj.apply_lora(params, ad)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
    for m in ("dense", "stacked", "qkv", "proj", "conv"):
        exact = reference_merge(np.asarray(params[m]["kernel"], np.float64), ad[m]["kernel"])
        got = np.asarray(merged[m]["kernel"], np.float64)
        # One bf16 rounding: half a unit in the last place (8 significand bits) of the exact value.
        half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 8)
        assert np.all(np.abs(got - exact) <= half_ulp * 1.0001), m
        np.testing.assert_array_equal(got, exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64))


@pytest.mark.slow
def test_bf16_adapters_accumulate_in_float32():
    params = _params()
    ad = _trained(params, lj.LoraConfig(rank=3, alpha=6, dtype=jnp.bfloat16))
    merged = lj.apply_lora(params, ad)
    exact = reference_merge(params["dense"]["kernel"], ad["dense"]["kernel"])  # from the bf16 values themselves
    np.testing.assert_allclose(merged["dense"]["kernel"], exact, rtol=2e-6, atol=2e-6)


def test_nnx_state_roundtrip_and_model_output():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    ad = randomize(lj.init(jax.random.key(0), state, lj.LoraConfig(rank=2)), jax.random.key(1))
    merged = lj.apply_lora(state, ad)
    assert type(merged) is type(state) and jax.tree.structure(merged) == jax.tree.structure(state)
    x = jnp.ones((2, 8))
    y = nnx.merge(graphdef, merged)(x)
    w = [reference_merge(state["layers"][i]["kernel"][...], ad["layers"][i]["kernel"]) for i in (0, 1)]
    b = [np.asarray(state["layers"][i]["bias"][...], np.float64) for i in (0, 1)]
    expected = (np.asarray(x, np.float64) @ w[0] + b[0]) @ w[1] + b[1]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    back = lj.unmerge(merged, ad)
    np.testing.assert_allclose(back["layers"][0]["kernel"][...], state["layers"][0]["kernel"][...], atol=1e-6)


def test_linen_model_output_uses_merged_kernel(mlp):
    model, params, x = mlp
    ad = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)), jax.random.key(1))
    y = model.apply({"params": lj.apply_lora(params, ad)}, x)
    x64 = np.asarray(x, np.float64)
    h = np.maximum(x64 @ reference_merge(params["fc1"]["kernel"], ad["fc1"]["kernel"]) + params["fc1"]["bias"], 0)
    expected = h @ reference_merge(params["fc2"]["kernel"], ad["fc2"]["kernel"]) + params["fc2"]["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inside_scan_compatible_stacked_model():
    """A model built with nn.scan gets (L, in, out) kernels; merging the stack matches per-layer merges."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(6, name="dense")(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
            return scan(name="blocks")(x, None)[0]

    x = jnp.ones((2, 6))
    params = Stack().init(jax.random.key(0), x)["params"]
    assert params["blocks"]["dense"]["kernel"].shape == (4, 6, 6)
    roles = {"blocks/dense/kernel": ("stack", "in", "out")}
    ad = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(1))
    y = Stack().apply({"params": lj.apply_lora(params, ad)}, x)
    h = np.asarray(x, np.float64)
    w = reference_merge(params["blocks"]["dense"]["kernel"], ad["blocks"]["dense"]["kernel"])
    for layer in range(4):
        h = np.tanh(h @ w[layer] + np.asarray(params["blocks"]["dense"]["bias"][layer]))
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


# ---- property tests -------------------------------------------------------------------


@st.composite
def _kernel_case(draw):
    roles = draw(
        st.permutations(
            draw(
                st.sampled_from(
                    [
                        ("in", "out"),
                        ("stack", "in", "out"),
                        ("in", "out", "out"),
                        ("in", "in", "out"),
                        ("in", "in", "in", "out"),
                        ("stack", "in", "in", "out", "out"),
                    ]
                )
            )
        )
    )
    shape = tuple(draw(st.integers(1, 5)) for _ in roles)
    fan_in = int(np.prod([n for n, r in zip(shape, roles) if r == "in"]))
    fan_out = int(np.prod([n for n, r in zip(shape, roles) if r == "out"]))
    rank = draw(st.integers(1, min(fan_in, fan_out)))
    alpha = draw(st.floats(0.1, 64))
    return roles, shape, rank, alpha, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(case=_kernel_case())
def test_property_merge_and_unmerge(case):
    roles, shape, rank, alpha, rslora, seed = case
    params = {"m": {"kernel": jax.random.normal(jax.random.key(seed), shape)}}
    cfg = lj.LoraConfig(rank=rank, alpha=alpha, use_rslora=rslora)
    ad = randomize(lj.init(jax.random.key(seed), params, cfg, roles={"m/kernel": roles}), jax.random.key(seed + 1))
    adapter = ad["m"]["kernel"]
    assert adapter.kernel_shape == shape
    merged = lj.apply_lora(params, ad)
    exact = reference_merge(params["m"]["kernel"], adapter)
    np.testing.assert_allclose(merged["m"]["kernel"], exact, rtol=1e-5, atol=1e-5 * (1 + np.abs(exact).max()))
    back = lj.unmerge(merged, ad)["m"]["kernel"]
    np.testing.assert_allclose(back, params["m"]["kernel"], rtol=0, atol=1e-5 * (1 + np.abs(exact).max()))


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(1, 4), min_size=1),
    targets=st.sets(st.sampled_from(["a", "b", "c"]), min_size=1),
)
def test_property_patterns_pick_ranks(ranks, targets):
    params = {name: {"kernel": jnp.ones((6, 5))} for name in "abc"}
    pattern = {f"{name}/kernel": r for name, r in ranks.items() if name in targets}
    cfg = lj.LoraConfig(rank=2, targets=[f"{t}/kernel" for t in sorted(targets)], rank_pattern=pattern)
    ad = lj.init(jax.random.key(0), params, cfg)
    assert set(ad) == targets
    for name in targets:
        assert ad[name]["kernel"].a.shape == (6, ranks.get(name, 2) if name in targets else 2)


# ---- bad input ------------------------------------------------------------------------


def test_adapter_for_missing_path_and_wrong_shape_lists_all():
    params = _params()
    ad = _trained(params, CONFIGS["plain"])
    ad["ghost"] = {"kernel": ad["dense"]["kernel"]}
    bad = dict(params, dense={"kernel": jnp.ones((12, 9))}, qkv={"kernel": jnp.ones((12, 4, 5))})
    with pytest.raises(ValueError) as e:
        lj.apply_lora(bad, ad)
    lines = str(e.value).splitlines()
    assert lines[0] == "lora_jax.apply_lora: adapters do not fit params:"
    assert (
        "  'dense/kernel': the kernel has shape (12, 9), the adapter (a (12, 3), b (3, 10), roles ('in', 'out')) fits shape (12, 10)"
        in lines
    )
    assert "  'ghost/kernel': no such parameter" in lines
    assert any(line.startswith("  'qkv/kernel': the kernel has shape (12, 4, 5)") for line in lines)
    assert lines[-1].startswith("  (params has e.g. ")


def test_unmerge_errors_name_unmerge():
    with pytest.raises(ValueError, match=r"(?s)lora_jax\.unmerge: .*'ghost/kernel': no such parameter"):
        lj.unmerge(_params(), {"ghost": {"kernel": lj.Adapter(jnp.ones((2, 1)), jnp.ones((1, 2)), rank=1, alpha=1.0)}})


def test_non_adapter_leaves_are_a_type_error():
    with pytest.raises(TypeError, match=r"adapters must be a tree of lora_jax\.Adapter.*'dense/kernel' \(ArrayImpl\)"):
        lj.apply_lora(_params(), {"dense": {"kernel": jnp.ones((12, 10))}})
