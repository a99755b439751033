"""Quantized frozen kernels for QLoRA: NF4 (with double quantization), int8 and int4.

A kernel ``W`` of shape ``(d0, d1, ...)`` is cut into blocks of ``block`` consecutive entries
along its axis 0, one block per index of the other axes (for a Flax ``(in, out)`` kernel this
is exactly bitsandbytes' grouping of the PyTorch ``(out, in)`` weight); where ``block`` does
not divide ``d0``, along the fewest leading axes whose size it divides, flattened (an
attention output ``(heads, head_dim, features)``: along ``heads · head_dim``). Each block is scaled by
its absolute maximum and each entry stored as a code:

- ``"nf4"``: the 16 NormalFloat levels of Dettmers et al. 2023 (bitsandbytes' table), the
  nearest level of ``w / absmax``; two codes per byte. With ``double_quant``, the float32
  absmaxes are themselves stored in 8 bits as QLoRA's double quantization does in
  bitsandbytes: their mean (the offset) subtracted, then per group of 256 scaled by its
  absolute maximum and stored as the nearest of the 256 values of bitsandbytes' dynamic 8-bit
  code (a sign, a decimal exponent 10⁻⁶…10⁰ and a fraction: relative precision at every
  magnitude, so one outlier block does not wipe out the small scales of its group).
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

from lora_jax._core import paths as _paths

METHODS = ("nf4", "int8", "int4")
# The NF4 levels (QLoRA, appendix E; bitsandbytes' `get_4bit_type("nf4")`): the quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
DOUBLE_BLOCK = 256


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit code (``create_dynamic_map(signed=True)``, from
    Dettmers 2016): for exponent ``e`` in 0..6, the ``2^e`` midpoints of ``linspace(0.1, 1, 2^e + 1)``
    times ``10^(e - 6)``, both signs, plus 0 and 1; sorted (computed in float64)."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = np.linspace(0.1, 1.0, 2**e + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        values += [*mids, *-mids]
    return np.sort(np.asarray(values)).astype(np.float32)


DYNAMIC8 = _dynamic_code()  # 256 values in [-1, 1]: the codes of double-quantized absmaxes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized frozen kernel; made by :func:`lora_jax.quantize`. Acts as one leaf of a
    parameter tree (its path is the kernel's), with the kernel's ``shape`` and ``dtype``.

    Attributes:
      codes: ``uint8`` (``int8`` for ``"int8"``), the kernel's shape with axis 0 halved for 4 bits.
      absmax: the absolute maximum of each block, ``(d0 / block, d1, ...)`` float32, or with
        double quantization its ``uint8`` codes (indices into :data:`DYNAMIC8`).
      absmax_scale, absmax_offset: double quantization's float32 scale per 256 absmaxes
        (flattened in row-major order) and their mean, a float32 scalar (else both ``None``).
      shape, dtype, method, block: the kernel's shape and dtype name, the method, the block size.

    Construction checks the static fields, and the arrays' shapes and dtypes wherever they are
    arrays (not while a pytree transformation rebuilds it around other leaves: ``float0``
    gradients, shardings); files are checked further when read and written (code ranges,
    finite scales).
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

    def __post_init__(self) -> None:
        shape = self.shape
        if isinstance(shape, (list, tuple)) and all(_is_int(n) for n in shape):
            object.__setattr__(self, "shape", tuple(int(n) for n in shape))  # a JSON list, NumPy ints
        problems = _static_problems(self)
        if not problems and _holds_arrays(self):
            problems = _array_problems(self)
        if problems:
            raise (TypeError if problems[0].startswith("type:") else ValueError)(
                f"lora_jax.Quantized: {'; '.join(p.removeprefix('type: ') for p in problems)}."
            )

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


def _is_int(n: Any) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _is_array(x: Any) -> bool:
    return isinstance(getattr(x, "shape", None), tuple) and hasattr(x, "dtype")


def _holds_arrays(q: Quantized) -> bool:
    """Whether ``q`` holds a kernel's arrays: not while a transformation rebuilds it around other
    leaves (``float0`` gradients, shardings, ``None`` placeholders, per-leaf results)."""
    arrays = [x for x in _fields(q).values() if x is not None]
    return bool(arrays) and all(_is_array(x) and x.dtype != jax.dtypes.float0 for x in arrays)


def _fields(q: Quantized) -> dict[str, Any]:
    return {name: getattr(q, name) for name in ("codes", "absmax", "absmax_scale", "absmax_offset")}


def _static_problems(q: Quantized) -> list[str]:
    """What is wrong with the static fields (a ``"type: "`` prefix where a type is wrong)."""
    if not isinstance(q.shape, tuple) or not q.shape or not all(map(_is_int, q.shape)):
        return [f"type: shape must be a non-empty tuple of ints, found {q.shape!r}"]
    if not isinstance(q.method, str) or q.method not in METHODS:
        return [f"method must be one of {METHODS}, found {q.method!r}"]
    if not _is_int(q.block) or q.block < 2 or q.block % 2:
        return [f"block must be an even int >= 2, found {q.block!r}"]
    try:
        floating = isinstance(q.dtype, str) and jnp.issubdtype(jnp.dtype(q.dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        return [f"dtype must name a floating dtype ('float32', 'bfloat16'...), found {q.dtype!r}"]
    if len(q.shape) < 2 or min(q.shape) < 1:
        return [f"shape {q.shape} must have at least 2 axes, none of them empty"]
    try:
        blocked(q.shape, q.block)
    except ValueError as e:
        return [str(e)]
    return []


def _array_problems(q: Quantized) -> list[str]:
    """Shapes and dtypes of the arrays against the static fields (valid ones)."""
    rows, rest = blocked(q.shape, q.block)
    double = q.absmax_scale is not None or q.absmax_offset is not None
    n_absmax = (rows // q.block) * math.prod(rest)
    want = {
        "codes": ((rows if q.method == "int8" else rows // 2,) + rest, "int8" if q.method == "int8" else "uint8"),
        "absmax": ((rows // q.block,) + rest, "uint8" if double else "float32"),
    }
    if double:
        want["absmax_scale"] = ((-(-n_absmax // DOUBLE_BLOCK),), "float32")
        want["absmax_offset"] = ((), "float32")
    found = _fields(q)
    problems = []
    if double and (q.absmax_scale is None or q.absmax_offset is None):
        problems.append("double quantization needs both absmax_scale and absmax_offset")
    for name, (shape, dtype) in want.items():
        x = found[name]
        if x is None:
            problems.append(f"{name} is missing")
        elif tuple(x.shape) != shape or jnp.dtype(x.dtype) != jnp.dtype(dtype):
            problems.append(f"{name} is {jnp.dtype(x.dtype).name}{list(x.shape)}, expected {dtype}{list(shape)} "
                            f"for a {q.method} kernel of shape {q.shape} in blocks of {q.block}")  # fmt: skip
    return problems


def value_problems(q: Quantized) -> list[str]:
    """What is wrong with a concrete quantized kernel's values: codes outside the method's
    range (int8's -128, int4's -8), absmaxes, scales or offset that are negative or not finite."""
    codes = np.asarray(q.codes)
    problems = []
    if q.method == "int8" and (codes == -128).any():
        problems.append("codes hold -128, outside int8's symmetric range [-127, 127]")
    if q.method == "int4" and (((codes >> 4) == 8) | ((codes & 0xF) == 8)).any():
        problems.append("codes hold -8, outside int4's symmetric range [-7, 7]")
    scales = {"absmax": q.absmax} if q.absmax_scale is None else {"absmax_scale": q.absmax_scale}
    for name, x in scales.items():
        x = np.asarray(x)
        if not (np.isfinite(x) & (x >= 0)).all():
            problems.append(f"{name} holds negative or non-finite values")
    if q.absmax_offset is not None and not np.isfinite(np.asarray(q.absmax_offset)).all():
        problems.append("absmax_offset is not finite")
    return problems


def quantize_kernel(w: jax.Array, method: str = "nf4", block: int = 64, double_quant: bool = True) -> Quantized:
    """One kernel quantized (see the module docstring); jit-able."""
    shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
    rows, rest = blocked(shape, block)
    x = jnp.asarray(w, jnp.float32).reshape((rows // block, block) + rest)
    absmax = jnp.max(jnp.abs(x), axis=1)
    scaled = _divide(x, absmax[:, None])
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
    lead = lambda x: x.reshape((n, -1) + tuple(x.shape[1:]))
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
    """Double quantization: ``absmax - offset`` (the mean, taken as ``top · mean(absmax / top)``
    so that absmaxes near the float32 maximum do not overflow it) in groups of 256, each group
    scaled by its absolute maximum and coded by the nearest value of :data:`DYNAMIC8`."""
    top = jnp.max(absmax)
    offset = jnp.mean(_divide(absmax, top)) * top
    flat = (absmax - offset).reshape(-1)
    pad = (-flat.size) % DOUBLE_BLOCK
    groups = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_BLOCK)
    scale = jnp.max(jnp.abs(groups), axis=1)
    unit = _divide(groups, scale[:, None])
    thresholds = jnp.asarray((DYNAMIC8[1:] + DYNAMIC8[:-1]) / 2)
    codes = jnp.searchsorted(thresholds, unit, side="left").astype(jnp.uint8)
    return codes.reshape(-1)[: flat.size].reshape(absmax.shape), scale, offset


def _divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` for ``d >= 0`` (``x`` where ``d == 0``), exact even where ``1 / d`` is subnormal:
    XLA may compute ``x / d`` as ``x · (1 / d)``, which CPUs flush to zero for ``d > 2^126``."""
    mantissa, exponent = jnp.frexp(jnp.where(d == 0, 1.0, d))
    return jnp.ldexp(x, -exponent) / mantissa


