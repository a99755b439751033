"""Plain LoRA, the first adapter kind: ``W' = W + scale · a ⋅ b``.

With ``S``, ``I``, ``O`` the sizes of the kernel's stack, in and out axes,

    a: (S..., I..., r)      b: (S..., r, O...)      ΔW = a ⋅ b  (summed over r)

and ``ΔW`` is transposed back to the kernel's own axis order.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core import cost as _cost
from lora_jax._core import kind as _kind
from lora_jax._core import specs as _specs
from lora_jax._core.kind import DEFAULT_ROLES_2D, Roles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """The LoRA adapter of one kernel ``W``: ``W' = W + scale · ΔW``, ``ΔW = a ⋅ b``.

    Only ``a`` and ``b`` are pytree children; everything else is static metadata, so
    ``jax.tree.map`` and optax touch the two arrays only. The metadata is checked when the
    adapter is built (also by ``jax.tree.map``), and normalised to plain Python values.

    Attributes:
      a: ``(stack..., in..., rank)``, random at initialisation.
      b: ``(stack..., rank, out...)``, zero at initialisation.
      rank: the rank ``r``.
      alpha: the LoRA ``alpha``.
      roles: the role of each kernel axis, e.g. ``("in", "out")``.
      rslora: whether ``scale = alpha / √r`` (rsLoRA) instead of ``alpha / r``.
      dropout: dropout rate on the LoRA branch input (used by the factored forward).

    Raises:
      TypeError, ValueError: on metadata of the wrong type or value, or arrays whose shapes
        contradict the rank or the roles.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> ad = lj.Adapter(jnp.ones((8, 2)), jnp.zeros((2, 4)), rank=2, alpha=4.0)
      >>> ad.scale, ad.kernel_shape
      (2.0, (8, 4))
    """

    a: Any
    b: Any
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    roles: Roles = dataclasses.field(default=DEFAULT_ROLES_2D, metadata=dict(static=True))
    rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("rank", check_rank(self.rank, "lora_jax.Adapter: rank"))
        set_("alpha", check_alpha(self.alpha, "lora_jax.Adapter: alpha"))
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise TypeError(f"lora_jax.Adapter: rslora must be a bool, found {self.rslora!r}.")
        set_("rslora", bool(self.rslora))
        set_("dropout", check_dropout(self.dropout, "lora_jax.Adapter: dropout"))
        roles = tuple(self.roles) if isinstance(self.roles, (list, tuple)) else self.roles
        why = _kind.roles_problem(roles, [1] * len(roles) if isinstance(roles, tuple) else [])
        if why:
            raise ValueError(f"lora_jax.Adapter: {why}.")
        set_("roles", roles)
        f32 = np.finfo(np.float32)
        if not float(f32.tiny) <= self.scale <= float(f32.max):
            raise ValueError(
                f"lora_jax.Adapter: alpha {self.alpha} with rank {self.rank} gives the scale {self.scale}, which "
                "float32 cannot hold."
            )
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Shapes fit rank and roles. Leading stack axes may be missing: a lifted transform
        (``nn.scan``, ``jax.vmap``) hands the layer arrays with those axes sliced off."""
        a, b = getattr(self.a, "shape", None), getattr(self.b, "shape", None)
        if not (isinstance(a, tuple) and isinstance(b, tuple)):
            return  # not arrays (shardings, optax placeholders): nothing to check
        n_stack, n_in, n_out = (self.roles.count(role) for role in ("stack", "in", "out"))
        sliced_a, sliced_b = n_stack + n_in + 1 - len(a), n_stack + n_out + 1 - len(b)
        problem = None
        if not (0 <= sliced_a <= n_stack and sliced_a == sliced_b) or any(r != "stack" for r in self.roles[:sliced_a]):
            # (a transform slicing the arrays removes leading stack axes only)
            problem = f"roles {self.roles} need a (stack..., in..., r) and b (stack..., r, out...)"
        elif a[-1] != self.rank or b[n_stack - sliced_b] != self.rank:
            problem = f"rank {self.rank} is not the last axis of a and the rank axis of b"
        elif a[: n_stack - sliced_a] != b[: n_stack - sliced_b]:
            problem = "a and b differ in their stack axes"
        if problem:
            raise ValueError(f"lora_jax.Adapter: a {a} and b {b} do not fit: {problem}.")

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel this adapter belongs to, from ``a``, ``b`` and roles."""
        return _kind.full_shape(self)

    def __repr__(self) -> str:
        """Array shapes, then the hyper-parameters (also for kinds extending it: their arrays too)."""
        arrays = [f"{n}={getattr(x, 'shape', x)}" for n, x in _kind.arrays(self).items()]
        return f"{type(self).__name__}({', '.join(arrays + [f'{k}={v}' for k, v in _kind.static(self).items()])})"


def check_rank(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int, found {value!r}.")
    if int(value) < 1:
        raise ValueError(f"{where} must be >= 1, found {value}.")
    return int(value)


def check_alpha(value: Any, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, found {value!r}.")
    if not (math.isfinite(value) and float(value) > 0):
        raise ValueError(f"{where} must be > 0 and finite, found {value}.")
    return float(value)


def check_dropout(value: Any, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"{where} must be a number in [0, 1), found {value!r}.")
    return float(value)


def axes(ad: Adapter) -> dict[str, tuple[int | None, ...]]:
    """``a`` follows the kernel's stack and in axes, ``b`` its stack and out axes."""
    of = lambda role: tuple(i for i, r in enumerate(ad.roles) if r == role)
    return {"a": of("stack") + of("in") + (None,), "b": of("stack") + (None,) + of("out")}


def delta_spec(roles: Roles) -> str:
    """The einsum contracting ``a`` and ``b`` over the rank into the kernel's axis order (its
    ``"shared"`` axes left out)."""
    letters = "abcdefghijklmnopqstuvwxyz"  # no 'r': that is the rank
    names = letters[: len(roles)]
    of = lambda role: "".join(c for c, r in zip(names, roles) if r == role)
    kernel = "".join(c for c, r in zip(names, roles) if r != "shared")
    return f"{of('stack')}{of('in')}r,{of('stack')}r{of('out')}->{kernel}"


def delta(ad: Adapter) -> jax.Array:
    """``scale · ΔW`` in float32, computed at full precision, in the kernel's axis order (size 1
    along ``"shared"`` axes: it broadcasts against the kernel)."""
    a, b = ad.a.astype(jnp.float32), ad.b.astype(jnp.float32)
    d = ad.scale * jnp.einsum(delta_spec(ad.roles), a, b, precision=jax.lax.Precision.HIGHEST)
    shared = tuple(i for i, r in enumerate(ad.roles) if r == "shared")
    return jnp.expand_dims(d, shared) if shared else d


def output(layer: _specs.Spec, base: jax.Array, kernel: jax.Array, ad: Adapter, dropout) -> jax.Array:
    """``base + scale · drop(x) ⋅ a ⋅ b``, never forming ``a ⋅ b``."""
    del kernel  # plain LoRA does not read it
    y = _specs.lowrank(layer, ad.a, ad.b, ad.scale, dropout=dropout)
    return base + y.astype(base.dtype)


_kind.register_kind(
    Adapter,
    _kind.Kind(
        name="lora",
        axes=axes,
        merge=lambda w, ad: w + delta(ad),
        unmerge=lambda w, ad: w - delta(ad),
        output=output,
        as_lora=lambda ad: ad,
        create=lambda lora, kernel: lora,
        costs=lambda ad, usages: _cost.lowrank_costs(usages, ad.rank),
    ),
)
