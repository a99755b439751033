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

from lora_jax import _engine, _paths, _specs, _transform


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
    return _engine.roles(_engine.Tracer(run_model(graphdef)), state, args, kwargs)


def layer_roles(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """The roles of the kernels of ``model``'s built-in Flax layers, read off the layers
    themselves (no call; for :func:`lora_jax.init` on a model): leading axes a kernel has
    beyond the layer's own (``nnx.vmap``) are stacks. Other kernels need ``axis_roles``."""
    out = {}
    for keys, module in nnx.iter_graph(model):
        local = _own_roles(module) if isinstance(module, nnx.Module) else None
        if local is None:
            continue
        param, own = local
        kernel = getattr(module, param, None)
        ndim = len(getattr(kernel, "shape", ()))
        if ndim >= len(own):
            out[_paths.join([*map(str, keys), param])] = ("stack",) * (ndim - len(own)) + own
    return out


def _own_roles(module: nnx.Module) -> tuple[str, tuple[str, ...]] | None:
    if isinstance(module, nnx.LinearGeneral):
        n = lambda v: len(v) if isinstance(v, (tuple, list)) else 1
        roles = (
            ("stack",) * len(module.batch_axis) + ("in",) * n(module.in_features) + ("out",) * n(module.out_features)
        )
        return "kernel", roles
    if isinstance(module, nnx.Einsum):
        x, k, y = module.einsum_str.replace(" ", "").replace("->", ",").split(",")
        try:
            return "kernel", _specs._einsum_roles(x.replace("...", ""), k, y.replace("...", ""))
        except ValueError:
            return None
    if isinstance(module, nnx.Conv):
        size = module.kernel_size if isinstance(module.kernel_size, (tuple, list)) else (module.kernel_size,)
        return "kernel", ("in",) * (len(size) + 1) + ("out",)
    if isinstance(module, nnx.Linear):
        return "kernel", ("in", "out")
    if isinstance(module, nnx.Embed):
        return "embedding", ("in", "out")
    return None


def module_of(path: str) -> tuple:
    """The module path owning a kernel path, with NNX's integer keys restored."""
    return tuple(int(k) if k.isdigit() else k for k in path.split("/")[:-1])