def _dequantize_absmax(q: Quantized) -> jax.Array:
    flat = jnp.asarray(DYNAMIC8)[q.absmax.reshape(-1).astype(jnp.int32)]
    pad = (-flat.size) % DOUBLE_BLOCK
    groups = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_BLOCK) * q.absmax_scale[:, None]
    return groups.reshape(-1)[: flat.size].reshape(q.absmax.shape) + q.absmax_offset


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
        int, targets matching nothing, or kernels that are not floating, have fewer than 2 axes,
        an axis 0 the block size does not divide, or NaN/infinite weights (checked where the
        kernel is concrete, not under ``jit``; every offending path in one message).

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
            if not isinstance(leaf, jax.core.Tracer) and not bool(jnp.isfinite(leaf).all()):
                problems.append(f"{path!r}: holds NaN or infinite weights (a block's scale would be non-finite)")
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
    """The JSON description of a quantized kernel stored with its arrays, codebooks included."""
    codebook = NF4.tolist() if q.method == "nf4" else None
    described = {"shape": list(q.shape), "dtype": q.dtype, "method": q.method, "block": q.block, "codebook": codebook}
    if q.absmax_scale is not None:
        described["absmax_codebook"] = DYNAMIC8.tolist()
    return described


def rebuild(tree: dict, metadata: str, where: str) -> dict:
    """``tree`` (nested arrays read from a file) with its quantized kernels rebuilt from
    ``metadata`` and validated: the static fields, each array's shape and dtype, the codebooks,
    the code ranges and finite, non-negative scales (every problem listed)."""
    try:
        described = json.loads(metadata)
        entries = {p: (d["shape"], d["dtype"], d["method"], d["block"], d["codebook"], d.get("absmax_codebook"))
                   for p, d in described.items()}  # fmt: skip
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise ValueError(f"{where}: invalid quantization metadata ({e!r}).") from None
    problems, out = [], {}
    flat = _paths.by_path(tree, where)  # {path: (keys, array)}, "<kernel path>/codes" among them
    names = ("codes", "absmax", "absmax_scale", "absmax_offset")
    for path, (shape, dtype, method, block, codebook, absmax_codebook) in entries.items():
        keys = flat.get(f"{path}/codes", ((),))[0][:-1]  # the kernel's own keys (an NNX State's ints kept)
        arrays = {name: flat.pop(f"{path}/{name}", (None, None))[1] for name in names}
        extra = sorted(p for p in flat if p.startswith(f"{path}/"))
        if extra:
            problems.append(f"{path!r}: arrays {extra} are not part of a quantized kernel")
            continue
        if arrays["codes"] is None or arrays["absmax"] is None:
            problems.append(f"{path!r}: codes or absmax missing")
            continue
        if method == "nf4" and not _same_values(codebook, NF4):
            problems.append(f"{path!r}: quantized with another NF4 codebook than lora_jax's (values differ)")
            continue
        if arrays["absmax_scale"] is not None and not _same_values(absmax_codebook, DYNAMIC8):
            problems.append(f"{path!r}: its absmaxes are double-quantized with another code than lora_jax's "
                            "(bitsandbytes' dynamic 8-bit code; files from before it used int8)")  # fmt: skip
            continue
        try:
            q = Quantized(**arrays, shape=shape, dtype=dtype, method=method, block=block)
        except (TypeError, ValueError) as e:
            problems.append(f"{path!r}: {str(e).removeprefix('lora_jax.Quantized: ')}")
            continue
        problems += [f"{path!r}: {p}" for p in value_problems(q)]
        out[path] = (keys, q)
    if problems:
        raise ValueError(f"{where}: cannot rebuild the quantized kernels:" + "".join(f"\n  {p}" for p in problems))
    return _paths.nest(list(flat.values()) + list(out.values()), where)


def _same_values(codebook: Any, want: np.ndarray) -> bool:
    try:
        return np.array_equal(np.asarray(codebook, np.float32), want)
    except (TypeError, ValueError):
        return False


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

