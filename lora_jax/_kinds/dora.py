"""DoRA (weight-decomposed LoRA, Liu et al. 2024, arXiv:2402.09353), an adapter kind.

The adapted kernel is split into a direction and a trained magnitude ``m``, one per output
feature (per ``(stack..., out...)`` entry of the kernel):

    W' = m · V / ‖V‖,    V = W + scale · a ⋅ b,    ‖V‖ over the kernel's in axes

(PEFT: per row of its ``(out, in)`` weight; per output channel of a convolution). ``m`` starts
at ``‖W‖``, so a fresh adapter changes nothing. As in the paper (§4.3) and PEFT, ``‖V‖`` is a
constant of the backward pass. The factored forward never forms ``W'``:

    y = bias + (m / ‖V‖) · (x ⋅ W + scale · x ⋅ a ⋅ b)

from the layer's own output ``x ⋅ W + bias``: one low-rank branch, the norm of ``V`` (``I·O·r``
per call, independent of the tokens) and elementwise work on the output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import specs as _specs
from lora_jax._core.kind import Roles
from lora_jax._kinds import lora as _lora


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)  # Adapter's repr names its arrays
class DoraAdapter(_lora.Adapter):
    """The DoRA adapter of one kernel: an :class:`lora_jax.Adapter` ``a``, ``b`` and a magnitude ``m``.

    Create them with ``LoraConfig(kind="dora")`` (or PEFT's spelling ``use_dora=True``);
    :func:`lora_jax.init` sets ``m = ‖W‖``.

    Attributes:
      m: ``(stack..., out...)``: the magnitude of each output feature (keyword only).
      a, b, rank, alpha, roles, rslora, dropout: as :class:`lora_jax.Adapter`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, kind="dora"))["dense"]["kernel"]
      >>> ad.m  # ‖W‖ of each output column
      Array([2.828427, 2.828427, 2.828427, 2.828427], dtype=float32)
    """

    m: Any = dataclasses.field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()  # a, b and the metadata, as lj.Adapter
        m, a, b = (getattr(x, "shape", None) for x in (self.m, self.a, self.b))
        if all(isinstance(s, tuple) for s in (m, a, b)):
            kept = len(a) - self.roles.count("in") - 1  # stack axes a lifted transform has not sliced off
            if m != a[:kept] + b[kept + 1 :]:
                raise ValueError(
                    f"lora_jax.DoraAdapter: m has shape {m}, expected {a[:kept] + b[kept + 1:]} (stack..., out...)."
                )


def axes(ad: DoraAdapter) -> dict[str, tuple[int | None, ...]]:
    return {**_lora.axes(ad), "m": tuple(i for i, r in enumerate(ad.roles) if r != "in")}


def norm(v: jax.Array, roles: Roles) -> jax.Array:
    """``‖v‖`` over the in axes, kept as axes of size 1 (broadcasts against the kernel)."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(i for i, r in enumerate(roles) if r == "in"), keepdims=True))


def in_kernel_layout(m: jax.Array, roles: Roles) -> jax.Array:
    """``m`` ``(stack..., out...)`` with the kernel's in axes inserted as size 1."""
    sizes = iter(m.shape)
    return m.reshape(tuple(1 if r == "in" else next(sizes) for r in roles))


def guarded_norm(v: jax.Array, roles: Roles) -> tuple[jax.Array, jax.Array]:
    """``(‖v‖, nonzero)`` over the in axes (size-1 axes kept), without gradient, with ``1``
    in place of the norm of a column of ``v`` that is exactly zero (``nonzero`` false there).

    Such a column has no direction, and DoRA uses the limit ``m · V/‖V‖ → 0`` for it: the
    column computes only the bias and passes no gradient to ``a``, ``b`` or ``m`` (PEFT divides
    0 by 0 there and gives NaN outputs and gradients)."""
    n = jax.lax.stop_gradient(norm(v, roles))
    return jnp.where(n > 0, n, 1.0), n > 0


def initial_magnitude(kernel: jax.Array, roles: Roles) -> jax.Array:
    """``‖W‖`` per output feature, ``(stack..., out...)``, in float32."""
    n = norm(jnp.asarray(kernel, jnp.float32), roles)
    return n.reshape(tuple(s for s, r in zip(n.shape, roles) if r != "in"))


def create(lora: _lora.Adapter, kernel: jax.Array) -> DoraAdapter:
    """A fresh DoRA adapter: ``lora``'s factors and ``m = ‖W‖`` (in ``lora``'s dtype), which
    must be finite there (checked where concrete)."""
    m = initial_magnitude(kernel, lora.roles).astype(lora.a.dtype)
    try:
        finite = bool(np.isfinite(np.asarray(m)).all())
    except jax.errors.TracerArrayConversionError:
        finite = True
    if not finite:
        raise ValueError(
            f"a column norm of the kernel overflows the adapter dtype {m.dtype.name} as DoRA's magnitude m = ‖W‖ (or "
            "the kernel holds inf/NaN); use LoraConfig(dtype=jnp.float32)."
        )
    return DoraAdapter(**_kind.arrays(lora), m=m, **_kind.static(lora))


