"""The NNX front end of the engine: ``wrap(model_or_graphdef)`` and ``axis_roles(nnx_model, ...)``.

``wrap`` returns ``apply(state, lora, *args)``: the engine traces ``nnx.merge(graphdef,
state)(*args)`` and evaluates it with every use of an adapted kernel factored, so layers
stacked by ``nnx.vmap`` and run by ``nnx.scan`` are reached like any other. The caller's
model is never changed; the base state is under ``stop_gradient``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from lora_jax._engine import interpret as _interpret
from lora_jax._engine import transform as _transform


def is_nnx(x: Any) -> bool:
    return isinstance(x, (nnx.Module, nnx.GraphDef))


def run_model(graphdef: nnx.GraphDef) -> Callable:
    """``fn(state, *args, **kwargs)``: the model ``graphdef`` on ``state``, called."""
    return lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs)


def wrap(model_or_graphdef: Any, *, strict: bool = True, compute: str = "auto") -> Callable:
    """The NNX form of :func:`lora_jax.wrap` (see there): ``apply(state, lora, *args,
    lora_training=False, lora_rng=None, lora_index=None, **kwargs)`` runs the model's
    ``__call__`` on ``state`` (from ``nnx.split(model)``) with adapters ``lora``, factored, and
    returns its output."""
    graphdef = model_or_graphdef if isinstance(model_or_graphdef, nnx.GraphDef) else nnx.split(model_or_graphdef)[0]

    def check(state: Any) -> None:
        if not isinstance(state, nnx.State):
            raise TypeError(
                "lora_jax.wrap: the wrapped NNX apply takes (state, lora, *inputs) with state from "
                f"nnx.split(model); found a {type(state).__name__} as state."
            )

    return _transform.function_apply(run_model(graphdef), strict=strict, compute=compute, check=check)


def axis_roles(model: nnx.Module, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The NNX form of :func:`lora_jax.axis_roles` (see there)."""
    graphdef, state = nnx.split(model)
    return _interpret.roles(_interpret.Tracer(run_model(graphdef)), state, args, kwargs)


def module_of(path: str) -> tuple:
    """The module path owning a kernel path, with NNX's integer keys restored."""
    return tuple(int(k) if k.isdigit() else k for k in path.split("/")[:-1])
