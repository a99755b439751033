"""Views of an adapted kernel: how a value in a traced program is laid out from the kernel.

Between a parameter and its use, programs rearrange kernels without computing on them: a
``transpose`` (``x @ W.T``), a dtype cast, a ``reshape`` that splits or merges whole axes, a
size-1 axis added or removed. The engine follows a kernel through such operations as a
:class:`View`: for each axis of the current value, the *atoms* of the kernel it holds, an
atom ``(k, j)`` being piece ``j`` of kernel axis ``k`` (a kernel axis split by a reshape has
several pieces; an axis of size 1 that a program added holds none).

:func:`regroup` moves an array between two such layouts (one reshape, one transpose, one
reshape), which is all the engine needs to bring a use's input to the kernel's own layout
and the result back, so that adapter kinds only ever see kernels in their own layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Atom = tuple[Any, ...]  # (kernel axis, piece), or any hashable label of an axis of another array
Group = tuple[Atom, ...]  # the atoms one axis holds, in row-major order

# Operations that change neither values nor layout (a dtype cast rounds, as the program does).
# ``stop_gradient`` too: it stops the base kernel (frozen anyway), not the adapter, which trains
# through it — as when an attached model, which freezes its base so, runs inside a wrapped call.
_ELEMENTWISE_LAYOUT = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
                       "stop_gradient"}  # fmt: skip


class View(NamedTuple):
    """How a value is laid out from a kernel: ``groups[i]`` the atoms axis ``i`` holds,
    ``pieces[k]`` the sizes kernel axis ``k`` is split into."""

    groups: tuple[Group, ...]
    pieces: tuple[tuple[int, ...], ...]

    @staticmethod
    def identity(shape: Sequence[int]) -> View:
        return View(tuple(((k, 0),) for k in range(len(shape))), tuple((n,) for n in shape))

    def sizes(self) -> dict[Atom, int]:
        return {(k, j): n for k, ns in enumerate(self.pieces) for j, n in enumerate(ns)}

    def is_permutation(self) -> bool:
        """Whether each axis is one whole kernel axis (a transpose of the kernel, maybe cast)."""
        return all(len(g) == 1 for g in self.groups) and all(len(p) == 1 for p in self.pieces)

    def kernel_axis(self, d: int) -> int:
        """The kernel axis that axis ``d`` is (of a view that :meth:`is_permutation`)."""
        return self.groups[d][0][0]

    def kernel_groups(self) -> tuple[Group, ...]:
        """The kernel's own layout: axis ``k`` holds its pieces in order."""
        return tuple(tuple((k, j) for j in range(len(p))) for k, p in enumerate(self.pieces))

    def drop_leading(self) -> tuple[View, int] | None:
        """The view of one slice along axis 0 (``scan`` over a stacked kernel) and the kernel
        axis removed, or ``None`` unless axis 0 is one whole kernel axis."""
        first = self.groups[0]
        if len(first) != 1 or len(self.pieces[first[0][0]]) != 1:
            return None
        k = first[0][0]
        shift = lambda g: tuple((a - (a > k), j) for a, j in g)
        return View(tuple(shift(g) for g in self.groups[1:]), self.pieces[:k] + self.pieces[k + 1 :]), k


def add_leading(view: View, axis: int, size: int) -> View:
    """The inverse of :meth:`View.drop_leading`: the view of slices stacked along a new axis 0
    that is kernel axis ``axis`` (of ``size``)."""
    shift = lambda g: tuple((a + (a >= axis), j) for a, j in g)
    groups = (((axis, 0),),) + tuple(shift(g) for g in view.groups)
    return View(groups, view.pieces[:axis] + ((size,),) + view.pieces[axis:])


def step(view: View, name: str, params: dict, in_shape: tuple[int, ...]) -> View | None:
    """The view after the layout operation ``name`` (a primitive of one operand), or ``None``
    if it is not a layout operation the engine follows."""
    if name in _ELEMENTWISE_LAYOUT:
        return view
    if name == "transpose":
        return view._replace(groups=tuple(view.groups[p] for p in params["permutation"]))
    if name == "squeeze":
        dims = {d % len(in_shape) for d in params["dimensions"]}
        if any(view.groups[d] for d in dims):
            return None  # a kernel axis of size 1 squeezed away: not followed
        return view._replace(groups=tuple(g for i, g in enumerate(view.groups) if i not in dims))
    if name == "broadcast_in_dim":
        shape, dims = params["shape"], params["broadcast_dimensions"]
        if any(shape[d] != in_shape[i] for i, d in enumerate(dims)) or any(
            shape[d] != 1 for d in range(len(shape)) if d not in dims
        ):
            return None  # a real broadcast repeats the kernel: not a view
        groups: list[Group] = [()] * len(shape)
        for i, d in enumerate(dims):
            groups[d] = view.groups[i]
        return view._replace(groups=tuple(groups))
    if name == "reshape" and params.get("dimensions") is None:
        return _reshape(view, in_shape, tuple(params["new_sizes"]))
    return None


