"""The stateful NNX style: ``attach`` adapters to a model in place, ``detach`` them again.

An attached adapter rides in its layer as ``_nnx`` puts it there for a functional call (its
arrays as ``nnx.LoRAParam``s), and the layer's class is swapped for the intercepting subclass,
so every later call of the layer computes the adapter kind's output, factored or (as
``attach``'s ``compute`` and the cost model say) on a merged copy of its kernel.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from lora_jax import _adapter, _cost, _layers, _merge, _paths
from lora_jax._nnx import _COMPUTE, _PATH, _SUBCLASSES, _SUFFIX, _get, _intercepting, _module_of, _put


def attach(model: nnx.Module, adapters: Any, *, compute: str = "auto") -> None:
    """Put ``adapters`` into ``model`` (the stateful NNX style): each adapted layer gets its
    adapter as an ``nnx.LoRAParam`` attribute and computes the factored branch whenever it is
    called, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and ``nnx.jit`` train only the
    adapters. :func:`detach` takes them out again.

    With ``compute="auto"`` each call of an adapted layer instead runs the layer on its
    merged kernel ``W + scale·a⋅b`` when the cost model says that is cheaper for that call
    (high ranks, many tokens; see :func:`wrap`); ``"factored"``/``"merged"`` force one form.

    Args:
      model: an NNX model (changed in place, as NNX models are).
      adapters: an adapter tree for ``nnx.state(model)`` (from :func:`init`, :func:`load`,
        :func:`from_peft`...); adapter kinds without a factored output are not attachable.
      compute: ``"auto"`` (the default), ``"factored"`` or ``"merged"``.

    Raises:
      TypeError: if ``model`` is not an NNX model or ``adapters`` is not an adapter tree.
      ValueError: if an adapter does not fit ``model``'s parameters or its layer is not one
        lora_jax factors, or ``model`` already has adapters attached.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> lj.attach(model, lj.init(jax.random.key(1), nnx.state(model), lj.LoraConfig(rank=2)))
      >>> type(model.kernel__lora_a).__name__
      'LoRAParam'
      >>> sorted(lj.detach(model))
      ['kernel']
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"lora_jax.attach: model must be a Flax NNX Module, found {type(model).__name__}.")
    _cost.check_mode(compute, "lora_jax.attach")
    by_path = _merge.adapters_by_path(adapters, "lora_jax.attach")
    _merge.check_fit(nnx.state(model), by_path, "lora_jax.attach")
    if _attached(model):
        raise ValueError("lora_jax.attach: the model already has adapters attached; lj.detach(model) them first.")
    modules = {tuple(keys): m for keys, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    problems = []
    for path, adapter in by_path.items():
        module = modules.get(_module_of(path))
        if _adapter.kind_of(adapter).output is None:
            problems.append(f"{path!r}: a {type(adapter).__name__} has no factored form; merge it with lj.apply_lora")
        elif module is None or not _layers.known(type(module)):
            problems.append(f"{path!r}: its layer is not one lora_jax factors (see lj.register_layer)")
    if problems:
        raise ValueError("lora_jax.attach: cannot attach:" + "".join(f"\n  {p}" for p in problems))
    for path, adapter in by_path.items():
        module = modules[_module_of(path)]
        _put(module, path.split("/")[-1], adapter)
        setattr(module, _PATH, "/".join(path.split("/")[:-1]))
        setattr(module, _COMPUTE, compute)
        module.__class__ = _intercepting(type(module))


def detach(model: nnx.Module) -> dict:
    """Take the adapters :func:`attach` put into ``model`` out again and return them as a
    separate adapter tree (for :func:`save`, :func:`to_peft`, :func:`apply_lora`); the layers
    get their own classes back.

    Raises:
      TypeError: if ``model`` is not an NNX model.
      ValueError: if it has no adapters attached.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"lora_jax.detach: model must be a Flax NNX Module, found {type(model).__name__}.")
    leaves = []
    for keys, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module) or type(module) not in _SUBCLASSES.values():
            continue
        for name in [n for n in vars(module) if n.endswith(_SUFFIX)]:
            param = name[: -len(_SUFFIX)]
            keys_ = tuple(k if isinstance(k, int) else str(k) for k in keys)
            leaves.append((keys_ + (param,), _get(module, param, remove=True)))
        for name in (_PATH, _COMPUTE):
            if hasattr(module, name):
                delattr(module, name)
        module.__class__ = type(module).__mro__[1]
    if not leaves:
        raise ValueError("lora_jax.detach: the model has no adapters attached (see lj.attach).")
    return _paths.nest(leaves, "lora_jax.detach")


def _attached(model: nnx.Module) -> bool:
    return any(type(m) in _SUBCLASSES.values() for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module))
