"""The Linen front end of the engine: ``wrap(model.apply)`` and ``axis_roles(linen_model, ...)``.

The wrapped apply takes ``{'params': base, 'lora': adapters, ...}``: the engine traces
``model.apply`` on the base and the other collections, and evaluates it with every use of an
adapted kernel factored (:mod:`lora_jax._engine.interpret`), whatever layer makes that use.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
from flax import nnx

from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._engine import interpret as _interpret
from lora_jax._engine import transform as _transform

_DROPOUT_STREAM = 0x10A  # LoRA dropout keys are folded from rngs['dropout'] with this


def is_linen_apply(apply_fn: Any) -> bool:
    fn = apply_fn.func if isinstance(apply_fn, functools.partial) else apply_fn
    owner = getattr(fn, "__self__", None)
    return inspect.ismethod(fn) and isinstance(owner, nn.Module) and fn.__name__ == "apply"


def wrap(apply_fn: Callable, *, strict: bool, compute: str) -> Callable:
    """The Linen form of :func:`lora_jax.wrap` (see there)."""
    tracer = _interpret.Tracer(lambda params, others, *args, **kwargs: apply_fn({"params": params, **others}, *args,
                                                                            **kwargs))  # fmt: skip

    @functools.wraps(apply_fn)
    def apply(variables: Mapping, *args, lora_training: bool = False, lora_index: Any = None, **kwargs):
        if not isinstance(variables, Mapping) or "lora" not in variables or "params" not in variables:
            found = sorted(map(str, variables)) if isinstance(variables, Mapping) else type(variables).__name__
            raise TypeError(
                "lora_jax.wrap: the wrapped apply takes variables {'params': base, 'lora': adapters, ...}; "
                f"found {found}."
            )
        rngs = kwargs.get("rngs")
        if lora_training and not (isinstance(rngs, Mapping) and "dropout" in rngs):
            raise ValueError("lora_jax.wrap: lora_training=True needs a dropout rng: pass rngs={'dropout': key}.")
        params = flax.core.unfreeze(variables["params"])
        by_path = _tree.adapters_by_path(variables["lora"], "lora_jax.wrap")
        _check_paths_exist(_paths.by_path(params, "lora_jax.wrap"), by_path)
        _tree.check_fit(params, by_path, "lora_jax.wrap")
        others = {k: v for k, v in variables.items() if k not in ("params", "lora")}
        rng = jax.random.fold_in(rngs["dropout"], _DROPOUT_STREAM) if lora_training and rngs else None
        return _transform.call(tracer, params, by_path, (others, *args), kwargs, strict=strict, compute=compute,
                               rng=rng, lora_index=lora_index)  # fmt: skip

    return apply


def axis_roles(model: nn.Module, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The Linen form of :func:`lora_jax.axis_roles` (see there)."""

    def init():
        key = jax.random.key(0)  # only shapes are computed: no value depends on it
        return model.init({"params": key, "dropout": key}, *args, **kwargs)

    variables = flax.core.unfreeze(jax.eval_shape(init))
    params = variables.pop("params", {})

    def run(params, others, *args, **kwargs):
        key = jax.random.key(0)
        return model.apply({"params": params, **others}, *args, rngs={"dropout": key}, mutable=True, **kwargs)

    return _interpret.roles(_interpret.Tracer(run), params, (variables, *args), kwargs)


def check_apply(apply_fn: Any) -> None:
    """A ``TypeError`` for the near misses of a Linen apply (a module itself, an NNX method)."""
    fn = apply_fn.func if isinstance(apply_fn, functools.partial) else apply_fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nnx.Module):
        found = f"a method of the NNX model {type(owner).__name__}; pass the model itself: lj.wrap(model)"
    elif isinstance(apply_fn, nn.Module):
        found = f"the Linen model {type(apply_fn).__name__} itself; pass its apply: lj.wrap(model.apply)"
    elif isinstance(owner, nn.Module):
        found = f"{type(owner).__name__}.{fn.__name__}; pass the model's apply: lj.wrap(model.apply)"
    elif not callable(apply_fn):
        found = f"a {type(apply_fn).__name__}, which is not callable"
    else:
        return
    raise TypeError(
        "lora_jax.wrap: expected a function fn(params, *args), a Flax Linen model's apply (lj.wrap(model.apply)) "
        f"or an NNX model; found {found}."
    )


def _check_paths_exist(existing: dict[str, Any], by_path: dict[str, Any]) -> None:
    missing = [p for p in by_path if p not in existing]
    if missing:
        examples = ", ".join(repr(p) for p in sorted(existing)[:3])
        raise ValueError(
            "lora_jax.wrap: adapters name kernels that params lacks:"
            + "".join(f"\n  {p!r}" for p in missing)
            + f"\n(params has e.g. {examples}); were the adapters made for another model?"
        )
