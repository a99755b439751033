"""``init``: a fresh adapter tree for the targeted kernels of a parameter tree."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import specs as _specs
from lora_jax._kinds.full import FullWeight
from lora_jax._kinds.lora import Adapter
from lora_jax._ops import quantize as _quantize
from lora_jax._ops.config import RESIDUAL_INITS, LoraConfig, check_key


def init(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    *,
    roles: Mapping[str, tuple[str, ...]] | None = None,
) -> dict:
    """A new adapter tree for ``params``: ``a`` random, ``b`` zero, so nothing changes yet.

    The result mirrors the nesting of ``params`` (a Linen params dict or an NNX ``State``)
    but holds only the targeted kernels, each an :class:`Adapter`, and the parameters that
    ``config.trainable`` names, each a :class:`FullWeight` copy. Pure and jit-able:
    the same key gives the same adapters, and each kernel draws from its own key
    (``fold_in`` of its path), so adding a target leaves the others unchanged.

    Args:
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      params: the base parameters (not modified): a Linen params dict, an NNX ``State``, or
        an NNX model, whose built-in layers (``Linear``, ``LinearGeneral``, ``Einsum``,
        ``Conv``, ``Embed``, also stacked by ``nnx.vmap``) then give their kernels' roles, so
        ``roles`` is needed only for other layers; the adapters are keyed like
        ``nnx.state(model)``.
      config: a :class:`LoraConfig`.
      roles: ``{path: roles}`` giving, for kernels that are not plain 2-D ``(in, out)``
        matrices, the role of each axis (``"stack"``, ``"in"``, ``"out"``, or ``"shared"`` for an
        axis, such as a mixture-of-experts kernel's experts, along which one adapter is shared
        instead of one per entry as for ``"stack"``). Keys are exact
        paths or regexes (``re.fullmatch``); ``axis_roles(model, ...)`` produces them.

    Returns:
      A nested dict of :class:`Adapter`, keyed like ``params``.

    Raises:
      ValueError: if targets match nothing, match a non-floating or <2-D array, an N-D
        kernel has no roles or roles that do not fit it, a rank exceeds ``min(in, out)``,
        a ``rank_pattern``/``alpha_pattern`` key matches no target, or ``trainable``
        matches nothing, a non-floating array or a target. One message lists every
        offending path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2, alpha=2))
      >>> ad["dense"]["kernel"].a.shape, ad["dense"]["kernel"].b.shape
      ((8, 2), (2, 4))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_jax.init: config must be a lora_jax.LoraConfig, found {type(config).__name__}.")
    check_key(key, "lora_jax.init")
    if RESIDUAL_INITS.fullmatch(config.init):
        raise ValueError(
            f"lora_jax.init: init={config.init!r} moves part of each kernel into its adapter, so the base changes "
            "too: use lj.init_residual(key, params, config), which returns (adapters, residual base)."
        )
    if isinstance(params, nnx.Module):  # an NNX model: its layers say their kernels' roles
        roles = {**layer_roles(params), **(roles or {})}
        params = nnx.state(params, nnx.Param)
    plan, trainable = plan_targets(params, config, roles, "lora_jax.init")
    create = _kind.kind_of(_kind.class_named(config.kind)).create
    assert create is not None  # LoraConfig checks that the kind has one
    kernels = {path: leaf for path, (_, leaf) in _paths.by_path(params, "lora_jax.init").items()}
    adapters: list[tuple[Any, Any]] = [(keys, FullWeight(leaf.astype(config.dtype))) for keys, leaf in trainable]
    for keys, path, shape, kernel_roles in plan:
        rank = config.rank_for(path)
        a_shape, b_shape = _kind.factor_shapes(shape, kernel_roles, rank)
        fan_in, _ = _kind.fan_in_out(shape, kernel_roles)
        kernel_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
        a = _init_a(kernel_key, a_shape, config.dtype, config.init, fan_in, rank)
        b = jnp.zeros(b_shape, config.dtype)
        adapter: Any = Adapter(
            a, b, rank=rank, alpha=config.alpha_for(path), roles=kernel_roles,
            rslora=config.use_rslora, dropout=config.dropout,
        )  # fmt: skip
        try:  # the kernel as the layer computes with it
            adapter = create(adapter, _quantize.dequantize(kernels[path]))
        except ValueError as e:
            raise ValueError(f"lora_jax.init: {path!r}: {e}") from None
        adapters.append((keys, adapter))
    return _paths.nest(adapters)


