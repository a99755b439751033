"""``save_params`` / ``load_params``: a (merged) parameter tree as one safetensors file.

The file is written tensor by tensor (header first, then each array as soon as it is
computed), so a merged export never holds a second full copy of the model in host memory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import _io, _merge, _paths

_META_KEY = "lora_jax_params"
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def save_params(path: str | os.PathLike, params: Any, adapters: Any = None) -> None:
    """Write ``params`` (with ``adapters`` merged in, if given) to one safetensors file.

    Keys are the ``/``-joined parameter paths (``decoder/layers_0/attn/query/kernel``);
    dtypes and shapes are kept. Each merged kernel is computed and written on its own, so
    at most one tensor is held in host memory at a time. The write is atomic: a failure
    leaves any previous file at ``path`` intact.

    Args:
      path: the ``.safetensors`` file to write.
      params: a parameter tree (Linen dict or NNX ``State``).
      adapters: optional adapters to merge (``W + scale·a⋅b``) on the way out.

    Raises:
      ValueError: if adapters do not fit ``params`` or a leaf is not an array of a
        supported dtype.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, lora_jax as lj
      >>> file = os.path.join(tempfile.mkdtemp(), "model.safetensors")
      >>> lj.save_params(file, {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}})
      >>> lj.load_params(file)["dense"]["kernel"].shape
      (2, 3)
    """
    leaves = _paths.leaves_with_paths(params)
    by_path = _merge.adapters_by_path(adapters, "lora_jax.save_params") if adapters is not None else {}
    if by_path:
        _merge.check_fit(params, by_path, "lora_jax.save_params")
    header, entries, offset = {}, [], 0
    for keys, leaf in leaves:
        name = _paths.join(keys)
        dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if dtype.name not in _DTYPES:
            raise ValueError(f"lora_jax.save_params: {name!r} has dtype {dtype}, which safetensors cannot store.")
        shape = tuple(np.shape(leaf))
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        entries.append((name, leaf))
        offset += size
    header["__metadata__"] = {_META_KEY: json.dumps([[_paths.join(k), list(k)] for k, _ in leaves])}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for name, leaf in entries:
            adapter = by_path.get(name)
            value = leaf if adapter is None else _merge.fold_kernel(leaf, adapter, 1.0)
            f.write(np.ascontiguousarray(np.asarray(value)).tobytes())

    _io.atomic_write_with(path, write)


def load_params(path: str | os.PathLike) -> dict:
    """Read a parameter tree written by :func:`save_params`, validated as a whole.

    Args:
      path: the file.

    Returns:
      The nested parameter dict (integer keys of an NNX ``State`` restored) of jax arrays.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is truncated, corrupt or not written by :func:`save_params`.

    Example:
      >>> import lora_jax as lj
      >>> lj.load_params("missing.safetensors")
      Traceback (most recent call last):
      ...
      FileNotFoundError: lora_jax.load_params: no parameter file at 'missing.safetensors'.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora_jax.load_params: no parameter file at {path!r}.")
    where = f"lora_jax.load_params: {path!r}"
    tensors, metadata = _io.read_safetensors(path, where)
    try:
        names = {name: tuple(keys) for name, keys in json.loads(metadata[_META_KEY])}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where} has no valid lora_jax parameter metadata ({e!r}); was it written by "
                         "lj.save_params?") from None  # fmt: skip
    if set(names) != set(tensors) or any(_paths.join(k) != n for n, k in names.items()):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise ValueError(f"{where} is inconsistent: arrays missing {missing}, arrays not listed {extra}.")
    return _paths.nest((names[name], jnp.asarray(arr)) for name, arr in tensors.items())
