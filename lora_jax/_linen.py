"""``wrap`` and ``axis_roles``: LoRA for any Flax Linen model through method interception.

``wrap(model.apply)`` runs the model unchanged under ``flax.linen.intercept_methods``: each
call of a known layer whose kernel has an adapter returns ``base output + scale·(x⋅a)⋅b``
(see ``_branches``). Adapters are handed to the model inside its ``params`` collection,
beside their kernels, so lifted transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) slice
them exactly as they slice the kernels; the base itself is wrapped in ``stop_gradient``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import _adapter, _branches, _merge, _paths
from lora_jax._adapter import Adapter

_SUFFIX = "@lora"  # an adapter rides in params as '<kernel name>@lora' beside its kernel
_IN_BRANCH = contextvars.ContextVar("lora_jax_in_branch", default=False)


def wrap(apply_fn: Callable, *, trainable: _paths.Pattern | None = None) -> Callable:
    """A Linen ``apply`` that takes ``{'params': base, 'lora': adapters}`` and computes LoRA
    factored: ``x⋅W + scale·(x⋅a)⋅b`` for every adapted kernel, never forming ``W'``.

    The output equals ``apply_fn({'params': apply_lora(base, adapters)}, ...)``; gradients
    reach the adapters (and ``trainable`` base parameters) only: the rest of the base is
    under ``stop_gradient``, so no weight gradient of a frozen kernel is ever computed.
    Known layers: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` (ungrouped)
    and ``nn.Embed`` (``__call__`` and ``attend``), also inside ``nn.scan``/``nn.remat``/
    ``nn.vmap``. A targeted kernel of any other layer is merged instead, with a warning.

    The returned function has ``apply_fn``'s signature plus one keyword, ``lora_training``
    (default ``False``): when true, the LoRA branch input gets dropout at each adapter's
    ``dropout`` rate (PEFT's semantics), drawn from ``rngs['dropout']``.

    The branch of ``Dense``/``DenseGeneral`` has a hand-written backward pass (a
    ``jax.custom_vjp``): reverse mode (``jax.grad``, ``jax.vjp``, also nested) works,
    forward mode (``jax.jvp``, ``jax.jacfwd``) does not; merge with :func:`apply_lora` for
    those.

    Args:
      apply_fn: a Linen model's ``apply``, e.g. ``model.apply`` (or a ``functools.partial``
        of it).
      trainable: base parameters to differentiate too (PEFT's ``modules_to_save``): a regex
        or list of regexes fully matched against paths inside ``params``, or a
        ``callable(path, leaf) -> bool``; pass the same value to :func:`optimizer`.

    Returns:
      ``apply(variables, *args, lora_training=False, **kwargs)``.

    Raises:
      TypeError: if ``apply_fn`` is not a Linen ``apply``, or ``variables`` lacks ``'lora'``.
      ValueError: (when called) if an adapter names a kernel that ``params`` lacks or that
        the model never uses, if its roles or shape contradict how the layer uses the
        kernel, or if ``lora_training`` is set without a dropout rng.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax as lj
      >>> model, x = nn.Dense(4), jnp.ones((3, 8))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2))
      >>> apply = lj.wrap(model.apply)
      >>> bool((apply({"params": params, "lora": lora}, x) == model.apply({"params": params}, x)).all())
      True
    """
    _check_linen_apply(apply_fn)
    is_trainable = _paths.compile_pattern(trainable, "trainable")

    @functools.wraps(apply_fn)
    def apply(variables: Mapping, *args, lora_training: bool = False, **kwargs):
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
        _check_paths_exist(params, by_path)
        params = _stop_gradient(params, is_trainable)
        others = {k: v for k, v in variables.items() if k not in ("params", "lora")}

        def run(factored: dict[str, Adapter], merged: dict[str, Adapter]):
            trace = _Trace(lora_training)
            base = _inject(_merge_kernels(params, merged), factored)
            with nn.intercept_methods(trace.intercept):
                out = apply_fn({"params": base, **others}, *args, **kwargs)
            trace.raise_problems()
            return out, trace

        out, trace = run(by_path, {})
        leftover = {p: ad for p, ad in by_path.items() if p not in trace.consumed}
        if not leftover:
            return out
        unused = [p for p in leftover if _module_of(p) not in trace.visited]
        if unused:
            raise ValueError(
                "lora_jax.wrap: adapters name kernels that the model never uses in this call:"
                + "".join(f"\n  {p!r}" for p in unused)
                + "\nAdapt only kernels of layers the model calls (or drop these adapters)."
            )
        warnings.warn(
            "lora_jax.wrap: no factored LoRA forward for the layers owning "
            + ", ".join(repr(p) for p in leftover)
            + " (a layer type or configuration lora_jax does not know); these kernels are merged "
            "(W + scale·a⋅b) instead. The result is correct but computes their weight gradients.",
            stacklevel=2,
        )
        return run({p: ad for p, ad in by_path.items() if p not in leftover}, leftover)[0]

    return apply


def axis_roles(model: nn.Module, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The axis roles of every kernel the model's known layers use, found by tracing.

    The model is traced abstractly (``jax.eval_shape`` of ``model.init``: no FLOPs, no
    memory) with the sample inputs its ``init`` takes. A kernel stacked by ``nn.scan`` or
    ``nn.vmap`` gets ``"stack"`` for the leading axes the transform adds.

    Args:
      model: a Linen module.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora_jax.axis_roles: model must be a flax.linen Module, found {type(model).__name__}.")
    local: dict[str, tuple] = {}

    def intercept(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        plan = _branches.plan(context.module, context.method_name, call_args, call_kwargs)
        if plan is not None and context.module.has_variable("params", plan.param):
            path = _paths.join(context.module.path + (plan.param,))
            local[path] = (plan.roles, tuple(context.module.get_variable("params", plan.param).shape))
        return out

    key = jax.random.key(0)  # only shapes are computed: no value depends on it

    def init():
        with nn.intercept_methods(intercept):
            return model.init({"params": key, "dropout": key}, *args, **kwargs)

    params = jax.eval_shape(init).get("params", {})
    shapes = {_paths.join(keys): leaf.shape for keys, leaf in _paths.leaves_with_paths(params)}
    roles, problems = {}, []
    for path, (local_roles, local_shape) in local.items():
        full = tuple(shapes[path])
        n_stack = len(full) - len(local_shape)
        if n_stack < 0 or full[n_stack:] != local_shape:
            problems.append(f"{path!r}: the layer sees shape {local_shape}, params hold {full}")
            continue
        roles[path] = ("stack",) * n_stack + tuple(local_roles)
    if problems:
        raise ValueError(
            "lora_jax.axis_roles: kernels stacked along a non-leading axis (lora_jax supports the "
            "leading axis that nn.scan/nn.vmap add with variable_axes={'params': 0}):"
            + "".join(f"\n  {p}" for p in problems)
        )
    return roles


class _Trace:
    """The interceptor of one wrapped call and what it saw."""

    def __init__(self, training: bool):
        self.training = training
        self.consumed: set[str] = set()
        self.visited: set[tuple] = set()
        self.problems: list[str] = []

    def intercept(self, next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _IN_BRANCH.get():
            return out
        module = context.module
        self.visited.add(module.path)
        plan = _branches.plan(module, context.method_name, args, kwargs)
        if plan is None or not module.has_variable("params", plan.param + _SUFFIX):
            return out
        path = _paths.join(module.path + (plan.param,))
        kernel_shape = tuple(module.get_variable("params", plan.param).shape)
        adapter = _localize(module.get_variable("params", plan.param + _SUFFIX), kernel_shape, plan.roles)
        if isinstance(adapter, str):
            self.problems.append(f"{path!r} ({type(module).__name__}): {adapter}")
            return out
        self.consumed.add(path)
        drop = _dropout(module, adapter.dropout) if self.training and adapter.dropout > 0 else (lambda x: x)
        with _branch_scope():
            y = plan.branch(adapter, drop)
        return out + y.astype(out.dtype)

    def raise_problems(self):
        if self.problems:
            raise ValueError(
                "lora_jax.wrap: adapters contradict how the model uses their kernels:"
                + "".join(f"\n  {p}" for p in self.problems)
                + "\nCreate adapters with roles=lj.axis_roles(model, *sample_inputs)."
            )


def _localize(adapter: Adapter, kernel_shape: tuple[int, ...], roles: tuple[str, ...]) -> Adapter | str:
    """The adapter as the layer sees it (stack axes sliced off by a lifted transform), or why not."""
    n_sliced = len(adapter.roles) - len(kernel_shape)
    local_roles = adapter.roles[max(n_sliced, 0) :]
    if n_sliced < 0 or any(r != "stack" for r in adapter.roles[:n_sliced]) or local_roles != roles:
        return f"the adapter has roles {adapter.roles}, the layer uses its kernel {kernel_shape} as {roles}"
    local = Adapter(
        adapter.a, adapter.b, rank=adapter.rank, alpha=adapter.alpha, roles=local_roles,
        rslora=adapter.rslora, dropout=adapter.dropout,
    )  # fmt: skip
    a_shape, b_shape = _adapter.factor_shapes(kernel_shape, local_roles, adapter.rank)
    if (tuple(adapter.a.shape), tuple(adapter.b.shape)) != (a_shape, b_shape):
        return f"a {tuple(adapter.a.shape)} and b {tuple(adapter.b.shape)} do not fit the kernel {kernel_shape} (expected a {a_shape}, b {b_shape})"  # noqa: E501
    return local


def _dropout(module: nn.Module, rate: float) -> Callable[[jax.Array], jax.Array]:
    rng = module.make_rng("dropout")

    def drop(x: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return drop


@contextlib.contextmanager
def _branch_scope():
    token = _IN_BRANCH.set(True)
    try:
        yield
    finally:
        _IN_BRANCH.reset(token)


def _check_linen_apply(apply_fn: Any) -> None:
    fn = apply_fn.func if isinstance(apply_fn, functools.partial) else apply_fn
    owner = getattr(fn, "__self__", None)
    if not (inspect.ismethod(fn) and isinstance(owner, nn.Module) and fn.__name__ == "apply"):
        raise TypeError(
            f"lora_jax.wrap: expected a Flax Linen model's apply method, e.g. lj.wrap(model.apply); "
            f"found {apply_fn!r}. For an NNX model, merge with lj.apply_lora(state, adapters)."
        )


def _check_paths_exist(params: Any, by_path: dict[str, Adapter]) -> None:
    existing = {_paths.join(keys) for keys, _ in _paths.leaves_with_paths(params)}
    missing = [p for p in by_path if p not in existing]
    if missing:
        examples = ", ".join(repr(p) for p in sorted(existing)[:3])
        raise ValueError(
            "lora_jax.wrap: adapters name kernels that params lacks:"
            + "".join(f"\n  {p!r}" for p in missing)
            + f"\n(params has e.g. {examples}); were the adapters made for another model?"
        )


def _stop_gradient(params: Any, is_trainable) -> Any:
    if is_trainable is None:
        return jax.lax.stop_gradient(params)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x if is_trainable(_paths.join(_paths.keys_of(kp)), x) else jax.lax.stop_gradient(x), params
    )


def _module_of(path: str) -> tuple:
    """The module path owning a kernel path, as ``Module.path`` spells it."""
    keys = path.split("/")[:-1]
    return tuple(keys)


def _inject(params: dict, adapters: dict[str, Adapter]) -> dict:
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


def _merge_kernels(params: dict, adapters: dict[str, Adapter]) -> dict:
    if not adapters:
        return params
    return _merge.apply_lora(params, _paths.nest((tuple(p.split("/")), ad) for p, ad in adapters.items()))
