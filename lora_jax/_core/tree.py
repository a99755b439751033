"""The validating tree algebra: an adapter tree read as ``{path: adapter}`` (every leaf checked
to be an adapter of floating-point arrays), checked against the parameters it is for, and
described in messages. Every operation on adapter trees starts here."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths


def describe(adapter: Any) -> str:
    """``a (8, 2), b (2, 4), roles ('in', 'out')``: an adapter's arrays and roles, for messages."""
    parts = [f"{n} {tuple(getattr(x, 'shape', ()))}" for n, x in _kind.arrays(adapter).items()]
    roles = _kind.static(adapter).get("roles")
    return ", ".join(parts + ([f"roles {roles}"] if roles is not None else []))


def flatten(adapters: Any, where: str) -> dict[str, tuple[_paths.Keys, Any]]:
    """``{path: (keys, adapter)}`` of an adapter tree, in tree order, checking that every leaf is
    an adapter whose arrays are (possibly abstract) floating-point arrays and that no two
    leaves share a path. :func:`lora_jax._core.paths.nest` is the inverse."""
    flat = _paths.by_path(adapters, where, is_leaf=_kind.is_adapter)
    wrong = [f"{path!r} ({type(leaf).__name__})" for path, (_, leaf) in flat.items() if not _kind.is_adapter(leaf)]
    if wrong:
        raise TypeError(
            f"{where}: adapters must be a tree of lora_jax.Adapter (or another adapter kind; from lj.init or "
            "lj.load); "
            f"found other leaves at: {', '.join(wrong)}."
        )
    not_arrays = [
        f"{path!r}: {name} is a {type(x).__name__}" + (f" of dtype {x.dtype}" if hasattr(x, "dtype") else "")
        for path, (_, ad) in flat.items()
        for name, x in _kind.arrays(ad).items()
        if not (hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
    ]
    if not_arrays:
        raise TypeError(
            f"{where}: adapter arrays must be floating-point arrays (jax.Array, np.ndarray):"
            + "".join(f"\n  {p}" for p in not_arrays)
        )
    return flat


def adapters_by_path(adapters: Any, where: str) -> dict[str, Any]:
    """``{path: adapter}`` of an adapter tree, validated as by :func:`flatten`."""
    return {path: leaf for path, (_, leaf) in flatten(adapters, where).items()}


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
        elif not _kind.fits(shapes[path], adapter):
            problems.append(
                f"{path!r}: the kernel has shape {shapes[path]}, the adapter ({describe(adapter)}) fits shape "
                f"{_kind.kernel_shape(adapter)}"
            )
    if any(p.endswith("no such parameter") for p in problems):
        problems.append(f"(params has e.g. {', '.join(repr(p) for p in list(shapes)[:3]) or 'nothing'})")
    if problems:
        raise ValueError(f"{where}: adapters do not fit params:" + "".join(f"\n  {p}" for p in problems))


def map_adapters(f: Any, tree: Any, where: str) -> dict:
    """A new adapter tree, nested as ``tree``: ``f(path, adapter)`` for each of its adapters
    (validated as by :func:`flatten`)."""
    return _paths.nest([(keys, f(path, adapter)) for path, (keys, adapter) in flatten(tree, where).items()], where)
