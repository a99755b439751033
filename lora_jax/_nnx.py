"""The NNX front end of the layer specs: ``wrap``, ``axis_roles`` and the layer interception.

``wrap(model_or_graphdef)`` returns ``apply(state, lora, *args)``: for each call it rebuilds the
model from ``state`` (``nnx.merge``), puts each adapter into its layer (its arrays as
``nnx.LoRAParam``s, so that ``nnx.scan``/``nnx.vmap``/``nnx.remat`` slice and carry them with
the kernel), gives the layer a subclass of its own class whose ``__call__``/``attend`` add the
adapter kind's factored output (the layer table of ``_layers`` says how the layer applies its
kernel), and runs the model. The model's code and the caller's model are never changed; the
base state is under ``stop_gradient``. ``_attach`` does the same to a model in place, for the
stateful style (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``).
"""

from __future__ import annotations

import contextvars
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import _adapter, _bank, _cost, _layers, _merge, _paths, _quant, _specs

_METHODS = ("__call__", "attend")
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("lora_jax_nnx_call", default=None)
_SUBCLASSES: dict[type, type] = {}


def is_nnx(x: Any) -> bool:
    return isinstance(x, (nnx.Module, nnx.GraphDef))


def wrap(model_or_graphdef: Any, *, strict: bool = True, compute: str = "auto") -> Callable:
    """The NNX form of :func:`lora_jax.wrap` (see there): ``apply(state, lora, *args,
    lora_training=False, lora_rng=None, lora_index=None, **kwargs)`` runs the model's
    ``__call__`` on ``state`` (from ``nnx.split(model)``) with adapters ``lora``, factored, and
    returns its output."""
    graphdef = model_or_graphdef if isinstance(model_or_graphdef, nnx.GraphDef) else nnx.split(model_or_graphdef)[0]

    def apply(
        state: Any, lora: Any, *args, lora_training: bool = False, lora_rng: Any = None, lora_index: Any = None,
        **kwargs,
    ):  # fmt: skip
        if not isinstance(state, nnx.State):
            raise TypeError(
                "lora_jax.wrap: the wrapped NNX apply takes (state, lora, *inputs) with state from "
                f"nnx.split(model); found a {type(state).__name__} as state."
            )
        if lora_training and lora_rng is None:
            raise ValueError("lora_jax.wrap: lora_training=True needs lora_rng=<a PRNG key> for the LoRA dropout.")
        by_path = _merge.adapters_by_path(lora, "lora_jax.wrap")
        _merge.check_fit(state, by_path, "lora_jax.wrap")
        state = jax.tree.map(_frozen, _quant.dequantize(state))  # a quantized base: float inside the call
        substituted = {p: ad for p, ad in by_path.items() if _adapter.kind_of(ad).output is None}
        layered = {p: ad for p, ad in by_path.items() if p not in substituted}

        def run(factored: dict, merged: dict) -> _layers.Pass:
            model = nnx.merge(graphdef, _merge.apply_lora(state, _nest(merged)) if merged else state)
            call = _Call(model, factored, lora_rng if lora_training else None, watch=set(merged) - set(substituted))
            token = _ACTIVE.set(call)
            try:
                out = model(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)
            call.raise_problems()
            called = lambda path: _module_of(path) in call.visited  # noqa: E731
            return _layers.Pass(out, call.consumed, called, call.calls.usages())

        with _bank.indexed(lora_index):
            return _layers.run_adapted(
                run, layered, substituted, strict=strict, compute=compute, training=lora_training
            )

    return apply


