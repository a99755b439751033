"""The factored LoRA branch of each Flax Linen layer type: ``scale · (x ⋅ a) ⋅ b``.

:func:`plan` looks at one intercepted module call and says which parameter it uses as its
kernel, the role of each kernel axis, and how to compute the branch from a (layer-local)
adapter without forming ``W + scale · a ⋅ b``. It returns ``None`` for a layer it does not
know (the caller then merges that kernel instead).

The branches contract over the input's flattened leading axes (2-D GEMMs): the weight
gradients ``xᵀ ⋅ g`` then contract over one axis, not over (batch, sequence), which XLA
compiles to a single GEMM instead of a much slower multi-axis contraction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from lora_jax._adapter import Adapter, Roles

Dropout = Callable[[jax.Array], jax.Array]


class Plan(NamedTuple):
    """How one module call uses its kernel, and its LoRA branch."""

    param: str  # the kernel's parameter name in the module ("kernel", "embedding")
    roles: Roles  # the kernel's axis roles as this call uses it
    branch: Callable[[Adapter, Dropout], jax.Array]  # (layer-local adapter, dropout) -> branch output


def plan(module: nn.Module, method: str, args: tuple, kwargs: dict) -> Plan | None:
    """The :class:`Plan` of a module call, or ``None`` if this layer type is not known."""
    kind = type(module)
    if kind is nn.Embed and method in ("__call__", "attend"):
        return _embed(module, method, _first_arg(args, kwargs, "inputs" if method == "__call__" else "query"))
    if method != "__call__":
        return None
    if kind is nn.Dense:
        x = _first_arg(args, kwargs, "inputs")
        return Plan("kernel", ("in", "out"), lambda ad, drop: _dense_general(drop(x), ad, (), (x.ndim - 1,)))
    if kind is nn.DenseGeneral:
        return _dense_general_plan(module, _first_arg(args, kwargs, "inputs"))
    if kind is nn.Einsum:
        return _einsum_plan(module, args, kwargs)
    if kind is nn.Conv:
        return _conv_plan(module, _first_arg(args, kwargs, "inputs"))
    return None


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs[name]


def _scaled(u: jax.Array, ad: Adapter) -> jax.Array:
    return u * jnp.asarray(ad.scale, u.dtype)


_OUTER_MAX_RANK = 16


def _outer(u: jax.Array, v: jax.Array) -> jax.Array:
    """``u ⋅ v`` for ``u (n, r)``, ``v (r, m)`` with a small ``r``, as ``r`` broadcast
    multiply-adds: XLA fuses them with the addition that consumes the result into one pass
    over ``(n, m)``, where a rank-``r`` GEMM would first write its own ``(n, m)`` output."""
    if u.shape[-1] > _OUTER_MAX_RANK:
        return u @ v
    return sum(u[:, i, None] * v[i] for i in range(u.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lowrank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · (x ⋅ a) ⋅ b`` for 2-D ``x (n, in)``, ``a (in, r)``, ``b (r, out)``."""
    return _lowrank_fwd(x, a, b, scale)[0]


def _lowrank_fwd(x, a, b, scale):
    u = (x @ a) * jnp.asarray(scale, x.dtype)
    return _outer(u, b), (x, a, b, u)


def _lowrank_bwd(scale, res, g):
    x, a, b, u = res
    # The optimization barriers keep XLA from rewriting these into transposed-operand GEMMs:
    # on CPU, (g_uᵀ x)ᵀ runs ~5x faster than xᵀ g_u for a thin g_u.
    g_u = (g @ jax.lax.optimization_barrier(b.T)) * jnp.asarray(scale, g.dtype)
    da = jax.lax.optimization_barrier(g_u.T @ x).T
    return g_u @ a.T, da, u.T @ g


_lowrank.defvjp(_lowrank_fwd, _lowrank_bwd)


# ---- Dense / DenseGeneral: y = dot_general(x, W) over `axis`, batched over `batch_dims` ----


def _dense_general_plan(module: nn.DenseGeneral, x: jax.Array) -> Plan:
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    normalize = lambda axes: tuple(sorted(a % x.ndim for a in as_tuple(axes)))  # noqa: E731 (sorted, as Flax does)
    batch, axis = normalize(module.batch_dims), normalize(module.axis)
    roles = ("stack",) * len(batch) + ("in",) * len(axis) + ("out",) * len(as_tuple(module.features))
    return Plan("kernel", roles, lambda ad, drop: _dense_general(drop(x), ad, batch, axis))


def _dense_general(x: jax.Array, ad: Adapter, batch: tuple[int, ...], axis: tuple[int, ...]) -> jax.Array:
    """``scale · (x ⋅ a) ⋅ b`` in ``dot_general``'s output layout (batch, rest of x, out)."""
    rest = tuple(i for i in range(x.ndim) if i not in batch and i not in axis)
    x = x.astype(ad.a.dtype)
    if not batch:
        return _matmul_branch(x, ad, rest + axis)
    x = jnp.transpose(x, batch + rest + axis)  # independent matrices per batch index: batched GEMMs
    batch_shape, rest_shape = x.shape[: len(batch)], x.shape[len(batch) : len(batch) + len(rest)]
    n_b, n_rest = math.prod(batch_shape), math.prod(rest_shape)
    u = jnp.matmul(x.reshape(n_b, n_rest, -1), ad.a.reshape(n_b, -1, ad.rank))
    y = jnp.matmul(_scaled(u, ad), ad.b.reshape(n_b, ad.rank, -1))
    return y.reshape(batch_shape + rest_shape + ad.b.shape[len(batch) + 1 :])


