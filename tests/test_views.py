"""The layout algebra the engine follows kernels with, checked against the programs' own values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax._engine import views as _views

W = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)


def _follow(fn, kernel):
    """The view of ``fn(kernel)`` found by stepping through its jaxpr, or None where it stops."""
    jaxpr = jax.make_jaxpr(fn)(kernel).jaxpr
    view, shape = _views.View.identity(kernel.shape), tuple(kernel.shape)
    for eqn in jaxpr.eqns:
        view = _views.step(view, eqn.primitive.name, eqn.params, shape)
        if view is None:
            return None
        shape = tuple(eqn.outvars[0].aval.shape)
    return view


@pytest.mark.parametrize(
    "fn",
    [
        lambda w: w.T,  # transpose
        lambda w: w.astype(jnp.bfloat16),  # a cast
        lambda w: w.reshape(6, 4),  # merge whole axes
        lambda w: w.reshape(2, 3, 2, 2),  # split one axis into pieces
        lambda w: w.reshape(6, 4).reshape(2, 3, 2, 2),  # merge, then split along the atoms
        lambda w: jnp.transpose(w.reshape(2, 3, 2, 2), (3, 0, 2, 1)).reshape(2, 2, 2, 3),  # pieces moved around
        lambda w: w[None, :, None],  # size-1 axes added
        lambda w: jnp.squeeze(w[None, :, :, None], (0, 3)),  # and removed
        lambda w: jnp.moveaxis(w, 1, 0).reshape(3, 8),
    ],
)
def test_a_followed_view_lays_the_kernel_out_as_the_program_does(fn):
    view = _follow(fn, W)
    assert view is not None
    want = np.asarray(fn(W))
    got = np.asarray(_views.of_kernel(W, view, want.dtype))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "fn",
    [
        lambda w: w.reshape(4, 6),  # regroups across axis boundaries
        lambda w: jnp.broadcast_to(w, (5, 2, 3, 4)),  # a real broadcast repeats the kernel
        lambda w: w * 2,  # arithmetic
        lambda w: w[:, :2],  # a slice
    ],
)
def test_operations_that_are_not_views_are_not_followed(fn):
    assert _follow(fn, W) is None


def test_regroup_round_trips_and_drop_leading_inverts_add_leading():
    view = _follow(lambda w: jnp.transpose(w.reshape(2, 3, 2, 2), (3, 0, 2, 1)), W)
    sizes = view.sizes()
    laid = _views.regroup(W, view.kernel_groups(), view.groups, sizes)
    np.testing.assert_array_equal(_views.regroup(laid, view.groups, view.kernel_groups(), sizes), W)
    stacked = _views.View.identity((5, 3, 4))
    dropped, axis = stacked.drop_leading()
    assert axis == 0 and _views.add_leading(dropped, axis, 5) == stacked
    assert _views.View(((), ((0, 0),)), ((3,),)).drop_leading() is None  # axis 0 holds no kernel axis
