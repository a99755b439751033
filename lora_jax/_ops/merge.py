"""``apply_lora`` / ``unmerge``: fold adapters into their kernels and back out again, each
through its kind's ``merge``/``unmerge``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._ops import quantize as _quantize


def apply_lora(params: Any, adapters: Any) -> Any:
    """The merged tree: each targeted kernel ``W`` replaced by ``W + scale · a ⋅ b``
    (or what another adapter kind merges to, e.g. a :class:`FullWeight`'s value).

    The sum is accumulated in float32 at full matmul precision and cast back to ``W``'s
    dtype; every other leaf is passed through as it is. The result has the structure and
    dtypes of ``params`` (a Linen dict or an NNX ``State``); inputs are neither modified
    nor donated. Each kernel's merge is jit-compiled; the whole call is jit-able too.

    Args:
      params: the base parameters.
      adapters: an adapter tree from :func:`init` or :func:`load` for ``params``.

    Returns:
      The merged parameter tree.

    Raises:
      ValueError: if an adapter names a path missing from ``params`` or its shape does not
        fit the kernel there (every such path is listed).
      TypeError: if ``adapters`` holds something other than adapters (:class:`Adapter` or
        another registered kind).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
      >>> bool((lj.apply_lora(params, ad)["dense"]["kernel"] == 1).all())  # b = 0
      True
    """
    return _fold(params, adapters, inverse=False, where="lora_jax.apply_lora")


def unmerge(merged: Any, adapters: Any) -> Any:
    """The inverse of :func:`apply_lora`: each kernel ``W'`` replaced by ``W' - scale · a ⋅ b``.

    ``unmerge(apply_lora(p, ad), ad)`` equals ``p`` up to float32 rounding (and to the
    rounding of ``W``'s own dtype, for a low-precision base).

    Args:
      merged: a parameter tree produced by :func:`apply_lora`.
      adapters: the adapters that were merged into it.

    Returns:
      The base parameter tree.

    Raises:
      ValueError, TypeError: as :func:`apply_lora`; a ``ValueError`` also for a kind that
        cannot be unmerged (a :class:`FullWeight` replaced its base value).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
      >>> ad = jax.tree.map(jnp.ones_like, ad)  # a trained adapter
      >>> back = lj.unmerge(lj.apply_lora(params, ad), ad)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0))
      True
    """
    return _fold(merged, adapters, inverse=True, where="lora_jax.unmerge")


@functools.partial(jax.jit, static_argnames="inverse")
def fold_kernel(kernel: jax.Array, adapter: Any, inverse: bool = False) -> jax.Array:
    """The kind's merge (or unmerge) of one kernel, computed in float32, in ``kernel``'s dtype."""
    kind = _kind.kind_of(adapter)
    fold = kind.unmerge if inverse else kind.merge
    assert fold is not None  # _fold refuses kinds without an unmerge first
    return fold(kernel.astype(jnp.float32), adapter).astype(kernel.dtype)


def _fold(params: Any, adapters: Any, inverse: bool, where: str) -> Any:
    by_path = _tree.adapters_by_path(adapters, where)
    _tree.check_fit(params, by_path, where)
    refuse_quantized(params, where)
    if inverse:
        final = [p for p, ad in by_path.items() if _kind.kind_of(ad).unmerge is None]
        if final:
            raise ValueError(
                f"{where}: these adapters replaced their base values, which cannot be recovered from the "
                "merged tree: "
                + ", ".join(f"{p!r} ({type(by_path[p]).__name__})" for p in final)
                + ". Keep the base tree instead of unmerging."
            )

    def fold(keypath, leaf):
        adapter = by_path.get(_paths.join(_paths.keys_of(keypath)))
        return leaf if adapter is None else fold_kernel(leaf, adapter, inverse)

    return jax.tree_util.tree_map_with_path(fold, params)


def refuse_quantized(params: Any, where: str) -> None:
    """A ``ValueError`` if ``params`` holds quantized kernels (merging needs float kernels)."""
    quantized = [path for path, (_, leaf) in _paths.by_path(params, where).items() if _quantize.is_quantized(leaf)]
    if quantized:
        raise ValueError(
            f"{where}: params hold quantized kernels ({', '.join(repr(p) for p in quantized[:3])}"
            f"{', ...' if len(quantized) > 3 else ''}); merging needs float kernels: pass lj.dequantize(params) "
            "(and lj.quantize the result again to serve it quantized)."
        )


def merge_quantized(params: Any, adapters: Any, *, requantize: bool = True) -> tuple[Any, dict[str, float]]:
    """Serve a QLoRA model: dequantize, merge the adapters, and quantize the merged kernels again.

    Args:
      params: a tree with :class:`Quantized` kernels (from :func:`quantize`).
      adapters: the adapter tree trained over it.
      requantize: quantize each merged kernel with its own method, block size and double
        quantization (``False``: return the float merged tree).

    Returns:
      ``(merged, errors)``: the merged tree and, per re-quantized kernel, the root-mean-square
      error of the re-quantization relative to the merged kernel's RMS (empty without
      ``requantize``).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = lj.quantize({"d": {"kernel": jax.random.normal(jax.random.key(0), (128, 16))}})
      >>> lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2))
      >>> merged, errors = lj.merge_quantized(params, lora)
      >>> merged["d"]["kernel"].method, errors["d/kernel"] < 1e-3  # b = 0: the same kernel, nearly the same codes
      ('nf4', True)
    """
    merged = apply_lora(_quantize.dequantize(params), adapters)
    if not requantize:
        return merged, {}
    quantized = {path: leaf for path, (_, leaf) in _paths.by_path(params, "lora_jax.merge_quantized").items()
                 if _quantize.is_quantized(leaf)}  # fmt: skip
    errors: dict[str, float] = {}

    def again(keypath: Any, leaf: Any) -> Any:
        path = _paths.join(_paths.keys_of(keypath))
        if path not in quantized:
            return leaf
        q = quantized[path]
        new = _quantize.quantize_kernel(leaf, q.method, q.block, q.absmax_scale is not None)
        diff = jnp.asarray(_quantize.dequantize_kernel(new), jnp.float32) - jnp.asarray(leaf, jnp.float32)
        scale = jnp.maximum(jnp.mean(jnp.square(jnp.asarray(leaf, jnp.float32))), 1e-30)
        errors[path] = float(jnp.sqrt(jnp.mean(diff**2) / scale))
        return new

    return jax.tree_util.tree_map_with_path(again, merged), errors
