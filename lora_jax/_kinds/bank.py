"""Adapter banks: many LoRA adapters of one kernel, stacked, and the mixed-batch forward.

A :class:`Bank` holds ``N`` plain LoRA adapters of one kernel with their ranks zero-padded
to one rank ``R`` and their scales in an array, so that putting another adapter into a
slot (another rank ≤ ``R``, another alpha) changes only array values: a compiled step or
forward does not retrace. With ``S``, ``I``, ``O`` the kernel's stack, in and out axes,

    a: (S..., N, I..., R)      b: (S..., N, R, O...)      scales, ranks: (S..., N)

(stack axes stay leading, so ``nn.scan``/``nnx.scan`` slice a bank as they slice kernels).
Padding is self-preserving in training: a zero column of ``a`` and the zero row of ``b``
facing it get zero gradients.

A layer with a bank computes, for each example ``e`` of its batch (the leading axis of its
input), ``base(x_e) + scales[i_e] · x_e ⋅ a[i_e] ⋅ b[i_e]`` with ``i = index`` the
per-example adapter index given to the call (``lora_index=`` of a wrapped apply, or
:func:`bank_index` around a call of an attached model); ``-1`` (:data:`BASE`) is the base
alone. The adapters are gathered per example and the branch is batched over examples
(BGMV): the same FLOPs as one adapter, gradients reaching each adapter from its own
examples only.

The scales are data (so other alphas need no recompilation) but must not train. Their gradient
is stopped and :func:`lora_jax.optimizer` freezes them, but any optax transform given the whole
tree would still move them (weight decay shrinks every leaf). So each slot's rank is kept
beside its scale as a float, a whole number: a seal that any such update breaks with the scale
(decay, noise, an L2 term all make it fractional). A broken seal is a ``ValueError`` where the
bank is concrete, and NaN outputs for the slot's examples under ``jax.jit`` — never a silently
rescaled adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import specs as _specs
from lora_jax._core.kind import DEFAULT_ROLES_2D, Roles
from lora_jax._kinds import lora as _lora

BASE = -1
"""The index of "no adapter": an example with this index gets the base model's output."""

