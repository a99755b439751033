"""The engine: LoRA as a transformation of the traced program.

``fn(params, *args)`` is traced to a jaxpr once per input signature. Each adapted kernel is
followed from its input variable through layout-only operations (:mod:`lora_jax._engine.views`) to
every *use*, and the program is evaluated again with each use computed by the adapter
kind's factored output, never forming ``W + scale·a⋅b``:

- ``dot_general`` with any dimension numbers: contracted kernel axes equal to the adapter's
  ``in`` axes give ``(x⋅a)⋅b``, equal to its ``out`` axes (a tied head ``h @ E.T``) give
  ``(x⋅bᵀ)⋅aᵀ``; kernel batch axes are ``stack`` axes;
- ``conv_general_dilated`` on a ``(spatial..., in, out)`` kernel;
- ``gather`` of whole rows (an embedding lookup): rows of ``a``, then ``⋅b``.

The engine enters ``jit`` calls (inlined), ``checkpoint`` (re-emitted with its policy),
``scan`` (a kernel stacked along the scanned axis is sliced with its adapter, which rides
beside it as a scanned input), ``cond`` and ``while``. Any other use of a kernel (an
elementwise op, a ``custom_jvp``/``custom_vjp`` call, a ``shard_map``, a Pallas call) gets
the merged kernel at that use only, with one warning naming the path and the operation.

The same walk, with no adapters, finds each kernel's axis roles from its uses (:func:`roles`).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from lora_jax._core import cost as _cost
from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import specs as _specs
from lora_jax._engine import views as _views
from lora_jax._engine.views import View
from lora_jax._ops import merge as _merge
from lora_jax._ops import quantize as _quantize

_INLINED = {"jit", "pjit", "closed_call", "core_call"}
_REMAT = {"checkpoint", "remat2", "remat"}
_LETTERS = _specs._LETTERS


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Kernel:
    """A value of the program that is a view of an adapted kernel.

    ``kernel`` is the kernel in its own layout (without the axes a ``scan`` sliced off),
    ``adapter`` its adapter in that layout (``None`` while finding roles, and for a quantized
    kernel without one), ``value`` the program's own value (``kernel`` laid out by ``view``,
    maybe cast), ``axes`` the axis of the full kernel each axis of ``kernel`` is.

    A quantized kernel (:class:`lora_jax.Quantized`) stays quantized: its ``value`` is only a
    shape and dtype, and each use dequantizes it inside a ``jax.checkpoint`` of the use itself,
    so a step never holds every dequantized kernel (the backward pass dequantizes again)."""

    kernel: Any
    adapter: Any
    value: Any
    path: str
    view: View
    axes: tuple[int, ...]
    ndim: int

    def tree_flatten(self):
        lazy = isinstance(self.value, jax.ShapeDtypeStruct)  # a quantized kernel's: no array to carry
        children = (self.kernel, self.adapter) + (() if lazy else (self.value,))
        return children, (self.path, self.view, self.axes, self.ndim, self.value if lazy else None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        *aux, lazy = aux
        kernel, adapter, *value = children
        return cls(kernel, adapter, lazy if lazy is not None else value[0], *aux)


def _quantized(k: Kernel) -> bool:
    return _quantize.is_quantized(k.kernel)


def dense(k: Kernel) -> jax.Array:
    """The kernel in its own layout as a float array (a quantized kernel dequantized)."""
    return _quantize.dequantize_kernel(k.kernel) if _quantized(k) else k.kernel


def current(k: Kernel) -> jax.Array:
    """The program's value of ``k`` (without the adapter)."""
    return _views.of_kernel(dense(k), k.view, k.value.dtype) if _quantized(k) else k.value


