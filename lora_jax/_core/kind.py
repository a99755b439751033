"""Adapters and adapter kinds: the one seam every adapter type plugs into.

An adapter is a frozen dataclass registered with ``jax.tree_util.register_dataclass``: its
data fields are its trainable arrays, its static fields (``metadata=dict(static=True)``) its
hyper-parameters. What it *does* is its :class:`Kind`, registered for its class with
:func:`register_kind` and looked up along the MRO, as ``register_pytree_node`` is. Generic
code (merge, files, sharding, summaries, the factored forward) only calls the kind.

Each kernel axis has a role: ``"stack"`` (a leading layer axis added by ``nn.scan``, or any
axis that indexes independent matrices, such as a mixture-of-experts kernel's experts: one
adapter per entry), ``"in"`` (contracted with the input), ``"out"``, or ``"shared"``: an axis
that indexes independent matrices which all get the same adapter (one adapter shared by
every expert; the adapter's arrays have no such axis).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from lora_jax._core import paths as _paths

Roles = tuple[str, ...]
ROLE_NAMES = ("stack", "in", "out", "shared")
DEFAULT_ROLES_2D: Roles = ("in", "out")
Dropout = Callable[[jax.Array], jax.Array]


class Kind(NamedTuple):
    """What one adapter kind does. Register it for the adapter class with :func:`register_kind`.

    Attributes:
      name: recorded in files; :func:`load` finds the class by it.
      axes: ``adapter -> {array name: kernel axis of each array axis}`` (``None`` for an axis
        of the adapter's own, such as the rank). Shapes, shardings and the slicing of stacked
        kernels are derived from it.
      merge: ``(kernel, adapter) -> merged kernel``, both float32, in the kernel's layout.
      unmerge: ``(merged kernel, adapter) -> kernel``, the inverse of ``merge``; ``None`` if
        the kind has none (:func:`unmerge` then refuses it).
      output: ``(layer, base_output, kernel, adapter, dropout) -> output``: the adapted
        output of a layer call described by ``layer`` (a spec such as ``lj.extend.Einsum``, which
        holds the layer's input), without forming the merged kernel; ``dropout`` is the
        function to apply to the input. ``None``: the kind is applied by merging (e.g. a
        parameter trained fully).
      as_lora: ``adapter -> lj.Adapter``, its plain LoRA form (for PEFT files), or ``None``
        if it has none.
      costs: ``(adapter, usages) -> (factored, merged)``: the training FLOPs of the factored
        output and of merging into the kernel inside the step, over the calls ``usages``
        (``lj.extend.Usage``; see ``lj.extend.lowrank_costs``); ``wrap(compute="auto")`` merges when the
        second is lower. ``None``: always factored.
      frozen: the names of arrays that are data but not trained (a bank's per-adapter
        scales): the kind's output stops their gradient, :func:`lora_jax.optimizer` leaves
        them unchanged and :func:`lora_jax.summary` does not count them as trainable.
      create: ``(lora, kernel) -> adapter``: how :func:`lora_jax.init` makes this kind for
        ``LoraConfig(kind=name)``, from the kernel's fresh ``lj.Adapter`` (``a`` random, ``b``
        zero, the config's rank, alpha and roles) and the kernel (floating point, as the layer
        computes with it). A ``ValueError`` it raises is reported with the kernel's path.
        ``None``: ``init`` does not make this kind.
      peft: how the kind is written in PEFT's LoRA format (an ``lj.extend.PeftForm``), for a kind
        that is an ``lj.Adapter`` with more; ``None``: written as its ``as_lora`` form.
    """

    name: str
    axes: Callable[[Any], dict[str, tuple[int | None, ...]]]
    merge: Callable[[jax.Array, Any], jax.Array]
    unmerge: Callable[[jax.Array, Any], jax.Array] | None
    output: Callable[..., jax.Array] | None = None
    as_lora: Callable[[Any], Any] | None = None
    costs: Callable[[Any, Any], tuple[float, float]] | None = None
    frozen: tuple[str, ...] = ()
    create: Callable[[Any, jax.Array], Any] | None = None
    peft: PeftForm | None = None


class PeftForm(NamedTuple):
    """How an adapter kind that extends ``lj.Adapter`` is stored in PEFT's LoRA format: its
    ``a``, ``b`` as PEFT's ``lora_A``/``lora_B``, plus config fields and tensors of its own.

    Attributes:
      config: the PEFT config fields that mark this kind (all adapters of a file share them);
        a file whose config holds them is read as this kind.
      tensors: ``(adapter, layer) -> {suffix: array}``: the kind's own tensors of one PyTorch
        module in PEFT's layout, for an adapter without stack axes; ``layer`` is
        ``"linear"``, ``"conv"`` or ``"embedding"``. A ``ValueError`` where PEFT has no form.
      read: ``(lora, tensors, layer) -> adapter``: the inverse, from the module's LoRA part
        (an ``lj.Adapter``) and its other tensors; a ``ValueError`` saying what does not fit.
    """

    config: Mapping[str, Any]
    tensors: Callable[[Any, str], dict[str, Any]]
    read: Callable[[Any, dict[str, Any], str], Any]


_KINDS: dict[type, Kind] = {}


def register_kind(cls: type, kind: Kind) -> type:
    """Make ``cls`` (a frozen dataclass registered with ``jax.tree_util.register_dataclass``)
    an adapter kind: ``apply_lora``, ``wrap``, ``save``/``load``, ``summary`` and
    ``adapter_shardings`` then handle its instances through ``kind``.

    Args:
      cls: the adapter class. Its data fields are its arrays; its static fields must be plain
        JSON values (``str``, ``int``, ``float``, ``bool``, tuples of them) to be saved.
      kind: what the kind does.

    Returns:
      ``cls``, so that this can be used as a decorator's last step.

    Raises:
      TypeError: if ``cls`` is not a dataclass or ``kind`` not a :class:`Kind`.
      ValueError: if another class is registered under ``kind.name``.

    Example:
      >>> import lora_jax as lj
      >>> lj.extend.kind_of(lj.Adapter).name
      'lora'
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"lora_jax.extend.register_kind: cls must be a dataclass type, found {cls!r}.")
    if not _is_pytree_node(cls):
        raise TypeError(f"lora_jax.extend.register_kind: {cls.__qualname__} is not a pytree node; decorate it with "
                        "@jax.tree_util.register_dataclass (its arrays data fields, its hyper-parameters static).")
    if not isinstance(kind, Kind):
        raise TypeError(
            f"lora_jax.extend.register_kind: kind must be a lora_jax.extend.Kind, found {type(kind).__name__}."
        )
    if not isinstance(kind.name, str) or not kind.name:
        raise TypeError(f"lora_jax.extend.register_kind: the kind's name (recorded in files) must be a non-empty "
                        f"str, found {kind.name!r}.")  # fmt: skip
    taken = [c for c, k in _KINDS.items() if k.name == kind.name and c is not cls]
    if taken:
        raise ValueError(f"lora_jax.extend.register_kind: the name {kind.name!r} is taken by {taken[0].__qualname__}.")
    _KINDS[cls] = kind
    return cls


