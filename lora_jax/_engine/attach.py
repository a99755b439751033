"""The stateful NNX style: ``attach`` adapters to a model in place, ``detach`` them again.

An attached adapter rides in the layer owning its kernel, its arrays as ``nnx.LoRAParam``s
(so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains them), and every module above an
adapted kernel computes its calls through the engine: the outermost call of such a module
runs the module's own ``__call__`` on a copy of its state, with each use of an adapted
kernel factored, and writes back what the call changed (RNG counts, batch statistics).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

from flax import nnx

from lora_jax._core import cost as _cost
from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._engine import interpret as _interpret
from lora_jax._engine import nnx as _nnx
from lora_jax._engine import transform as _transform

_SUFFIX = "__lora"  # '<kernel>__lora_<array>' holds an array; '<kernel>__lora' the class and static fields
_COMPUTE = "lora_jax_compute__"  # attach's compute mode, a static attribute of each intercepting module
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_jax_attached_call", default=False)
_SUBCLASSES: dict[type, type] = {}


def attach(model: nnx.Module, adapters: Any, *, compute: str = "auto") -> None:
    """Put ``adapters`` into ``model`` (the stateful NNX style): each adapted kernel's layer
    gets its adapter as ``nnx.LoRAParam`` attributes, and calls of the model (or of any module
    holding an adapted kernel) compute LoRA factored, so ``nnx.Optimizer(model, tx,
    wrt=nnx.LoRAParam)`` and ``nnx.jit`` train only the adapters. :func:`detach` takes them
    out again.

    Args:
      model: an NNX model (changed in place, as NNX models are).
      adapters: an adapter tree for ``nnx.state(model)`` (from :func:`init`, :func:`load`,
        :func:`from_peft`...); adapter kinds without a factored output are not attachable.
      compute: ``"auto"`` (the default), ``"factored"`` or ``"merged"``, as for :func:`wrap`.

    Raises:
      TypeError: if ``model`` is not an NNX model or ``adapters`` is not an adapter tree.
      ValueError: if an adapter does not fit ``model``'s parameters, has no factored form, or
        ``model`` already has adapters attached.

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
    by_path = _tree.adapters_by_path(adapters, "lora_jax.attach")
    _tree.check_fit(nnx.state(model), by_path, "lora_jax.attach")
    if _attached(model):
        raise ValueError("lora_jax.attach: the model already has adapters attached; lj.detach(model) them first.")
    modules = {tuple(keys): m for keys, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    problems = [
        f"{path!r}: a {type(ad).__name__} has no factored form; merge it with lj.apply_lora"
        for path, ad in by_path.items()
        if _kind.kind_of(ad).output is None
    ]
    if problems:
        raise ValueError("lora_jax.attach: cannot attach:" + "".join(f"\n  {p}" for p in problems))
    for path, adapter in by_path.items():
        owner = _nnx.module_of(path)
        _put(modules[owner], path.split("/")[-1], adapter)
        for n in range(len(owner) + 1):  # every module that holds the kernel computes through the engine
            module = modules.get(owner[:n])
            if module is not None:
                setattr(module, _COMPUTE, compute)
                module.__class__ = _intercepting(type(module))


def detach(model: nnx.Module) -> dict:
    """Take the adapters :func:`attach` put into ``model`` out again and return them as a
    separate adapter tree (for :func:`save`, :func:`to_peft`, :func:`apply_lora`); the modules
    get their own classes back.

    Raises:
      TypeError: if ``model`` is not an NNX model.
      ValueError: if it has no adapters attached.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"lora_jax.detach: model must be a Flax NNX Module, found {type(model).__name__}.")
    leaves = []
    for keys, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module):
            continue
        keys_ = tuple(k if isinstance(k, int) else str(k) for k in keys)
        for param, adapter in _held(module, remove=True).items():
            leaves.append((keys_ + (param,), adapter))
        if type(module) in _SUBCLASSES.values():
            delattr(module, _COMPUTE)
            module.__class__ = type(module).__mro__[1]
    if not leaves:
        raise ValueError("lora_jax.detach: the model has no adapters attached (see lj.attach).")
    return _paths.nest(leaves, "lora_jax.detach")


def _attached(model: nnx.Module) -> bool:
    return any(type(m) in _SUBCLASSES.values() for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module))


def _put(module: nnx.Module, param: str, adapter: Any) -> None:
    """Store ``adapter`` in ``module`` beside its kernel ``param``: arrays as ``nnx.LoRAParam``."""
    setattr(module, param + _SUFFIX, (type(adapter), tuple(_kind.static(adapter).items())))
    for name, array in _kind.arrays(adapter).items():
        setattr(module, f"{param}{_SUFFIX}_{name}", nnx.LoRAParam(array))


def _held(module: nnx.Module, remove: bool = False) -> dict[str, Any]:
    """``{kernel name: adapter}`` stored in ``module`` itself."""
    out = {}
    for attr in [n for n in vars(module) if n.endswith(_SUFFIX)]:
        param = attr[: -len(_SUFFIX)]
        cls, static = getattr(module, attr)
        attrs = {field: f"{param}{_SUFFIX}_{field}" for field in _kind.field_names(cls, static=False)}
        out[param] = cls(**{field: getattr(module, a)[...] for field, a in attrs.items()}, **dict(static))
        if remove:
            for a in [attr, *attrs.values()]:
                delattr(module, a)
    return out


def _intercepting(cls: type) -> type:
    """``cls`` whose ``__call__`` computes through the engine (one subclass per class)."""
    if cls in _SUBCLASSES.values():
        return cls
    if cls not in _SUBCLASSES:
        original = cls.__call__

        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            if _INSIDE.get():
                return original(self, *args, **kwargs)
            return _engine_call(self, original, args, kwargs)

        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__call__": __call__}
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _SUBCLASSES[cls]


def _engine_call(module: nnx.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
    by_path = {
        _paths.join([*map(str, keys), param]): adapter
        for keys, m in nnx.iter_graph(module)
        if isinstance(m, nnx.Module)
        for param, adapter in _held(m).items()
    }
    graphdef, state = nnx.split(module)

    def run(state, *args, **kwargs):
        copy = nnx.merge(graphdef, state)
        token = _INSIDE.set(True)
        try:
            out = original(copy, *args, **kwargs)
        finally:
            _INSIDE.reset(token)
        return out, nnx.state(copy, nnx.Not(nnx.Param))

    tracer = _interpret.Tracer(run)
    compute = getattr(module, _COMPUTE, "auto")
    out, changed = _transform.call(tracer, state, by_path, args, kwargs, strict=False, compute=compute)
    nnx.update(module, changed)
    return out
