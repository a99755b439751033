"""``save_params`` / ``load_params``: a (merged) parameter tree as one safetensors file.

The file is written tensor by tensor (header first, then each array as soon as it is
computed), so a merged export never holds a second full copy of the model in host memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import _io, _merge, _paths, _peft

_META_KEY = "lora_jax_params"
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def save_params(
    path: str | os.PathLike,
    params: Any,
    adapters: Any = None,
    *,
    torch_names: bool = False,
    name_map: Callable[[str], str] | None = None,
    roles: Mapping[str, tuple[str, ...]] | None = None,
    conv: _paths.Pattern | None = None,
) -> None:
    """Write ``params`` (with ``adapters`` merged in, if given) to one safetensors file.

    Keys are the ``/``-joined parameter paths (``decoder/layers_0/attn/query/kernel``);
    dtypes and shapes are kept. With ``torch_names=True`` the file is laid out for a
    PyTorch ``load_state_dict`` instead: ``<module>.weight`` / ``<module>.bias`` (module
    names as in :func:`to_peft`), ``Linear`` kernels transposed to ``(out, in)`` (N-D kernels
    flattened by their ``roles``), ``Conv`` kernels as ``(cout, cin, k…)``, embeddings as they
    are and LayerNorm ``scale`` as ``weight``; such a file is read with ``safetensors``.

    Each merged kernel is computed and written on its own, so at most one tensor is held in
    host memory at a time. The write is atomic: a failure leaves any previous file intact.

    Args:
      path: the ``.safetensors`` file to write.
      params: a parameter tree (Linen dict or NNX ``State``).
      adapters: optional adapters to merge (``W + scale·a⋅b``) on the way out.
      torch_names: write PyTorch names and layouts instead of Flax paths.
      name_map: with ``torch_names``: ``kernel path -> module name`` (see :func:`to_peft`).
      roles: with ``torch_names``: axis roles of N-D kernels (``axis_roles(model, ...)``).
      conv: with ``torch_names``: paths of convolution kernels (see :func:`to_peft`).

    Raises:
      ValueError: if adapters do not fit ``params``, a leaf's dtype cannot be stored, or
        (with ``torch_names``) a kernel's layout is ambiguous or two leaves share a name.

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
    is_conv = _paths.compile_pattern(conv, "conv")
    header, entries, offset, problems = {}, [], 0, []
    for keys, leaf in leaves:
        leaf_path = _paths.join(keys)
        dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if dtype.name not in _DTYPES:
            raise ValueError(f"lora_jax.save_params: {leaf_path!r} has dtype {dtype}, which safetensors cannot store.")
        shape, name, layout = tuple(np.shape(leaf)), leaf_path, None
        if torch_names:
            try:
                name, layout = _torch_layout(keys, shape, name_map or _peft.default_name, roles, is_conv)
            except ValueError as e:
                problems.append(f"{leaf_path!r}: {e}")
                continue
            if name in header:
                problems.append(f"{leaf_path!r}: a second tensor named {name!r}")
                continue
            shape = layout(np.empty(shape, np.bool_)).shape
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        entries.append((leaf_path, leaf, layout))
        offset += size
    if problems:
        raise ValueError("lora_jax.save_params: no PyTorch layout for:" + "".join(f"\n  {p}" for p in problems))
    meta = {"format": "pt"} if torch_names else {_META_KEY: json.dumps([[_paths.join(k), list(k)] for k, _ in leaves])}
    header["__metadata__"] = meta
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for leaf_path, leaf, layout in entries:
            adapter = by_path.get(leaf_path)
            value = np.asarray(leaf if adapter is None else _merge.fold_kernel(leaf, adapter, 1.0))
            f.write(np.ascontiguousarray(value if layout is None else layout(value)).tobytes())

    _io.atomic_write_with(path, write)


def _torch_layout(keys, shape, name_of, roles, is_conv) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The PyTorch state-dict name of a leaf and the transform of its array."""
    parent, last = list(keys[:-1]), keys[-1]
    module = name_of(_paths.join([*parent, "kernel"])) if parent else str(last)
    if "{}" in module:
        raise ValueError("stacked (nn.scan) parameters have no single PyTorch tensor; export per layer")
    path = _paths.join(keys)
    if last == "embedding":
        return f"{module}.weight", lambda x: x
    if last == "scale":
        return f"{module}.weight", lambda x: x.reshape(-1)
    if last == "bias":
        return f"{module}.bias", lambda x: x.reshape(-1)
    if last != "kernel":
        return f"{module}.{last}", lambda x: x
    kernel_roles = _peft.roles_of(path, shape, roles)
    if _peft.kind_of(path, kernel_roles, is_conv) == "conv":
        n = len(shape) - 2
        return f"{module}.weight", lambda x: np.transpose(x, (n + 1, n, *range(n)))
    n_in = kernel_roles.count("in")
    if kernel_roles != ("in",) * n_in + ("out",) * (len(shape) - n_in):
        raise ValueError(f"the kernel {shape} has roles {kernel_roles}; PyTorch Linear needs (in..., out...)")
    fan_in = int(np.prod(shape[:n_in]))
    return f"{module}.weight", lambda x: x.reshape(fan_in, -1).T


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
    tensors, metadata, where = _io.read_safetensors(path, "lora_jax.load_params", "parameter file")
    try:
        names = {name: tuple(keys) for name, keys in json.loads(metadata[_META_KEY])}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where} has no valid lora_jax parameter metadata ({e!r}); was it written by "
                         "lj.save_params?") from None  # fmt: skip
    if set(names) != set(tensors) or any(_paths.join(k) != n for n, k in names.items()):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise ValueError(f"{where} is inconsistent: arrays missing {missing}, arrays not listed {extra}.")
    return _paths.nest((names[name], jnp.asarray(arr)) for name, arr in tensors.items())