def _init_a(key, shape, dtype, kind: str, fan_in: int, rank: int) -> jax.Array:
    if kind == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    # variance_scaling(1/3, "fan_in", "uniform"): bound sqrt(3 · (1/3) / fan_in).
    bound = fan_in**-0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def plan_targets(params: Any, config: LoraConfig, roles: Mapping | None, where: str) -> tuple[list, list]:
    """``[(keys, path, shape, roles), ...]`` of the targeted kernels and ``[(keys, leaf), ...]``
    of the parameters trained fully, validated together."""
    is_target = _paths.compile_pattern(config.targets, "targets", where) or (lambda path, leaf: True)
    is_excluded = _paths.compile_pattern(config.exclude, "exclude", where) or (lambda path, leaf: False)
    is_trainable = _paths.compile_pattern(config.trainable, "trainable", where)
    leaves = [(keys, path, leaf) for path, (keys, leaf) in _paths.by_path(params, where).items()]
    if not leaves:
        raise ValueError(f"{where}: params has no array leaves; pass the base parameter tree.")
    targets = [(k, p, leaf) for k, p, leaf in leaves if is_target(p, leaf) and not is_excluded(p, leaf)]
    if not targets:
        examples = ", ".join(repr(p) for _, p, _ in leaves[:3])
        raise ValueError(
            f"{where}: targets matched no parameter. {len(leaves)} parameters exist, e.g. "
            f"{examples}. Check the pattern (it must match the whole path)."
        )
    problems: dict[str, list[str]] = {}
    plan = [p for k, path, leaf in targets if (p := _planned(k, path, leaf, config, roles, where, problems))]
    trainable = _trainable(leaves, targets, is_trainable, problems) if is_trainable is not None else []
    target_paths = [p for _, p, _ in targets]
    for name, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for pattern in dict(patterns):
            if not any(_paths.first_match({pattern: None}, p) for p in target_paths):
                problems.setdefault("pattern", []).append(f"{name} key {pattern!r}")
    if problems:
        raise ValueError(_problem_message(where, problems))
    return plan, trainable


def _planned(keys: Any, path: str, leaf: Any, config: LoraConfig, roles: Mapping | None, where: str,
             problems: dict[str, list[str]]) -> tuple | None:  # fmt: skip
    """``(keys, path, shape, roles)`` of a targeted kernel, or ``None`` with its problem recorded."""
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        problems.setdefault("not_kernel", []).append(f"{path!r} ({_describe(leaf)})")
        return None
    kernel_roles = _kind.roles_for(path, shape, roles, where)
    if kernel_roles is None:
        problems.setdefault("no_roles", []).append(f"{path!r} {shape}")
        return None
    why = _kind.roles_problem(kernel_roles, shape)
    if why:
        problems.setdefault("bad_roles", []).append(f"{path!r}: {why}")
        return None
    rank = config.rank_for(path)
    fan_in, fan_out = _kind.fan_in_out(shape, tuple(kernel_roles))
    if rank > min(fan_in, fan_out):
        problems.setdefault("rank", []).append(f"{path!r}: rank {rank} > min(in={fan_in}, out={fan_out})")
        return None
    return keys, path, shape, tuple(kernel_roles)


