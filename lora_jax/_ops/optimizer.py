"""``optimizer``: an optax transformation that trains the adapters and freezes the base."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._kinds import bank as _bank

_TRAIN, _FREEZE = "train", "freeze"


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
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
            # Arrays another group of a multi_transform owns (the frozen scales; LoRA+'s other
            # factor) are optax.MaskedNode here, without a shape.
            arrays = {name: x for name, x in _kind.arrays(new).items() if hasattr(x, "shape")}
            if not arrays:
                return new
            n = new.roles.count("stack")
            size = next(iter(arrays.values())).shape[n]
            _bank.check_range(index, size, "lora_jax.optimizer: lora_index")
            used = jnp.zeros(size, bool).at[jnp.where(index >= 0, index, size)].set(True, mode="drop")
            changes = {}
            for name, x in arrays.items():
                y = jnp.zeros_like(x) if old is None else getattr(old, name)
                changes[name] = jnp.where(used.reshape((1,) * n + (size,) + (1,) * (x.ndim - n - 1)), x, y)
            return _kind.replace(new, **changes)

        is_bank = lambda x: isinstance(x, _bank.Bank)
        kept = jax.tree.map(lambda u: keep(u, None), new_updates, is_leaf=is_bank)
        return kept, jax.tree.map(keep, new_state, state, is_leaf=is_bank)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _positive(value: Any, name: str) -> float:
    """``value`` as a float, or a ``ValueError`` unless it is a finite number > 0."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) else None
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"lora_jax.loraplus: {name} must be a finite number > 0 (or a schedule), found {value!r}.")
    return number


def _labels(adapters: Any) -> Any:
    """Train every adapter array except those its kind declares frozen (a bank's scales)."""

    def label(leaf: Any) -> Any:
        frozen = _kind.kind_of(leaf).frozen if _kind.is_adapter(leaf) else ()
        if not frozen:
            return _TRAIN
        names = _kind.field_names(leaf, static=False)
        return _kind.replace(leaf, **{n: _FREEZE if n in frozen else _TRAIN for n in names})

    return jax.tree.map(label, adapters, is_leaf=_kind.is_adapter)


def loraplus(
    make: Callable[[Any], optax.GradientTransformation],
    *,
    learning_rate: float | optax.Schedule,
    ratio: float,
    embedding_learning_rate: float | optax.Schedule = 1e-6,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): ``b`` learns ``ratio`` times faster than ``a``.

    Groups the adapter arrays as PEFT's ``create_loraplus_optimizer`` does: ``a`` at
    ``learning_rate``; ``b`` and every other 1-D trained vector (a DoRA magnitude per layer, a
    bias trained fully) at ``ratio × learning_rate``; both factors of an embedding's adapter (a
    kernel named ``embedding``) at ``embedding_learning_rate``; other fully trained parameters at
    ``learning_rate``. Each group gets its own ``make(its learning rate)``; arrays a kind keeps
    frozen (a bank's scales) get no update.

    Args:
      make: ``learning_rate -> optax transformation``, e.g. ``optax.adamw`` or
        ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
      learning_rate: ``a``'s learning rate (a number or an optax schedule).
      ratio: ``η_B / η_A`` (the paper suggests 2–16; PEFT's ``loraplus_lr_ratio``).
      embedding_learning_rate: the learning rate of embedding adapters (PEFT's default 1e-6).

    Returns:
      An optax transformation over an adapter tree; wrap it in :func:`optimizer` to train
      ``{'params', 'lora'}`` with the base frozen.

    Raises:
      TypeError: if ``make`` is not callable.
      ValueError: if ``ratio`` or a learning rate given as a number is not a finite number > 0.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> variables = {"params": params, "lora": lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))}
      >>> tx = lj.optimizer(lj.loraplus(optax.adam, learning_rate=1e-4, ratio=16))
      >>> grads = jax.tree.map(jnp.ones_like, variables)
      >>> updates, _ = tx.update(grads, tx.init(variables), variables)
      >>> ad = updates["lora"]["dense"]["kernel"]
      >>> round(float(ad.a[0, 0]), 6), round(float(ad.b[0, 0]), 6)  # adam's first step: -lr·sign(g)
      (-0.0001, -0.0016)
    """
    if not callable(make):
        raise TypeError(f"lora_jax.loraplus: make must be a function learning_rate -> optax transformation, found "
                        f"{make!r}.")  # fmt: skip
    ratio = _positive(ratio, "ratio")
    if not callable(learning_rate):
        learning_rate = _positive(learning_rate, "learning_rate")
    if not callable(embedding_learning_rate):
        embedding_learning_rate = _positive(embedding_learning_rate, "embedding_learning_rate")
    scaled = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
    transforms = {"a": make(learning_rate), "b": make(scaled), "embedding": make(embedding_learning_rate),
                  _FREEZE: optax.set_to_zero()}  # fmt: skip
    return optax.multi_transform(transforms, _loraplus_labels)


def _loraplus_labels(tree: Any) -> Any:
    def label(keypath: Any, leaf: Any) -> Any:
        if not _kind.is_adapter(leaf):
            return "a"
        embedding = _paths.keys_of(keypath)[-1:] == ("embedding",)
        roles = _kind.static(leaf).get("roles")
        n_stack = roles.count("stack") if roles else 0
        frozen = _kind.kind_of(leaf).frozen

        def group(name: str, x: Any) -> str:
            if name in frozen:
                return _FREEZE
            if embedding and roles is not None:
                return "embedding"
            if name == "b" or (name != "a" and getattr(x, "ndim", 0) - n_stack == 1):
                return "b"
            return "a"

        return _kind.replace(leaf, **{n: group(n, x) for n, x in _kind.arrays(leaf).items()})

    return jax.tree_util.tree_map_with_path(label, tree, is_leaf=_kind.is_adapter)
