"""PyTorch names and layouts, shared by PEFT interop and the merged export.

A Flax path maps to a PyTorch module name by dropping the final ``kernel``/``embedding`` and
joining with ``.``. Flax kernels are ``(in..., out...)`` (or any order given by their roles),
PyTorch ``Linear`` weights ``(out, in)``, ``Conv`` weights ``(cout, cin, k...)``; embeddings
are ``(vocab, features)`` in both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths

Layout = Callable[[np.ndarray], np.ndarray]


def default_name(path: str) -> str:
    """``'model/layers/0/q_proj/kernel'`` -> ``'model.layers.0.q_proj'``."""
    keys = path.split("/")
    if keys[-1] in ("kernel", "embedding") and len(keys) > 1:
        keys = keys[:-1]
    return ".".join(keys)


def layer_kind(path: str, roles: tuple[str, ...], is_conv) -> str:
    """``"embedding"``, ``"conv"`` or ``"linear"``: how PyTorch lays out this kernel."""
    if path.split("/")[-1] == "embedding":
        return "embedding"
    all_in_but_last = roles[-1] == "out" and all(r == "in" for r in roles[:-1])
    if is_conv is not None:
        return "conv" if is_conv(path, None) and all_in_but_last else "linear"
    return "conv" if all_in_but_last and len(roles) in (4, 5) else "linear"


def roles_of(path: str, shape: tuple, roles: Mapping | None) -> tuple[str, ...]:
    """:func:`_kind.roles_for`, or a ``ValueError`` for an N-D kernel without roles."""
    found = _kind.roles_for(path, shape, roles)
    if found is None:
        raise ValueError(f"the kernel {shape} has more than 2 axes and no roles; pass roles=lj.axis_roles(model, ...)")
    return found


# ---- LoRA factors: A = aᵀ (r, in), B = bᵀ (out, r); conv A (r, cin, k...), B (cout, r, 1...) ----


def lora_to_torch(kind: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """``{suffix: tensor}`` of one module's LoRA factors in PEFT's layout."""
    r = a.shape[-1]
    if kind == "embedding":
        return {"lora_embedding_A": a.T.copy(), "lora_embedding_B": b.T.copy()}
    if kind == "conv":  # a (k..., cin, r) -> (r, cin, k...); b (r, cout) -> (cout, r, 1...)
        n = a.ndim - 2
        lora_a = np.transpose(a, (n + 1, n, *range(n)))
        lora_b = b.T.reshape(b.shape[1], r, *(1,) * n)
        return {"lora_A.weight": np.ascontiguousarray(lora_a), "lora_B.weight": lora_b.copy()}
    return {"lora_A.weight": a.reshape(-1, r).T.copy(), "lora_B.weight": b.reshape(r, -1).T.copy()}


def conv_lora_from_torch(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT conv factors ``(r, cin, k...)``, ``(cout, r, 1...)`` -> ``a (k..., cin, r)``, ``b (r, cout)``."""
    n, r = lora_a.ndim - 2, lora_a.shape[0]
    return np.transpose(lora_a, (*range(2, n + 2), 1, 0)), lora_b.reshape(lora_b.shape[0], r).T


# ---- whole parameters: state-dict names and layouts ------------------------------------------


def param_layout(
    keys: tuple, shape: tuple, name_of: Callable[[str], str], roles: Mapping | None, is_conv
) -> tuple[str, Layout, Layout]:
    """The PyTorch state-dict name of a Flax leaf, its layout transform and the inverse.

    Raises:
      ValueError: if the leaf has no single PyTorch tensor (a stacked kernel) or its layout
        is ambiguous.
    """
    parent, last = list(keys[:-1]), keys[-1]
    module = name_of(_paths.join([*parent, "kernel"])) if parent else str(last)
    if not isinstance(module, str) or not module:
        raise ValueError(f"name_map returned {module!r}; a module name must be a non-empty str")
    if "{}" in module:
        raise ValueError("stacked (nn.scan) parameters have no single PyTorch tensor; export per layer")
    same: Layout = lambda x: x
    back: Layout = lambda x: x.reshape(shape)
    if last == "embedding":
        return f"{module}.weight", same, back
    if last in ("scale", "bias"):
        return f"{module}.{'weight' if last == 'scale' else 'bias'}", lambda x: x.reshape(-1), back
    if last != "kernel":
        return f"{module}.{last}", same, same
    path = _paths.join(keys)
    kernel_roles = roles_of(path, shape, roles)
    if layer_kind(path, kernel_roles, is_conv) == "conv":
        n = len(shape) - 2
        order = (n + 1, n, *range(n))
        return f"{module}.weight", lambda x: np.transpose(x, order), lambda x: np.transpose(x, np.argsort(order))
    if "stack" in kernel_roles:
        raise ValueError(f"the kernel {shape} has roles {kernel_roles}; a PyTorch Linear has no stack axes")
    order = tuple(i for i, r in enumerate(kernel_roles) if r == "out") + tuple(
        i for i, r in enumerate(kernel_roles) if r == "in"
    )
    fan_in, fan_out = _kind.fan_in_out(shape, kernel_roles)
    permuted = tuple(shape[i] for i in order)
    return (
        f"{module}.weight",
        lambda x: np.transpose(x, order).reshape(fan_out, fan_in),
        lambda x: np.transpose(x.reshape(permuted), np.argsort(order)),
    )


def param_names(params: Any, name_of: Callable[[str], str], roles: Mapping | None, is_conv) -> dict[str, tuple]:
    """``{torch name: (keys, shape, inverse layout)}`` of every leaf that has one."""
    out = {}
    for keys, leaf in _paths.leaves_with_paths(params):
        shape = tuple(np.shape(leaf))
        try:
            name, _, inverse = param_layout(keys, shape, name_of, roles, is_conv)
        except ValueError:
            continue
        out[name] = (keys, shape, inverse)
    return out


def merge_into(path: str, adapter: Any, weight: np.ndarray, module: str, *, index: int | None = None) -> np.ndarray:
    """``weight``, a tensor in PyTorch's layout (a state dict's, a GGUF file's), with the adapter
    at ``path`` merged as :func:`lora_jax.apply_lora` merges it (layer ``index`` of a stacked
    one): float32, row-major, in the same layout.

    Raises:
      ValueError: if the adapter is for a tensor of another shape, or has no PyTorch layout.
    """
    kind = _kind.kind_of(adapter)
    if index is not None:  # one layer of a kernel stacked by nn.scan
        adapter = _kind.stack_entry(adapter, index)
    if hasattr(adapter, "roles"):
        shape, roles = _kind.full_shape(adapter), {path: adapter.roles}
    else:  # a kind without roles (a fully trained parameter) holds the whole value
        shape, roles = tuple(adapter.value.shape), None
    _, layout, inverse = param_layout(tuple(path.split("/")), shape, lambda _: module, roles, None)
    want = layout(np.empty(shape, np.bool_)).shape
    if want != weight.shape:
        raise ValueError(f"the adapter is for a {want} tensor, the base's is {weight.shape}")
    merged = kind.merge(jax.numpy.asarray(inverse(np.asarray(weight, np.float32))), adapter)
    return np.ascontiguousarray(layout(np.asarray(merged, np.float32)))  # row-major, as writers read memory
