"""Quantized frozen kernels for QLoRA: NF4 (with double quantization), int8 and int4.

A kernel ``W`` of shape ``(d0, d1, ...)`` is cut into blocks of ``block`` consecutive entries
along its axis 0, one block per index of the other axes (for a Flax ``(in, out)`` kernel this
is exactly bitsandbytes' grouping of the PyTorch ``(out, in)`` weight); where ``block`` does
not divide ``d0``, along the fewest leading axes whose size it divides, flattened (an
attention output ``(heads, head_dim, features)``: along ``heads · head_dim``). Each block is scaled by
its absolute maximum and each entry stored as a code:

- ``"nf4"``: the 16 NormalFloat levels of Dettmers et al. 2023 (bitsandbytes' table), the
  nearest level of ``w / absmax``; two codes per byte. With ``double_quant``, the float32
  absmaxes are themselves stored as int8 (their mean subtracted, symmetric per block of 256),
  as QLoRA's double quantization (bitsandbytes uses an 8-bit dynamic-exponent code there;
  lora_jax a linear one).
- ``"int8"`` / ``"int4"``: symmetric, ``round(w / absmax · 127)`` (``· 7``; two per byte).

The codes keep the kernel's shape (axis 0 halved for 4 bits) and the absmaxes are
``(d0 / block, d1, ...)``, so both are sharded with the kernel's own partition spec (with
flattened leading axes, the flattened axis is not sharded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax import _paths

METHODS = ("nf4", "int8", "int4")
# The NF4 levels (QLoRA, appendix E; bitsandbytes' `get_4bit_type("nf4")`): the quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
DOUBLE_BLOCK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized frozen kernel; made by :func:`lora_jax.quantize`. Acts as one leaf of a
    parameter tree (its path is the kernel's), with the kernel's ``shape`` and ``dtype``.

    Attributes:
      codes: ``uint8`` (``int8`` for ``"int8"``), the kernel's shape with axis 0 halved for 4 bits.
      absmax: the absolute maximum of each block, ``(d0 / block, d1, ...)`` float32, or its int8
        codes with double quantization.
      absmax_scale, absmax_offset: double quantization's per-256 scales and mean (else ``None``).
      shape, dtype, method, block: the kernel's shape and dtype name, the method, the block size.
    """

    codes: Any
    absmax: Any
    absmax_scale: Any
    absmax_offset: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    method: str = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))

    is_path_leaf = True  # one leaf of the parameter tree for lora_jax's path functions

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, absmaxes and their scales."""
        arrays = (self.codes, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in arrays if x is not None)

    def __repr__(self) -> str:
        double = ", double_quant" if self.absmax_scale is not None else ""
        return f"Quantized({self.method}, shape={self.shape}, dtype={self.dtype}, block={self.block}{double})"


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def quantize_kernel(w: jax.Array, method: str = "nf4", block: int = 64, double_quant: bool = True) -> Quantized:
    """One kernel quantized (see the module docstring); jit-able."""
    shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
    rows, rest = blocked(shape, block)
    x = jnp.asarray(w, jnp.float32).reshape((rows // block, block) + rest)
    absmax = jnp.max(jnp.abs(x), axis=1)
    scaled = x / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    if method == "nf4":
        thresholds = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
        codes = jnp.searchsorted(thresholds, scaled, side="left").astype(jnp.uint8)
    else:
        top = 127 if method == "int8" else 7
        codes = jnp.clip(jnp.round(scaled * top), -top, top).astype(jnp.int8)
    codes = codes.reshape((rows,) + rest)
    if method != "int8":
        nibbles = (codes.astype(jnp.uint8) & 0xF).reshape((rows // 2, 2) + rest)
        codes = (nibbles[:, 0] << 4) | nibbles[:, 1]
    scale = offset = None
    if double_quant and method == "nf4":
        absmax, scale, offset = _quantize_absmax(absmax)
    return Quantized(codes, absmax, scale, offset, shape=shape, dtype=dtype, method=method, block=block)


def dequantize_kernel(q: Quantized) -> jax.Array:
    """The kernel a :class:`Quantized` stands for, in its dtype; jit-able (XLA fuses it)."""
    codes = q.codes
    rows, rest = blocked(q.shape, q.block)
    if q.method != "int8":
        high, low = (codes >> 4) & 0xF, codes & 0xF
        codes = jnp.stack([high, low], axis=1).reshape((rows,) + rest)
        if q.method == "int4":
            codes = jnp.where(codes > 7, codes.astype(jnp.int32) - 16, codes.astype(jnp.int32))
    absmax = q.absmax if q.absmax_scale is None else _dequantize_absmax(q)
    if q.method == "nf4":
        values = jnp.asarray(NF4)[codes.astype(jnp.int32)]
    else:
        values = codes.astype(jnp.float32) / (127 if q.method == "int8" else 7)
    blocks = values.reshape((rows // q.block, q.block) + rest) * absmax[:, None]
    return blocks.reshape(q.shape).astype(q.dtype)


def blocked(shape: tuple[int, ...], block: int) -> tuple[int, tuple[int, ...]]:
    """``(rows, rest)``: the fewest leading axes of ``shape`` whose size (product) ``block``
    divides, flattened into ``rows`` (blocks run along them), and the remaining axes."""
    rows = 1
    for j, n in enumerate(shape[:-1]):
        rows *= n
        if rows % block == 0:
            return rows, tuple(shape[j + 1 :])
    raise ValueError(f"no leading axes of {shape} hold a multiple of the block size {block}")


def leading_slices(q: Quantized) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Quantized]] | None:
    """A kernel stacked along axis 0, quantized, as arrays with that axis leading (for a
    ``lax.scan`` to slice) and ``rebuild(slices) -> Quantized`` of one slice; ``None`` where
    blocks (or double quantization's groups of 256 block scales) cross from one slice to the next."""
    n, inner = q.shape[0], tuple(q.shape[1:])
    try:
        rows_in, rest_in = blocked(inner, q.block)
    except ValueError:
        return None
    if blocked(q.shape, q.block) != (n * rows_in, rest_in):
        return None
    lead = lambda x: x.reshape((n, -1) + tuple(x.shape[1:]))  # noqa: E731
    arrays = {"codes": lead(q.codes), "absmax": lead(q.absmax)}
    if q.absmax_scale is not None:
        if math.prod(arrays["absmax"].shape[1:]) % DOUBLE_BLOCK:
            return None
        arrays["absmax_scale"] = q.absmax_scale.reshape(n, -1)
    offset = q.absmax_offset

    def rebuild(a: dict[str, Any]) -> Quantized:
        return Quantized(a["codes"], a["absmax"], a.get("absmax_scale"), offset, shape=inner, dtype=q.dtype,
                         method=q.method, block=q.block)  # fmt: skip

    return arrays, rebuild


def _quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    offset = jnp.mean(absmax)
    flat = (absmax - offset).reshape(-1)
    pad = (-flat.size) % DOUBLE_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=1) / 127
    codes = jnp.round(blocks / jnp.where(scale == 0, 1.0, scale)[:, None]).astype(jnp.int8)
    return codes.reshape(-1)[: flat.size].reshape(absmax.shape), scale, offset