def _base(eqn: Any, invals: list, k: Kernel) -> jax.Array:
    """The use ``eqn`` of the base kernel ``k`` (its value in place of ``k``). A quantized
    kernel is dequantized at the use only: once when the other inputs are ready, and again in
    the backward pass when the output's cotangent arrives (optimization barriers tie the
    dequantization to them), so a step never holds every dequantized kernel at once."""
    if not _quantized(k):
        return _bind(eqn, [k.value if x is k else x for x in invals])[0]

    def use(q, others):
        it = iter(others)
        return _bind(eqn, [current(dataclasses.replace(k, kernel=q)) if x is k else next(it) for x in invals])[0]

    @jax.custom_vjp
    def dequantized_use(q, others):
        return use(q, others)

    def forward(q, others):
        return use(*jax.lax.optimization_barrier((q, others))), (q, others)

    def backward(residuals, g):
        q, others = residuals
        q_now, g = jax.lax.optimization_barrier((q, g))
        _, vjp = jax.vjp(lambda others: use(q_now, others), others)
        return jax.tree.map(_zero_cotangent, q), vjp(g)[0]

    dequantized_use.defvjp(forward, backward)
    return dequantized_use(k.kernel, [x for x in invals if x is not k])


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


class Run:
    """What one evaluation shares: the dropout key (``None``: no dropout), the usages of each
    factored kernel (for ``compute="auto"``), the roles seen (when finding roles), and the
    uses that were merged."""

    def __init__(self, *, rng: Any = None, find_roles: bool = False):
        self.rng = rng
        self.find_roles = find_roles
        self.usages: dict[str, list[_cost.Usage]] = {}
        self.roles: dict[str, tuple[str, ...]] = {}
        self.merged: dict[str, set[str]] = {}
        self.count: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self.transposed: dict[str, str] = {}  # kernels with a use contracting the adapter's out axes
        self.forward: set[str] = set()  # and kernels with a use contracting its in axes

    def dropout(self, path: str, adapter: Any) -> Callable | None:
        rate = _kind.static(adapter).get("dropout", 0.0)
        if self.rng is None or not rate:
            return None
        n = self.count[path] = self.count.get(path, 0) + 1
        key = jax.random.fold_in(jax.random.fold_in(self.rng, zlib.crc32(path.encode())), n)

        def drop(x: jax.Array) -> jax.Array:
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

        return drop

    def record_roles(self, k: Kernel, local: tuple[str, ...]) -> None:
        full = ["stack"] * k.ndim  # axes a scan sliced off are stacks
        for axis, role in zip(k.axes, local):
            full[axis] = role
        self.roles.setdefault(k.path, tuple(full))


# ---- evaluation -----------------------------------------------------------------------------


def evaluate(run: Run, jaxpr: Any, consts: list, args: list) -> list:
    """Evaluate ``jaxpr`` on ``args`` (some of them :class:`Kernel`\\ s), every use of a
    kernel computed factored where possible."""
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, Kernel) for x in invals):
            outs = _RULES.get(eqn.primitive.name, _merged_use)(run, eqn, invals)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: Any, invals: list) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def values(run: Run, xs: list, where: str) -> list:
    """``xs`` with each :class:`Kernel` replaced by its merged value (the use ``where``)."""
    return [merged_value(run, x, where) if isinstance(x, Kernel) else x for x in xs]


def merged_value(run: Run, k: Kernel, where: str) -> jax.Array:
    """The program's value of ``k`` with its adapter merged: ``W + scale·a⋅b`` laid out as the
    program lays out ``W`` here."""
    if k.adapter is None:
        return current(k)
    run.merged.setdefault(k.path, set()).add(where)
    merged = _merge.fold_kernel(dense(k), k.adapter)
    return _views.of_kernel(merged, k.view, k.value.dtype)


def _merged_use(run: Run, eqn: Any, invals: list) -> list:
    return _bind(eqn, values(run, invals, eqn.primitive.name))


# ---- layout operations ------------------------------------------------------------------------


