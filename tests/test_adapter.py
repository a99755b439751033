import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_delta

import lora_jax as lj
from lora_jax import _adapter, _lora


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
def test_kernel_shape_and_delta_against_reference(roles, kernel_shape):
    r = 2
    a_shape, b_shape = _adapter.factor_shapes(kernel_shape, roles, r)
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
    assert re.search(match, _adapter.roles_problem(roles, shape))


def test_roles_problem_accepts_valid():
    assert _adapter.roles_problem(("stack", "in", "out"), (2, 3, 4)) is None
