"""FLOPs of a program's matrix products, read off its jaxpr (no compilation, no noise).

A ``ragged_dot`` of ``(m, k)`` rows by ``(groups, k, n)`` counts ``2·m·k·n``: what a grouped
GEMM computes on GPU and TPU. XLA:CPU's cost analysis counts it ``groups`` times over, because
XLA:CPU lowers ``ragged_dot`` densely (every row by every group, masked), so for
mixture-of-experts programs the jaxpr is the figure that describes the algorithm.
"""

from __future__ import annotations

import math
from typing import Any

import jax


def count(jaxpr: Any) -> int:
    """``2·m·k·n`` per ``ragged_dot_general`` (``m·k`` the left operand, ``n`` the output's last
    axis), ``2·|out|·|contracted|`` per ``dot_general``, through nested jaxprs (jit, remat,
    custom_vjp calls; a ``scan`` body counted ``length`` times)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "ragged_dot_general":
            total += 2 * math.prod(eqn.invars[0].aval.shape) * eqn.outvars[0].aval.shape[-1]
        elif name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracted)
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * count(inner)
    return total


def program_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """:func:`count` of ``fn(*args, **kwargs)``'s jaxpr."""
    return count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