def _layout(run: Run, eqn: Any, invals: list) -> list:
    k = invals[0]
    view = _views.step(k.view, eqn.primitive.name, eqn.params, tuple(k.value.shape)) if len(invals) == 1 else None
    if view is None:
        return _merged_use(run, eqn, invals)
    if _quantized(k):  # stays quantized: only the shape and dtype follow
        aval = eqn.outvars[0].aval
        return [dataclasses.replace(k, value=jax.ShapeDtypeStruct(aval.shape, aval.dtype), view=view)]
    (value,) = _bind(eqn, [k.value])
    return [dataclasses.replace(k, value=value, view=view)]


# ---- uses -----------------------------------------------------------------------------------


def _implied(n: int, contracted: list, batch: list) -> tuple[str, ...]:
    """The roles a use gives a kernel's axes: batch axes stack, contracted axes in, others out."""
    return tuple("stack" if a in batch else "in" if a in contracted else "out" for a in range(n))


def _check_use(run: Run, k: Kernel, use_roles: tuple[str, ...]) -> bool:
    """Whether ``k``'s adapter computes a use whose roles are ``use_roles``: as they are, or
    transposed (in and out swapped: a tied head ``h @ E.T`` computes ``(h⋅bᵀ)⋅aᵀ``). A
    contradiction is noted (reported with the others when the run ends)."""
    roles = _roles(k.adapter)
    if roles is None:  # a kind without roles (a gain per output feature): its output reads the use
        run.forward.add(k.path)
        return True
    # An adapter's stack axis may be a free axis of the use: one branch per entry of it.
    # A shared axis is one the use indexes (a stack axis of the use): one adapter for each entry.
    fits = lambda r, u: r == u or (r, u) in (("stack", "out"), ("shared", "stack"))
    if len(use_roles) == len(roles) and all(map(fits, roles, use_roles)):
        run.forward.add(k.path)
        return True
    swapped = tuple({"in": "out", "out": "in"}.get(r, r) for r in use_roles)
    if roles == swapped and "stack" not in roles:
        run.transposed.setdefault(k.path, _mismatch(k, use_roles))
        return True
    _contradiction(run, k, use_roles)
    return False


def _roles(adapter: Any) -> tuple[str, ...] | None:
    """An adapter's axis roles; ``None`` for a kind that has none."""
    return getattr(adapter, "roles", None)


def _mismatch(k: Kernel, use_roles: tuple[str, ...]) -> str:
    return f"the adapter has roles {k.adapter.roles}, the model uses its kernel {tuple(k.kernel.shape)} as {use_roles}"


def _contradiction(run: Run, k: Kernel, use_roles: tuple[str, ...]) -> None:
    run.problems.setdefault(k.path, _mismatch(k, use_roles))


def check(run: Run) -> None:
    """Raise the contradictions between adapters and uses seen in ``run``: roles that fit no
    use, and kernels only ever used transposed (an ``(out, in)`` kernel given the default 2-D
    roles would train and export transposed)."""
    problems = dict(run.problems)
    for path, why in run.transposed.items():
        if path not in run.forward:
            problems.setdefault(path, why + " only")
    if problems:
        raise ValueError(
            "lora_jax.wrap: adapters contradict how the model uses their kernels:"
            + "".join(f"\n  {p!r}: {why}" for p, why in sorted(problems.items()))
            + "\nCreate adapters with roles=lj.axis_roles(model, *sample_inputs)."
        )


def _output(run: Run, k: Kernel, spec: _specs.Spec, base: jax.Array, where: str) -> jax.Array:
    output = _kind.kind_of(k.adapter).output
    assert output is not None  # kinds without one are merged before the run
    run.usages.setdefault(k.path, []).append(_cost.usage(spec, tuple(k.kernel.shape)))
    try:
        return output(spec, base, dense(k), k.adapter, run.dropout(k.path, k.adapter))
    except ValueError as e:
        raise ValueError(f"lora_jax.wrap: {k.path!r} ({where}): {e}") from e


