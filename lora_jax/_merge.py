"""``apply_lora`` / ``unmerge``: fold adapters into their kernels and back out again, each
through its kind's ``merge``/``unmerge``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _adapter, _paths, _quant


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
    kind = _adapter.kind_of(adapter)
    fold = kind.unmerge if inverse else kind.merge
    assert fold is not None  # _fold refuses kinds without an unmerge first
    return fold(kernel.astype(jnp.float32), adapter).astype(kernel.dtype)


def _fold(params: Any, adapters: Any, inverse: bool, where: str) -> Any:
    by_path = adapters_by_path(adapters, where)
    check_fit(params, by_path, where)
    refuse_quantized(params, where)
    if inverse:
        final = [p for p, ad in by_path.items() if _adapter.kind_of(ad).unmerge is None]
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


def check_fit(params: Any, by_path: dict[str, Any], where: str) -> None:
    """Raise a ``ValueError`` listing every adapter whose kernel is missing or mis-shaped."""
    leaves = {path: leaf for path, (_, leaf) in _paths.by_path(params, where).items()}
    shapes = {path: tuple(getattr(leaf, "shape", ())) for path, leaf in leaves.items()}
    problems = []
    for path, adapter in by_path.items():
        dtype = getattr(leaves.get(path), "dtype", None)
        if path not in shapes:
            problems.append(f"{path!r}: no such parameter")
        elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{path!r}: the parameter has dtype {dtype}; only floating-point kernels can be adapted")
        elif not _adapter.fits(shapes[path], adapter):
            problems.append(
                f"{path!r}: the kernel has shape {shapes[path]}, the adapter ({describe(adapter)}) fits shape "
                f"{_adapter.kernel_shape(adapter)}"
            )
    if any(p.endswith("no such parameter") for p in problems):
        problems.append(f"(params has e.g. {', '.join(repr(p) for p in list(shapes)[:3]) or 'nothing'})")
    if problems:
        raise ValueError(f"{where}: adapters do not fit params:" + "".join(f"\n  {p}" for p in problems))


def refuse_quantized(params: Any, where: str) -> None:
    """A ``ValueError`` if ``params`` holds quantized kernels (merging needs float kernels)."""
    quantized = [path for path, (_, leaf) in _paths.by_path(params, where).items() if _quant.is_quantized(leaf)]
    if quantized:
        raise ValueError(
            f"{where}: params hold quantized kernels ({', '.join(repr(p) for p in quantized[:3])}"
            f"{', ...' if len(quantized) > 3 else ''}); merging needs float kernels: pass lj.dequantize(params) "
            "(and lj.quantize the result again to serve it quantized)."
        )


def describe(adapter: Any) -> str:
    """``a (8, 2), b (2, 4), roles ('in', 'out')``: an adapter's arrays and roles, for messages."""
    parts = [f"{n} {tuple(getattr(x, 'shape', ()))}" for n, x in _adapter.arrays(adapter).items()]
    roles = _adapter.static(adapter).get("roles")
    return ", ".join(parts + ([f"roles {roles}"] if roles is not None else []))


def adapters_by_path(adapters: Any, where: str) -> dict[str, Any]:
    """``{path: adapter}`` of an adapter tree, checking every leaf is an adapter whose arrays
    are (possibly abstract) floating-point arrays."""
    flat = _paths.by_path(adapters, where, is_leaf=_adapter.is_adapter)
    wrong = [f"{path!r} ({type(leaf).__name__})" for path, (_, leaf) in flat.items() if not _adapter.is_adapter(leaf)]
    if wrong:
        raise TypeError(
            f"{where}: adapters must be a tree of lora_jax.Adapter (or another adapter kind; from lj.init or "
            "lj.load); "
            f"found other leaves at: {', '.join(wrong)}."
        )
    not_arrays = [
        f"{path!r}: {name} is a {type(x).__name__}" + (f" of dtype {x.dtype}" if hasattr(x, "dtype") else "")
        for path, (_, ad) in flat.items()
        for name, x in _adapter.arrays(ad).items()
        if not (hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
    ]
    if not_arrays:
        raise TypeError(
            f"{where}: adapter arrays must be floating-point arrays (jax.Array, np.ndarray):"
            + "".join(f"\n  {p}" for p in not_arrays)
        )
    return {path: leaf for path, (_, leaf) in flat.items()}
