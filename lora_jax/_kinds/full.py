"""A base parameter trained fully beside the adapters (PEFT's ``modules_to_save``).

It rides in the adapter tree like any adapter, so that one tree says what trains: ``wrap``
substitutes it for the frozen base value, ``optimizer`` trains it, ``save``/``to_peft`` write
it and ``apply_lora`` puts it into the merged tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lora_jax._core import kind as _kind


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FullWeight:
    """A trainable copy of one base parameter (a new head, a bias, a norm scale).

    Create them with ``LoraConfig(trainable=...)``: :func:`init` copies the matched base
    parameters in the config's dtype. The merged tree holds ``value`` (cast to the base
    parameter's dtype); :func:`unmerge` cannot restore the base value and refuses.

    Attributes:
      value: the parameter's trained value, shaped like the base parameter.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"body": {"kernel": jnp.ones((8, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
      >>> cfg = lj.LoraConfig(rank=2, targets="body/kernel", trainable="head/kernel")
      >>> lj.init(jax.random.key(0), params, cfg)["head"]["kernel"]
      FullWeight(value=(4, 2))
    """

    value: Any

    def __repr__(self) -> str:
        return f"FullWeight(value={getattr(self.value, 'shape', self.value)})"


_kind.register_kind(
    FullWeight,
    _kind.Kind(
        name="full",
        axes=lambda ad: {"value": tuple(range(len(ad.value.shape)))},
        merge=lambda w, ad: ad.value.astype(w.dtype),
        unmerge=None,  # the base value is gone: unmerge refuses
    ),
)