def _unfactorable(run: Run, eqn: Any, invals: list, why: str) -> list:
    """The use ``eqn`` with the merged kernel, ``why`` it cannot be factored noted for the warning."""
    return _bind(eqn, values(run, invals, f"{eqn.primitive.name} ({why})"))


def _dot_general(run: Run, eqn: Any, invals: list) -> list:
    lhs, rhs = invals
    if isinstance(lhs, Kernel) and isinstance(rhs, Kernel):
        return _merged_use(run, eqn, invals)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k_is_lhs = isinstance(lhs, Kernel)
    k, x = (lhs, rhs) if k_is_lhs else (rhs, lhs)
    kc, kb, xc, xb = (lc, lb, rc, rb) if k_is_lhs else (rc, rb, lc, lb)
    view = k.view
    category = {d: "c" for d in kc} | {d: "b" for d in kb}
    cats: dict[int, set] = {}
    for d, group in enumerate(view.groups):
        for axis, _ in group:
            cats.setdefault(axis, set()).add(category.get(d, "f"))
    if any(len(c) != 1 for c in cats.values()):
        return _unfactorable(run, eqn, invals, "a kernel axis split between contracted and kept axes")
    of = lambda c: [axis for axis in range(len(view.pieces)) if cats.get(axis) == {c}]
    batch, contracted, free = of("b"), of("c"), of("f")
    base = _base(eqn, invals, k)
    use_roles = _implied(len(view.pieces), contracted, batch)
    if run.find_roles:
        run.record_roles(k, use_roles)
        return [base]
    if k.adapter is None:
        return [base]
    if not _check_use(run, k, use_roles):
        return _merged_use(run, eqn, invals)
    sizes = view.sizes() | {("x", i): n for i, n in enumerate(x.shape)}
    pairs = dict(zip(xc, kc)) | dict(zip(xb, kb))
    x_groups = [view.groups[pairs[i]] if i in pairs else (("x", i),) for i in range(x.ndim)]
    x_free = [(("x", i),) for i in range(x.ndim) if i not in pairs]
    whole = view.kernel_groups()
    x_layout = [whole[a] for a in batch] + x_free + [whole[a] for a in contracted]
    y_layout = [whole[a] for a in batch] + x_free + [whole[a] for a in free]
    k_free = [view.groups[d] for d in range(len(view.groups)) if d not in category]
    out_layout = [view.groups[d] for d in kb] + (k_free + x_free if k_is_lhs else x_free + k_free)
    letter: dict[Any, str] = {a: _LETTERS[a] for a in range(len(view.pieces))}
    letter |= {g[0]: _LETTERS[len(view.pieces) + j] for j, g in enumerate(x_free)}
    spell = lambda layout: "".join(letter[g[0][0]] if g[0][0] != "x" else letter[g[0]] for g in layout)
    equation = f"{spell(x_layout)},{''.join(letter[a] for a in range(len(view.pieces)))}->{spell(y_layout)}"
    spec = _specs.Einsum(equation, _views.regroup(x, x_groups, x_layout, sizes), roles=_roles(k.adapter) or use_roles)
    y = _output(run, k, spec, _views.regroup(base, out_layout, y_layout, sizes), "dot_general")
    return [_views.regroup(y, y_layout, out_layout, sizes)]