def _is_pytree_node(cls: type) -> bool:
    """Whether JAX flattens instances of ``cls`` (a dataclass) into children, checked on a bare
    instance (no ``__init__``) whose fields are all ``None``."""
    bare: Any = object.__new__(cls)
    for field in dataclasses.fields(cls):
        object.__setattr__(bare, field.name, None)
    return jax.tree_util.tree_leaves(bare) != [bare]


def kind_of(adapter_or_cls: Any) -> Kind:
    """The :class:`Kind` of an adapter (or adapter class), found along its class's MRO.

    Raises:
      TypeError: if it is not a registered adapter kind.
    """
    cls = adapter_or_cls if isinstance(adapter_or_cls, type) else type(adapter_or_cls)
    for base in cls.__mro__:
        if base in _KINDS:
            return _KINDS[base]
    raise TypeError(f"lora_jax: {cls.__qualname__} is not an adapter kind (see lora_jax.extend.register_kind).")


def is_adapter(x: Any) -> bool:
    return any(base in _KINDS for base in type(x).__mro__)


def class_named(name: str) -> type | None:
    """The adapter class registered under ``name``, or ``None``."""
    return next((c for c, k in _KINDS.items() if k.name == name), None)


def kind_names() -> list[str]:
    return sorted(k.name for k in _KINDS.values())