def _matmul_branch(x: jax.Array, ad: Adapter, order: tuple[int, ...]) -> jax.Array:
    """``scale · (x ⋅ a) ⋅ b`` for an adapter without stack axes, with ``x``'s axes taken in
    ``order`` (the axes it keeps, then those contracted, in the kernel's in-axis order): a
    2-D :func:`_lowrank` on the flattened axes; the result is laid out (kept..., out...)."""
    if order != tuple(range(x.ndim)):
        x = jnp.transpose(x, order)
    kept = x.shape[: x.ndim - (ad.a.ndim - 1)]
    y = _lowrank(x.reshape(math.prod(kept), -1), ad.a.reshape(-1, ad.rank), ad.b.reshape(ad.rank, -1), ad.scale)
    return y.reshape(kept + ad.b.shape[1:])


# ---- Einsum: the branch from the layer's own equation --------------------------------


def _einsum_plan(module: nn.Einsum, args: tuple, kwargs: dict) -> Plan | None:
    x = _first_arg(args, kwargs, "inputs")
    equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    equation = (equation if equation is not None else module.einsum_str).replace(" ", "")
    kernel = jax.ShapeDtypeStruct(tuple(module.shape), jnp.float32)
    operands, y_spec, _ = opt_einsum.parser.parse_einsum_input((equation, x, kernel))
    x_spec, k_spec = operands.split(",")
    roles = []
    for c in k_spec:
        if c in x_spec:
            roles.append("stack" if c in y_spec else "in")
        elif c in y_spec:
            roles.append("out")
        else:
            return None  # a kernel axis summed away on its own: not a linear map of x
    if "in" not in roles or "out" not in roles or len(set(k_spec)) != len(k_spec):
        return None
    of = lambda role: "".join(c for c, x in zip(k_spec, roles) if x == role)  # noqa: E731
    kept = "".join(c for c in x_spec if c not in k_spec)
    if "stack" not in roles and len(set(x_spec)) == len(x_spec) and sorted(y_spec) == sorted(kept + of("out")):
        # A plain matrix product of x's flattened axes: the fast 2-D branch, then y's axis order.
        order = tuple(x_spec.index(c) for c in kept + of("in"))
        to_y = tuple((kept + of("out")).index(c) for c in y_spec)

        def branch(ad: Adapter, drop: Dropout) -> jax.Array:
            y = _matmul_branch(drop(x).astype(ad.a.dtype), ad, order)
            return y if to_y == tuple(range(y.ndim)) else jnp.transpose(y, to_y)

    else:  # batched (stack) letters or axes summed inside x: two einsums
        used = set(x_spec + k_spec + y_spec)
        r = next(c for c in "rRzZqQ" + "".join(map(chr, range(0x3B1, 0x3C9))) if c not in used)
        u_spec = "".join(c for c in x_spec if c in y_spec) + r
        a_eq = f"{x_spec},{of('stack')}{of('in')}{r}->{u_spec}"
        b_eq = f"{u_spec},{of('stack')}{r}{of('out')}->{y_spec}"

        def branch(ad: Adapter, drop: Dropout) -> jax.Array:
            u = jnp.einsum(a_eq, drop(x).astype(ad.a.dtype), ad.a)
            return jnp.einsum(b_eq, _scaled(u, ad), ad.b)

    return Plan("kernel", tuple(roles), branch)


# ---- Conv: a conv with the base kernel size into r channels, then a 1x1 conv (PEFT) ----


def _conv_plan(module: nn.Conv, x: jax.Array) -> Plan | None:
    if module.feature_group_count != 1 or module.mask is not None:
        return None
    n_spatial = len(module.kernel_size) if isinstance(module.kernel_size, (tuple, list)) else 1
    roles = ("in",) * (n_spatial + 1) + ("out",)

    def branch(ad: Adapter, drop: Dropout) -> jax.Array:
        down = module.clone(parent=None, features=ad.rank, use_bias=False, dtype=ad.a.dtype, param_dtype=ad.a.dtype)
        u = down.apply({"params": {"kernel": ad.a}}, drop(x).astype(ad.a.dtype))
        u2 = u.reshape(-1, ad.rank)
        return (_scaled(u2, ad) @ ad.b).reshape(u.shape[:-1] + ad.b.shape[-1:])

    return Plan("kernel", roles, branch)


# ---- Embed: a lookup in a, then ⋅ b; attend: q ⋅ (a b)ᵀ = (q ⋅ bᵀ) ⋅ aᵀ ---------------


def _embed(module: nn.Embed, method: str, x: jax.Array) -> Plan:
    if method == "__call__":

        def branch(ad: Adapter, drop: Dropout) -> jax.Array:
            ids = x if module.num_embeddings > 1 else jnp.zeros(np.shape(x), jnp.int32)
            u = jnp.take(ad.a, ids, axis=0).reshape(-1, ad.rank)  # no dropout on ids (as PEFT)
            return (_scaled(u, ad) @ ad.b).reshape(np.shape(x) + ad.b.shape[-1:])

    else:

        def branch(ad: Adapter, drop: Dropout) -> jax.Array:
            q = drop(x).astype(ad.a.dtype)
            u = q.reshape(-1, q.shape[-1]) @ ad.b.T
            return (_scaled(u, ad) @ ad.a.T).reshape(q.shape[:-1] + ad.a.shape[:1])

    return Plan("embedding", ("in", "out"), branch)