def _conv(run: Run, eqn: Any, invals: list) -> list:
    lhs, rhs = invals
    p = eqn.params
    if isinstance(lhs, Kernel):
        return _merged_use(run, eqn, invals)
    k = rhs
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return _unfactorable(run, eqn, invals, "a grouped convolution")
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    if not k.view.is_permutation():
        return _unfactorable(run, eqn, invals, "a reshaped kernel")
    axis = k.view.kernel_axis
    n = len(rhs_spec) - 2
    if [axis(d) for d in rhs_spec[2:]] + [axis(rhs_spec[1]), axis(rhs_spec[0])] != list(range(n + 2)):
        return _unfactorable(run, eqn, invals, "a kernel not laid out (spatial..., in, out)")
    base = _base(eqn, invals, k)
    roles = ("in",) * (n + 1) + ("out",)
    if run.find_roles:
        run.record_roles(k, roles)
        return [base]
    if k.adapter is None:
        return [base]
    if _roles(k.adapter) not in (roles, None):
        _contradiction(run, k, roles)
        return _merged_use(run, eqn, invals)
    run.forward.add(k.path)
    to_last = lambda s: (s[0], *s[2:], s[1])
    x = jnp.transpose(lhs, to_last(lhs_spec))
    out_perm = to_last(out_spec)
    spec = _specs.Conv(x, tuple(p["window_strides"]), tuple(map(tuple, p["padding"])), tuple(p["lhs_dilation"]),
                       tuple(p["rhs_dilation"]))  # fmt: skip
    y = _output(run, k, spec, jnp.transpose(base, out_perm), "conv_general_dilated")
    return [jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))]


def _gather(run: Run, eqn: Any, invals: list) -> list:
    k, indices = invals
    if not isinstance(k, Kernel) or isinstance(indices, Kernel):
        return _merged_use(run, eqn, invals)
    p = eqn.params
    dn = p["dimension_numbers"]
    rows = (
        k.view.groups == (((0, 0),), ((1, 0),))
        and k.view.pieces[1] == (k.kernel.shape[1],)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(dn.operand_batching_dims)
        and tuple(p["slice_sizes"]) == (1, k.kernel.shape[1])
        and indices.shape[-1] == 1
        and tuple(dn.offset_dims) == (indices.ndim - 1,)
    )
    if not rows:
        return _unfactorable(run, eqn, invals, "not a lookup of whole rows")
    base = _base(eqn, invals, k)
    if run.find_roles:
        run.record_roles(k, ("in", "out"))
        return [base]
    if k.adapter is None:
        return [base]
    if _roles(k.adapter) not in (("in", "out"), None):
        _contradiction(run, k, ("in", "out"))
        return _merged_use(run, eqn, invals)
    run.forward.add(k.path)
    ids = indices[..., 0]
    if "CLIP" in str(p["mode"]) or "PROMISE" in str(p["mode"]):
        ids = jnp.clip(ids, 0, k.kernel.shape[0] - 1)
    return [_output(run, k, _specs.Lookup(ids), base, "gather")]


def _ragged_dot(run: Run, eqn: Any, invals: list) -> list:
    """``ragged_dot(x, kernel, group_sizes)``: a mixture-of-experts layer's experts, the kernel's
    group axis a ``stack`` axis (one adapter per expert), each row through its expert's adapter."""
    x, k, group_sizes = invals[:3]
    if not isinstance(k, Kernel) or isinstance(x, Kernel) or isinstance(group_sizes, Kernel):
        return _merged_use(run, eqn, invals)
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (x_contracted, k_contracted), batch = dn.dot_dimension_numbers
    canonical = (
        len(invals) == 3 and eqn.params.get("group_offset") is None and batch == ((), ()) and jnp.ndim(x) == 2
        and tuple(dn.lhs_ragged_dimensions) == (0,) and tuple(x_contracted) == (1,) and len(k_contracted) == 1
        and len(dn.rhs_group_dimensions) == 1 and len(k.view.groups) == 3 and k.view.is_permutation()
    )  # fmt: skip
    if not canonical:
        return _unfactorable(run, eqn, invals, "a grouped product other than x (tokens, in) by (groups, in, out)")
    group, contracted = dn.rhs_group_dimensions[0], k_contracted[0]
    axis = k.view.kernel_axis
    roles = ["out"] * 3
    roles[axis(group)], roles[axis(contracted)] = "stack", "in"
    base = _base(eqn, invals, k)
    if run.find_roles:
        run.record_roles(k, tuple(roles))
        return [base]
    if k.adapter is None:
        return [base]
    if not _check_use(run, k, tuple(roles)):
        return _merged_use(run, eqn, invals)
    return [_output(run, k, _specs.Grouped(x, group_sizes), base, "ragged_dot")]


