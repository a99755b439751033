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

from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._files import safetensors as _safetensors
from lora_jax._files import torch_names as _torch_names
from lora_jax._ops import merge as _merge
from lora_jax._ops import quantize as _quantize

_META_KEY = "lora_jax_params"
_QUANT_KEY = "lora_jax_quantized"


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
      ValueError: if adapters do not fit ``params``, a leaf's dtype cannot be stored, a
        quantized kernel holds codes out of range or non-finite scales, or (with
        ``torch_names``) a kernel's layout is ambiguous or two leaves share a name.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, lora_jax as lj
      >>> file = os.path.join(tempfile.mkdtemp(), "model.safetensors")
      >>> lj.save_params(file, {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}})
      >>> lj.load_params(file)["dense"]["kernel"].shape
      (2, 3)
    """
    leaves = list(_paths.by_path(params, "lora_jax.save_params").values())
    by_path = _tree.adapters_by_path(adapters, "lora_jax.save_params") if adapters is not None else {}
    if by_path:
        _tree.check_fit(params, by_path, "lora_jax.save_params")
    quantized = {_paths.join(k): leaf for k, leaf in leaves if _quantize.is_quantized(leaf)}
    if quantized and (by_path or torch_names):
        _merge.refuse_quantized(params, "lora_jax.save_params (merged or with torch_names)")
    # A quantized kernel is stored as its arrays (``<path>/codes``...), described in the metadata.
    bad = [f"{path!r}: {p}" for path, q in quantized.items() for p in _quantize.value_problems(q)]
    if bad:
        raise ValueError("lora_jax.save_params: malformed quantized kernels:" + "".join(f"\n  {p}" for p in bad))
    if quantized:
        leaves = [(k + (name,) if name else k, x) for k, leaf in leaves for name, x in _quantize.parts(leaf).items()]
    is_conv = _paths.compile_pattern(conv, "conv", "lora_jax.save_params")
    tensors, problems = [], []
    for keys, leaf in leaves:
        leaf_path = _paths.join(keys)
        dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        shape, name, layout = tuple(np.shape(leaf)), leaf_path, (lambda x: x)
        if torch_names:
            try:
                name_of = name_map or _torch_names.default_name
                name, layout, _ = _torch_names.param_layout(keys, shape, name_of, roles, is_conv)
            except ValueError as e:
                problems.append(f"{leaf_path!r}: {e}")
                continue
            shape = layout(np.empty(shape, np.bool_)).shape

        def produce(leaf=leaf, adapter=by_path.get(leaf_path), layout=layout):  # noqa: B008 (bound per leaf)
            value = leaf if adapter is None else _merge.fold_kernel(leaf, adapter)
            return layout(_safetensors.to_host(value))

        tensors.append(_safetensors.Tensor(name, shape, dtype, produce))
    if problems:
        raise ValueError("lora_jax.save_params: no PyTorch layout for:" + "".join(f"\n  {p}" for p in problems))
    meta = {"format": "pt"} if torch_names else {_META_KEY: json.dumps([[_paths.join(k), list(k)] for k, _ in leaves])}
    if quantized:
        meta[_QUANT_KEY] = json.dumps({path: _quantize.describe(q) for path, q in quantized.items()})
    _safetensors.write(path, tensors, meta, "lora_jax.save_params")


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
      >>> import os, tempfile, jax.numpy as jnp, lora_jax as lj
      >>> path = os.path.join(tempfile.mkdtemp(), "params.safetensors")
      >>> lj.save_params(path, {"dense": {"kernel": jnp.ones((2, 3))}})
      >>> lj.load_params(path)["dense"]["kernel"].shape
      (2, 3)
    """
    with _safetensors.reading(path, "lora_jax.load_params", "parameter file") as f:
        try:
            names = {name: tuple(keys) for name, keys in json.loads(f.metadata[_META_KEY])}
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for ks in names.values() for k in ks):
                raise TypeError("keys must be str or int")
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"{f.where} has no valid lora_jax parameter metadata ({e!r}); was it written by "
                             "lj.save_params?") from None  # fmt: skip
        if set(names) != set(f.names) or any(_paths.join(k) != n for n, k in names.items()):
            missing, extra = sorted(set(names) - set(f.names)), sorted(set(f.names) - set(names))
            raise ValueError(f"{f.where} is inconsistent: arrays missing {missing}, arrays not listed {extra}.")
        tree = _paths.nest(((names[name], jnp.asarray(f.get(name))) for name in f.names), f.where)
        if _QUANT_KEY in f.metadata:
            tree = _quantize.rebuild(tree, f.metadata[_QUANT_KEY], f.where)
        return tree