def _trainable(leaves: list, targets: list, is_trainable: Any, problems: dict[str, list[str]]) -> list:
    """``[(keys, leaf)]`` of the parameters ``trainable`` names, with their problems recorded."""
    chosen = [(k, p, leaf) for k, p, leaf in leaves if is_trainable(p, leaf)]
    if not chosen:
        problems.setdefault("trainable_none", []).append(f"{len(leaves)} parameters exist, e.g. {leaves[0][1]!r}")
    target_paths = {p for _, p, _ in targets}
    trainable = []
    for keys, path, leaf in chosen:
        dtype = getattr(leaf, "dtype", None)
        if path in target_paths:
            problems.setdefault("trainable_target", []).append(repr(path))
        elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            problems.setdefault("trainable_dtype", []).append(f"{path!r} ({_describe(leaf)})")
        else:
            trainable.append((keys, leaf))
    return trainable


_FIXES = {
    "not_kernel": "targets matched arrays that are not floating-point kernels with >= 2 axes "
    "(a bias or a scale?); tighten `targets` or add them to `exclude`:",
    "no_roles": "these kernels have more than 2 axes and no axis roles; pass "
    "roles=lj.axis_roles(model, *sample_inputs), or roles={path: ('stack', 'in', 'out'), ...}:",
    "bad_roles": "the roles given do not fit these kernels:",
    "rank": "the rank exceeds min(in, out) of these kernels; lower it with `rank_pattern` "
    "or leave them out with `exclude`:",
    "pattern": "these patterns match no target (they must match the whole path of a targeted kernel):",
    "trainable_none": "trainable matched no parameter (it must match the whole path):",
    "trainable_target": "these parameters are both targets and trainable; train each one way only:",
    "trainable_dtype": "trainable matched arrays that are not floating-point:",
}


def _problem_message(where: str, problems: dict[str, list[str]]) -> str:
    parts = [f"{where}: invalid targets."]
    for kind, items in problems.items():
        parts.append(_FIXES[kind] + "".join(f"\n  {item}" for item in items))
    return "\n".join(parts)


def _describe(leaf: Any) -> str:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return f"shape {tuple(leaf.shape)}, dtype {leaf.dtype}"
    return f"a {type(leaf).__name__}"


def layer_roles(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """The roles of the kernels of ``model``'s built-in Flax layers, read off the layers
    themselves (no call; for :func:`lora_jax.init` on a model): leading axes a kernel has
    beyond the layer's own (``nnx.vmap``) are stacks. Other kernels need ``axis_roles``."""
    out = {}
    for keys, module in nnx.iter_graph(model):
        local = _own_roles(module) if isinstance(module, nnx.Module) else None
        if local is None:
            continue
        param, own = local
        kernel = getattr(module, param, None)
        ndim = len(getattr(kernel, "shape", ()))
        if ndim >= len(own):
            out[_paths.join([*map(str, keys), param])] = ("stack",) * (ndim - len(own)) + own
    return out


def _own_roles(module: nnx.Module) -> tuple[str, tuple[str, ...]] | None:
    if isinstance(module, nnx.LinearGeneral):
        n = lambda v: len(v) if isinstance(v, (tuple, list)) else 1
        roles = (
            ("stack",) * len(module.batch_axis) + ("in",) * n(module.in_features) + ("out",) * n(module.out_features)
        )
        return "kernel", roles
    if isinstance(module, nnx.Einsum):
        x, k, y = module.einsum_str.replace(" ", "").replace("->", ",").split(",")
        try:
            return "kernel", _specs._einsum_roles(x.replace("...", ""), k, y.replace("...", ""))
        except ValueError:
            return None
    if isinstance(module, nnx.Conv):
        size = module.kernel_size if isinstance(module.kernel_size, (tuple, list)) else (module.kernel_size,)
        return "kernel", ("in",) * (len(size) + 1) + ("out",)
    if isinstance(module, nnx.Linear):
        return "kernel", ("in", "out")
    if isinstance(module, nnx.Embed):
        return "embedding", ("in", "out")
    return None
