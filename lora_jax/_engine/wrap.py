"""``wrap`` and ``axis_roles``: the public doors to the engine, for any function, a Linen
model's ``apply`` or an NNX model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from lora_jax._core import cost as _cost
from lora_jax._engine import interpret as _interpret
from lora_jax._engine import linen as _linen
from lora_jax._engine import nnx as _nnx
from lora_jax._engine import transform as _transform


def wrap(fn: Any, *, strict: bool = True, compute: str = "auto") -> Callable:
    """LoRA for any JAX function of parameters, computed factored: every use of an adapted
    kernel ``W`` computes ``x⋅W + scale·(x⋅a)⋅b`` (or the adapter kind's own output) without
    forming ``W + scale·a⋅b``.

    ``fn`` is traced to a jaxpr once per input signature; each adapted kernel is followed from
    its input through layout-only operations (transposes, casts, reshapes of whole axes) to
    every use: ``dot_general`` (any dimension numbers; a tied head ``h @ E.T`` too),
    ``conv_general_dilated``, an embedding ``gather``, inside ``jit``, ``checkpoint``, ``scan``
    (stacked kernels with their adapters sliced per step), ``cond`` and ``while``. No layer
    needs registering: Flax's layers, Hugging Face's Flax models and any ``jnp.einsum`` or
    ``lax.dot_general`` on a kernel are all factored the same way. A use that cannot be
    factored (the kernel in an elementwise op, a ``custom_vjp``, a ``shard_map``, a Pallas
    call) gets the merged kernel at that use only, with a warning naming the path and the
    operation. The output equals the merged model's; gradients reach the adapters only (the
    base is under ``stop_gradient``, and a factored kernel gets no weight gradient at all).

    Three front ends:

    - ``wrap(fn)`` for ``fn(params, *args, **kwargs)``: returns ``apply(params, lora, *args,
      lora_training=False, lora_rng=None, lora_index=None, **kwargs)``.
    - ``wrap(model.apply)`` for a Linen model: returns an apply that takes
      ``{'params': base, 'lora': adapters, ...}``; LoRA dropout keys come from
      ``rngs['dropout']``.
    - ``wrap(nnx_model)`` (or its ``GraphDef``): returns ``apply(state, lora, *args, ...)``
      running the model's ``__call__`` on ``state`` from ``nnx.split(model)``.

    Each call chooses, per adapted kernel, the cheaper of the factored branch and merging
    inside the call (``compute="auto"``): merging pays off only for ranks above
    ``in·out / (3·(in + out))``, and only then is the program first evaluated abstractly to
    count each use's tokens (``lj.extend.lowrank_costs``). ``"factored"``/``"merged"`` force one form.

    Keywords of the returned function: ``lora_training`` (default ``False``): LoRA dropout on
    the branch input at each adapter's ``dropout`` rate (PEFT's semantics); ``lora_rng``: its
    key (not for Linen, which uses ``rngs['dropout']``); ``lora_index``: for adapter banks
    (:func:`bank`), an int array ``(batch,)`` naming each example's slot (``-1``: the base).

    Args:
      fn: a function ``fn(params, *args, **kwargs)``, a Linen model's ``apply`` (or a
        ``functools.partial`` of it), or an NNX model or ``GraphDef``.
      strict: if true (the default), an adapter of a kernel that the call never reads is an
        error; pass ``False`` to call one part of a model with the adapters of the whole.
      compute: ``"auto"`` (the default), ``"factored"`` or ``"merged"``.

    Returns:
      The adapted function, as above.

    Raises:
      TypeError: if ``fn`` is not callable (or is a Linen module rather than its ``apply``).
      ValueError: (when called) if an adapter names a kernel that ``params`` lacks or (with
        ``strict``) that the call never reads, or if its shape does not fit the kernel.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> def mlp(params, x):  # any function of a parameter tree
      ...     return jax.lax.dot_general(x, params["w"], (((1,), (1,)), ((), ())))  # x @ w.T
      >>> params = {"w": jnp.ones((3, 8))}  # stored (out, in)
      >>> lora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, targets="w"), roles={"w": ("out", "in")})
      >>> lj.wrap(mlp)(params, lora, jnp.ones((2, 8))).shape
      (2, 3)
    """
    _cost.check_mode(compute, "lora_jax.wrap")
    if _nnx.is_nnx(fn):
        return _nnx.wrap(fn, strict=strict, compute=compute)
    if _linen.is_linen_apply(fn):
        return _linen.wrap(fn, strict=strict, compute=compute)
    _linen.check_apply(fn)
    return functools.wraps(fn)(_transform.function_apply(fn, strict=strict, compute=compute))


def axis_roles(fn_or_model: Any, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """The axis roles of every kernel a function or model multiplies, convolves or looks up,
    found from its uses in the traced program (abstractly: no FLOPs, no memory).

    Axes contracted with the input are ``"in"``, the kernel's free axes ``"out"``, its batch
    axes in a ``dot_general`` and the axes a ``scan`` runs over (``nn.scan``, ``nnx.scan``)
    ``"stack"``; a convolution's spatial and input-channel axes are ``"in"``; a table looked
    up by rows is ``("in", "out")``. A kernel used several ways (a tied embedding: lookup and
    head) gets the roles of its first use; its other uses are computed from the same adapter.
    Roles given by hand to :func:`init` override these.

    Args:
      fn_or_model: a Linen module, an NNX model, or a function ``fn(params, *args)``.
      *args: sample inputs (arrays or ``jax.ShapeDtypeStruct``): for a Linen module those of
        ``model.init``, for an NNX model those of its ``__call__``, for a function its
        ``params`` first, then its arguments.
      **kwargs: keyword arguments of the call (e.g. ``train=False``, ``method=``).

    Returns:
      ``{path: roles}``, e.g. ``{"attn/query/kernel": ("in", "out", "out"), ...}``; pass it
      to :func:`init` as ``roles=``.

    Raises:
      TypeError: if ``fn_or_model`` is an NNX ``GraphDef`` (it has no values to trace) or not
        callable.

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp, lora_jax as lj
      >>> lj.axis_roles(nn.DenseGeneral((2, 3)), jnp.ones((1, 8)))
      {'kernel': ('in', 'out', 'out')}
    """
    if isinstance(fn_or_model, nnx.GraphDef):
        raise TypeError("lora_jax.axis_roles: pass the NNX model itself (its GraphDef has no values to trace).")
    if isinstance(fn_or_model, nnx.Module):
        return _nnx.axis_roles(fn_or_model, *args, **kwargs)
    if isinstance(fn_or_model, nn.Module):
        return _linen.axis_roles(fn_or_model, *args, **kwargs)
    if not callable(fn_or_model) or not args:
        raise TypeError(
            "lora_jax.axis_roles: expected a Linen module, an NNX model, or a function fn(params, *args) with its "
            f"sample params and arguments; found {type(fn_or_model).__name__}"
            + ("" if args else " and no sample inputs") + "."
        )
    params, *rest = args
    return _interpret.roles(_interpret.Tracer(fn_or_model), params, tuple(rest), kwargs)