def kinds() -> list[Kind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def field_names(adapter_or_cls: Any, static: bool) -> list[str]:
    """The names of an adapter class's static fields, or of its data fields (its arrays)."""
    return [f.name for f in dataclasses.fields(adapter_or_cls) if bool(f.metadata.get("static")) == static]


def arrays(adapter: Any) -> dict[str, Any]:
    """``{name: array}``: an adapter's data fields (its trainable arrays)."""
    return {name: getattr(adapter, name) for name in field_names(adapter, static=False)}


def static(adapter: Any) -> dict[str, Any]:
    """``{name: value}``: an adapter's static fields (its hyper-parameters)."""
    return {name: getattr(adapter, name) for name in field_names(adapter, static=True)}


def replace(adapter: Any, **changes: Any) -> Any:
    """A copy with ``changes``; every copy goes through here, so invariants are rechecked."""
    return dataclasses.replace(adapter, **changes)


def kernel_shape(adapter: Any) -> tuple[int | None, ...]:
    """The shape of the kernel an adapter belongs to, read off its arrays' shapes: ``None`` for
    an axis no array follows (a kind with a gain per output feature knows only that axis),
    up to the last axis some array follows."""
    sizes: dict[int, int] = {}
    for name, axes in kind_of(adapter).axes(adapter).items():
        for size, k in zip(_shape(getattr(adapter, name)), axes):
            if k is not None:
                sizes[k] = size
    return tuple(sizes.get(k) for k in range(max(sizes, default=-1) + 1))


def full_shape(adapter: Any) -> tuple[int, ...]:
    """:func:`kernel_shape` of a kind whose arrays follow every kernel axis (one with roles)."""
    shape = kernel_shape(adapter)
    if any(n is None for n in shape):
        raise ValueError(f"lora_jax: the arrays of a {type(adapter).__name__} do not tell its kernel's shape {shape}.")
    return tuple(int(n) for n in shape if n is not None)


def fits(shape: Sequence[int], adapter: Any) -> bool:
    """Whether a kernel of ``shape`` is one the adapter's arrays fit."""
    known = kernel_shape(adapter)
    if any(n is None for n in known):  # a kind whose arrays do not follow every axis
        return len(shape) >= len(known) and all(k is None or k == n for k, n in zip(known, shape))
    return tuple(shape) == known


def stack_entry(adapter: Any, i: int) -> Any:
    """The adapter of entry ``i`` along its kernel's first axis (one layer of a kernel stacked by
    ``nn.scan``): the arrays that follow that axis indexed, the rest kept, and that axis's role
    dropped (for a kind with roles)."""
    axes = kind_of(adapter).axes(adapter)
    indexed = {name: x[i] for name, x in arrays(adapter).items() if axes[name][:1] == (0,)}
    roles = static(adapter).get("roles")
    return replace(adapter, **indexed, **({} if roles is None else {"roles": roles[1:]}))


def array_specs(adapter: Any, kernel_spec: Sequence[Any]) -> dict[str, tuple]:
    """Per array, the entries of ``kernel_spec`` (one per kernel axis) its axes follow."""
    return {
        name: tuple(None if k is None else kernel_spec[k] for k in axes)
        for name, axes in kind_of(adapter).axes(adapter).items()
    }


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    return tuple(shape) if isinstance(shape, (tuple, list)) else ()


# ---- roles -----------------------------------------------------------------------------


def roles_problem(roles: Any, shape: Sequence[int]) -> str | None:
    """Why ``roles`` cannot describe a kernel of ``shape``, or ``None`` if they can."""
    if not isinstance(roles, (tuple, list)) or not all(isinstance(r, str) for r in roles):
        return f"roles must be a sequence of {ROLE_NAMES}, found {roles!r}"
    if len(roles) != len(shape):
        return f"{len(roles)} roles {tuple(roles)} for a kernel of shape {tuple(shape)} ({len(shape)} axes)"
    unknown = sorted({r for r in roles if r not in ROLE_NAMES})
    if unknown:
        return f"unknown roles {unknown} in {tuple(roles)}; each axis is one of {ROLE_NAMES}"
    if "in" not in roles or "out" not in roles:
        return f"roles {tuple(roles)} need at least one 'in' and one 'out' axis"
    return None


def roles_for(
    path: str, shape: Sequence[int], roles: Mapping[str, Sequence[str]] | None, where: str = "lora_jax"
) -> Any:
    """The roles ``roles`` gives for ``path`` (an exact key first, then the first regex key that
    fully matches), else ``("in", "out")`` for a 2-D kernel, else ``None``.

    Raises:
      TypeError: if ``roles`` is not a mapping.
      ValueError: if one of its keys is not a valid regex.
    """
    if roles is not None:
        if not isinstance(roles, Mapping):
            raise TypeError(f"{where}: roles must be a dict {{path or regex: roles}}, found {type(roles).__name__}.")
        key = path if path in roles else _paths.first_match(roles, path, f"{where}: roles")
        if key is not None:
            given = roles[key]
            return tuple(given) if isinstance(given, (list, tuple)) else given  # roles_problem judges the rest
    return DEFAULT_ROLES_2D if len(shape) == 2 else None


def factor_shapes(shape: Sequence[int], roles: Roles, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``a`` and ``b`` for a kernel of ``shape`` with ``roles``."""
    of = lambda role: tuple(n for n, r in zip(shape, roles) if r == role)
    return of("stack") + of("in") + (rank,), of("stack") + (rank,) + of("out")


def fan_in_out(shape: Sequence[int], roles: Roles) -> tuple[int, int]:
    """The product of the in-axis sizes and of the out-axis sizes."""
    fan_in = math.prod(n for n, r in zip(shape, roles) if r == "in")
    return fan_in, math.prod(n for n, r in zip(shape, roles) if r == "out")
