import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaf_pairs
from flax import nnx

import lora_jax as lj


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "enc": {
            "q": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(8)},
            "v": {"kernel": jax.random.normal(k[1], (16, 8)), "bias": jnp.zeros(8)},
        },
        "head": {"kernel": jax.random.normal(k[2], (8, 4))},
        "stack": {"kernel": jax.random.normal(k[3], (3, 16, 8))},  # nn.scan over 3 layers
    }


STACK_ROLES = {"stack/kernel": ("stack", "in", "out")}


@pytest.mark.slow
def test_structure_shapes_dtypes():
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=r"(enc/.*|stack)/kernel")
    ad = lj.init(jax.random.key(1), _params(), cfg, roles=STACK_ROLES)
    assert set(ad) == {"enc", "stack"} and set(ad["enc"]) == {"q", "v"}
    q = ad["enc"]["q"]["kernel"]
    assert (q.a.shape, q.b.shape, q.a.dtype, q.roles, q.rank, q.alpha) == (
        (16, 4),
        (4, 8),
        jnp.float32,
        ("in", "out"),
        4,
        8.0,
    )
    s = ad["stack"]["kernel"]
    assert (s.a.shape, s.b.shape, s.roles) == ((3, 16, 4), (3, 4, 8), ("stack", "in", "out"))
    assert all(not jnp.any(x.b) for x in jax.tree.leaves(ad, is_leaf=lambda x: isinstance(x, lj.Adapter)))


def test_roles_by_regex():
    cfg = lj.LoraConfig(rank=2, targets="stack/kernel")
    ad = lj.init(jax.random.key(1), _params(), cfg, roles={r"st.*/kernel": ("stack", "in", "out")})
    assert ad["stack"]["kernel"].a.shape == (3, 16, 2)


def test_rank_and_alpha_patterns_and_options():
    cfg = lj.LoraConfig(
        rank=4,
        alpha=8,
        targets=r"enc/.*/kernel",
        rank_pattern={"enc/v/kernel": 2},
        alpha_pattern={"enc/q/kernel": 1.0},
        use_rslora=True,
        dropout=0.1,
        dtype=jnp.bfloat16,
    )
    ad = lj.init(jax.random.key(1), _params(), cfg)
    q, v = ad["enc"]["q"]["kernel"], ad["enc"]["v"]["kernel"]
    assert (q.rank, q.alpha, v.rank, v.alpha) == (4, 1.0, 2, 8.0)
    assert q.rslora and q.dropout == 0.1 and q.a.dtype == jnp.bfloat16 and q.b.dtype == jnp.bfloat16
    assert v.scale == pytest.approx(8 / np.sqrt(2))


def test_exclude_and_callable_targets():
    cfg = lj.LoraConfig(rank=2, targets=lambda path, leaf: leaf.ndim == 2, exclude=[r"head/.*"])
    ad = lj.init(jax.random.key(1), _params(), cfg)
    assert set(ad) == {"enc"}


def test_deterministic_and_independent_keys():
    cfg = lj.LoraConfig(rank=4, targets=r"enc/.*/kernel")
    a1 = lj.init(jax.random.key(7), _params(), cfg)
    a2 = lj.init(jax.random.key(7), _params(), cfg)
    a3 = lj.init(jax.random.key(8), _params(), cfg)
    q = lambda ad: np.asarray(ad["enc"]["q"]["kernel"].a)
    np.testing.assert_array_equal(q(a1), q(a2))
    assert not np.array_equal(q(a1), q(a3))
    # Same shape, different kernel: different draws.
    assert not np.array_equal(q(a1), np.asarray(a1["enc"]["v"]["kernel"].a))
    # Adding a target does not change the other kernels' draws.
    wider = lj.init(jax.random.key(7), _params(), lj.LoraConfig(rank=4, targets=r"(enc/.*|head)/kernel"))
    np.testing.assert_array_equal(q(a1), q(wider))


def test_jit_equals_eager():
    cfg = lj.LoraConfig(rank=4, targets=r"(enc/.*|stack)/kernel")
    eager = lj.init(jax.random.key(3), _params(), cfg, roles=STACK_ROLES)
    jitted = jax.jit(lambda k, p: lj.init(k, p, cfg, roles=STACK_ROLES))(jax.random.key(3), _params())
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for x, y in leaf_pairs(eager, jitted):
        np.testing.assert_array_equal(x, y)


def test_legacy_uint32_key():
    ad = lj.init(jax.random.PRNGKey(0), _params(), lj.LoraConfig(rank=2, targets="head/kernel"))
    assert ad["head"]["kernel"].a.shape == (8, 2)


