"""``optimizer``: an optax transformation that trains the adapters and freezes the base."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from lora_jax import _full

_TRAIN, _FREEZE = "train", "freeze"


def optimizer(tx: optax.GradientTransformation, *, trainable: Any = None) -> optax.GradientTransformation:
    """Wrap ``tx`` to update only ``'lora'`` in a ``{'params': ..., 'lora': ...}`` tree.

    Base parameters get zero updates from ``optax.set_to_zero`` and hold no optimizer
    state: ``tx`` sees only the adapter tree's arrays, through ``optax.multi_transform``.
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
        return {name: _TRAIN if name == "lora" else _FREEZE for name in tree}

    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, labels)
