"""``LoraConfig``: which kernels to adapt, and how."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._kinds import lora as _lora

INITS = ("lora", "gaussian", "pissa", "olora")  # and "pissa_niter_K"
RESIDUAL_INITS = re.compile(r"pissa|olora|pissa_niter_[1-9]\d*")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how; validated when constructed, hashable (a valid static arg).

    Args:
      rank: the rank ``r`` of every adapter (≥1) unless ``rank_pattern`` says otherwise.
      alpha: the LoRA ``alpha`` (>0); the update is scaled by ``alpha / r``.
      targets: the kernels to adapt: a regex or a list of regexes matched with
        ``re.fullmatch`` against the ``/``-joined path (e.g. ``".*/(query|value)/kernel"``),
        or a ``callable(path, leaf) -> bool``. Default: every parameter named ``kernel``.
      exclude: paths to leave alone even if ``targets`` matches them (same forms).
      trainable: base parameters to train fully beside the adapters, like PEFT's
        ``modules_to_save`` (a new classification head, say): same forms as ``targets``.
        :func:`init` copies them into the adapter tree as :class:`FullWeight` leaves, so
        ``wrap``, ``optimizer``, ``save`` and ``to_peft`` agree on what trains.
      rank_pattern: ``{regex: rank}`` overriding ``rank`` for the targets a regex fully
        matches (the first matching regex wins).
      alpha_pattern: ``{regex: alpha}``, likewise for ``alpha``.
      use_rslora: scale by ``alpha / √r`` (rsLoRA, Kalajdzievski 2023) instead of ``alpha / r``.
      kind: the adapter kind :func:`init` makes: ``"lora"`` (:class:`Adapter`), ``"dora"``
        (:class:`DoraAdapter`: a trained magnitude per output feature, ``W' = m · V/‖V‖`` with
        ``V = W + scale·a⋅b``), or any registered kind with a ``create`` hook.
      use_dora: PEFT's spelling of ``kind="dora"``.
      init: ``"lora"`` (default): ``a`` uniform in ``±1/√fan_in``, i.e.
        ``variance_scaling(1/3, "fan_in", "uniform")``, the same as PyTorch's
        ``kaiming_uniform_(a=√5)`` used by PEFT; ``"gaussian"``: ``a`` normal with std ``1/r``.
        ``b`` is always zero, so a fresh adapter changes nothing. ``"pissa"``,
        ``"pissa_niter_K"`` and ``"olora"`` initialise the adapters from the kernels and move
        that part out of the base: use :func:`init_residual`, which returns the new base too.
      dropout: dropout rate in ``[0, 1)`` on the LoRA branch input (factored forward only).
      dtype: dtype of ``a`` and ``b``: float32 (the default, also for bf16 bases), bfloat16,
        float16 or float64.

    Raises:
      ValueError: on a rank < 1, alpha ≤ 0, dropout outside ``[0, 1)``, an invalid regex
        or an unknown ``init``.
      TypeError: on a field of the wrong type or another ``dtype`` (float8 or integer).

    Example:
      >>> import lora_jax as lj
      >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/(query|value)/kernel")
      >>> cfg.rank, cfg.alpha
      (4, 8.0)
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] | Callable[[str, Any], bool] = r"(.*/)?kernel"
    exclude: str | tuple[str, ...] | Callable[[str, Any], bool] | None = None
    trainable: str | tuple[str, ...] | Callable[[str, Any], bool] | None = None
    rank_pattern: tuple[tuple[str, int], ...] | Mapping[str, int] = ()
    alpha_pattern: tuple[tuple[str, float], ...] | Mapping[str, float] = ()
    use_rslora: bool = False
    kind: str = "lora"
    use_dora: bool = False
    init: str = "lora"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("rank", _check_rank(self.rank, "rank"))
        set_("alpha", _check_alpha(self.alpha, "alpha"))
        for name in ("targets", "exclude", "trainable"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                set_(name, tuple(value))
            _paths.compile_pattern(getattr(self, name), name, _WHERE)  # raises on a bad pattern
        set_("rank_pattern", _check_pattern_map(self.rank_pattern, "rank_pattern", _check_rank))
        set_("alpha_pattern", _check_pattern_map(self.alpha_pattern, "alpha_pattern", _check_alpha))
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"lora_jax.LoraConfig: {name} must be a bool, found {getattr(self, name)!r}.")
        set_("kind", _check_kind(self.kind, self.use_dora))
        set_("use_dora", self.kind == "dora")  # one config, however it was spelled
        if not isinstance(self.init, str) or not (self.init in INITS or RESIDUAL_INITS.fullmatch(self.init)):
            raise ValueError(
                f"lora_jax.LoraConfig: init must be one of {INITS} or 'pissa_niter_K' (K >= 1), found {self.init!r}."
            )
        set_("dropout", _lora.check_dropout(self.dropout, f"{_WHERE}: dropout"))
        try:
            dtype = None if self.dtype is None else jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or dtype.name not in DTYPES:
            raise TypeError(
                f"lora_jax.LoraConfig: dtype must be a floating dtype that adapter files store exactly, one of "
                f"{DTYPES}; found {self.dtype!r}."
            )
        set_("dtype", dtype)

    def rank_for(self, path: str) -> int:
        """The rank of the target at ``path`` (``rank_pattern`` first)."""
        patterns = dict(self.rank_pattern)
        key = _paths.first_match(patterns, path)
        return self.rank if key is None else patterns[key]

    def alpha_for(self, path: str) -> float:
        """The alpha of the target at ``path`` (``alpha_pattern`` first)."""
        patterns = dict(self.alpha_pattern)
        key = _paths.first_match(patterns, path)
        return self.alpha if key is None else patterns[key]


_WHERE = "lora_jax.LoraConfig"


def _check_rank(value: Any, where: str) -> int:
    return _lora.check_rank(value, f"{_WHERE}: {where}")


def _check_alpha(value: Any, where: str) -> float:
    return _lora.check_alpha(value, f"{_WHERE}: {where}")


def _check_kind(kind: Any, use_dora: bool) -> str:
    """A registered kind that :func:`init` can make (``use_dora=True``: ``"dora"``)."""
    makeable = sorted(k.name for k in _kind.kinds() if k.create is not None)
    if use_dora and kind not in ("lora", "dora"):
        raise ValueError(f"lora_jax.LoraConfig: use_dora=True says kind='dora', but kind is {kind!r}.")
    kind = "dora" if use_dora else kind
    if kind not in makeable:
        raise ValueError(f"lora_jax.LoraConfig: kind must be one of {makeable} (registered kinds with a create hook), "
                         f"found {kind!r}.")  # fmt: skip
    return kind


def _check_pattern_map(value: Any, name: str, check: Callable[[Any, str], Any]) -> tuple:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        items = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise TypeError(f"lora_jax.LoraConfig: {name} must be a dict {{regex: value}}, found {value!r}.") from None
    out = []
    for pattern, v in items:
        if not isinstance(pattern, str):
            raise TypeError(f"lora_jax.LoraConfig: {name} keys must be regex strings, found {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"lora_jax.LoraConfig: {name} key {pattern!r} is not a valid regex: {e}.") from None
        out.append((pattern, check(v, f"{name}[{pattern!r}]")))
    return tuple(out)


def check_key(key: Any, where: str) -> None:
    """A ``TypeError`` unless ``key`` is a PRNG key: ``jax.random.key(...)`` or the raw
    ``uint32[2]`` of ``jax.random.PRNGKey(...)``."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and jnp.ndim(key) == 0
    raw = dtype == jnp.uint32 and tuple(jnp.shape(key)) == (2,)
    if not (typed or raw):
        found = type(key).__name__ + (f" of dtype {dtype} and shape {jnp.shape(key)}" if dtype is not None else "")
        raise TypeError(f"{where}: key must be one PRNG key (jax.random.key(0)), found {found}.")