# ---- higher-order primitives ----------------------------------------------------------------


def _inline(run: Run, eqn: Any, invals: list) -> list:
    closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, [])
    return evaluate(run, jaxpr, list(consts), invals)


def _remat(run: Run, eqn: Any, invals: list) -> list:
    p = eqn.params
    jaxpr = p["jaxpr"]
    jaxpr, consts = (jaxpr.jaxpr, list(jaxpr.consts)) if hasattr(jaxpr, "consts") else (jaxpr, [])
    body = lambda ins: evaluate(run, jaxpr, consts, ins)
    out = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(invals)
    return out


def _scan(run: Run, eqn: Any, invals: list) -> list:
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    init = values(run, init, "scan carry")
    rebuild: list[Callable | None] = []
    scanned: list[Any] = []
    sliced_from: dict[str, tuple[Kernel, int]] = {}
    for x in xs:
        plan = _slice_plan(x) if isinstance(x, Kernel) else None
        if isinstance(x, Kernel) and plan is None:
            x = merged_value(run, x, "scan over a non-stack axis")
        if plan is not None:
            sliced_from[x.path] = (x, plan[2])
        rebuild.append(plan[1] if plan else None)
        scanned.append(plan[0] if plan else x)
    closed = p["jaxpr"]
    counter = run.rng is not None
    restack: dict[int, tuple[Kernel, View]] = {}  # ys that are slices of a scanned kernel, stacked again

    def body(carry, sliced):
        carry = list(carry)
        step = carry.pop() if counter else None
        ins = [r(s) if r else s for r, s in zip(rebuild, sliced)]
        outer_rng = run.rng
        if counter:
            run.rng = jax.random.fold_in(outer_rng, step)
        try:
            outs = evaluate(run, closed.jaxpr, list(closed.consts), list(consts) + carry + ins)
        finally:
            run.rng = outer_rng
        ys = outs[n_carry:]
        for i, y in enumerate(ys):
            outer, axis = sliced_from.get(y.path, (None, 0)) if isinstance(y, Kernel) else (None, 0)
            if outer is not None and len(y.axes) == len(outer.axes) - 1:
                restack[i] = (outer, _views.add_leading(y.view, axis, outer.kernel.shape[axis]))
                ys[i] = current(y)
        new_carry = values(run, outs[:n_carry], "scan carry") + ([step + 1] if counter else [])
        return new_carry, values(run, ys, "scan output")

    start = list(init) + ([jnp.zeros((), jnp.int32)] if counter else [])
    carry, ys = jax.lax.scan(body, start, scanned, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    ys = list(ys)
    for i, (outer, view) in restack.items():
        value = jax.ShapeDtypeStruct(ys[i].shape, ys[i].dtype) if _quantized(outer) else ys[i]
        ys[i] = dataclasses.replace(outer, value=value, view=view)
    return list(carry[:n_carry]) + ys


def _slice_plan(k: Kernel) -> tuple[Any, Callable, int] | None:
    """How to scan over axis 0 of a kernel's value: ``(arrays to scan, rebuild, the kernel axis
    scanned)``, or ``None``
    unless axis 0 is a whole stack axis of the kernel (and of its adapter)."""
    dropped = k.view.drop_leading()
    if dropped is None:
        return None
    view, axis = dropped
    adapter = k.adapter
    kernel_arrays: Any = _views.move_axis_first(k.kernel, axis) if not _quantized(k) else None
    unstack: Callable[[Any], Any] = lambda x: x
    if _quantized(k):
        stacked = _quantize.leading_slices(k.kernel) if axis == 0 else None
        if stacked is None:  # blocks that cross the stacked axis: dequantized whole, before the loop
            return _slice_plan(dataclasses.replace(k, kernel=dense(k), value=current(k)))
        kernel_arrays, unstack = stacked
    arrays: dict[str, Any] = {}
    role = None if _roles(adapter) is None else adapter.roles[axis]
    if role not in (None, "stack", "shared"):
        return None
    if adapter is not None and role != "shared":  # a shared adapter is the same at every step: not sliced
        for name, follows in _kind.kind_of(adapter).axes(adapter).items():
            if axis not in follows:
                return None
            arrays[name] = _views.move_axis_first(getattr(adapter, name), follows.index(axis))
    value = jax.ShapeDtypeStruct(k.value.shape[1:], k.value.dtype) if _quantized(k) else None
    scanned = {"value": None if _quantized(k) else k.value, "kernel": kernel_arrays, "arrays": arrays}
    axes = k.axes[:axis] + k.axes[axis + 1 :]

    def rebuild(s: dict) -> Kernel:
        local = None
        if adapter is not None:
            roles = _roles(adapter)
            local = _kind.replace(adapter, **s["arrays"], **({} if roles is None else
                                                                 {"roles": roles[:axis] + roles[axis + 1 :]}))
            # (a shared adapter's arrays are not in s["arrays"]: the whole arrays, as they are)
        return Kernel(unstack(s["kernel"]), local, value if value is not None else s["value"], k.path, view, axes,
                      k.ndim)  # fmt: skip

    return scanned, rebuild, axis


def _cond(run: Run, eqn: Any, invals: list) -> list:
    index, *ops = invals
    branches = [
        (lambda *xs, b=b: values(run, evaluate(run, b.jaxpr, list(b.consts), list(xs)), "cond output"))
        for b in eqn.params["branches"]
    ]
    return list(jax.lax.switch(index, branches, *ops))


def _while(run: Run, eqn: Any, invals: list) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc : nc + nb], values(run, invals[nc + nb :], "while carry")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    cond = lambda c: evaluate(run, cj.jaxpr, list(cj.consts), list(cconsts) + list(c))[0]
    body = lambda c: tuple(values(run, evaluate(run, bj.jaxpr, list(bj.consts), list(bconsts) + list(c)), "while"))
    return list(jax.lax.while_loop(cond, body, tuple(init)))


