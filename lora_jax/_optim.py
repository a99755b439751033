"""``optimizer``: an optax transformation that trains the adapters and freezes the base."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from lora_jax import _paths

_TRAIN, _FREEZE = "train", "freeze"


def optimizer(
    tx: optax.GradientTransformation, *, trainable: _paths.Pattern | None = None
) -> optax.GradientTransformation:
    """Wrap ``tx`` to update only ``'lora'`` in a ``{'params': ..., 'lora': ...}`` tree.

    Base parameters get zero updates from ``optax.set_to_zero`` and hold no optimizer
    state: ``tx`` sees only the adapter arrays (and the ``trainable`` base arrays), through
    ``optax.multi_transform``. Other top-level collections (e.g. ``batch_stats``) are frozen
    too.

    Args:
      tx: the optax transformation for the adapters, e.g. ``optax.adamw(1e-3)``.
      trainable: base parameters to train fully as well, like PEFT's ``modules_to_save``
        (e.g. a new classifier head): a regex or list of regexes fully matched against the
        path inside ``params`` (``"head/.*"``), or a ``callable(path, leaf) -> bool``.

    Returns:
      An ``optax.GradientTransformation`` over the ``{'params', 'lora'}`` dict.

    Raises:
      TypeError: at ``init``/``update`` if the tree is not a mapping with a ``'lora'`` key.
      ValueError: at ``init``/``update`` if ``trainable`` matches no base parameter.

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
    is_trainable = _paths.compile_pattern(trainable, "trainable")

    def labels(tree: Any) -> dict:
        if not isinstance(tree, Mapping) or "lora" not in tree:
            found = type(tree).__name__ + (f" with keys {sorted(map(str, tree))}" if isinstance(tree, Mapping) else "")
            raise TypeError(
                "lora_jax.optimizer: expected the variables dict {'params': base, 'lora': adapters}, "
                f"found a {found}. Differentiate and update the whole dict, or use `tx` "
                "directly on the adapters alone."
            )
        fixed = {"lora": _TRAIN, "params": _base_labels(tree.get("params"), is_trainable)}
        return {name: fixed.get(name, _FREEZE) for name in tree}

    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, labels)


def _base_labels(tree: Any, is_trainable) -> Any:
    if is_trainable is None or tree is None:
        return _FREEZE
    chosen = []

    def label(keypath, leaf):
        train = is_trainable(_paths.join(_paths.keys_of(keypath)), leaf)
        chosen.append(train)
        return _TRAIN if train else _FREEZE

    out = jax.tree_util.tree_map_with_path(label, tree)
    if chosen and not any(chosen):
        examples = ", ".join(repr(_paths.join(k)) for k, _ in _paths.leaves_with_paths(tree)[:3])
        raise ValueError(
            f"lora_jax.optimizer: trainable matched no base parameter; they exist e.g. as {examples} "
            "(paths inside 'params'; the pattern must match the whole path)."
        )
    return out
