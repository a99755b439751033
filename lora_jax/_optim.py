"""``optimizer``: an optax transformation that trains the adapters and freezes the base."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax import _adapter, _bank, _full

_TRAIN, _FREEZE = "train", "freeze"


def optimizer(tx: optax.GradientTransformation, *, trainable: Any = None) -> optax.GradientTransformation:
    """Wrap ``tx`` to update only ``'lora'`` in a ``{'params': ..., 'lora': ...}`` tree.

    Base parameters (and adapter arrays that are data but not trained, such as a bank's
    scales) get zero updates from ``optax.set_to_zero`` and hold no optimizer state: ``tx``
    sees only the adapter tree's arrays, through ``optax.multi_transform``.

    For adapter banks trained on mixed batches, pass the batch's index to the update,
    ``tx.update(grads, state, variables, lora_index=index)``: the slots no example used then
    keep their values and their optimizer state exactly (without it they get a zero gradient,
    but ``tx``'s moments decay and weight decay still moves them).
    Base parameters to train fully (PEFT's ``modules_to_save``) are in that tree already,
    as :class:`FullWeight` leaves (``LoraConfig(trainable=...)``), so the optimizer, ``wrap``
    and the files always agree on what trains. Other top-level collections (e.g.
    ``batch_stats``) are frozen too.

    Args:
      tx: the optax transformation for the adapters, e.g. ``optax.adamw(1e-3)``.
      trainable: no longer taken here; use ``LoraConfig(trainable=...)``.

    Returns:
      An ``optax.GradientTransformation`` over the ``{'params', 'lora'}`` dict.

    Raises:
      TypeError: if ``trainable`` is given, or at ``init``/``update`` if the tree is not a
        mapping with a ``'lora'`` key.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> variables = {"params": params,
      ...              "lora": lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))}
      >>> tx = lj.optimizer(optax.adam(1e-3))
      >>> state = tx.init(variables)
      >>> len(jax.tree.leaves(state))  # adam's count, mu and nu of a and b; nothing for the base
      5
    """
    _full.refuse_trainable(trainable, "lora_jax.optimizer")

    def labels(tree: Any) -> dict:
        if not isinstance(tree, Mapping) or "lora" not in tree:
            found = type(tree).__name__ + (f" with keys {sorted(map(str, tree))}" if isinstance(tree, Mapping) else "")
            raise TypeError(
                "lora_jax.optimizer: expected the variables dict {'params': base, 'lora': adapters}, "
                f"found a {found}. Differentiate and update the whole dict, or use `tx` "
                "directly on the adapters alone."
            )
        return {name: _labels(tree[name]) if name == "lora" else _FREEZE for name in tree}

    return optax.multi_transform({_TRAIN: _slots_kept(tx), _FREEZE: optax.set_to_zero()}, labels)


def _slots_kept(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` that, given ``lora_index``, leaves the bank slots absent from it untouched."""
    tx = optax.with_extra_args_support(tx)

    def update(updates: Any, state: Any, params: Any = None, *, lora_index: Any = None, **extra: Any):
        new_updates, new_state = tx.update(updates, state, params, **extra)
        if lora_index is None:
            return new_updates, new_state
        index = _bank.check_index(lora_index, "lora_jax.optimizer: lora_index")

        def keep(new: Any, old: Any | None) -> Any:
            """A bank node of the new updates/state with its unused slots from ``old`` (or zero)."""
            if not isinstance(new, _bank.Bank):
                return new
            n = new.roles.count("stack")
            size = new.a.shape[n]
            used = jnp.zeros(size, bool).at[jnp.where(index >= 0, index, size)].set(True, mode="drop")
            changes = {}
            for name, x in _adapter.arrays(new).items():
                if hasattr(x, "shape"):  # not an optax.MaskedNode (the frozen scales)
                    y = jnp.zeros_like(x) if old is None else getattr(old, name)
                    changes[name] = jnp.where(used.reshape((1,) * n + (size,) + (1,) * (x.ndim - n - 1)), x, y)
            return _adapter.replace(new, **changes)

        is_bank = lambda x: isinstance(x, _bank.Bank)  # noqa: E731
        kept = jax.tree.map(lambda u: keep(u, None), new_updates, is_leaf=is_bank)
        return kept, jax.tree.map(keep, new_state, state, is_leaf=is_bank)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _labels(adapters: Any) -> Any:
    """Train every adapter array except those its kind declares frozen (a bank's scales)."""

    def label(leaf: Any) -> Any:
        frozen = _adapter.kind_of(leaf).frozen if _adapter.is_adapter(leaf) else ()
        if not frozen:
            return _TRAIN
        names = _adapter.field_names(leaf, static=False)
        return _adapter.replace(leaf, **{n: _FREEZE if n in frozen else _TRAIN for n in names})

    return jax.tree.map(label, adapters, is_leaf=_adapter.is_adapter)
