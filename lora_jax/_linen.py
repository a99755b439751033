"""``wrap`` and ``axis_roles``: LoRA for any Flax Linen model through method interception.

``wrap(model.apply)`` runs the model unchanged under ``flax.linen.intercept_methods``: each
call of a layer in the layer table (``_layers``) whose kernel has an adapter is turned into a
layer spec, and its output replaced by the adapter kind's factored output (for LoRA,
``base output + scale·(x⋅a)⋅b``). Adapters are handed to the model inside its ``params`` collection,
beside their kernels, so lifted transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) slice
them exactly as they slice the kernels; the base itself is wrapped in ``stop_gradient``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
from flax import nnx

from lora_jax import _adapter, _bank, _cost, _full, _layers, _merge, _nnx, _paths, _quant, _specs

_SUFFIX = "@lora"  # an adapter rides in params as '<kernel name>@lora' beside its kernel


def wrap(apply_fn: Callable, *, strict: bool = True, compute: str = "auto", trainable: Any = None) -> Callable:
    """A Linen ``apply`` that takes ``{'params': base, 'lora': adapters}`` and computes LoRA
    factored, ``x⋅W + scale·(x⋅a)⋅b``, without forming ``W'`` (or merged inside the call for
    the kernels where that is cheaper: see ``compute``).

    The output equals ``apply_fn({'params': apply_lora(base, adapters)}, ...)``; gradients
    reach the adapters only (and the :class:`FullWeight` parameters among them, which
    replace their base values): the base is under ``stop_gradient``, so the optimizer never
    sees it, and a factored kernel gets no weight gradient at all. Factored layers: ``nn.Dense``, ``nn.DenseGeneral``,
    ``nn.Einsum``, ``nn.Conv`` (ungrouped), ``nn.Embed`` (``__call__`` and ``attend``), their
    subclasses and any layer added with :func:`register_layer`, also inside ``nn.scan``/
    ``nn.remat``/``nn.vmap``. A targeted kernel of any other layer is merged instead, with a
    warning.

    Given a Flax NNX model (or its ``GraphDef``) instead, it returns ``apply(state, lora,
    *args, lora_training=False, lora_rng=None, **kwargs)`` that runs the model's ``__call__``
    on ``state`` (from ``nnx.split(model)``) with the adapters, factored, and returns its
    output; ``lora_rng`` is the dropout key. Layers stacked by ``nnx.vmap`` and called inside
    ``nnx.scan``/``nnx.remat`` are factored too.

    Each call chooses, per adapted kernel, the cheaper of two computations of the same
    result (``compute="auto"``): the factored branch, or merging ``W + scale·a⋅b`` inside the
    call and letting the layer use the merged kernel (the base still frozen, the gradient
    reaching the adapter through the merge). A training-step FLOP model over static shapes
    (tokens, in, out, rank; ``lj.lowrank_costs``) decides; merging pays off only for ranks
    above ``in·out / (3·(in + out))`` (42.7 for a 256 × 256 kernel), and only then is the model
    first traced abstractly to count each layer's tokens. ``"factored"`` and ``"merged"``
    force one form for every kernel.

    The returned function has ``apply_fn``'s signature plus two keywords: ``lora_training``
    (default ``False``): when true, the LoRA branch input gets dropout at each adapter's
    ``dropout`` rate (PEFT's semantics), drawn from ``rngs['dropout']``; ``lora_index``: for
    adapter banks (:func:`bank`), an int array ``(batch,)`` naming each example's slot
    (``-1``: the base alone); see :func:`bank_index`.

    The branch of ``Dense``/``DenseGeneral`` has a hand-written backward pass (a
    ``jax.custom_vjp``): reverse mode (``jax.grad``, ``jax.vjp``, also nested) works,
    forward mode (``jax.jvp``, ``jax.jacfwd``) does not; merge with :func:`apply_lora` for
    those.

    Args:
      apply_fn: a Linen model's ``apply``, e.g. ``model.apply`` (or a ``functools.partial``
        of it), or an NNX model or ``GraphDef``.
      strict: if true (the default), an adapter of a kernel that the call never uses is an
        error; pass ``False`` to call one part of a model (``method=encode``) with the
        adapters of the whole model.
      compute: ``"auto"`` (the default), ``"factored"`` or ``"merged"``: see above. Adapters
        with active dropout are always factored (``"merged"`` refuses them).
      trainable: no longer taken here: base parameters to train fully are chosen once, with
        ``LoraConfig(trainable=...)``, and travel in the adapter tree.

    Returns:
      ``apply(variables, *args, lora_training=False, lora_index=None, **kwargs)``.

    Raises:
      TypeError: if ``apply_fn`` is not a Linen ``apply``, or ``variables`` lacks ``'lora'``.
      ValueError: (when called) if an adapter names a kernel that ``params`` lacks or (with
        ``strict``) that the model never uses, if its roles or shape contradict how the
        layer uses the kernel, or if ``lora_training`` is set without a dropout rng.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax as lj
      >>> model, x = nn.Dense(4), jnp.ones((3, 8))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2))
      >>> apply = lj.wrap(model.apply)
      >>> bool((apply({"params": params, "lora": lora}, x) == model.apply({"params": params}, x)).all())
      True
    """
    _full.refuse_trainable(trainable, "lora_jax.wrap")
    _cost.check_mode(compute, "lora_jax.wrap")
    if _nnx.is_nnx(apply_fn):
        return _nnx.wrap(apply_fn, strict=strict, compute=compute)
    _check_linen_apply(apply_fn)

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
        by_path = _merge.adapters_by_path(variables["lora"], "lora_jax.wrap")
        index = _paths.by_path(params, "lora_jax.wrap")
        _check_paths_exist(index, by_path)
        params = jax.lax.stop_gradient(_quant.dequantize(params))  # a quantized base: float inside the call
        others = {k: v for k, v in variables.items() if k not in ("params", "lora")}
        # Kinds without a layer output, and kernels below an integer key (no Linen module has one:
        # an NNX module bridged in with nnx.bridge.ToLinen), are merged into params instead.
        bridged = {p for p in by_path if any(isinstance(k, int) for k in index[p][0])}
        if bridged:
            warnings.warn(
                "lora_jax.wrap: " + ", ".join(repr(p) for p in sorted(bridged)) + " belong to an NNX module bridged "
                "into Linen; they are merged (W + scale·a⋅b), not factored. lj.wrap(nnx_model) factors NNX models.",
                stacklevel=2,
            )
        substituted = {p: ad for p, ad in by_path.items() if _adapter.kind_of(ad).output is None or p in bridged}
        layered = {p: ad for p, ad in by_path.items() if p not in substituted}

        def run(factored: dict[str, Any], merged: dict[str, Any]) -> _layers.Pass:
            trace = _Trace(lora_training)
            base = _inject(_merge_kernels(params, merged), factored)
            with nn.intercept_methods(trace.intercept):
                out = apply_fn({"params": base, **others}, *args, **kwargs)
            trace.raise_problems()
            # An adapter whose layer was not called but one of whose enclosing modules was (an
            # NNX module bridged into Linen, say) may have been used there: merged, never dropped.
            called = lambda path: _called(_module_of(path), trace.visited)  # noqa: E731
            return _layers.Pass(out, trace.consumed, called, trace.calls.usages())

        with _bank.indexed(lora_index):
            return _layers.run_adapted(
                run, layered, substituted, strict=strict, compute=compute, training=lora_training
            )

    return apply


def axis_roles(model: nn.Module, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The axis roles of every kernel the model's known layers use, found by tracing.

    The model is traced abstractly (``jax.eval_shape`` of ``model.init``: no FLOPs, no
    memory) with the sample inputs its ``init`` takes. A kernel stacked by ``nn.scan`` or
    ``nn.vmap`` gets ``"stack"`` for the leading axes the transform adds. Kernels that are
    not in the parameter tree (a tied head called as ``lm_head.apply({"params": {"kernel":
    emb.T}}, h)``) are skipped.

    Args:
      model: a Linen module, or an NNX model (the layers its ``__call__`` calls directly).
      *args: sample inputs for ``model.init`` (arrays or ``jax.ShapeDtypeStruct``).
      **kwargs: keyword arguments for ``model.init`` (e.g. ``train=False``, ``method=``).

    Returns:
      ``{path: roles}``, e.g. ``{"attn/query/kernel": ("in", "out", "out"), ...}``; pass it
      to :func:`init` as ``roles=``.

    Raises:
      TypeError: if ``model`` is not a Linen module.
      ValueError: if a transform stacks a kernel along a non-leading axis.

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp, lora_jax as lj
      >>> lj.axis_roles(nn.DenseGeneral((2, 3)), jnp.ones((1, 8)))
      {'kernel': ('in', 'out', 'out')}
    """
    if _nnx.is_nnx(model):
        if not isinstance(model, nnx.Module):
            raise TypeError("lora_jax.axis_roles: pass the NNX model itself (its GraphDef has no values to trace).")
        return _nnx.axis_roles(model, *args, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lora_jax.axis_roles: model must be a flax.linen Module, found {type(model).__name__} "
            "(a Flax NNX model works too)."
        )
    local: dict[str, tuple] = {}

    def intercept(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        use = _layers.describe_call(context.module, context.method_name, call_args, call_kwargs)
        if use is not None and context.module.has_variable("params", use[0]):
            path = _paths.join(context.module.path + (use[0],))
            local[path] = (_specs.roles(use[1]), tuple(context.module.get_variable("params", use[0]).shape))
        return out

    key = jax.random.key(0)  # only shapes are computed: no value depends on it

    def init():
        with nn.intercept_methods(intercept):
            return model.init({"params": key, "dropout": key}, *args, **kwargs)

    params = jax.eval_shape(init).get("params", {})
    return _layers.with_stacks(local, params)


class _Trace(_layers.Seen):
    """The interceptor of one wrapped call and what it saw."""

    def __init__(self, training: bool):
        super().__init__()
        self.training = training

    def intercept(self, next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        self.visited.add(module.path)
        use = _layers.describe_call(module, context.method_name, args, kwargs)
        if use is None or not module.has_variable("params", use[0] + _SUFFIX):
            return out
        param, spec = use
        path = _paths.join(module.path + (param,))
        kernel = module.get_variable("params", param)
        held = module.get_variable("params", param + _SUFFIX)
        key = (lambda: module.make_rng("dropout")) if self.training else None
        return self.output(path, module, spec, out, kernel, held, key)


def _check_linen_apply(apply_fn: Any) -> None:
    fn = apply_fn.func if isinstance(apply_fn, functools.partial) else apply_fn
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and isinstance(owner, nn.Module) and fn.__name__ == "apply":
        return
    if isinstance(owner, nnx.Module):
        found = f"a method of the NNX model {type(owner).__name__}; pass the model itself: lj.wrap(model)"
    elif isinstance(apply_fn, nn.Module):
        found = f"the Linen model {type(apply_fn).__name__} itself; pass its apply: lj.wrap(model.apply)"
    else:
        found = f"a {type(apply_fn).__name__}; pass a Linen model's apply (lj.wrap(model.apply)) or an NNX model"
    raise TypeError(
        f"lora_jax.wrap: expected a Flax Linen model's apply method, e.g. lj.wrap(model.apply), or an NNX model; "
        f"found {found}."
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


def _module_of(path: str) -> tuple:
    """The module path owning a kernel path, as ``Module.path`` spells it."""
    keys = path.split("/")[:-1]
    return tuple(keys)


def _called(module: tuple, visited: set[tuple]) -> bool:
    """Whether ``module`` or one of its enclosing modules (not the root) was called."""
    return any(module[:k] in visited for k in range(min(1, len(module)), len(module) + 1))


def _inject(params: dict, adapters: dict[str, Any]) -> dict:
    """``params`` with each adapter added beside its kernel as ``'<name>@lora'``."""
    out = dict(params)
    for path, adapter in adapters.items():
        *parents, name = path.split("/")
        node = out
        for key in parents:
            node[key] = dict(node[key])
            node = node[key]
        node[name + _SUFFIX] = adapter
    return out


def _merge_kernels(params: dict, adapters: dict[str, Any]) -> dict:
    if not adapters:
        return params
    return _merge.apply_lora(params, _paths.nest((tuple(p.split("/")), ad) for p, ad in adapters.items()))
