"""``apply_lora`` / ``unmerge``: fold adapters into their kernels and back out again."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _adapter, _paths


def apply_lora(params: Any, adapters: Any) -> Any:
    """The merged tree: each targeted kernel ``W`` replaced by ``W + scale · a ⋅ b``.

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
      TypeError: if ``adapters`` holds something other than :class:`Adapter` leaves.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
      >>> bool((lj.apply_lora(params, ad)["dense"]["kernel"] == 1).all())  # b = 0
      True
    """
    return _fold(params, adapters, sign=1.0, where="lora_jax.apply_lora")


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
      ValueError, TypeError: as :func:`apply_lora`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
      >>> ad = jax.tree.map(jnp.ones_like, ad)  # a trained adapter
      >>> back = lj.unmerge(lj.apply_lora(params, ad), ad)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0))
      True
    """
    return _fold(merged, adapters, sign=-1.0, where="lora_jax.unmerge")


@functools.partial(jax.jit, static_argnames="sign")
def _fold_kernel(kernel: jax.Array, adapter: _adapter.Adapter, sign: float) -> jax.Array:
    out = kernel.astype(jnp.float32) + sign * _adapter.delta(adapter)
    return out.astype(kernel.dtype)


def _fold(params: Any, adapters: Any, sign: float, where: str) -> Any:
    by_path = adapters_by_path(adapters, where)
    problems = []
    seen = set()

    def fold(keypath, leaf):
        path = _paths.join(_paths.keys_of(keypath))
        adapter = by_path.get(path)
        if adapter is None:
            return leaf
        seen.add(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if shape != adapter.kernel_shape:
            problems.append(
                f"{path!r}: the kernel has shape {shape}, the adapter (a {tuple(adapter.a.shape)}, "
                f"b {tuple(adapter.b.shape)}, roles {adapter.roles}) fits shape {adapter.kernel_shape}"
            )
            return leaf
        return _fold_kernel(leaf, adapter, sign)

    out = jax.tree_util.tree_map_with_path(fold, params)
    missing = [p for p in by_path if p not in seen]
    if missing:
        problems += [f"{p!r}: no such parameter" for p in missing]
        problems.append(f"(params has e.g. {_examples(params)})")
    if problems:
        raise ValueError(f"{where}: adapters do not fit params:" + "".join(f"\n  {p}" for p in problems))
    return out


def adapters_by_path(adapters: Any, where: str) -> dict[str, _adapter.Adapter]:
    """``{path: Adapter}`` of an adapter tree, checking every leaf is an :class:`Adapter`."""
    flat = _paths.leaves_with_paths(adapters, is_leaf=_adapter.is_adapter)
    wrong = [f"{_paths.join(k)!r} ({type(leaf).__name__})" for k, leaf in flat if not _adapter.is_adapter(leaf)]
    if wrong:
        raise TypeError(
            f"{where}: adapters must be a tree of lora_jax.Adapter (from lj.init or lj.load); "
            f"found other leaves at: {', '.join(wrong)}."
        )
    return {_paths.join(k): leaf for k, leaf in flat}


def _examples(params: Any, n: int = 3) -> str:
    paths = [_paths.join(k) for k, _ in _paths.leaves_with_paths(params)]
    return ", ".join(repr(p) for p in paths[:n]) or "nothing"
