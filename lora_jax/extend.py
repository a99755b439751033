"""What a new adapter kind is written with: ``lj.extend``.

A kind is a frozen dataclass registered with ``jax.tree_util.register_dataclass`` (its arrays
data fields, its hyper-parameters static) plus a :class:`Kind` registered for it with
:func:`register_kind`. The kind's ``output`` receives the use of the kernel as a spec
(:class:`Einsum`, :class:`Conv`, :class:`Lookup` or :class:`Grouped`) and computes the adapted
output with :func:`lowrank` (the factored branch) and :func:`per_output` (an array per output
feature placed in the output's layout); ``costs`` may compare factored and merged training
FLOPs over the uses (:class:`Usage`, :func:`lowrank_costs`). ``create`` lets ``lj.init`` make
the kind from ``LoraConfig(kind=name)``; ``peft`` (a :class:`PeftForm`) writes and reads it in
PEFT's format.

>>> import dataclasses, jax, jax.numpy as jnp, lora_jax as lj
>>> @jax.tree_util.register_dataclass
... @dataclasses.dataclass(frozen=True, eq=False)
... class Gain:  # IA³-like: W' = W · diag(g)
...     g: jax.Array
>>> _ = lj.extend.register_kind(Gain, lj.extend.Kind(
...     name="doc_gain", axes=lambda ad: {"g": (1,)},
...     merge=lambda w, ad: w * ad.g, unmerge=lambda w, ad: w / ad.g))
>>> params = {"dense": {"kernel": jnp.ones((2, 3))}}
>>> lj.apply_lora(params, {"dense": {"kernel": Gain(jnp.arange(3.0))}})["dense"]["kernel"]
Array([[0., 1., 2.],
       [0., 1., 2.]], dtype=float32)
"""

from lora_jax._core.cost import Usage, lowrank_costs
from lora_jax._core.kind import Kind, PeftForm, kind_of, register_kind
from lora_jax._core.specs import Conv, Einsum, Grouped, Lookup, lowrank, per_output

__all__ = [
    "Conv",
    "Einsum",
    "Grouped",
    "Kind",
    "Lookup",
    "PeftForm",
    "Usage",
    "kind_of",
    "lowrank",
    "lowrank_costs",
    "per_output",
    "register_kind",
]
