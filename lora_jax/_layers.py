"""The layer table: which layer classes ``wrap`` computes factored, and how.

A layer class maps to a function ``(module, method_name, args, kwargs) -> (param, spec)``
that describes one call: the name of the parameter the call uses as its kernel and a layer
spec (:class:`Einsum`, :class:`Conv`, :class:`Lookup`) saying how it applies that kernel to
its input, or ``None`` when this call cannot be described (the kernel is then merged).
Lookups follow the class's MRO, so a subclass of ``nn.Dense`` is a ``Dense`` unless it is
registered itself. Flax Linen's ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv`` and
``Embed`` and NNX's ``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` are
built in; :func:`register_layer` adds any other layer (Linen or NNX).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

from lora_jax import _adapter, _cost, _paths, _specs

LayerFn = Callable[[Any, str, tuple, dict], "tuple[str, _specs.Spec] | None"]
_LAYERS: dict[type, LayerFn | None] = {}
_LOG = logging.getLogger("lora_jax")


def register_layer(cls: type, describe: LayerFn | None) -> None:
    """Teach ``wrap`` (and ``axis_roles``) how a layer class applies its kernel.

    Args:
      cls: the layer class (subclasses inherit the entry unless registered themselves).
      describe: ``(module, method_name, args, kwargs) -> (param_name, spec)`` for one call
        of a method of the layer, ``spec`` one of ``lj.Einsum``, ``lj.Conv``,
        ``lj.Lookup`` holding the input the kernel is applied to; ``None`` from it (or
        ``describe=None``) means the call cannot be factored and the kernel is merged.

    Raises:
      TypeError: if ``cls`` is not a class or ``describe`` neither callable nor ``None``.

    Example:
      A layer that stores its kernel ``(out, in)`` as PyTorch does (GPT-2's ``Conv1D``):

      >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax as lj
      >>> class Conv1D(nn.Module):
      ...     features: int
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         w = self.param("kernel", nn.initializers.normal(), (self.features, x.shape[-1]))
      ...         return x @ w.T
      >>> lj.register_layer(Conv1D, lambda m, method, args, kwargs: (
      ...     ("kernel", lj.Einsum("...i,oi->...o", args[0])) if method == "__call__" else None))
      >>> lj.axis_roles(Conv1D(3), jnp.ones((2, 5)))
      {'kernel': ('out', 'in')}
    """
    if not isinstance(cls, type):
        raise TypeError(f"lora_jax.register_layer: cls must be a class, found {cls!r}.")
    if describe is not None and not callable(describe):
        raise TypeError(f"lora_jax.register_layer: describe must be callable or None, found {describe!r}.")
    _LAYERS[cls] = describe


class Pass(NamedTuple):
    """What one run of the model with adapters saw: its output, the adapters whose layers
    computed their factored outputs, whether the layer owning a kernel path was called, and
    the :class:`Usage` of each call of each factored adapter."""

    out: Any
    consumed: set[str]
    called: Callable[[str], bool]
    usages: dict[str, list[_cost.Usage]]


class Seen:
    """What one run of a model with adapters saw, kept by each front end's interceptor: the
    adapters whose layers computed their outputs (``consumed``), the modules called
    (``visited``), adapters that contradict their layers (``problems``), and each call's cost
    :class:`Usage` (``calls``)."""

    def __init__(self) -> None:
        self.consumed: set[str] = set()
        self.visited: set[tuple] = set()
        self.problems: list[str] = []
        self.calls = _cost.Calls()

    def output(
        self, path: str, layer: Any, spec: _specs.Spec, out: Any, kernel: Any, held: Any,
        dropout_key: Callable[[], jax.Array] | None,
    ) -> Any:  # fmt: skip
        """The adapted output of one layer call: ``held`` (the adapter as the layer holds it)
        fitted to the kernel the layer uses, its kind's output with LoRA dropout drawn from
        ``dropout_key()`` when given; ``out`` unchanged (and a problem noted) on a misfit."""
        adapter = _adapter.localize(held, tuple(kernel.shape), _specs.roles(spec))
        if isinstance(adapter, str):
            self.problems.append(f"{path!r} ({type(layer).__name__}): {adapter}")
            return out
        self.consumed.add(path)
        self.calls.add(path, layer, spec, tuple(kernel.shape))
        if isinstance(spec, (_specs.Einsum, _specs.Conv)) and spec.bias is None:
            spec = spec._replace(bias=bias_of(layer))
        rate = _adapter.static(adapter).get("dropout", 0.0)
        drop = _dropout(dropout_key(), rate) if dropout_key is not None and rate > 0 else (lambda x: x)
        output = _adapter.kind_of(adapter).output
        assert output is not None  # kinds without one are merged before the call
        try:
            return output(spec, out, kernel, adapter, drop)
        except ValueError as e:
            raise ValueError(f"lora_jax.wrap: {path!r} ({type(layer).__name__}): {e}") from e

    def raise_problems(self) -> None:
        if self.problems:
            raise ValueError(
                "lora_jax.wrap: adapters contradict how the model uses their kernels:"
                + "".join(f"\n  {p}" for p in self.problems)
                + "\nCreate adapters with roles=lj.axis_roles(model, *sample_inputs)."
            )


def bias_of(module: Any) -> Any:
    """The ``bias`` parameter of a Linen or NNX layer, or ``None``."""
    if isinstance(module, nn.Module):
        bias = module.get_variable("params", "bias") if module.scope is not None else None
    else:
        bias = getattr(module, "bias", None)
        bias = bias[...] if isinstance(bias, nnx.Variable) else bias
    return bias if hasattr(bias, "shape") else None


def _dropout(key: jax.Array, rate: float) -> Callable[[jax.Array], jax.Array]:
    def drop(x: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return drop


def run_adapted(
    run: Callable[[dict, dict], Pass], layered: dict, substituted: dict, *, strict: bool, compute: str, training: bool
) -> Any:
    """The common core of the front ends' ``wrap``: ``run(factored, merged)`` runs the model
    once with ``factored`` adapters on their layers and ``merged`` ones folded into their
    kernels (``W + scale·a⋅b``, the base frozen, the adapters still trained).

    ``compute="auto"`` first traces the model abstractly (``jax.eval_shape``: no FLOPs) when
    some adapter could be cheaper merged (``_cost.mergeable``), to learn how many tokens each
    layer sees, and merges the adapters the cost model picks; ``"factored"``/``"merged"``
    force one form. An adapter whose dropout is active stays factored (the dropout applies to
    the branch input only). Adapters whose layers did not consume them are unused
    (``called(path)`` false: an error, or ignored when not ``strict``) or belong to layers the
    table does not know: those are merged, with a warning."""
    dropped = {p for p, ad in layered.items() if training and _adapter.static(ad).get("dropout", 0.0) > 0}
    if compute == "merged" and dropped:
        raise ValueError(
            "lora_jax.wrap: compute='merged' cannot apply LoRA dropout (it acts on the branch input only), but "
            f"lora_training=True and these adapters have dropout > 0: {sorted(dropped)}. Use compute='auto' or "
            "'factored', or adapters without dropout."
        )
    forced = set(layered) if compute == "merged" else set()
    factored = {p: ad for p, ad in layered.items() if p not in forced}
    merged = {**substituted, **{p: layered[p] for p in forced}}
    probe = compute == "auto" and any(_cost.mergeable(ad) for p, ad in layered.items() if p not in dropped)
    if probe:
        seen: list[Pass] = []
        jax.eval_shape(lambda: seen.append(run(factored, merged)))
        first = seen[0]
    else:
        first = run(factored, merged)
    leftover = [p for p in factored if p not in first.consumed]
    unused = [p for p in leftover + sorted(forced) if not first.called(p)]
    if not strict:
        leftover = [p for p in leftover if p not in unused]
    elif unused:
        raise ValueError(
            "lora_jax.wrap: adapters name kernels that the model never uses in this call:"
            + "".join(f"\n  {p!r}" for p in unused)
            + "\nAdapt only kernels of layers the model calls (or drop these adapters), or pass "
            "strict=False to wrap to ignore them in calls that skip those layers."
        )
    chosen = _cost.choose({p: ad for p, ad in factored.items() if p not in dropped}, first.usages) if probe else set()
    if not (probe or leftover):
        return first.out
    if leftover:
        warnings.warn(
            "lora_jax.wrap: no factored LoRA forward for the layers owning "
            + ", ".join(repr(p) for p in leftover)
            + " (a layer type or configuration lora_jax does not know; see lj.register_layer); these "
            "kernels are merged (W + scale·a⋅b) instead. The result is correct but computes their weight "
            "gradients.",
            stacklevel=3,
        )
    if chosen:
        _LOG.debug("lora_jax.wrap: merging %s (cheaper than factored at their ranks and token counts)", sorted(chosen))
    to_merge = set(leftover) | chosen
    factored = {p: ad for p, ad in factored.items() if p not in to_merge}
    return run(factored, {**merged, **{p: layered[p] for p in to_merge}}).out


def with_stacks(seen: dict[str, tuple], tree: Any) -> dict[str, tuple[str, ...]]:
    """``axis_roles``' last step: ``seen`` maps a kernel path to the roles and shape a layer saw;
    the leading axes the kernel has in ``tree`` beyond those (``nn.scan``, ``nnx.vmap``) are
    stacks. Kernels not in ``tree`` (handed to a layer from outside it) are skipped."""
    shapes = {
        p: tuple(getattr(leaf, "shape", ())) for p, (_, leaf) in _paths.by_path(tree, "lora_jax.axis_roles").items()
    }
    roles, problems = {}, []
    for path, (local_roles, local_shape) in seen.items():
        full = shapes.get(path)
        if full is None:
            continue
        n_stack = len(full) - len(local_shape)
        if n_stack < 0 or full[n_stack:] != local_shape:
            problems.append(f"{path!r}: the layer sees shape {local_shape}, params hold {full}")
            continue
        roles[path] = ("stack",) * n_stack + tuple(local_roles)
    if problems:
        raise ValueError(
            "lora_jax.axis_roles: kernels stacked along a non-leading axis (lora_jax supports the leading axis "
            "that nn.scan/nn.vmap/nnx.vmap add):" + "".join(f"\n  {p}" for p in problems)
        )
    return roles


def known(cls: type) -> bool:
    """Whether the table describes calls of ``cls`` (along its MRO)."""
    return next((_LAYERS[c] is not None for c in cls.__mro__ if c in _LAYERS), False)


def describe_call(module: Any, method: str, args: tuple, kwargs: dict) -> tuple[str, _specs.Spec] | None:
    """``(param, spec)`` of one layer call, from the first class of its MRO in the table."""
    for cls in type(module).__mro__:
        if cls in _LAYERS:
            describe = _LAYERS[cls]
            return None if describe is None else describe(module, method, args, kwargs)
    return None


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs[name]


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _dense(module: nn.Dense, method: str, args: tuple, kwargs: dict):
    if method != "__call__":
        return None
    return "kernel", _specs.Einsum("...i,io->...o", _first_arg(args, kwargs, "inputs"))


def _dot_general(x: Any, batch: Any, axis: Any, n_out: int) -> _specs.Einsum:
    """The spec of ``dot_general(x, kernel)`` contracting x's ``axis`` with the kernel's in axes,
    batched over x's ``batch`` axes (the kernel's leading axes), as Flax's DenseGeneral does."""
    ndim = jnp.ndim(x)
    normalize = lambda axes: tuple(sorted(a % ndim for a in _as_tuple(axes)))  # noqa: E731 (sorted, as Flax does)
    batch, axis = normalize(batch), normalize(axis)
    letters = _specs._LETTERS
    xs = letters[:ndim]
    outs = letters[ndim : ndim + n_out]
    rest = "".join(xs[i] for i in range(ndim) if i not in batch and i not in axis)
    of = lambda axes: "".join(xs[i] for i in axes)  # noqa: E731
    return _specs.Einsum(f"{xs},{of(batch)}{of(axis)}{outs}->{of(batch)}{rest}{outs}", x)