def _reshape(view: View, old: tuple[int, ...], new: tuple[int, ...]) -> View | None:
    """A reshape that merges whole axes, splits one axis into whole atoms or a whole kernel
    axis into pieces, and adds or removes axes of size 1; anything else is ``None``."""
    sizes = view.sizes()
    pieces = [list(p) for p in view.pieces]
    groups: list[Group] = []
    i = j = 0
    while i < len(old) or j < len(new):
        # Size-1 axes of the program's own (no atoms) go and come freely.
        while i < len(old) and old[i] == 1 and not view.groups[i]:
            i += 1
        while j < len(new) and new[j] == 1:
            groups.append(())
            j += 1
        if i >= len(old) and j >= len(new):
            break
        if i >= len(old) or j >= len(new):
            return None
        matched = _matching_axes(old, new, i, j)
        if matched is None:
            return None
        olds, news = matched
        i, j = olds[-1] + 1, news[-1] + 1
        atoms = tuple(a for o in olds for a in view.groups[o])
        if len(news) == 1:
            groups.append(atoms)
            continue
        # A split: along atom boundaries, or of one whole unsplit kernel axis into pieces.
        cut = _split_atoms(atoms, [new[n] for n in news], sizes)
        if cut is None:
            if len(atoms) != 1 or len(pieces[atoms[0][0]]) != 1:
                return None
            k = atoms[0][0]
            pieces[k] = [new[n] for n in news]
            cut = [((k, t),) for t in range(len(news))]
        groups.extend(cut)
    return View(tuple(groups), tuple(tuple(p) for p in pieces))


def _matching_axes(old: tuple[int, ...], new: tuple[int, ...], i: int, j: int) -> tuple[list[int], list[int]] | None:
    """The fewest axes of ``old`` from ``i`` and of ``new`` from ``j`` whose sizes have one
    product, or ``None`` if the shapes end first."""
    olds, news = [i], [j]
    while math.prod(old[o] for o in olds) != math.prod(new[n] for n in news):
        if math.prod(old[o] for o in olds) < math.prod(new[n] for n in news):
            if olds[-1] + 1 >= len(old):
                return None
            olds.append(olds[-1] + 1)
        else:
            if news[-1] + 1 >= len(new):
                return None
            news.append(news[-1] + 1)
    return olds, news


def _split_atoms(atoms: Group, sizes_wanted: list[int], sizes: dict[Atom, int]) -> list[Group] | None:
    out: list[Group] = []
    it = iter(atoms)
    for want in sizes_wanted:
        current: list[Atom] = []
        while math.prod(sizes[a] for a in current) < want:
            a = next(it, None)
            if a is None:
                return None
            current.append(a)
        if math.prod(sizes[a] for a in current) != want:
            return None
        out.append(tuple(current))
    return out if next(it, None) is None else None


def regroup(x: jax.Array, src: Sequence[Group], dst: Sequence[Group], sizes: dict[Atom, int]) -> jax.Array:
    """``x``, whose axis ``i`` holds the atoms ``src[i]``, laid out so that axis ``i`` holds
    ``dst[i]`` (both covering the same atoms; an empty group is an axis of size 1)."""
    flat_src = [a for g in src for a in g]
    flat_dst = [a for g in dst for a in g]
    if sorted(flat_src, key=repr) != sorted(flat_dst, key=repr):
        raise ValueError(f"lora_jax: internal error: regroup {src} -> {dst}")
    if list(src) == list(dst):
        return x
    y = jnp.reshape(x, tuple(sizes[a] for a in flat_src))
    order = tuple(flat_src.index(a) for a in flat_dst)
    if order != tuple(range(len(order))):
        y = jnp.transpose(y, order)
    return jnp.reshape(y, tuple(math.prod(sizes[a] for a in g) for g in dst))


def of_kernel(kernel: jax.Array, view: View, dtype: Any) -> jax.Array:
    """``kernel`` (in its own layout) laid out as ``view`` and cast to ``dtype``."""
    out = regroup(kernel, view.kernel_groups(), view.groups, view.sizes())
    return out.astype(dtype)


def move_axis_first(x: jax.Array, axis: int) -> jax.Array:
    return x if axis == 0 else jnp.moveaxis(x, axis, 0)