def _dequantize_absmax(q: Quantized) -> jax.Array:
    flat = q.absmax.reshape(-1).astype(jnp.float32)
    pad = (-flat.size) % DOUBLE_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_BLOCK) * q.absmax_scale[:, None]
    return blocks.reshape(-1)[: flat.size].reshape(q.absmax.shape) + q.absmax_offset


# ---- trees -----------------------------------------------------------------------------------


def quantize(
    params: Any,
    *,
    method: str = "nf4",
    targets: _paths.Pattern = r"(.*/)?kernel",
    exclude: _paths.Pattern | None = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """The frozen base with its targeted kernels quantized (QLoRA's base): pure, jit-able.

    Args:
      params: a Linen params dict or an NNX ``State``.
      method: ``"nf4"`` (4-bit NormalFloat), ``"int8"`` or ``"int4"`` (symmetric).
      targets, exclude: the kernels to quantize, as for :class:`LoraConfig`.
      block_size: entries per absmax block along axis 0 (must divide it; even).
      double_quant: NF4 only: store the absmaxes as int8 too (QLoRA's double quantization).

    Returns:
      ``params`` with each targeted kernel a :class:`Quantized`. :func:`lora_jax.wrap`
      dequantizes them inside the call (under ``stop_gradient``); :func:`dequantize` gives the
      float tree (for merging and export).

    Raises:
      ValueError, TypeError: on an unknown method, a block size that is not a positive even
        int, targets matching nothing, or kernels that are not floating, have fewer than 2 axes
        or an axis 0 the block size does not divide (every offending path in one message).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 32)), "bias": jnp.zeros(32)}}
      >>> q = lj.quantize(params)
      >>> q["dense"]["kernel"]
      Quantized(nf4, shape=(128, 32), dtype=float32, block=64, double_quant)
      >>> q["dense"]["kernel"].nbytes / params["dense"]["kernel"].nbytes < 0.14
      True
    """
    where = "lora_jax.quantize"
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, found {method!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 2 or block_size % 2:
        raise ValueError(f"{where}: block_size must be an even int >= 2, found {block_size!r}.")
    is_target = _paths.compile_pattern(targets, "targets", where)
    is_excluded = _paths.compile_pattern(exclude, "exclude", where) or (lambda path, leaf: False)
    chosen, problems = {}, []
    for path, (_, leaf) in _paths.by_path(params, where).items():
        if is_quantized(leaf) or not (is_target and is_target(path, leaf)) or is_excluded(path, leaf):
            continue
        shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{path!r}: dtype {dtype} is not floating")
        elif len(shape) < 2:
            problems.append(f"{path!r}: shape {shape} has fewer than 2 axes")
        else:
            try:
                blocked(shape, block_size)
                chosen[path] = leaf
            except ValueError as e:
                problems.append(f"{path!r}: {e} (pick a block size that divides axis 0, or exclude the kernel)")
    if problems:
        raise ValueError(f"{where}: cannot quantize:" + "".join(f"\n  {p}" for p in problems))
    if not chosen:
        raise ValueError(f"{where}: targets matched no kernel to quantize (already quantized ones are skipped).")

    def swap(keypath: Any, leaf: Any) -> Any:
        path = _paths.join(_paths.keys_of(keypath))
        return quantize_kernel(leaf, method, block_size, double_quant) if path in chosen else leaf

    return jax.tree_util.tree_map_with_path(swap, params, is_leaf=is_quantized)


def dequantize(params: Any) -> Any:
    """``params`` with every :class:`Quantized` kernel replaced by its float value."""
    return jax.tree.map(lambda x: dequantize_kernel(x) if is_quantized(x) else x, params, is_leaf=is_quantized)


# ---- files ------------------------------------------------------------------------------------


def parts(leaf: Any) -> dict[str, Any]:
    """``{"": leaf}`` for an array; a quantized kernel's arrays by field name."""
    if not is_quantized(leaf):
        return {"": leaf}
    fields = ("codes", "absmax", "absmax_scale", "absmax_offset")
    return {name: getattr(leaf, name) for name in fields if getattr(leaf, name) is not None}


def describe(q: Quantized) -> dict:
    """The JSON description of a quantized kernel stored with its arrays, codebook included."""
    codebook = NF4.tolist() if q.method == "nf4" else None
    return {"shape": list(q.shape), "dtype": q.dtype, "method": q.method, "block": q.block, "codebook": codebook}


def rebuild(tree: dict, metadata: str, where: str) -> dict:
    """``tree`` (nested arrays read from a file) with its quantized kernels rebuilt from ``metadata``."""
    try:
        described = json.loads(metadata)
        entries = {p: (d["shape"], d["dtype"], d["method"], d["block"], d["codebook"]) for p, d in described.items()}
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: invalid quantization metadata ({e!r}).") from None
    problems, out = [], {}
    flat = _paths.by_path(tree, where)  # {path: (keys, array)}, "<kernel path>/codes" among them
    for path, (shape, dtype, method, block, codebook) in entries.items():
        if method not in METHODS:
            problems.append(f"{path!r}: unknown method {method!r}")
            continue
        if method == "nf4" and (codebook is None or not np.array_equal(np.asarray(codebook, np.float32), NF4)):
            problems.append(f"{path!r}: quantized with another NF4 codebook than lora_jax's (values differ)")
            continue
        keys = flat.get(f"{path}/codes", ((),))[0][:-1]  # the kernel's own keys (an NNX State's ints kept)
        names = ("codes", "absmax", "absmax_scale", "absmax_offset")
        arrays = {name: flat.pop(f"{path}/{name}", (None, None))[1] for name in names}
        if arrays["codes"] is None or arrays["absmax"] is None:
            problems.append(f"{path!r}: codes or absmax missing")
            continue
        out[path] = (keys, Quantized(**arrays, shape=tuple(shape), dtype=dtype, method=method, block=int(block)))
    if problems:
        raise ValueError(f"{where}: cannot rebuild the quantized kernels:" + "".join(f"\n  {p}" for p in problems))
    return _paths.nest(list(flat.values()) + list(out.values()), where)


def quantized_shardings(param_shardings: Any, quantized: Any) -> Any:
    """Shardings for a quantized tree from the kernels' own: codes and absmaxes take their
    kernel's sharding (``PartitionSpec`` or ``NamedSharding``; blocks lie along axis 0, so the
    sharded axis must hold whole blocks), double quantization's small arrays are replicated.

    Args:
      param_shardings: a tree like the float ``params``, a sharding per parameter.
      quantized: ``quantize(params, ...)`` (or its ``jax.eval_shape``).

    Returns:
      A tree like ``quantized``, for ``jax.jit(..., in_shardings=...)`` or ``jax.device_put``.
    """
    where = "lora_jax.quantized_shardings"
    given = {path: s for path, (_, s) in _paths.by_path(param_shardings, where, is_leaf=_is_sharding).items()}

    def shard(keypath: Any, leaf: Any) -> Any:
        path = _paths.join(_paths.keys_of(keypath))
        if path not in given:
            raise ValueError(f"{where}: param_shardings has no entry for {path!r}.")
        spec = given[path]
        if not is_quantized(leaf):
            return spec
        rows, rest = blocked(leaf.shape, leaf.block)
        if len(rest) != len(leaf.shape) - 1:  # leading axes flattened: that axis replicated
            named = isinstance(spec, NamedSharding)
            parts = tuple(spec.spec if named else spec)
            flat = PartitionSpec(None, *parts[len(leaf.shape) - len(rest) :])
            spec = NamedSharding(spec.mesh, flat) if named else flat
        whole = PartitionSpec() if isinstance(spec, PartitionSpec) else NamedSharding(spec.mesh, PartitionSpec())
        double = leaf.absmax_scale is not None
        return dataclasses.replace(leaf, codes=spec, absmax=spec, absmax_scale=whole if double else None,
                                   absmax_offset=whole if double else None)  # fmt: skip

    return jax.tree_util.tree_map_with_path(shard, quantized, is_leaf=is_quantized)


def _is_sharding(x: Any) -> bool:
    return isinstance(x, (PartitionSpec, NamedSharding))


def merge_quantized(params: Any, adapters: Any, *, requantize: bool = True) -> tuple[Any, dict[str, float]]:
    """Serve a QLoRA model: dequantize, merge the adapters, and quantize the merged kernels again.

    Args:
      params: a tree with :class:`Quantized` kernels (from :func:`quantize`).
      adapters: the adapter tree trained over it.
      requantize: quantize each merged kernel with its own method, block size and double
        quantization (``False``: return the float merged tree).

    Returns:
      ``(merged, errors)``: the merged tree and, per re-quantized kernel, the root-mean-square
      error of the re-quantization relative to the merged kernel's RMS (empty without
      ``requantize``).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = lj.quantize({"d": {"kernel": jax.random.normal(jax.random.key(0), (128, 16))}})
      >>> lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=2))
      >>> merged, errors = lj.merge_quantized(params, lora)
      >>> merged["d"]["kernel"].method, errors["d/kernel"] < 1e-3  # b = 0: the same kernel, nearly the same codes
      ('nf4', True)
    """
    from lora_jax._merge import apply_lora  # _merge imports this module

    merged = apply_lora(dequantize(params), adapters)
    if not requantize:
        return merged, {}
    quantized = {path: leaf for path, (_, leaf) in _paths.by_path(params, "lora_jax.merge_quantized").items()
                 if is_quantized(leaf)}  # fmt: skip
    errors: dict[str, float] = {}

    def again(keypath: Any, leaf: Any) -> Any:
        path = _paths.join(_paths.keys_of(keypath))
        if path not in quantized:
            return leaf
        q = quantized[path]
        new = quantize_kernel(leaf, q.method, q.block, q.absmax_scale is not None)
        diff = jnp.asarray(dequantize_kernel(new), jnp.float32) - jnp.asarray(leaf, jnp.float32)
        scale = jnp.maximum(jnp.mean(jnp.square(jnp.asarray(leaf, jnp.float32))), 1e-30)
        errors[path] = float(jnp.sqrt(jnp.mean(diff**2) / scale))
        return new

    return jax.tree_util.tree_map_with_path(again, merged), errors
