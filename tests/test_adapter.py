import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_delta

import lora_jax as lj
from lora_jax._core import kind as _kind
from lora_jax._kinds import lora as _lora


def _adapter_of(a_shape, b_shape, **kw):
    ka, kb = jax.random.split(jax.random.key(0))
    return lj.Adapter(jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape), rank=a_shape[-1], **kw)


def test_pytree_children_are_exactly_a_and_b():
    ad = _adapter_of((6, 2), (2, 5), alpha=4.0)
    leaves = jax.tree.leaves(ad)
    assert len(leaves) == 2 and leaves[0] is ad.a and leaves[1] is ad.b
    doubled = jax.tree.map(lambda x: 2 * x, ad)
    assert (doubled.rank, doubled.alpha, doubled.roles) == (2, 4.0, ("in", "out"))
    # Static metadata is part of the tree structure.
    other = lj.Adapter(ad.a, ad.b, rank=2, alpha=5.0)
    assert jax.tree.structure(ad) != jax.tree.structure(other)


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scale(rslora, expected):
    ad = lj.Adapter(jnp.zeros((8, 4)), jnp.zeros((4, 8)), rank=4, alpha=16.0, rslora=rslora)
    assert ad.scale == expected


@pytest.mark.parametrize(
    "roles, kernel_shape",
    [
        (("in", "out"), (6, 5)),
        (("stack", "in", "out"), (3, 6, 5)),
        (("in", "out", "out"), (6, 4, 3)),  # DenseGeneral q/k/v (features, heads, head_dim)
        (("in", "in", "out"), (4, 3, 6)),  # attention out (heads, head_dim, features)
        (("in", "in", "in", "out"), (3, 3, 2, 5)),  # Conv (kh, kw, cin, cout)
        (("out", "stack", "in"), (5, 3, 6)),  # roles in any order
    ],
)
@pytest.mark.slow
def test_kernel_shape_and_delta_against_reference(roles, kernel_shape):
    r = 2
    a_shape, b_shape = _kind.factor_shapes(kernel_shape, roles, r)
    ad = _adapter_of(a_shape, b_shape, alpha=3.0, roles=roles)
    assert ad.kernel_shape == kernel_shape
    d = _lora.delta(ad)
    assert d.shape == kernel_shape and d.dtype == jnp.float32
    np.testing.assert_allclose(d, reference_delta(ad.a, ad.b, roles, ad.scale), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "roles, shape, match",
    [
        (("in",), (3, 4), r"1 roles \('in',\) for a kernel of shape \(3, 4\)"),
        (("in", "bogus"), (3, 4), r"unknown roles \['bogus'\]"),
        (("in", "in"), (3, 4), r"at least one 'in' and one 'out'"),
        ("in,out", (3, 4), r"roles must be a sequence"),
    ],
)
def test_roles_problem(roles, shape, match):
    assert re.search(match, _kind.roles_problem(roles, shape))


def test_roles_problem_accepts_valid():
    assert _kind.roles_problem(("stack", "in", "out"), (2, 3, 4)) is None


# ---- invariants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(rank=3), ValueError, r"a \(6, 2\) and b \(2, 5\) do not fit: rank 3 is not the last axis"),
        (dict(rank=0), ValueError, r"rank must be >= 1, found 0"),
        (dict(rank=2.0), TypeError, r"rank must be an int"),
        (dict(alpha=float("nan")), ValueError, r"alpha must be > 0 and finite, found nan"),
        (dict(alpha=float("inf")), ValueError, r"alpha must be > 0 and finite"),
        (dict(alpha=-1.0), ValueError, r"alpha must be > 0"),
        (dict(alpha="2"), TypeError, r"alpha must be a number"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (dict(rslora="yes"), TypeError, r"rslora must be a bool"),
        (dict(roles=("in", "up")), ValueError, r"unknown roles \['up'\]"),
        (dict(roles=("in", "out", "out")), ValueError, r"need a \(stack..., in..., r\)"),
    ],
)
def test_adapter_checks_itself(kw, error, match):
    args = dict(rank=2, alpha=4.0) | kw
    with pytest.raises(error, match=r"lora_jax\.Adapter: .*" + match):
        lj.Adapter(jnp.ones((6, 2)), jnp.ones((2, 5)), **args)


def test_metadata_normalised_to_plain_python():
    ad = lj.Adapter(jnp.ones((6, 2)), jnp.ones((2, 5)), rank=np.int64(2), alpha=np.float32(4.0), roles=["in", "out"])
    assert type(ad.rank) is int and type(ad.alpha) is float and ad.roles == ("in", "out")
    json.dumps(_kind.static(ad))  # plain JSON


def test_sliced_stack_axes_are_accepted_inside_transforms():
    """nn.scan / jax.vmap hand the layer a and b with the leading stack axis sliced off."""
    ad = _adapter_of((3, 6, 2), (3, 2, 5), roles=("stack", "in", "out"), alpha=1.0)
    jax.vmap(lambda ad: ad.a.sum())(ad)  # unflattens Adapter(a (6, 2), b (2, 5), roles stack/in/out)
    with pytest.raises(ValueError, match=r"a and b differ in their stack axes"):
        lj.Adapter(jnp.ones((3, 6, 2)), jnp.ones((4, 2, 5)), rank=2, alpha=1.0, roles=("stack", "in", "out"))


def test_copies_go_through_replace_and_are_checked():
    ad = _adapter_of((6, 2), (2, 5), alpha=4.0)
    assert _kind.replace(ad, alpha=8.0).scale == 4.0
    with pytest.raises(ValueError, match=r"alpha must be > 0"):
        _kind.replace(ad, alpha=0.0)
