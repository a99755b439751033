"""Initialisations that move part of the base into the adapter: PiSSA and OLoRA.

``LoraConfig(init="pissa")`` (Meng et al. 2024) puts the top-``r`` singular directions of
each kernel into its adapter and ``init="olora"`` (Büyükakyüz 2024) the first ``r`` columns of
its QR decomposition; the frozen base becomes the residual ``W - scale · a ⋅ b``, so the adapted
model starts out equal to the original one. PEFT's formulas, in its ``(out, in)`` weight
``W = V S Uᵀ = Q R``:

    PiSSA: A = √(S_r/scale) U_rᵀ,  B = V_r √(S_r/scale)          OLoRA: A = R[:r],  B = Q[:, :r]

(``"pissa_niter_K"``: the singular vectors from a randomized SVD with ``K`` subspace
iterations). A trained adapter of this kind belongs to the residual base; :func:`convert_to_lora`
turns it into a plain LoRA adapter of the original base, as PEFT's
``path_initial_model_for_weight_conversion`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._kinds import lora as _lora
from lora_jax._ops import quantize as _quantize
from lora_jax._ops.config import LoraConfig, check_key
from lora_jax._ops.init import init

_WHERE = "lora_jax.init_residual"


def init_residual(
    key: jax.Array, params: Any, config: LoraConfig, *, roles: Mapping[str, tuple[str, ...]] | None = None
) -> tuple[dict, Any]:
    """Adapters initialised from the kernels (``config.init``: ``"pissa"``, ``"pissa_niter_K"``,
    ``"olora"``) and the residual base they belong to.

    Args:
      key: a PRNG key (used by ``"pissa_niter_K"``'s random projection).
      params: the base parameters (a Linen params dict or an NNX ``State``; not modified).
      config: a :class:`LoraConfig` with one of the inits above (any other init: the adapters
        of :func:`init` and ``params`` unchanged).
      roles: as for :func:`init`.

    Returns:
      ``(adapters, residual)``: ``residual`` is ``params`` with every targeted kernel ``W``
      replaced by ``W - scale · a ⋅ b`` (in ``W``'s dtype), so that
      ``apply_lora(residual, adapters)`` is ``params`` to rounding. Train the adapters on
      ``residual``; keep the initial adapters to :func:`convert_to_lora` the trained ones.

    Raises:
      ValueError: as :func:`init`.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, lora_jax as lj
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
      >>> lora, residual = lj.init_residual(jax.random.key(1), params, lj.LoraConfig(rank=2, init="pissa"))
      >>> bool(np.allclose(lj.apply_lora(residual, lora)["dense"]["kernel"], params["dense"]["kernel"], atol=1e-5))
      True
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{_WHERE}: config must be a lora_jax.LoraConfig, found {type(config).__name__}.")
    check_key(key, _WHERE)
    plain = init(key, params, dataclasses.replace(config, init="lora"), roles=roles)
    method = _method(config.init)
    if method is None:
        return plain, params
    kernels = {path: leaf for path, (_, leaf) in _paths.by_path(params, _WHERE).items()}
    quantized = [p for p in _tree.adapters_by_path(plain, _WHERE) if _quantize.is_quantized(kernels.get(p))]
    if quantized:
        raise ValueError(
            f"{_WHERE}: init={config.init!r} needs float kernels, and {quantized[:3]} are quantized: initialise from "
            "the float params and quantize the residual base it returns (lj.quantize(residual)), as QLoRA with "
            "PiSSA does."
        )
    bad = [p for p in _tree.adapters_by_path(plain, _WHERE) if not _finite(kernels[p])]
    if bad:
        raise ValueError(
            f"{_WHERE}: init={config.init!r} factors each kernel, and these hold inf or NaN, which would spread to the "
            f"whole adapter and residual: {bad}. Repair or exclude them."
        )
    residual = {}

    def factored(path: str, adapter: Any) -> Any:
        if "roles" not in _kind.static(adapter):
            return adapter  # a FullWeight
        kernel = kernels[path]
        a, b = _factors(method, kernel, adapter, jax.random.fold_in(key, zlib.crc32(path.encode())))
        new = _kind.replace(adapter, a=a.astype(adapter.a.dtype), b=b.astype(adapter.b.dtype))
        residual[path] = (jnp.asarray(kernel, jnp.float32) - _lora.delta(new)).astype(kernel.dtype)
        return new

    adapters = _tree.map_adapters(factored, plain, _WHERE)

    def swap(keypath: Any, leaf: Any) -> Any:
        return residual.get(_paths.join(_paths.keys_of(keypath)), leaf)

    return adapters, jax.tree_util.tree_map_with_path(swap, params)


def convert_to_lora(trained: Any, initial: Any) -> dict:
    """A trained adapter tree of a residual base (:func:`init_residual`) as LoRA adapters of the
    original base, ``ΔW = scale · (a⋅b - a₀⋅b₀)`` exactly: ``a' = [a | a₀]``, ``b' = [b | -b₀]``
    (the rank doubles), ``alpha`` doubled (×√2 with rsLoRA) so the scale is unchanged. Kinds that
    extend :class:`Adapter` (DoRA) keep their other arrays: they see ``W + scale·a⋅b``, which is
    unchanged. PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
    writes the same adapter.

    Args:
      trained: the adapters after training.
      initial: the adapters :func:`init_residual` returned.

    Raises:
      ValueError: if the two trees adapt different kernels or differ in shape, rank or alpha.
    """
    where = "lora_jax.convert_to_lora"
    now = _tree.adapters_by_path(trained, where)
    then = _tree.adapters_by_path(initial, where)
    if sorted(now) != sorted(then):
        raise ValueError(f"{where}: trained and initial adapt different kernels: {sorted(set(now) ^ set(then))}.")
    def converted(path: str, full: Any) -> Any:
        full0 = then[path]
        if type(full) is not type(full0) or not isinstance(full, _lora.Adapter):
            found = f"{type(full).__name__} (initially {type(full0).__name__})"
            raise ValueError(f"{where}: {path!r} is a {found}; LoRA adapters (and kinds extending them) convert.")
        ad, ad0 = full, full0
        same = (ad.rank, ad.alpha, ad.roles, ad.rslora, ad.a.shape, ad.b.shape)
        if same != (ad0.rank, ad0.alpha, ad0.roles, ad0.rslora, ad0.a.shape, ad0.b.shape):
            raise ValueError(f"{where}: {path!r}: the trained adapter ({_tree.describe(ad)}, rank {ad.rank}, alpha "
                             f"{ad.alpha}) is not the initial one's shape ({_tree.describe(ad0)}).")  # fmt: skip
        n = ad.roles.count("stack")
        a = jnp.concatenate([ad.a, ad0.a.astype(ad.a.dtype)], axis=-1)
        b = jnp.concatenate([ad.b, -ad0.b.astype(ad.b.dtype)], axis=n)
        alpha = ad.alpha * (2**0.5 if ad.rslora else 2)
        # W_res + s·a⋅b = W + s·(a⋅b - a₀⋅b₀): what a kind extending Adapter sees is unchanged.
        return _kind.replace(full, a=a, b=b, rank=2 * ad.rank, alpha=alpha)

    return _tree.map_adapters(converted, trained, where)


def _method(init: str) -> tuple[str, int] | None:
    if init in ("pissa", "olora"):
        return init, 0
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    return ("pissa", int(match[1]) or 1) if match else None


def _factors(method: tuple[str, int], kernel: Any, ad: _lora.Adapter, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a (stack..., in..., r)`` and ``b (stack..., r, out...)`` of one kernel, per stack slice."""
    roles, r = ad.roles, ad.rank
    order = [i for role in ("stack", "in", "out") for i, x in enumerate(roles) if x == role]
    w = jnp.transpose(jnp.asarray(kernel, jnp.float32), order)
    shape = w.shape
    n_stack, n_in = roles.count("stack"), roles.count("in")
    stack, ins, outs = shape[:n_stack], shape[n_stack : n_stack + n_in], shape[n_stack + n_in :]
    k = w.reshape((-1, math.prod(ins), math.prod(outs)))  # (S, I, O): PEFT's weight is each kᵀ
    name, niter = method
    if name == "olora":
        q, rr = jnp.linalg.qr(jnp.swapaxes(k, 1, 2))  # W = Q R, W (O, I)
        a, b = jnp.swapaxes(rr[:, :r], 1, 2), jnp.swapaxes(q[:, :, :r], 1, 2)
    else:
        if niter:
            u, s, vt = jax.vmap(lambda m, key: _svd_lowrank(m, r, niter, key))(k, jax.random.split(key, k.shape[0]))
        else:
            u, s, vt = jnp.linalg.svd(k, full_matrices=False)
        root = jnp.sqrt(s[:, :r] / ad.scale)
        a, b = u[:, :, :r] * root[:, None, :], root[:, :, None] * vt[:, :r]
    return a.reshape(stack + ins + (r,)), b.reshape(stack + (r,) + outs)


def _svd_lowrank(m: jax.Array, r: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``r`` SVD of ``m`` by a randomized range finder with ``niter`` subspace iterations
    (Halko et al. 2011, as ``torch.svd_lowrank(m, q=r, niter)``)."""
    q, _ = jnp.linalg.qr(m @ jax.random.normal(key, (m.shape[1], r), m.dtype))
    for _ in range(niter):
        z, _ = jnp.linalg.qr(m.T @ q)
        q, _ = jnp.linalg.qr(m @ z)
    u, s, vt = jnp.linalg.svd(q.T @ m, full_matrices=False)
    return q @ u, s, vt


def _finite(x: Any) -> bool:
    """Whether a concrete array is finite (a traced one cannot be checked and passes)."""
    try:
        return bool(np.isfinite(np.asarray(x)).all())
    except jax.errors.TracerArrayConversionError:
        return True
