"""Building and editing adapter banks: trees of :class:`Bank` leaves, one per adapted kernel.

A bank tree mirrors an adapter tree; slot ``i`` of every leaf holds adapter ``i`` of the
bank (zeros and scale 0 where that adapter does not adapt the kernel). Slots are numbered
in the order the adapters were given; keep your own ``{name: slot}`` map beside it.
"""

from __future__ import annotations

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
from lora_jax._kinds.bank import BASE, Bank, check_seal


def stack(adapters: Sequence[Any], rank: int | None, where: str) -> dict:
    """The bank tree of adapter trees (see :func:`lora_jax.bank`): slot ``i`` is ``adapters[i]``."""
    trees = [_entry(tree, f"{where}: adapters[{i}]") for i, tree in enumerate(adapters)]
    largest = max((ad.rank for tree in trees for _, ad in tree.values()), default=1)
    if rank is None:
        rank = largest
    rank = _lora.check_rank(rank, f"{where}: rank")
    if rank < largest:
        raise ValueError(f"{where}: rank {rank} is below the largest rank of the adapters, {largest}.")
    keys = {path: k for tree in trees for path, (k, _) in tree.items()}
    if not keys:
        raise ValueError(f"{where}: the {len(trees)} adapter trees adapt no kernel; there is nothing to bank.")
    out = []
    for path in sorted(keys):
        present = {i: tree[path][1] for i, tree in enumerate(trees) if path in tree}
        first = next(iter(present.values()))
        misfits = [
            f"adapters[{i}] ({_tree.describe(ad)})"
            for i, ad in present.items()
            if ad.roles != first.roles or ad.kernel_shape != first.kernel_shape
        ]
        if misfits:
            raise ValueError(
                f"{where}: the adapters of {path!r} disagree on its kernel: adapters[{next(iter(present))}] has "
                f"{_tree.describe(first)}, but " + ", ".join(misfits) + "."
            )
        rates = {i: ad.dropout for i, ad in present.items()}
        if len(set(rates.values())) > 1:
            raise ValueError(
                f"{where}: the adapters of {path!r} have LoRA dropout rates {rates}; a bank applies one rate per "
                "kernel (to the layer's input, shared by the batch): give them one rate."
            )
        empty = _empty(first, rank)
        slots = [_slot(present[i], rank) if i in present else empty for i in range(len(trees))]
        out.append((keys[path], _stack(slots, first.roles, rank, first.dropout)))
    return _paths.nest(out, where)


def bank_get(banks: Any, i: int) -> dict:
    """Adapter ``i`` of a bank, as it was put in: padding removed, the kernels it does not
    adapt left out.

    Call it on concrete arrays, outside ``jax.jit``. Its rank is the slot's rank; its alpha is
    the shortest decimal with ``alpha / rank`` equal to the stored scale (an rsLoRA adapter
    comes back as the plain LoRA adapter with the same scale).

    Raises:
      TypeError: if ``banks`` is not a bank tree or its arrays are traced.
      IndexError: if ``i`` is not a slot.
      ValueError: if an optimizer has changed the bank's frozen scales (see :class:`Bank`).
    """
    where = "lora_jax.bank_get"
    by_path = banks_by_path(banks, where)
    i = _slot_index(i, by_path, where)
    out = []
    for path, (keys, b) in by_path.items():
        try:
            slot = {k: np.asarray(x) for k, x in _take(b, i).items()}
        except jax.errors.TracerArrayConversionError:
            raise TypeError(f"{where}: the bank's arrays are traced; read a slot outside jax.jit.") from None
        check_seal(b, f"{where}: {path!r}")
        r = int(slot["ranks"].reshape(-1)[0]) if slot["ranks"].size else 0
        scale = float(slot["scales"].reshape(-1)[0]) if slot["scales"].size else 0.0
        if r == 0 or scale == 0:
            continue
        ad = _lora.Adapter(
            jnp.asarray(slot["a"][..., :r]), jnp.asarray(np.take(slot["b"], range(r), axis=b.roles.count("stack"))),
            rank=r, alpha=_alpha(scale, r), roles=b.roles, dropout=b.dropout,
        )  # fmt: skip
        out.append((keys, ad))
    return _paths.nest(out, where)


