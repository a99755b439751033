"""The cost model that chooses, per adapted kernel and per call, between the factored forward
and merging the adapter into the kernel inside the step.

Counted in multiply-add FLOPs of one training step (forward and backward), for a kernel with
in-axis size ``I``, out-axis size ``O``, stack size ``S``, rank ``r``, used on ``N`` tokens
(the rows the kernel is applied to; output positions for a convolution)::

    factored:  6·S·N·r·(I + O)           x⋅a, u⋅b and their four gradient GEMMs
    merged:    6·S·I·O·r + 2·S·N·I·O     a⋅b and its two gradients, once; the weight gradient
                                          xᵀ⋅g of the merged kernel, per call

(an embedding lookup has no ``x⋅a``: ``4·S·N·r·O`` factored, ``S·N·O`` per call merged; a
grouped product — mixture-of-experts experts, ``ragged_dot`` — over ``G`` groups counts each
token once, through its own group, and merges all ``G``: ``6·G·I·O·r`` once). The
base's own forward and input gradient are the same in both and cancel. Merging wins for large
ranks relative to the kernel, and only when ``r > I·O / (3·(I + O))``: below that bound the
factored form is cheaper for any number of tokens, and the kernel is factored without looking
at the call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax._core import kind as _kind
from lora_jax._core import specs as _specs

MODES = ("auto", "factored", "merged")


class Usage(NamedTuple):
    """How one layer call uses a kernel, as the cost model sees it.

    Attributes:
      tokens: the rows the kernel is applied to (for a convolution, its output positions).
      fan_in: the product of the kernel's in-axis sizes.
      fan_out: the product of its out-axis sizes.
      stack: the product of the stack-axis sizes the call itself sees (1 for a plain layer).
      lookup: whether the call indexes the kernel (an embedding lookup) instead of
        multiplying by it.
      groups: the groups a grouped product (``ragged_dot``) routes each token to one of (1
        for other calls): merging forms all of them.
    """

    tokens: int
    fan_in: int
    fan_out: int
    stack: int = 1
    lookup: bool = False
    groups: int = 1


def lowrank_costs(usages: Sequence[Usage], rank: int) -> tuple[float, float]:
    """``(factored, merged)`` training FLOPs of a rank-``rank`` branch over ``usages`` of one
    kernel (the formulas of this module's docstring, summed over the calls; the merge itself
    is counted once).

    Example:
      >>> import lora_jax as lj
      >>> lj.extend.lowrank_costs([lj.extend.Usage(tokens=1024, fan_in=256, fan_out=256)], rank=64)
      (201326592.0, 159383552.0)
    """
    factored = merged = 0.0
    for u in usages:
        if u.lookup:
            factored += 4.0 * u.stack * u.tokens * rank * u.fan_out
            merged += 1.0 * u.stack * u.tokens * u.fan_out
        else:
            factored += 6.0 * u.stack * u.tokens * rank * (u.fan_in + u.fan_out)
            merged += 2.0 * u.stack * u.tokens * u.fan_in * u.fan_out
    if usages:
        u = usages[0]
        merged += 6.0 * u.stack * u.groups * u.fan_in * u.fan_out * rank
    return factored, merged


def usage(spec: _specs.Spec, kernel_shape: tuple[int, ...]) -> Usage:
    """The :class:`Usage` of one layer call described by ``spec`` on a kernel of ``kernel_shape``."""
    roles = _specs.roles(spec)
    size = lambda role: math.prod(n for n, r in zip(kernel_shape, roles) if r == role)
    if isinstance(spec, _specs.Lookup):
        return Usage(math.prod(jnp.shape(spec.ids)), kernel_shape[0], math.prod(kernel_shape[1:]), lookup=True)
    if isinstance(spec, _specs.Grouped):
        (tokens, fan_in), groups = jnp.shape(spec.x), jnp.shape(spec.group_sizes)[0]  # any kernel layout
        return Usage(tokens, fan_in, math.prod(kernel_shape) // (groups * fan_in), groups=groups)
    if isinstance(spec, _specs.Conv):
        x = jax.ShapeDtypeStruct(jnp.shape(spec.x), jnp.float32)
        k = jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
        spatial = "XYZUVW"[: len(kernel_shape) - 2]
        out = jax.eval_shape(
            lambda x, k: jax.lax.conv_general_dilated(
                x, k, spec.strides, spec.padding, lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
                dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            ), x, k,
        )  # fmt: skip
        return Usage(math.prod(out.shape[:-1]), size("in"), size("out"))
    xs, ks, ys = _specs._parse(spec.equation, jnp.ndim(spec.x))
    x_sizes = dict(zip(xs, jnp.shape(spec.x)))
    tokens = math.prod(x_sizes[c] for c in set(xs) if c in ys and c not in ks)
    return Usage(tokens, size("in"), size("out"), size("stack"))


def costs(adapter: Any, usages: Sequence[Usage]) -> tuple[float, float] | None:
    """``(factored, merged)`` FLOPs of ``adapter`` over ``usages``; ``None`` if its kind has
    no cost model (it is then always factored)."""
    cost = _kind.kind_of(adapter).costs
    return None if cost is None else cost(adapter, usages)


def mergeable(adapter: Any) -> bool:
    """Whether merging can be the cheaper computation for ``adapter`` at any number of tokens:
    compared at a token count so large that the one-off cost of the merge does not count."""
    roles = _kind.static(adapter).get("roles")
    if _kind.kind_of(adapter).costs is None or roles is None or "shared" in roles:
        return False  # no cost model: always factored; shared: merging copies one adapter into each matrix
    shape = _kind.full_shape(adapter)
    fan_in, fan_out = _kind.fan_in_out(shape, roles)
    stack = math.prod(n for n, r in zip(shape, roles) if r == "stack")
    cost = costs(adapter, [Usage(2**50, fan_in, fan_out, stack)])
    return cost is not None and cost[1] < cost[0]


def choose(adapters: Mapping[str, Any], usages: Mapping[str, Sequence[Usage]]) -> set[str]:
    """The kernels to merge: those that are :func:`mergeable` and whose merged cost over their
    calls ``usages[path]`` is below the factored one."""
    chosen = set()
    for path, calls in usages.items():
        adapter = adapters[path]
        cost = costs(adapter, calls) if calls and mergeable(adapter) else None
        if cost is not None and cost[1] < cost[0]:
            chosen.add(path)
    return chosen


def check_mode(compute: Any, where: str) -> str:
    if not isinstance(compute, str) or compute not in MODES:
        raise ValueError(f"{where}: compute must be one of {MODES}, found {compute!r}.")
    return compute