_INDEX: contextvars.ContextVar[Any] = contextvars.ContextVar("lora_jax_bank_index", default=None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Bank:
    """``N`` LoRA adapters of one kernel, ranks padded to ``rank``; built by :func:`lora_jax.bank`.

    Attributes:
      a: ``(stack..., N, in..., rank)``.
      b: ``(stack..., N, rank, out...)``.
      scales: ``(stack..., N)``, each adapter's ``alpha / r`` (0 for an empty slot); data, so
        that other alphas need no recompilation, but never trained (its gradient is stopped
        and :func:`lora_jax.optimizer` freezes it).
      ranks: ``(stack..., N)`` float32, each adapter's rank ``r`` (0 for an empty slot), a
        whole number: the seal of ``scales`` (see the module docstring), frozen likewise.
      rank: the padded rank ``R`` (the largest rank a slot can hold).
      roles: the role of each kernel axis.
      dropout: the LoRA dropout rate of the bank's adapters (one rate per kernel, applied to
        the layer's input in training as for one adapter).

    Raises:
      TypeError, ValueError: on metadata of the wrong type or arrays that do not fit it.
    """

    a: Any
    b: Any
    scales: Any
    ranks: Any
    rank: int = dataclasses.field(metadata=dict(static=True))
    roles: Roles = dataclasses.field(default=DEFAULT_ROLES_2D, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    def __post_init__(self):
        object.__setattr__(self, "rank", _lora.check_rank(self.rank, "lora_jax.Bank: rank"))
        object.__setattr__(self, "dropout", _lora.check_dropout(self.dropout, "lora_jax.Bank: dropout"))
        roles = tuple(self.roles) if isinstance(self.roles, (list, tuple)) else self.roles
        why = _kind.roles_problem(roles, [1] * len(roles) if isinstance(roles, tuple) else [])
        if why:
            raise ValueError(f"lora_jax.Bank: {why}.")
        object.__setattr__(self, "roles", roles)
        shapes = [getattr(x, "shape", None) for x in (self.a, self.b, self.scales, self.ranks)]
        if all(isinstance(s, tuple) for s in shapes):
            self._check_shapes(*shapes)

    def _check_shapes(self, a: tuple, b: tuple, scales: tuple, ranks: tuple) -> None:
        n_stack, n_in = self.roles.count("stack"), self.roles.count("in")
        n_out = len(self.roles) - n_stack - n_in
        sliced = n_stack + 1 - len(scales)  # stack axes a lifted transform has sliced off
        kept = n_stack - sliced
        problem = None
        if not (0 <= sliced <= n_stack and len(a) == kept + 1 + n_in + 1 and len(b) == kept + 2 + n_out):
            problem = (
                f"roles {self.roles} need a (stack..., N, in..., R), b (stack..., N, R, out...), scales (stack..., N)"
            )
        elif a[-1] != self.rank or b[kept + 1] != self.rank:
            problem = f"rank {self.rank} is not the last axis of a and the rank axis of b"
        elif not a[: kept + 1] == b[: kept + 1] == scales == ranks:
            problem = "a, b, scales and ranks differ in their stack axes or number of adapters"
        if problem:
            raise ValueError(f"lora_jax.Bank: a {a}, b {b}, scales {scales}, ranks {ranks} do not fit: {problem}.")

    @property
    def size(self) -> int:
        """The number of slots ``N``."""
        return int(self.scales.shape[-1])

    def __repr__(self) -> str:
        shape = lambda x: getattr(x, "shape", x)
        arrays = f"a={shape(self.a)}, b={shape(self.b)}, scales={shape(self.scales)}"
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        return f"Bank({arrays}, rank={self.rank}, roles={self.roles}{dropout})"


def axes(bank: Bank) -> dict[str, tuple[int | None, ...]]:
    of = lambda role: tuple(i for i, r in enumerate(bank.roles) if r == role)
    return {
        "a": of("stack") + (None,) + of("in") + (None,),
        "b": of("stack") + (None, None) + of("out"),
        "scales": of("stack") + (None,),
        "ranks": of("stack") + (None,),
    }


def sealed(bank: Bank) -> jax.Array:
    """Per slot ``(stack..., N)``: whether its rank is still a whole number in ``0..rank`` (no
    optimizer has moved the bank's frozen arrays)."""
    ranks = jax.lax.stop_gradient(bank.ranks)
    return (ranks == jnp.round(ranks)) & (ranks >= 0) & (ranks <= bank.rank)


def check_seal(bank: Bank, where: str) -> None:
    """A ``ValueError`` where a concrete bank's seal is broken (see the module docstring)."""
    # Under jax.jit (traced ranks, or a trace around concrete ones) the forward gives NaN instead.
    ok = None if isinstance(bank.ranks, jax.core.Tracer) else _concrete(sealed(bank))
    if ok is not None and not ok.all():
        slots = sorted({int(i) for i in np.argwhere(~ok)[:, -1]})
        raise ValueError(
            f"{where}: the bank's frozen scales were changed (the ranks kept beside them as whole numbers are now "
            f"{np.asarray(bank.ranks)[..., slots].reshape(-1)[:4].tolist()} in slots {slots}): an optimizer "
            "updated the whole bank tree. Train a bank with lj.optimizer(tx, lora), or leave 'scales' and 'ranks' "
            "out of your optax transform (optax.masked), and rebuild this bank."
        )


# ---- the per-example index ------------------------------------------------------------------


@contextlib.contextmanager
def bank_index(index: Any) -> Iterator[None]:
    """Within this context, layers with a :class:`Bank` apply adapter ``index[e]`` to example ``e``.

    Use it around a call of a model with banks attached (:func:`lora_jax.attach`); a wrapped
    apply takes the index as its ``lora_index=`` keyword instead (which enters this context).
    Enter it inside the jitted function, with the index as an argument of that function:
    other indices then reuse the compiled code.

    Args:
      index: integer array ``(batch,)``: a slot of the bank for each example of the batch
        (the leading axis of each adapted layer's input), or ``-1`` (``lj.BASE``) for the base
        model alone. Out-of-range values are a ``ValueError`` where the index is concrete; under
        ``jax.jit`` (where it cannot be checked) they give NaN outputs for their examples.

    Raises:
      TypeError: if ``index`` is not a 1-D integer array.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> ads = [lj.init(jax.random.key(i), nnx.state(model), lj.LoraConfig(rank=2)) for i in (1, 2)]
      >>> lj.attach(model, lj.bank(ads))
      >>> with lj.bank_index(jnp.array([0, 1, -1])):
      ...     y = model(jnp.ones((3, 4)))
      >>> y.shape
      (3, 3)
    """
    with indexed(index, "lora_jax.bank_index"):
        yield


@contextlib.contextmanager
def indexed(index: Any, where: str = "lora_jax.wrap: lora_index") -> Iterator[None]:
    """:func:`bank_index`, also for a wrapped apply's ``lora_index`` keyword (``None``: no index)."""
    if index is None:
        yield
        return
    token = _INDEX.set(check_index(index, where))
    try:
        yield
    finally:
        _INDEX.reset(token)


def check_range(index: jax.Array, n: int, where: str) -> None:
    """A ``ValueError`` listing the values of a concrete ``index`` outside ``-1..n-1`` (a traced
    one cannot be checked: the forward gives its examples NaN)."""
    values = _concrete(index)
    if values is not None and ((values < BASE) | (values >= n)).any():
        bad = sorted({int(v) for v in values if not BASE <= v < n})
        raise ValueError(f"{where}: the adapter index holds {bad}, outside the bank's slots 0..{n - 1} (or -1 for the "
                         "base).")  # fmt: skip


def check_index(index: Any, where: str) -> jax.Array:
    dtype = getattr(index, "dtype", None)
    if dtype is None and isinstance(index, (list, tuple)):
        index = np.asarray(index)
        dtype = index.dtype
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(index) != 1:
        found = f"{type(index).__name__}" + (f" of dtype {dtype} and shape {jnp.shape(index)}" if dtype else "")
        raise TypeError(
            f"{where}: the adapter index must be a 1-D integer array (one slot per example), found {found}."
        )
    return jnp.asarray(index)


def _concrete(x: Any) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


# ---- the mixed-batch output -------------------------------------------------------------------


def output(layer: _specs.Spec, base: jax.Array, kernel: jax.Array, bank: Bank, dropout) -> jax.Array:
    """``base + scales[i_e] · x_e ⋅ a[i_e] ⋅ b[i_e]`` for each example ``e`` of the call."""
    del kernel
    index = _INDEX.get()
    if index is None:
        raise ValueError(
            "a Bank applies one adapter per example, so the call needs the adapter of each example: pass "
            "lora_index=<int array (batch,)> to the wrapped apply (or call an attached model inside "
            "`with lj.bank_index(index):`)."
        )
    n = bank.scales.shape[-1]
    check_range(index, n, "lora_jax.wrap: lora_index")
    check_seal(bank, "lora_jax.wrap")
    if dropout is not None:
        layer = _specs.map_input(layer, dropout)
    inputs, axis, branch = _examples(layer)
    if index.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"the adapter index has {index.shape[0]} entries but the layer's input has {inputs.shape[0]} examples "
            "along its leading axis (the index needs one entry per example)."
        )
    take = jnp.clip(index, 0, n - 1)
    scale = jnp.where(index >= 0, jax.lax.stop_gradient(bank.scales)[take], 0.0)
    valid = (index >= BASE) & (index < n) & ((index < 0) | sealed(bank)[take])
    scale = jnp.where(valid, scale, jnp.nan)  # out of range or unsealed under jit: NaN, not a clamp
    a = jnp.take(bank.a, take, axis=0)
    b = jnp.take(bank.b, take, axis=0)
    b = b * scale.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype)
    y = jax.vmap(branch, out_axes=axis)(inputs, a, b)
    return base + y.astype(base.dtype)