def bank_set(banks: Any, i: Any, adapters: Any) -> dict:
    """A new bank with slot ``i`` holding ``adapters`` (``None``: the slot emptied). Shapes and
    static metadata do not change, so a compiled step or forward taking the bank does not
    retrace; jit-able (``i`` may be traced).

    Args:
      banks: a bank tree (:func:`bank`).
      i: the slot.
      adapters: an adapter tree whose kernels all have slots in the bank, ranks at most the
        bank's rank; the bank's kernels it does not adapt get zeros. ``None`` empties the slot.

    Raises:
      TypeError, ValueError: if an adapter has no slot in the bank, a higher rank than the
        bank's, or another kernel shape or roles; IndexError: if ``i`` is not a slot (a
        traced ``i`` outside the slots, which cannot be checked, gives a bank of NaN).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
      >>> ads = [lj.init(jax.random.key(i), params, lj.LoraConfig(rank=2)) for i in range(3)]
      >>> b = lj.bank_set(lj.bank(ads, rank=4), 1, None)
      >>> sorted(lj.bank_get(b, 1)), sorted(lj.bank_get(b, 2))
      ([], ['dense'])
    """
    where = "lora_jax.bank_set"
    by_path = banks_by_path(banks, where)
    i = _slot_index(i, by_path, where)
    slots = _fitted(adapters, by_path, where)
    out = []
    for path, (keys, b) in by_path.items():
        new, n = slots.get(path, _empty_of(b)), b.roles.count("stack")
        out.append((keys, _kind.replace(b, **{k: _put(getattr(b, k), n, i, new[k]) for k in _ARRAYS})))
    return _paths.nest(out, where)


def bank_add(banks: Any, adapters: Any) -> dict:
    """A new bank with ``adapters`` in a new last slot (the bank's shapes grow by one slot,
    so a compiled step retraces once; prefer :func:`bank_set` on a spare empty slot).

    Raises:
      TypeError, ValueError: as :func:`bank_set`.
    """
    where = "lora_jax.bank_add"
    by_path = banks_by_path(banks, where)
    slots = _fitted(adapters, by_path, where)
    out = []
    for path, (keys, b) in by_path.items():
        new, n = slots.get(path, _empty_of(b)), b.roles.count("stack")
        grown = {
            k: jnp.concatenate([getattr(b, k), jnp.expand_dims(jnp.asarray(new[k], getattr(b, k).dtype), n)], axis=n)
            for k in _ARRAYS
        }
        out.append((keys, _kind.replace(b, **grown)))
    return _paths.nest(out, where)


def bank_remove(banks: Any, i: int) -> dict:
    """A new bank without slot ``i``; the later slots move down by one.

    Raises:
      TypeError: if ``banks`` is not a bank tree; IndexError: if ``i`` is not a slot.
    """
    where = "lora_jax.bank_remove"
    by_path = banks_by_path(banks, where)
    if isinstance(i, jax.core.Tracer):
        raise TypeError(f"{where}: removing a slot changes the bank's shapes, so the slot must be a concrete int, "
                        "not traced (call it outside jax.jit, or empty the slot with lj.bank_set(bank, i, None)).")
    i = _slot_index(i, by_path, where)
    if next(iter(by_path.values()))[1].size == 1:
        raise ValueError(f"{where}: the bank has one slot; a bank cannot be empty.")
    out = []
    for keys, b in by_path.values():
        n = b.roles.count("stack")
        out.append((keys, _kind.replace(b, **{k: jnp.delete(getattr(b, k), i, axis=n) for k in _ARRAYS})))
    return _paths.nest(out, where)




# ---- helpers --------------------------------------------------------------------------------


def _entry(tree: Any, where: str) -> dict[str, tuple[tuple, _lora.Adapter]]:
    """``{path: (keys, adapter)}`` of one tree, each adapter in its plain LoRA form."""
    out = {}
    for path, (keys, adapter) in _tree.flatten(tree, where).items():
        as_lora = _kind.kind_of(adapter).as_lora
        if as_lora is None or isinstance(adapter, Bank):
            raise TypeError(f"{where}: {path!r} is a {type(adapter).__name__}, which has no LoRA form for a bank.")
        lora = as_lora(adapter)
        if "shared" in lora.roles:
            raise ValueError(f"{where}: {path!r} is an adapter shared along a kernel axis (roles {lora.roles}); a "
                             "bank holds adapters with one entry per kernel matrix (give that axis the role 'stack').")
        out[path] = (keys, lora)
    return out


_ARRAYS = ("a", "b", "scales", "ranks")  # a Bank's arrays, each with the slot axis after the stack axes


def _slot(ad: _lora.Adapter, rank: int) -> dict[str, jax.Array]:
    n = ad.roles.count("stack")
    a = jnp.pad(jnp.asarray(ad.a), [(0, 0)] * (ad.a.ndim - 1) + [(0, rank - ad.rank)])
    b = jnp.pad(jnp.asarray(ad.b), [(0, rank - ad.rank) if k == n else (0, 0) for k in range(ad.b.ndim)])
    stack = ad.a.shape[:n]
    return {"a": a, "b": b, "scales": jnp.full(stack, ad.scale, jnp.float32),
            "ranks": jnp.full(stack, ad.rank, jnp.float32)}  # fmt: skip