_RULES: dict[str, Callable[[Run, Any, list], list]] = {
    **{name: _layout for name in ("transpose", "reshape", "squeeze", "broadcast_in_dim") + tuple(
        _views._ELEMENTWISE_LAYOUT)},
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "ragged_dot_general": _ragged_dot,
    **{name: _inline for name in _INLINED},
    **{name: _remat for name in _REMAT},
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}  # fmt: skip


# ---- tracing ------------------------------------------------------------------------------


@dataclasses.dataclass
class Traced:
    """``fn(params, *args, **kwargs)`` as a jaxpr over its array inputs: ``paths[i]`` the
    parameter path of input ``i`` (``None`` for an argument), ``static`` the other leaves."""

    jaxpr: Any
    treedef: Any
    dynamic: list[int]
    static: dict[int, Any]
    paths: list[str | None]
    out_tree: Any

    def used(self) -> set[str]:
        """Paths of parameters the program reads at all."""
        reads = {v for eqn in self.jaxpr.jaxpr.eqns for v in eqn.invars if not isinstance(v, jex.core.Literal)}
        reads |= {v for v in self.jaxpr.jaxpr.outvars if not isinstance(v, jex.core.Literal)}
        return {p for v, p in zip(self.jaxpr.jaxpr.invars, self.paths) if p is not None and v in reads}


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


