"""Use specs: how one use of a kernel in a program applies it to its input.

The engine (:mod:`lora_jax._engine.interpret`) turns each use of an adapted kernel into a spec, with
the kernel in its own layout; the adapter kinds compute their factored outputs from specs
only. Four specs cover every use the engine factors:

- :class:`Einsum` ``y = einsum(equation, x, kernel)``: any ``dot_general`` (``Dense`` is
  ``"...i,io->...o"``, a PyTorch-layout ``Conv1D`` ``"...i,oi->...o"``, a tied output head
  ``"...f,vf->...v"``);
- :class:`Conv` ``y = conv_general_dilated(x, kernel, ...)``;
- :class:`Lookup` ``y = kernel[ids]``;
- :class:`Grouped` ``y = ragged_dot(x, kernel, group_sizes)``: the experts of a
  mixture-of-experts layer, tokens sorted by expert, each multiplied by its own expert's
  ``(in, out)`` slice of a ``(experts, in, out)`` kernel.

:func:`lowrank` computes ``scale · x ⋅ (a ⋅ b)`` for a spec without forming ``a ⋅ b``.
Matrix products of ``x``'s flattened axes go through one 2-D ``custom_vjp``: a weight
gradient then contracts over one axis, not over (batch, sequence), which XLA compiles to a
single GEMM instead of a much slower multi-axis contraction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax._core.kind import Roles


class Einsum(NamedTuple):
    """A layer computing ``einsum(equation, x, kernel)``.

    Attributes:
      equation: ``"<x>,<kernel>-><y>"`` with an explicit output (``...`` allowed in ``x`` and
        ``y``). A kernel letter in ``x`` and ``y`` is a ``"stack"`` axis, one in ``x`` only an
        ``"in"`` axis, one in ``y`` only an ``"out"`` axis.
      x: the input the kernel is contracted with.
      roles: the kernel's roles as the layer defines them, when they differ from those the
        equation implies (``Embed.attend`` contracts an embedding's ``"out"`` axis).
      bias: the layer's bias, added to the product (``None``: none); filled in by the front
        ends for kinds that rescale the product (DoRA).
    """

    equation: str
    x: Any
    roles: Roles | None = None
    bias: Any = None


class Conv(NamedTuple):
    """A use computing ``lax.conv_general_dilated(x, kernel, ...)`` with channels-last ``x``
    and a ``(spatial..., in, out)`` kernel; ``bias`` as for :class:`Einsum`."""

    x: Any
    strides: tuple[int, ...]
    padding: Any
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    bias: Any = None


class Lookup(NamedTuple):
    """A layer computing ``kernel[ids]`` (an embedding table ``(vocab, features)``)."""

    ids: Any


class Grouped(NamedTuple):
    """A use computing ``jax.lax.ragged_dot(x, kernel, group_sizes)``: ``x`` ``(tokens, in)``
    sorted by group, the kernel ``(groups, in, out)`` (its roles ``("stack", "in", "out")``),
    the first ``group_sizes[0]`` rows multiplied by ``kernel[0]``, the next ``group_sizes[1]``
    by ``kernel[1]``, and so on (rows past ``sum(group_sizes)`` give zeros)."""

    x: Any
    group_sizes: Any

    def group_ids(self) -> jax.Array:
        """The group of each row of ``x``, ``(tokens,)`` (``groups`` for rows past the last group)."""
        ends = jnp.cumsum(self.group_sizes)
        return jnp.searchsorted(ends, jnp.arange(jnp.shape(self.x)[0], dtype=ends.dtype), side="right")


Spec = Einsum | Conv | Lookup | Grouped


def roles(spec: Spec) -> Roles:
    """The kernel's roles as the layer uses it."""
    if isinstance(spec, Einsum):
        return spec.roles or _einsum_roles(*_parse(spec.equation, jnp.ndim(spec.x)))
    if isinstance(spec, Conv):
        return ("in",) * (jnp.ndim(spec.x) - 1) + ("out",)
    if isinstance(spec, Grouped):
        return ("stack", "in", "out")
    return ("in", "out")


def map_input(spec: Spec, f) -> Spec:
    """``spec`` with ``f`` applied to its floating input (a lookup's ids are left alone)."""
    return spec._replace(x=f(spec.x)) if isinstance(spec, (Einsum, Conv, Grouped)) else spec


def lowrank(spec: Spec, a: jax.Array, b: jax.Array, scale: float, *, dropout=None) -> jax.Array:
    """``scale · x ⋅ (a ⋅ b)`` for the layer call ``spec``, without forming ``a ⋅ b``: the
    branch of a LoRA-like adapter kind, in the layer's output layout and ``a``'s dtype.

    Args:
      spec: the layer call (:class:`Einsum`, :class:`Conv`, :class:`Lookup` or :class:`Grouped`).
      a: ``(stack..., in..., r)``, its axes in the kernel's axis order.
      b: ``(stack..., r, out...)``.
      scale: the factor on the product.
      dropout: a function applied to the layer's floating input first (not to ids).

    Returns:
      The branch output, shaped like the layer's output.

    Raises:
      ValueError: if the layer contracts kernel axes that are neither the adapter's ``in``
        axes nor (for a transposed use) its ``out`` axes.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> x, a, b = jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4))
      >>> lj.extend.lowrank(lj.extend.Einsum("ni,io->no", x), a, b, 0.5)
      Array([[1.5, 1.5, 1.5, 1.5],
             [1.5, 1.5, 1.5, 1.5]], dtype=float32)
    """
    if dropout is not None:
        spec = map_input(spec, dropout)
    if isinstance(spec, Einsum):
        return _einsum(spec, a, b, scale)
    if isinstance(spec, Conv):
        return _conv(spec, a, b, scale)
    if isinstance(spec, Grouped):
        return _grouped(spec, a, b, scale)
    ids = spec.ids
    u = jnp.take(a, ids, axis=0).reshape(-1, a.shape[-1])
    return _outer(_scaled(u, scale), b).reshape(jnp.shape(ids) + b.shape[1:])


def per_output(spec: Spec, roles: Roles) -> Callable[[jax.Array], jax.Array] | None:
    """A function placing an array over the kernel's ``(stack..., out...)`` axes (one value per
    output feature, such as DoRA's magnitude) into the layout of the use's output (size-1 axes
    elsewhere), so that it broadcasts against it; ``None`` for a use whose output features are
    not the kernel's out axes (an embedding lookup, an einsum that reduces them)."""
    if isinstance(spec, Conv):
        return lambda f: f  # channels last: (out,) broadcasts
    if isinstance(spec, Grouped):  # (experts, out): each row takes its expert's
        return lambda f: f[jnp.minimum(spec.group_ids(), f.shape[0] - 1)]
    if not isinstance(spec, Einsum):
        return None
    xs, ks, ys = _parse(spec.equation, jnp.ndim(spec.x))
    ins = {c for c, r in zip(ks, roles) if r == "in"}
    kept = [c for c, r in zip(ks, roles) if r != "in"]
    if {c for c in ks if c in xs and c not in ys} != ins or not all(c in ys for c in kept):
        return None
    order = sorted(range(len(kept)), key=lambda j: ys.index(kept[j]))

    def place(f: jax.Array) -> jax.Array:
        f = jnp.transpose(f, order)
        sizes = dict(zip([kept[j] for j in order], f.shape))
        return f.reshape(tuple(sizes.get(c, 1) for c in ys))

    return place


# ---- the 2-D low-rank product with a hand-written backward pass ---------------------------

_OUTER_MAX_RANK = 16


def _scaled(u: jax.Array, scale: float) -> jax.Array:
    return u * jnp.asarray(scale, u.dtype)


def _outer(u: jax.Array, v: jax.Array) -> jax.Array:
    """``u ⋅ v`` for ``u (n, r)``, ``v (r, m)`` with a small ``r``, as ``r`` broadcast
    multiply-adds: XLA fuses them with the addition that consumes the result into one pass
    over ``(n, m)``, where a rank-``r`` GEMM would first write its own ``(n, m)`` output."""
    if u.shape[-1] > _OUTER_MAX_RANK:
        return u @ v
    out = u[:, 0, None] * v[0]
    for i in range(1, u.shape[-1]):
        out = out + u[:, i, None] * v[i]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lowrank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · (x ⋅ a) ⋅ b`` for 2-D ``x (n, in)``, ``a (in, r)``, ``b (r, out)``."""
    return _lowrank_fwd(x, a, b, scale)[0]


def _lowrank_fwd(x, a, b, scale):
    u = _scaled(x @ a, scale)
    return _outer(u, b), (x, a, b, u)


def _lowrank_bwd(scale, res, g):
    x, a, b, u = res
    # The optimization barriers keep XLA from rewriting these into transposed-operand GEMMs:
    # on CPU, (g_uᵀ x)ᵀ runs ~5x faster than xᵀ g_u for a thin g_u.
    g_u = _scaled(g @ jax.lax.optimization_barrier(b.T), scale)
    da = jax.lax.optimization_barrier(g_u.T @ x).T
    return g_u @ a.T, da, u.T @ g


_lowrank.defvjp(_lowrank_fwd, _lowrank_bwd)


# ---- Einsum ------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _parse(equation: str, x_ndim: int) -> tuple[str, str, str]:
    """``(x, kernel, y)`` letter strings of an explicit equation, ``...`` expanded."""
    equation = equation.replace(" ", "")
    if "->" not in equation or equation.count(",") != 1:
        raise ValueError(f"lora_jax: einsum equation {equation!r} must have the form '<x>,<kernel>-><y>'.")
    lhs, y = equation.split("->")
    x, k = lhs.split(",")
    if "..." in k:
        raise ValueError(f"lora_jax: einsum equation {equation!r}: the kernel's axes must be spelled out.")
    if "..." in x:
        n = x_ndim - (len(x) - 3)
        free = "".join(c for c in _LETTERS if c not in equation)[:n]
        x, y = x.replace("...", free), y.replace("...", free)
    return x, k, y


def _einsum_roles(x: str, k: str, y: str) -> Roles:
    def role(c: str) -> str:
        if c in x:
            return "stack" if c in y else "in"
        if c in y:
            return "out"
        raise ValueError(f"lora_jax: the kernel axis {c!r} of '{x},{k}->{y}' is summed on its own (not a linear map).")

    return tuple(role(c) for c in k)


def _einsum(spec: Einsum, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    x = spec.x.astype(a.dtype)
    xs, ks, ys = _parse(spec.equation, x.ndim)
    kernel_roles = roles(spec)
    of = lambda role: "".join(c for c, r in zip(ks, kernel_roles) if r == role)
    stack, ins, outs = of("stack"), of("in"), of("out")
    contracted = {c for c in ks if c in xs and c not in ys}
    forward = contracted == set(ins)
    if forward:  # x ⋅ a, then ⋅ b
        first, first_axes, second, second_axes = a, ins, b, outs
        first_spec, second_spec = f"{stack}{ins}@", f"{stack}@{outs}"
    elif contracted == set(outs) and not stack:  # a transposed use (Embed.attend): x ⋅ bᵀ, then ⋅ aᵀ
        first, first_axes, second, second_axes = b, outs, a, ins
        first_spec, second_spec = f"@{outs}", f"{ins}@"
    else:
        raise ValueError(
            f"lora_jax: the layer ('{xs},{ks}->{ys}') contracts kernel axes {sorted(contracted)}, which are "
            f"neither the adapter's in axes {list(ins)} nor its out axes {list(outs)}."
        )
    kept = "".join(c for c in xs if c in ys and c not in ks)
    plain = sorted(xs) == sorted(kept + first_axes) and sorted(ys) == sorted(kept + second_axes)
    if not stack and len(set(xs)) == len(xs) and plain:
        # A plain matrix product of x's flattened axes: the fast 2-D branch, then y's axis order.
        order = tuple(xs.index(c) for c in kept + first_axes)
        if order != tuple(range(x.ndim)):
            x = jnp.transpose(x, order)
        lead = x.shape[: len(kept)]
        r = a.shape[-1]
        f1, f2 = (a.reshape(-1, r), b.reshape(r, -1)) if forward else (b.reshape(r, -1).T, a.reshape(-1, r).T)
        y = _lowrank(x.reshape(math.prod(lead), -1), f1, f2, scale)
        y = y.reshape(lead + (b.shape[1:] if forward else a.shape[:-1]))
        to_y = tuple((kept + second_axes).index(c) for c in ys)
        return y if to_y == tuple(range(y.ndim)) else jnp.transpose(y, to_y)
    # Batched (stack) letters, repeated letters or axes summed inside x: two einsums.
    rank = next(c for c in _LETTERS if c not in xs + ks + ys)
    if any(c not in ys for c in stack):
        raise ValueError(f"lora_jax: the use '{xs},{ks}->{ys}' sums over the kernel's stack axes {list(stack)}.")
    # u keeps x's axes that reach y, the stack axes (also those x lacks: one branch per stack entry), and r.
    u_spec = "".join(c for c in xs if c in ys) + "".join(c for c in stack if c not in xs) + rank
    u = jnp.einsum(f"{xs},{first_spec.replace('@', rank)}->{u_spec}", x, first)
    return jnp.einsum(f"{u_spec},{second_spec.replace('@', rank)}->{ys}", _scaled(u, scale), second)


# ---- Conv: a conv with the base kernel size into r channels, then a 1x1 conv (PEFT) -------


def _conv(spec: Conv, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    x = spec.x.astype(a.dtype)
    spatial = "XYZUVW"[: x.ndim - 2]  # any distinct letters but N, C, I and O
    numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    u = jax.lax.conv_general_dilated(
        x, a, spec.strides, spec.padding, lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
        dimension_numbers=numbers,
    )  # fmt: skip
    return (_scaled(u.reshape(-1, a.shape[-1]), scale) @ b).reshape(u.shape[:-1] + b.shape[-1:])


# ---- Grouped: each row through its own group's adapter --------------------------------------


def _grouped(spec: Grouped, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``ragged_dot(ragged_dot(x, a), b)`` with the layer's group sizes, ``a (groups, in, r)``,
    ``b (groups, r, out)``: ``2·r·(in + out)`` FLOPs per row, whatever the number of groups."""
    x = spec.x.astype(a.dtype)
    if a.ndim == 2:  # one adapter shared by every group: a plain low-rank product
        return _lowrank(x, a, b, scale)
    u = jax.lax.ragged_dot(x, a, spec.group_sizes)
    return jax.lax.ragged_dot(_scaled(u, scale), b, spec.group_sizes)
