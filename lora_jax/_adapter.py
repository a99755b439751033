"""The adapter of one kernel: arrays ``a``, ``b`` and static metadata.

Each kernel axis has a role: ``"stack"`` (a leading layer axis added by ``nn.scan``, or
any axis that indexes independent matrices), ``"in"`` (contracted with the input) or
``"out"``. With ``S``, ``I``, ``O`` the sizes of those axes,

    a: (S..., I..., r)      b: (S..., r, O...)      ΔW = a ⋅ b  (summed over r)

and ``ΔW`` is transposed back to the kernel's own axis order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _paths

Roles = tuple[str, ...]
ROLE_NAMES = ("stack", "in", "out")
DEFAULT_ROLES_2D: Roles = ("in", "out")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """The LoRA adapter of one kernel ``W``: ``W' = W + scale · ΔW``, ``ΔW = a ⋅ b``.

    Only ``a`` and ``b`` are pytree children; everything else is static metadata, so
    ``jax.tree.map`` and optax touch the two arrays only.

    Attributes:
      a: ``(stack..., in..., rank)``, random at initialisation.
      b: ``(stack..., rank, out...)``, zero at initialisation.
      rank: the rank ``r``.
      alpha: the LoRA ``alpha``.
      roles: the role of each kernel axis, e.g. ``("in", "out")``.
      rslora: whether ``scale = alpha / √r`` (rsLoRA) instead of ``alpha / r``.
      dropout: dropout rate on the LoRA branch input (used by the factored forward).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> ad = lj.Adapter(jnp.ones((8, 2)), jnp.zeros((2, 4)), rank=2, alpha=4.0)
      >>> ad.scale, ad.kernel_shape
      (2.0, (8, 4))
    """

    a: jax.Array
    b: jax.Array
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    roles: Roles = dataclasses.field(default=DEFAULT_ROLES_2D, metadata=dict(static=True))
    rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel this adapter belongs to, from ``a``, ``b`` and roles."""
        n_stack = self.roles.count("stack")
        pick = {
            "stack": iter(self.a.shape[:n_stack]),
            "in": iter(self.a.shape[n_stack:-1]),
            "out": iter(self.b.shape[n_stack + 1 :]),
        }
        return tuple(next(pick[role]) for role in self.roles)

    def __repr__(self) -> str:
        shape = lambda x: getattr(x, "shape", x)  # noqa: E731
        return (
            f"Adapter(a={shape(self.a)}, b={shape(self.b)}, rank={self.rank}, alpha={self.alpha}, "
            f"roles={self.roles}, rslora={self.rslora}, dropout={self.dropout})"
        )


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def roles_problem(roles: Any, shape: Sequence[int]) -> str | None:
    """Why ``roles`` cannot describe a kernel of ``shape``, or ``None`` if they can."""
    if not isinstance(roles, (tuple, list)) or not all(isinstance(r, str) for r in roles):
        return f"roles must be a sequence of {ROLE_NAMES}, found {roles!r}"
    if len(roles) != len(shape):
        return f"{len(roles)} roles {tuple(roles)} for a kernel of shape {tuple(shape)} ({len(shape)} axes)"
    unknown = sorted({r for r in roles if r not in ROLE_NAMES})
    if unknown:
        return f"unknown roles {unknown} in {tuple(roles)}; each axis is one of {ROLE_NAMES}"
    if "in" not in roles or "out" not in roles:
        return f"roles {tuple(roles)} need at least one 'in' and one 'out' axis"
    return None


def roles_for(path: str, shape: Sequence[int], roles: Mapping[str, Sequence[str]] | None) -> Roles | None:
    """The roles ``roles`` gives for ``path`` (an exact key first, then the first regex key that
    fully matches), else ``("in", "out")`` for a 2-D kernel, else ``None``."""
    if roles is not None:
        key = path if path in roles else _paths.first_match(roles, path)
        if key is not None:
            given = roles[key]
            return tuple(given) if isinstance(given, (list, tuple)) else given  # roles_problem judges the rest
    return DEFAULT_ROLES_2D if len(shape) == 2 else None


def factor_shapes(shape: Sequence[int], roles: Roles, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``a`` and ``b`` for a kernel of ``shape`` with ``roles``."""
    of = lambda role: tuple(n for n, r in zip(shape, roles) if r == role)  # noqa: E731
    return of("stack") + of("in") + (rank,), of("stack") + (rank,) + of("out")


def fan_in_out(shape: Sequence[int], roles: Roles) -> tuple[int, int]:
    """The product of the in-axis sizes and of the out-axis sizes."""
    fan_in = math.prod(n for n, r in zip(shape, roles) if r == "in")
    return fan_in, math.prod(n for n, r in zip(shape, roles) if r == "out")


def delta_spec(roles: Roles) -> str:
    """The einsum contracting ``a`` and ``b`` over the rank into the kernel's axis order."""
    letters = "abcdefghijklmnopqstuvwxyz"  # no 'r': that is the rank
    axes = letters[: len(roles)]
    of = lambda role: "".join(c for c, r in zip(axes, roles) if r == role)  # noqa: E731
    return f"{of('stack')}{of('in')}r,{of('stack')}r{of('out')}->{axes}"


def delta(adapter: Adapter) -> jax.Array:
    """``scale · ΔW`` in float32, computed at full precision, in the kernel's axis order."""
    a = adapter.a.astype(jnp.float32)
    b = adapter.b.astype(jnp.float32)
    d = jnp.einsum(delta_spec(adapter.roles), a, b, precision=jax.lax.Precision.HIGHEST)
    return adapter.scale * d