def _dense_general(module: nn.DenseGeneral, method: str, args: tuple, kwargs: dict):
    if method != "__call__":
        return None
    x = _first_arg(args, kwargs, "inputs")
    return "kernel", _dot_general(x, module.batch_dims, module.axis, len(_as_tuple(module.features)))


def _linear_general(module: Any, method: str, args: tuple, kwargs: dict):
    """``nnx.LinearGeneral``: kernel ``(batch..., in..., out...)``."""
    if method != "__call__":
        return None
    x = _first_arg(args, kwargs, "inputs")
    return "kernel", _dot_general(x, tuple(module.batch_axis), module.axis, len(_as_tuple(module.out_features)))


def _einsum(module: nn.Einsum, method: str, args: tuple, kwargs: dict):
    if method != "__call__":
        return None
    x = _first_arg(args, kwargs, "inputs")
    equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    equation = equation if equation is not None else module.einsum_str
    if not isinstance(equation, str):
        return None
    spec = _specs.Einsum(equation, x)
    try:
        _specs.roles(spec)
    except ValueError:
        return None  # a kernel axis summed on its own: not a linear map of x
    return "kernel", spec


def _conv(module: nn.Conv, method: str, args: tuple, kwargs: dict):
    """Flax's own preprocessing of a Conv input (batch axes flattened, circular/causal
    padding done by hand), then the convolution's configuration."""
    if method != "__call__" or module.feature_group_count != 1 or module.mask is not None:
        return None
    x = _first_arg(args, kwargs, "inputs")
    kernel_size = _as_tuple(module.kernel_size)
    n = len(kernel_size)
    broadcast = lambda v: (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
    strides, lhs_dilation, rhs_dilation = (
        broadcast(module.strides),
        broadcast(module.input_dilation),
        broadcast(module.kernel_dilation),
    )
    n_batch = x.ndim - (n + 1)
    batch_shape = None
    if n_batch != 1:
        batch_shape = x.shape[:n_batch]
        x = jnp.reshape(x, (-1,) + x.shape[n_batch:])
    padding = canonicalize_padding(module.padding, n)
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (rhs_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    return "kernel", _specs.Conv(x, strides, padding, lhs_dilation, rhs_dilation, batch_shape)


def _embed(module: nn.Embed, method: str, args: tuple, kwargs: dict):
    if method == "__call__":
        ids = _first_arg(args, kwargs, "inputs")
        if module.num_embeddings == 1:  # Flax broadcasts the one row; so does the branch
            ids = jnp.zeros(jnp.shape(ids), jnp.int32)
        return "embedding", _specs.Lookup(ids)
    if method == "attend":  # q ⋅ Eᵀ: the embedding's out (feature) axis is contracted
        return "embedding", _specs.Einsum("...f,vf->...v", _first_arg(args, kwargs, "query"), ("in", "out"))
    return None


for _cls, _fn in (
    (nn.Dense, _dense), (nn.DenseGeneral, _dense_general), (nn.Einsum, _einsum), (nn.Conv, _conv),
    (nn.Embed, _embed),
    # Flax NNX: the same layers under other names; Einsum, Conv and Embed have the same attributes.
    (nnx.Linear, _dense), (nnx.LinearGeneral, _linear_general), (nnx.Einsum, _einsum), (nnx.Conv, _conv),
    (nnx.Embed, _embed),
):  # fmt: skip
    register_layer(_cls, _fn)
