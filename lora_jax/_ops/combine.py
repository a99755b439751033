"""Adapter arithmetic: one adapter tree from several, with PEFT's ``add_weighted_adapter`` methods.

Per adapted kernel, with weight ``w_i`` and scale ``s_i`` of adapter ``i``:

- ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` combine
  the ``a`` factors with weights ``sign(w_i s_i)·√|w_i s_i|`` and the ``b`` factors with
  ``√|w_i s_i|`` (equal ranks; every adapter must adapt the same kernels);
- ``"cat"`` stacks ``w_i s_i a_i`` and ``b_i`` along the rank (ranks add; exact:
  ``ΔW = Σ w_i s_i a_i b_i``);
- ``"svd"`` (and ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"``) combines the ``ΔW_i = s_i a_i b_i`` and re-factors the result
  to ``rank`` (default: the largest rank) by an SVD in float32.

The combination rules are PEFT's (``peft.utils.merge_utils``): ``ties`` keeps the ``density``
largest magnitudes of each tensor, elects a sign per entry (``"total"``: of the sum,
``"frequency"``: of the count) and averages the entries that agree with it; ``dare`` keeps
each entry with probability ``density`` and rescales by ``1/density`` (drawn from ``key``:
deterministic given it); ``magnitude_prune`` prunes as ``ties`` does, then sums. The result
has ``alpha = rank`` (scale 1), as PEFT's combined adapter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._kinds import lora as _lora
from lora_jax._ops.config import check_key

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
           "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # fmt: skip
_WHERE = "lora_jax.combine"


def combine(
    adapters: Sequence[Any],
    weights: Sequence[float],
    method: str = "svd",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> dict:
    """One adapter tree from several, as PEFT's ``add_weighted_adapter`` builds one.

    Args:
      adapters: adapter trees (plain LoRA, or kinds with a LoRA form) for the same params.
      weights: one number per tree (negative subtracts).
      method: PEFT's ``combination_type``: ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``,
        ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` or an ``*_svd`` variant of the
        last four (see the module docstring).
      rank: the rank of an ``*svd`` result (default: the largest input rank).
      density: the fraction kept by ``ties``/``dare``/``magnitude_prune``, in (0, 1].
      majority_sign_method: ``"total"`` or ``"frequency"`` (``ties``, ``dare_ties``).
      key: the PRNG key of ``dare`` methods.

    Returns:
      An adapter tree of ``lj.Adapter``s, ``alpha = rank``.

    Raises:
      ValueError, TypeError: on a method, weights, density, rank or key that do not fit, on
        ``linear``-like methods over adapters of different ranks or kernels, on adapters
        whose roles differ for one kernel.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
      >>> one, two = (lj.init(jax.random.key(i), params, lj.LoraConfig(rank=2)) for i in (0, 1))
      >>> both = lj.combine([one, two], [1.0, 0.5], "cat")
      >>> both["dense"]["kernel"].rank
      4
    """
    rank = _check_arguments(adapters, weights, method, rank, density, majority_sign_method, key)
    trees = [_lora_forms(_tree.adapters_by_path(tree, _WHERE)) for tree in adapters]
    paths = sorted(set().union(*trees))
    in_place = method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    if in_place:
        _check_same(trees, paths, method)
    keys = list(jax.random.split(key, len(paths))) if key is not None else [None] * len(paths)
    out = []
    for path, k in zip(paths, keys):
        present = [(tree[path], w) for tree, w in zip(trees, weights) if path in tree]
        _check_one_kernel(path, [ad for ad, _ in present])
        rule = method.removesuffix("_svd")
        if method == "cat":
            combined = _cat(present)
        elif in_place:
            combined = _in_place(present, rule, density, majority_sign_method, k)
        else:
            combined = _svd(present, rule, density, majority_sign_method, k, rank)
        out.append((tuple(path.split("/")), combined))
    overflow = [path for path, (_, ad) in zip(paths, out) if not _finite(ad)]
    if overflow:
        raise ValueError(
            f"{_WHERE}: the weights {list(weights)!r} make the combined adapters of {overflow} overflow (inf or NaN "
            "in float32); scale the weights down."
        )
    return _paths.nest(out, _WHERE)


def _check_arguments(adapters: Any, weights: Any, method: str, rank: Any, density: Any, majority_sign_method: str,
                     key: Any) -> int | None:  # fmt: skip
    """Every argument of :func:`combine` checked; the rank normalised."""
    if method not in METHODS:
        raise ValueError(f"{_WHERE}: method must be one of {METHODS}, found {method!r}.")
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"{_WHERE}: adapters must be a non-empty list of adapter trees.")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        found = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(f"{_WHERE}: weights must be a list of {len(adapters)} numbers (one per tree), found {found}.")
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise TypeError(f"{_WHERE}: weights must be finite numbers, found {list(weights)!r}.")
    pruned = any(m in method for m in ("ties", "dare", "magnitude_prune"))
    if pruned and not (isinstance(density, numbers.Real) and 0 < float(density) <= 1):
        raise ValueError(f"{_WHERE}: method {method!r} needs density in (0, 1], found {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        found = repr(majority_sign_method)
        raise ValueError(f"{_WHERE}: majority_sign_method must be 'total' or 'frequency', found {found}.")
    if "dare" in method and key is None:
        raise ValueError(f"{_WHERE}: method {method!r} draws random masks: pass key=jax.random.key(...).")
    if key is not None:
        check_key(key, _WHERE)
    if rank is not None:
        rank = _lora.check_rank(rank, f"{_WHERE}: rank")
    return rank


def _check_one_kernel(path: str, ads: list) -> None:
    """The adapters of one kernel agree on its roles and shape."""
    roles = {ad.roles for ad in ads}
    if len(roles) > 1:
        raise ValueError(f"{_WHERE}: the adapters of {path!r} disagree on its axis roles: {sorted(roles)}.")
    shapes = {ad.kernel_shape for ad in ads}
    if len(shapes) > 1:
        raise ValueError(f"{_WHERE}: the adapters of {path!r} fit kernels of different shapes {sorted(shapes)}; "
                         "they adapt different models.")  # fmt: skip


def _finite(adapter: Any) -> bool:
    """Whether an adapter's arrays are finite (traced arrays, which cannot be checked, pass)."""
    try:
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in _kind.arrays(adapter).values())
    except jax.errors.TracerArrayConversionError:
        return True


def _lora_forms(by_path: dict[str, Any]) -> dict[str, _lora.Adapter]:
    out = {}
    for path, adapter in by_path.items():
        as_lora = _kind.kind_of(adapter).as_lora
        if as_lora is None:
            raise ValueError(f"{_WHERE}: {path!r} is a {type(adapter).__name__}, which has no LoRA form to combine.")
        out[path] = as_lora(adapter)
    return out


def _check_same(trees: list[dict], paths: list[str], method: str) -> None:
    for i, tree in enumerate(trees):
        missing = [p for p in paths if p not in tree]
        if missing:
            raise ValueError(
                f"{_WHERE}: method {method!r} needs every adapter tree to adapt the same kernels; tree {i} lacks "
                f"{missing[:3]}. Use 'cat' or 'svd' for trees with different targets."
            )
    ranks = {ad.rank for tree in trees for ad in tree.values()}
    if len(ranks) > 1:
        raise ValueError(f"{_WHERE}: method {method!r} needs equal ranks, found {sorted(ranks)}; use 'cat' or 'svd'.")


def _cat(present: list[tuple[_lora.Adapter, float]]) -> _lora.Adapter:
    first = present[0][0]
    n_stack = first.roles.count("stack")
    a = jnp.concatenate([ad.a.astype(jnp.float32) * (w * ad.scale) for ad, w in present], axis=-1)
    b = jnp.concatenate([ad.b.astype(jnp.float32) for ad, _ in present], axis=n_stack)
    r = a.shape[-1]
    return _lora.Adapter(a.astype(first.a.dtype), b.astype(first.b.dtype), rank=r, alpha=float(r), roles=first.roles)


def _in_place(present, rule, density, sign_method, key) -> _lora.Adapter:
    first = present[0][0]
    n_stack = first.roles.count("stack")
    scaled = [w * ad.scale for ad, w in present]
    weights_a = jnp.array([math.copysign(math.sqrt(abs(s)), s) for s in scaled], jnp.float32)
    weights_b = jnp.array([math.sqrt(abs(s)) for s in scaled], jnp.float32)
    keys = jax.random.split(key, 2) if key is not None else (None, None)
    a = _merge_tensors([ad.a for ad, _ in present], weights_a, rule, density, sign_method, keys[0], n_stack)
    b = _merge_tensors([ad.b for ad, _ in present], weights_b, rule, density, sign_method, keys[1], n_stack)
    r = first.rank
    return _lora.Adapter(a.astype(first.a.dtype), b.astype(first.b.dtype), rank=r, alpha=float(r), roles=first.roles)


def _svd(present, rule, density, sign_method, key, rank) -> _lora.Adapter:
    first = present[0][0]
    roles, shape = first.roles, first.kernel_shape
    n_stack = roles.count("stack")
    order = [i for i, r in enumerate(roles) if r == "stack"] + [i for i, r in enumerate(roles) if r == "in"]
    order += [i for i, r in enumerate(roles) if r == "out"]
    deltas = [jnp.transpose(_lora.delta(ad), order) for ad, _ in present]  # (stack..., in..., out...), scaled
    weights = jnp.array([w for _, w in present], jnp.float32)
    delta = _merge_tensors(deltas, weights, rule, density, sign_method, key, n_stack)
    stack = tuple(shape[i] for i in order[:n_stack])
    ins = tuple(shape[i] for i, r in enumerate(roles) if r == "in")
    outs = tuple(shape[i] for i, r in enumerate(roles) if r == "out")
    r = rank or max(ad.rank for ad, _ in present)
    r = min(r, math.prod(ins), math.prod(outs))
    matrix = delta.reshape(stack + (math.prod(ins), math.prod(outs)))
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
    a = (u[..., :r] * s[..., None, :r]).reshape(stack + ins + (r,))
    b = vh[..., :r, :].reshape(stack + (r,) + outs)
    return _lora.Adapter(a.astype(first.a.dtype), b.astype(first.b.dtype), rank=r, alpha=float(r), roles=roles)


def _merge_tensors(tensors, weights, rule, density, sign_method, key, n_stack) -> jax.Array:
    """PEFT's ``task_arithmetic``/``ties``/``dare_*``/``magnitude_prune`` over ``tensors`` (each
    pruned per stack slice, as PEFT prunes per module), in float32."""
    stacked = jnp.stack([t.astype(jnp.float32) for t in tensors])
    if rule in ("ties", "magnitude_prune") and density < 1:
        stacked = _per_slice(_magnitude_prune, stacked, n_stack + 1, density)
    elif rule.startswith("dare") and density < 1:
        keep = jax.random.bernoulli(key, density, stacked.shape)
        stacked = jnp.where(keep, stacked / density, 0.0)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if rule in ("ties", "dare_ties"):
        votes = stacked.sum(0) if sign_method == "total" else jnp.sign(stacked).sum(0)
        agree = jnp.sign(stacked) == jnp.where(votes >= 0, 1.0, -1.0)
        return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1)
    return weighted.sum(0)


def _per_slice(f, x: jax.Array, n_lead: int, *args) -> jax.Array:
    flat = x.reshape((-1,) + x.shape[n_lead:])
    return jax.vmap(lambda t: f(t, *args))(flat).reshape(x.shape)


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    """Keep the ``int(density·size)`` largest magnitudes of ``t`` (PEFT's rule)."""
    k = int(density * t.size)
    _, top = jax.lax.top_k(jnp.abs(t).reshape(-1), k)
    mask = jnp.zeros(t.size, bool).at[top].set(True)
    return jnp.where(mask.reshape(t.shape), t, 0.0)
