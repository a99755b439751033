"""One adapted call through the engine, shared by every front end of ``wrap``.

``call`` freezes the base, folds in the adapters that are computed merged (kinds without a
factored output, ``compute="merged"``, or those the cost model picks under ``"auto"``),
refuses adapters of kernels the program never reads, and evaluates the traced program with
the rest factored at each use (:mod:`lora_jax._engine.interpret`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._core import cost as _cost
from lora_jax._core import kind as _kind
from lora_jax._core import tree as _tree
from lora_jax._engine import interpret as _interpret
from lora_jax._kinds import bank as _bank
from lora_jax._ops import merge as _merge
from lora_jax._ops import quantize as _quantize

_LOG = logging.getLogger("lora_jax")


def frozen(params: Any) -> Any:
    """``params`` without gradient (quantized kernels stay quantized: the engine dequantizes
    them at each use)."""

    def freeze(x: Any) -> Any:
        floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
        return jax.lax.stop_gradient(x) if floating else x

    return jax.tree.map(freeze, params)


def call(
    tracer: _interpret.Tracer, params: Any, by_path: Mapping[str, Any], args: tuple, kwargs: Mapping, *,
    strict: bool, compute: str, rng: Any = None, lora_index: Any = None, stacklevel: int = 3,
) -> Any:  # fmt: skip
    """``tracer.fn(params, *args, **kwargs)`` with the adapters ``by_path`` (``{path: adapter}``,
    already checked against ``params``); ``rng`` is the LoRA dropout key (``None``: no dropout),
    ``lora_index`` each example's bank slot (``None``: none)."""
    if lora_index is not None and not any(isinstance(ad, _bank.Bank) for ad in by_path.values()):
        raise ValueError(
            "lora_jax.wrap: lora_index= selects each example's slot of an adapter bank, but no adapter is a "
            "lj.Bank; build one with lj.bank([...]) or drop lora_index."
        )
    with _bank.indexed(lora_index):
        return _call(tracer, params, by_path, args, kwargs, strict=strict, compute=compute, rng=rng,
                     stacklevel=stacklevel + 1)  # fmt: skip


def _call(
    tracer: _interpret.Tracer, params: Any, by_path: Mapping[str, Any], args: tuple, kwargs: Mapping, *,
    strict: bool, compute: str, rng: Any, stacklevel: int,
) -> Any:  # fmt: skip
    dropped = {p for p, ad in by_path.items() if rng is not None and _kind.static(ad).get("dropout", 0.0) > 0}
    if compute == "merged" and dropped:
        raise ValueError(
            "lora_jax.wrap: compute='merged' cannot apply LoRA dropout (it acts on the branch input only), but "
            f"lora_training=True and these adapters have dropout > 0: {sorted(dropped)}. Use compute='auto' or "
            "'factored', or adapters without dropout."
        )
    params = frozen(params)
    traced, inputs = tracer(params, args, kwargs)
    used = traced.used()
    unused = [p for p in by_path if p not in used]
    if strict and unused:
        raise ValueError(
            "lora_jax.wrap: adapters name kernels that the model never uses in this call:"
            + "".join(f"\n  {p!r}" for p in unused)
            + "\nAdapt only kernels the model uses (or drop these adapters), or pass strict=False to wrap to "
            "ignore them in calls that skip those kernels."
        )
    used_adapters = {p: ad for p, ad in by_path.items() if p in used}
    merged = {p for p, ad in used_adapters.items() if _kind.kind_of(ad).output is None}
    factored = {p: ad for p, ad in used_adapters.items() if p not in merged}
    if compute == "merged":
        merged |= set(factored)
    elif compute == "auto" and any(_cost.mergeable(ad) for p, ad in factored.items() if p not in dropped):
        plan = _interpret.Run()
        jax.eval_shape(lambda xs, ads: _interpret.run_traced(plan, traced, xs, ads), inputs, factored)
        chosen = _cost.choose({p: ad for p, ad in factored.items() if p not in dropped}, plan.usages)
        if chosen:
            _LOG.debug("lora_jax.wrap: merging %s (cheaper than factored at their ranks and token counts)", chosen)
        merged |= chosen
    inputs = [
        _merge.fold_kernel(_quantize.dequantize(x), used_adapters[p]) if p in merged else x
        for x, p in zip(inputs, traced.paths)
    ]
    run = _interpret.Run(rng=rng)
    out = _interpret.run_traced(run, traced, inputs, {p: ad for p, ad in factored.items() if p not in merged})
    _interpret.check(run)
    _interpret.warn_merged(run, stacklevel=stacklevel + 1)
    return out


def function_apply(fn: Callable, *, strict: bool, compute: str, check: Callable[[Any], None] | None = None) -> Callable:
    """``apply(params, lora, *args, lora_training=False, lora_rng=None, lora_index=None, **kwargs)``:
    ``fn(params, *args, **kwargs)`` with the adapters ``lora`` (``check(params)`` first, if given)."""
    tracer = _interpret.Tracer(fn)

    def apply(params: Any, lora: Any, *args, lora_training: bool = False, lora_rng: Any = None,
              lora_index: Any = None, **kwargs):  # fmt: skip
        if check is not None:
            check(params)
        if lora_training and lora_rng is None:
            raise ValueError("lora_jax.wrap: lora_training=True needs lora_rng=<a PRNG key> for the LoRA dropout.")
        by_path = _tree.adapters_by_path(lora, "lora_jax.wrap")
        _tree.check_fit(params, by_path, "lora_jax.wrap")
        return call(tracer, params, by_path, args, kwargs, strict=strict, compute=compute,
                    rng=lora_rng if lora_training else None, lora_index=lora_index)  # fmt: skip

    return apply