def axis_roles(model: nnx.Module, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The NNX form of :func:`lora_jax.axis_roles`: the roles of the kernels of the layers the
    model's ``__call__`` calls, traced abstractly (``jax.eval_shape``, no FLOPs); a kernel
    stacked by ``nnx.vmap`` and called inside ``nnx.scan`` gets ``"stack"`` for its layer axis."""
    graphdef, state = nnx.split(model)
    found: dict[str, tuple] = {}

    def trace(state):
        copy = nnx.merge(graphdef, state)
        call = _Call(copy, {}, None, record=found)
        token = _ACTIVE.set(call)
        try:
            return copy(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    jax.eval_shape(trace, state)
    return _layers.with_stacks(found, state)


# An adapter rides in its layer: each array as the nnx.LoRAParam '<kernel>__lora_<array>', its
# class and static fields as the static attribute '<kernel>__lora'.
_SUFFIX = "__lora"
_PATH = "lora_jax_path__"  # and the layer's path in the model as a static attribute


def layer_roles(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """The roles of the kernels of ``model``'s built-in layers, read off the layers themselves
    (no call): leading axes a kernel has beyond the layer's own (``nnx.vmap``) are stacks."""
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
        n = lambda v: len(v) if isinstance(v, (tuple, list)) else 1  # noqa: E731
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


class _Call(_layers.Seen):
    """One adapted call of a model: its adapted layers given their adapters (as ``nnx.LoRAParam``
    attributes, so that NNX transforms slice and carry them with the kernels) and an
    intercepting class; what the layers saw."""

    def __init__(
        self, model: nnx.Module | None, adapters: dict[str, Any], rng: Any, record: dict | None = None, watch=()
    ):
        super().__init__()
        self.rng, self.record = rng, record
        owners: dict[tuple, dict[str, Any]] = {}
        for kernel_path, adapter in adapters.items():
            owners.setdefault(_module_of(kernel_path), {})[kernel_path.split("/")[-1]] = adapter
        watched = {_module_of(p) for p in watch}  # layers of merged adapters: whether they are called
        for keys, module in nnx.iter_graph(model) if model is not None else ():
            if isinstance(module, nnx.Module) and (record is not None or tuple(keys) in owners.keys() | watched):
                setattr(module, _PATH, _paths.join(str(k) for k in keys))
                for param, adapter in owners.get(tuple(keys), {}).items():
                    _put(module, param, adapter)
                module.__class__ = _intercepting(type(module))

    def after(self, module: Any, method: str, args: tuple, kwargs: dict, out: Any) -> Any:
        module_path = getattr(module, _PATH, None)
        if module_path is None:
            return out
        self.visited.add(_module_of(module_path + "/_"))
        use = _layers.describe_call(module, method, args, kwargs)
        if use is None:
            return out
        param, spec = use
        kernel_path = _paths.join([p for p in (module_path, param) if p])
        kernel = getattr(module, param)[...]
        if self.record is not None:
            self.record[kernel_path] = (_specs.roles(spec), tuple(kernel.shape))
            return out
        held = _get(module, param)
        if held is None:
            return out
        rng = self.rng
        key = (lambda: jax.random.fold_in(rng, zlib.crc32(kernel_path.encode()))) if rng is not None else None
        return self.output(kernel_path, module, spec, out, kernel, held, key)


def _put(module: nnx.Module, param: str, adapter: Any) -> None:
    """Store ``adapter`` in ``module`` beside its kernel ``param``: arrays as ``nnx.LoRAParam``."""
    setattr(module, param + _SUFFIX, (type(adapter), tuple(_adapter.static(adapter).items())))
    for name, array in _adapter.arrays(adapter).items():
        setattr(module, f"{param}{_SUFFIX}_{name}", nnx.LoRAParam(array))


def _get(module: nnx.Module, param: str, remove: bool = False) -> Any:
    """The adapter stored in ``module`` for ``param`` (``None`` if there is none)."""
    template = getattr(module, param + _SUFFIX, None)
    if template is None:
        return None
    cls, static = template
    names = _adapter.field_names(cls, static=False)
    arrays = {name: getattr(module, f"{param}{_SUFFIX}_{name}")[...] for name in names}
    if remove:
        for name in [param + _SUFFIX] + [f"{param}{_SUFFIX}_{name}" for name in names]:
            delattr(module, name)
    return cls(**arrays, **dict(static))


def _intercepting(cls: type) -> type:
    """``cls`` with its ``__call__``/``attend`` reporting to the active call (one subclass per class)."""
    if cls in _SUBCLASSES.values():
        return cls
    if cls not in _SUBCLASSES:
        namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        for name in _METHODS:
            if callable(getattr(cls, name, None)):
                namespace[name] = _reporting(cls, name)
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _SUBCLASSES[cls]


def _reporting(cls: type, name: str) -> Callable:
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        call = _ACTIVE.get()
        if call is None:  # the stateful style: adapters attached to the model itself
            merged = _merged_call(self, name, args, kwargs)
            if merged is not None:
                return merged(original)
            call = _Call(None, {}, None)
        out = original(self, *args, **kwargs)
        return call.after(self, name, args, kwargs, out)

    return method


_COMPUTE = "lora_jax_compute__"  # attach's compute mode, a static attribute of each adapted layer


def _merged_call(module: nnx.Module, method: str, args: tuple, kwargs: dict) -> Callable | None:
    """For an attached adapter that this call computes merged (by ``attach``'s ``compute``
    and the cost model), ``run(original)`` calling ``original`` on a copy of the layer whose
    kernel is ``W + scale·a⋅b``; ``None`` to compute the call as usual (factored)."""
    use = _layers.describe_call(module, method, args, kwargs)
    held = None if use is None else _get(module, use[0])
    if use is None or held is None:
        return None
    param, spec = use
    variable = getattr(module, param)
    kernel = variable[...]
    adapter = _adapter.localize(held, tuple(kernel.shape), _specs.roles(spec))
    compute = getattr(module, _COMPUTE, "auto")
    if isinstance(adapter, str) or compute == "factored":
        return None  # a misfit is reported by the factored call
    if compute == "auto":
        if not _cost.mergeable(adapter):
            return None
        cost = _cost.costs(adapter, [_cost.usage(spec, tuple(kernel.shape))])
        if cost is None or cost[1] >= cost[0]:
            return None

    def run(original: Callable) -> Any:
        # A transient copy of the layer holding the merged kernel: mutating the layer itself
        # is refused under a jax transform other than the one that made it.
        merged = object.__new__(type(module))
        vars(merged).update(vars(module))
        vars(merged)[param] = type(variable)(_merge.fold_kernel(kernel, adapter))
        return original(merged, *args, **kwargs)

    return run


def _frozen(x: Any) -> Any:
    floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    return jax.lax.stop_gradient(x) if floating else x


def _module_of(path: str) -> tuple:
    """The module path owning a kernel path, with NNX's integer keys restored."""
    return tuple(int(k) if k.isdigit() else k for k in path.split("/")[:-1])


def _nest(adapters: dict[str, Any]) -> dict:
    return _paths.nest((tuple(int(k) if k.isdigit() else k for k in p.split("/")), ad) for p, ad in adapters.items())