def _examples(layer: _specs.Spec):
    """``(inputs, axis, branch)``: the layer's input with its examples along axis 0, the axis of
    the examples in the layer's output, and ``branch(x, a, b)`` the low-rank branch of one
    example's input ``x`` (no example axis)."""
    low = lambda spec, a, b: _specs.lowrank(spec, a, b, 1.0)
    if isinstance(layer, _specs.Lookup):
        return jnp.asarray(layer.ids), 0, lambda ids, a, b: low(_specs.Lookup(ids[None]), a, b)[0]
    if isinstance(layer, _specs.Conv):
        return layer.x, 0, lambda x, a, b: low(layer._replace(x=x[None]), a, b)[0]
    if isinstance(layer, _specs.Grouped):
        raise ValueError("a Bank needs the layer's input to have its examples along its leading axis, but this layer "
                         "is a ragged_dot over tokens sorted by expert (a mixture-of-experts layer's experts).")
    xs, ks, ys = _specs._parse(layer.equation, jnp.ndim(layer.x))
    first = xs[0] if xs else ""
    if not first or first in ks or first not in ys or xs.count(first) > 1:
        raise ValueError(
            f"a Bank needs the layer's input to have its examples along its leading axis, but the layer computes "
            f"'{xs},{ks}->{ys}'."
        )
    axis = ys.index(first)
    return layer.x, axis, lambda x, a, b: jnp.squeeze(low(layer._replace(x=x[None]), a, b), axis)


def _no_merge(kernel: jax.Array, bank: Bank) -> jax.Array:
    raise ValueError(
        f"lora_jax: a Bank holds {bank.size} adapters of one kernel, so it has no one merged kernel; merge one of them "
        "(lj.apply_lora(params, lj.bank_get(bank, i))) or compute the bank factored (lj.wrap with compute='auto' or "
        "'factored', on a layer lora_jax factors)."
    )


def _no_lora(bank: Bank) -> Any:
    raise ValueError(
        f"lora_jax: a Bank holds {bank.size} adapters; export them with lj.bank_to_peft(directory, bank), or one "
        "of them with lj.to_peft(directory, lj.bank_get(bank, i))."
    )


_kind.register_kind(
    Bank,
    _kind.Kind(
        name="bank", axes=axes, merge=_no_merge, unmerge=_no_merge, output=output, as_lora=_no_lora,
        frozen=("scales", "ranks"),
    ),
)  # fmt: skip