def _empty(ad: _lora.Adapter, rank: int) -> dict[str, jax.Array]:
    n = ad.roles.count("stack")
    a_shape, b_shape = _kind.factor_shapes(ad.kernel_shape, ad.roles, rank)
    dtype, stack = jnp.result_type(ad.a, ad.b), ad.a.shape[:n]
    return {"a": jnp.zeros(a_shape, dtype), "b": jnp.zeros(b_shape, dtype), "scales": jnp.zeros(stack, jnp.float32),
            "ranks": jnp.zeros(stack, jnp.float32)}  # fmt: skip


def _empty_of(b: Bank) -> dict[str, jax.Array]:
    n = b.roles.count("stack")
    return {k: jnp.zeros(x.shape[:n] + x.shape[n + 1 :], x.dtype) for k in _ARRAYS for x in [getattr(b, k)]}


def _stack(slots: list[dict], roles: tuple, rank: int, dropout: float) -> Bank:
    n = roles.count("stack")
    dtype = jnp.result_type(*(s[k] for s in slots for k in ("a", "b")))
    arrays = {k: jnp.stack([s[k].astype(dtype if k in ("a", "b") else jnp.float32) for s in slots], axis=n)
              for k in _ARRAYS}  # fmt: skip
    return Bank(**arrays, rank=rank, roles=roles, dropout=dropout)


def banks_by_path(banks: Any, where: str) -> dict[str, tuple[tuple, Bank]]:
    flat = _paths.by_path(banks, where, is_leaf=_kind.is_adapter)
    wrong = [p for p, (_, leaf) in flat.items() if not isinstance(leaf, Bank)]
    if wrong or not flat:
        raise TypeError(f"{where}: expected a bank tree (from lj.bank); found other leaves at {wrong or 'nothing'}.")
    return flat


def _slot_index(i: Any, by_path: dict, where: str) -> Any:
    n = next(iter(by_path.values()))[1].size
    if isinstance(i, jax.Array) and not isinstance(i, jax.core.Tracer) and i.ndim == 0:
        i = int(i)
    if isinstance(i, jax.core.Tracer):
        return i
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"{where}: the slot must be an int, found {i!r}.")
    i = int(i)
    if not 0 <= i < n:
        base = " (-1 is lj.BASE, the base model alone in a lora_index; it is no slot)" if i == BASE else ""
        raise IndexError(f"{where}: slot {i} is out of range for a bank of {n} slots 0..{n - 1}{base}.")
    return i


def _take(b: Bank, i: int) -> dict[str, jax.Array]:
    n = b.roles.count("stack")
    return {k: jnp.take(getattr(b, k), i, axis=n) for k in _ARRAYS}


def _put(x: jax.Array, axis: int, i: Any, value: Any) -> jax.Array:
    """``x`` with ``value`` at ``i`` along ``axis``; a traced ``i`` outside the slots (which
    cannot be refused under ``jax.jit``) makes every entry NaN rather than write nothing."""
    index = (slice(None),) * axis + (i,)
    out = x.at[index].set(jnp.asarray(value, x.dtype))
    if isinstance(i, jax.core.Tracer):
        out = jnp.where((i >= 0) & (i < x.shape[axis]), out, jnp.nan)
    return out


def _fitted(adapters: Any, by_path: dict[str, tuple[tuple, Bank]], where: str) -> dict[str, dict[str, Any]]:
    """``{path: {array name: value}}`` of one slot's worth of ``adapters``, checked against the bank."""
    if adapters is None:
        return {}
    entry = _entry(adapters, where)
    problems = []
    for path, (_, ad) in entry.items():
        if path not in by_path:
            problems.append(f"{path!r}: the bank has no slot for this kernel (rebuild it with lj.bank)")
            continue
        b = by_path[path][1]
        if ad.rank > b.rank:
            problems.append(f"{path!r}: rank {ad.rank} is above the bank's rank {b.rank} (rebuild with a larger rank=)")
        elif ad.roles != b.roles or ad.kernel_shape != _kind.kernel_shape(b):
            problems.append(
                f"{path!r}: the adapter fits a kernel {ad.kernel_shape} with roles {ad.roles}, the bank's is "
                f"{_kind.kernel_shape(b)} with roles {b.roles}"
            )
        elif ad.dropout != b.dropout:
            problems.append(f"{path!r}: the adapter's LoRA dropout is {ad.dropout}, the bank's {b.dropout} (one rate "
                            "per kernel)")  # fmt: skip
    if problems:
        raise ValueError(f"{where}: the adapters do not fit the bank:" + "".join(f"\n  {p}" for p in problems))
    return {path: _slot(ad, by_path[path][1].rank) for path, (_, ad) in entry.items()}


def _alpha(scale: float, rank: int) -> float:
    """The shortest decimal ``alpha`` with ``float32(alpha / rank) == scale``."""
    target = np.float32(scale)
    for digits in range(1, 18):
        alpha = float(f"{scale * rank:.{digits}g}")
        if alpha > 0 and np.float32(alpha / rank) == target:
            return alpha
    return scale * rank