class Tracer:
    """Traces a function once per input signature (abstract shapes, dtypes and static leaves)."""

    def __init__(self, fn: Callable, max_entries: int = 16):
        self.fn = fn
        self._cache: dict[Any, Traced] = {}
        self._max = max_entries

    def __call__(self, params: Any, args: tuple, kwargs: Mapping) -> tuple[Traced, list]:
        leaf = lambda x: x is None or _quantize.is_quantized(x)
        flat, treedef = jax.tree_util.tree_flatten_with_path((params, args, dict(kwargs)), is_leaf=leaf)
        leaves = [leaf for _, leaf in flat]
        dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf) or _quantize.is_quantized(leaf)]
        static = {i: leaf for i, leaf in enumerate(leaves) if i not in set(dynamic)}
        args_in = [leaves[i] for i in dynamic]
        key = None
        try:
            avals = tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in args_in)
            key = (treedef, avals, tuple(sorted(static.items(), key=lambda kv: kv[0])))
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._cache:
            return self._cache[key], args_in

        def flat_fn(*dyn):
            full = dict(static)
            full.update(zip(dynamic, dyn))
            p, a, kw = jax.tree.unflatten(treedef, [full[i] for i in range(len(leaves))])
            return self.fn(p, *a, **kw)

        abstract = [
            jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _quantize.is_quantized(x) else x for x in args_in
        ]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*abstract)
        paths = []
        for i in dynamic:
            keypath = flat[i][0]
            is_param = keypath and isinstance(keypath[0], jax.tree_util.SequenceKey) and keypath[0].idx == 0
            paths.append(_paths.join(_paths.keys_of(keypath[1:])) if is_param else None)
        traced = Traced(closed, treedef, dynamic, static, paths, jax.tree.structure(out_shape))
        if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            if len(self._cache) >= self._max:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = traced
        return traced, args_in


def run_traced(run: Run, traced: Traced, args_in: list, adapters: Mapping[str, Any]) -> Any:
    """Evaluate a traced program with the parameters named in ``adapters`` as kernels."""
    ins = []
    for x, path in zip(args_in, traced.paths):
        if path is not None and (path in adapters or _quantize.is_quantized(x)):
            shape = tuple(x.shape)
            value = jax.ShapeDtypeStruct(shape, jnp.dtype(x.dtype)) if _quantize.is_quantized(x) else x
            x = Kernel(x, adapters.get(path), value, path, View.identity(shape), tuple(range(len(shape))), len(shape))
        ins.append(x)
    outs = evaluate(run, traced.jaxpr.jaxpr, list(traced.jaxpr.consts), ins)
    outs = values(run, outs, "the function's output")
    return jax.tree.unflatten(traced.out_tree, outs)


def warn_merged(run: Run, stacklevel: int = 3) -> None:
    if run.merged:
        lines = "".join(f"\n  {p!r}: {'; '.join(sorted(w))}" for p, w in sorted(run.merged.items()))
        warnings.warn(
            "lora_jax.wrap: these adapted kernels have uses that cannot be computed factored; those uses get the "
            "merged kernel W + scale·a⋅b (correct, but the step computes their weight gradients):" + lines,
            stacklevel=stacklevel,
        )


def roles(tracer: Tracer, params: Any, args: tuple, kwargs: Mapping) -> dict[str, tuple[str, ...]]:
    """The roles of every parameter of at least two axes that the program multiplies, convolves
    or looks up, from its first such use; traced abstractly (no FLOPs)."""
    run = Run(find_roles=True)
    flat, tree = jax.tree.flatten((params, args, dict(kwargs)))
    positions = [i for i, x in enumerate(flat) if _is_array(x)]

    def call(*xs):
        full = list(flat)
        for i, x in zip(positions, xs):
            full[i] = x
        p, a, kw = jax.tree.unflatten(tree, full)
        traced, args_in = tracer(p, a, kw)
        probes = {p: None for x, p in zip(args_in, traced.paths) if p is not None and len(x.shape) >= 2}
        run_traced(run, traced, args_in, probes)

    jax.eval_shape(call, *[jax.ShapeDtypeStruct(np.shape(flat[i]), flat[i].dtype) for i in positions])
    return dict(run.roles)