def merge(w: jax.Array, ad: DoraAdapter) -> jax.Array:
    """``m · V/‖V‖``; ``‖V‖`` without gradient, as in the factored forward (merged inside a step,
    the gradients are the factored ones)."""
    v = w + _lora.delta(ad)
    n, nonzero = guarded_norm(v, ad.roles)
    return jnp.where(nonzero, in_kernel_layout(ad.m.astype(jnp.float32), ad.roles) * v / n, 0.0)


def _no_unmerge(w: jax.Array, ad: DoraAdapter) -> jax.Array:
    raise ValueError(
        "lora_jax: a DoRA merge cannot be undone from the merged kernel alone: it holds m · V/‖V‖, and ‖V‖ (the norm "
        "of W + scale·a⋅b) is lost in it. Keep the base parameters, or merge again from them."
    )


def output(layer: _specs.Spec, base: jax.Array, kernel: jax.Array, ad: DoraAdapter, dropout) -> jax.Array:
    """``bias + f · (x⋅W + scale · drop(x)⋅a⋅b)`` with ``f = m/‖V‖`` per output feature (``‖V‖``
    without gradient), computed as ``f·base + (1 - f)·bias + scale · drop(x)⋅a⋅(b·f)``: the
    factor folded into ``b``'s columns, so the branch is LoRA's own fused product, and exactly
    the base output for a fresh adapter (``f = 1``)."""
    v = kernel.astype(jnp.float32) + jax.lax.stop_gradient(_lora.delta(ad))
    n, nonzero = guarded_norm(v, ad.roles)
    factor = jnp.where(nonzero.reshape(ad.m.shape), ad.m.astype(jnp.float32) / n.reshape(ad.m.shape), 0.0)
    rank_axis = ad.b.ndim - ad.roles.count("out") - 1  # b: (stack..., r, out...), factor: (stack..., out...)
    b = (ad.b.astype(jnp.float32) * jnp.expand_dims(factor, rank_axis)).astype(ad.b.dtype)
    place = _specs.per_output(layer, ad.roles)
    if place is None:
        lookup = isinstance(layer, _specs.Lookup)
        what = "an embedding lookup" if lookup else "a layer that does not map its input by x⋅W"
        raise ValueError(
            f"DoRA adapts linear layers and convolutions (a magnitude per output feature); this is {what} (e.g. "
            "Embed, or a tied head's attend). Leave it out of the DoRA targets, or adapt it with plain LoRA."
        )
    placed = place(factor)  # float32: a bf16 factor would round every output by 2^-8
    out = placed * base.astype(jnp.float32)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        out = out + (1 - placed) * jnp.asarray(bias, jnp.float32)
    branch = _specs.lowrank(layer, ad.a, b, ad.scale, dropout=dropout)
    return (out + branch.astype(jnp.float32)).astype(base.dtype)


def peft_tensors(ad: DoraAdapter, layer: str) -> dict[str, Any]:
    """PEFT's ``lora_magnitude_vector`` of one module: ``(out,)``, or ``(1, out, 1...)`` for a
    convolution."""
    if layer == "embedding":
        raise ValueError("DoRA on an embedding (PEFT's has a magnitude per row) is not exported")
    size = math.prod(ad.m.shape)
    shape = (1, size) + (1,) * (len(ad.roles) - 2) if layer == "conv" else (size,)
    return {"lora_magnitude_vector": jnp.reshape(ad.m, shape)}


def read_peft(lora: _lora.Adapter, tensors: dict[str, Any], layer: str) -> DoraAdapter:
    """The inverse of :func:`peft_tensors`, from the module's LoRA part."""
    tensors = dict(tensors)
    magnitude = tensors.pop("lora_magnitude_vector", None)
    if tensors or magnitude is None:
        found = f"{sorted(tensors)} besides its factors" if tensors else "no lora_magnitude_vector"
        raise ValueError(f"the config says use_dora: true but the module has {found}")
    out = tuple(lora.b.shape[1:])
    want = (1, math.prod(out)) + (1,) * (lora.a.ndim - 2) if layer == "conv" else (math.prod(out),)
    if layer == "embedding" or magnitude.shape != want or not jnp.issubdtype(magnitude.dtype, jnp.floating):
        found = "an embedding" if layer == "embedding" else f"{magnitude.dtype}{list(magnitude.shape)}"
        raise ValueError(f"its DoRA lora_magnitude_vector is {found}, expected a float vector of shape {want} "
                         "(one magnitude per output feature)")  # fmt: skip
    return DoraAdapter(**_kind.arrays(lora), m=jnp.asarray(magnitude).reshape(out), **_kind.static(lora))


_kind.register_kind(
    DoraAdapter,
    _kind.Kind(
        name="dora", axes=axes, merge=merge, unmerge=_no_unmerge, output=output, create=create,
        peft=_kind.PeftForm(config={"use_dora": True}, tensors=peft_tensors, read=read_peft),
    ),
)  # fmt: skip