def test_lora_init_matches_peft_distribution():
    """a ~ U(-1/√in, 1/√in): PyTorch kaiming_uniform_(a=√5), as in PEFT's reset_lora_parameters."""
    fan_in, r = 256, 64
    params = {"w": {"kernel": jnp.zeros((fan_in, 128))}}
    a = np.asarray(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=r))["w"]["kernel"].a, np.float64)
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound  # 16k draws reach the edge
    # Uniform on ±bound: variance bound²/3 (3σ band of the sample variance of 16k draws).
    var, n = bound**2 / 3, a.size
    assert abs(a.var() - var) < 3 * var * np.sqrt(0.8 / n)
    assert abs(a.mean()) < 3 * np.sqrt(var / n)


def test_lora_init_fan_in_of_nd_kernel():
    """A conv kernel's fan-in is kh·kw·cin (PEFT's lora_A is a conv with the base kernel size)."""
    params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32))}}
    roles = {"conv/kernel": ("in", "in", "in", "out")}
    a = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=8), roles=roles)["conv"]["kernel"].a
    assert a.shape == (3, 3, 16, 8)
    bound = 1 / np.sqrt(3 * 3 * 16)
    assert bound * 0.98 < np.abs(np.asarray(a)).max() <= bound


def test_gaussian_init_std_one_over_r():
    r = 32
    params = {"w": {"kernel": jnp.zeros((512, 64))}}
    a = np.asarray(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=r, init="gaussian"))["w"]["kernel"].a)
    assert abs(a.std() - 1 / r) < 0.03 / r


def test_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])

    _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    ad = lj.init(jax.random.key(0), state, lj.LoraConfig(rank=2, targets=r"layers/\d+/kernel"))
    assert set(ad["layers"]) == {0, 1}
    assert ad["layers"][1]["kernel"].a.shape == (8, 2)


# ---- bad input ------------------------------------------------------------------------


def test_targets_match_nothing_lists_existing_paths():
    with pytest.raises(
        ValueError,
        match=r"targets matched no parameter\. 6 parameters exist, e\.g\. "
        r"'enc/q/bias', 'enc/q/kernel', 'enc/v/bias'\. Check the pattern",
    ):
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(targets="q/kernel"))


def test_bias_target_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"not floating-point kernels with >= 2 axes[^\n]*\n"
        r"  'enc/q/bias' \(shape \(8,\), dtype float32\)\n  'enc/v/bias'",
    ):
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(targets=r"enc/.*"))


def test_integer_target_is_an_error():
    params = {"ids": {"kernel": jnp.zeros((4, 4), jnp.int32)}}
    with pytest.raises(ValueError, match=r"'ids/kernel' \(shape \(4, 4\), dtype int32\)"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=1))


def test_nd_target_without_roles_says_how_to_fix():
    with pytest.raises(
        ValueError, match=r"pass roles=lj\.axis_roles\(model, \*sample_inputs\).*\n  'stack/kernel' \(3, 16, 8\)"
    ):
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(rank=2))


def test_roles_that_do_not_fit():
    with pytest.raises(ValueError, match=r"'stack/kernel': 2 roles \('in', 'out'\) for a kernel of shape \(3, 16, 8\)"):
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(rank=2), roles={"stack/kernel": ("in", "out")})


def test_rank_too_large_lists_every_path():
    with pytest.raises(
        ValueError,
        match=r"lower it with `rank_pattern` or leave them out with `exclude`:\n"
        r"  'enc/q/kernel': rank 9 > min\(in=16, out=8\)\n"
        r"  'enc/v/kernel': rank 9 > min\(in=16, out=8\)\n"
        r"  'head/kernel': rank 9 > min\(in=8, out=4\)",
    ):
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(rank=9, exclude="stack/kernel"))


def test_all_problems_in_one_message():
    with pytest.raises(ValueError) as e:
        lj.init(jax.random.key(0), _params(), lj.LoraConfig(rank=5, targets=".*"))
    msg = str(e.value)
    assert "'enc/q/bias'" in msg and "'stack/kernel' (3, 16, 8)" in msg and "'head/kernel': rank 5" in msg


def test_rank_pattern_matching_no_target():
    cfg = lj.LoraConfig(rank=2, targets="head/kernel", rank_pattern={"enc/q/kernel": 4})
    with pytest.raises(ValueError, match=r"patterns match no target.*\n  rank_pattern key 'enc/q/kernel'"):
        lj.init(jax.random.key(0), _params(), cfg)


def test_config_type_checked():
    with pytest.raises(TypeError, match=r"config must be a lora_jax\.LoraConfig, found dict"):
        lj.init(jax.random.key(0), _params(), {"rank": 2})


def test_empty_params():
    with pytest.raises(ValueError, match=r"params has no array leaves"):
        lj.init(jax.random.key(0), {}, lj.LoraConfig())
