"""``summary``: trainable vs total parameters and bytes, per target."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree


class TargetSummary(NamedTuple):
    """One adapted parameter: its path and shape, the adapter's rank and scale (``None`` for
    a kind without them, such as :class:`FullWeight`), size and kind."""

    path: str
    kernel_shape: tuple[int | None, ...]  # None: an axis the adapter's arrays do not follow
    rank: int | None
    scale: float | None
    params: int
    bytes: int
    kind: str = "lora"


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a LoRA model; ``str()`` gives a readable table.

    ``total_*`` counts the base and the adapters together, as PEFT's
    ``print_trainable_parameters`` does.
    """

    targets: tuple[TargetSummary, ...]
    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        header = ("target", "kernel shape", "rank", "scale", "params")
        rows = [
            (t.path, str(t.kernel_shape), "-" if t.rank is None else str(t.rank),
             "-" if t.scale is None else f"{t.scale:g}", f"{t.params:,}")
            for t in self.targets
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        table = [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
        footer = (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {self.trainable_percent:.4f}\n"
            f"trainable bytes: {_human(self.trainable_bytes)} || all bytes: {_human(self.total_bytes)}"
        )
        return "\n".join(table + [footer])


def summary(params: Any, adapters: Any) -> Summary:
    """Trainable (adapter) vs total parameters and bytes, per target, like PEFT's
    ``print_trainable_parameters``.

    Works on concrete or abstract (``jax.ShapeDtypeStruct``) trees.

    Args:
      params: the base parameters.
      adapters: their adapter tree.

    Returns:
      A :class:`Summary`.

    Raises:
      TypeError: if ``adapters`` holds something other than adapters.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> s = lj.summary(params, lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)))
      >>> s.trainable_params, s.total_params
      (24, 60)
      >>> print(s)
      target        kernel shape  rank  scale  params
      ------------  ------------  ----  -----  ------
      dense/kernel        (8, 4)     2      4      24
      trainable params: 24 || all params: 60 || trainable%: 40.0000
      trainable bytes: 96 B || all bytes: 240 B
    """
    by_path = _tree.adapters_by_path(adapters, "lora_jax.summary")
    targets = tuple(
        TargetSummary(
            path,
            _kind.kernel_shape(ad),
            _kind.static(ad).get("rank"),
            getattr(ad, "scale", None),
            sum(map(_count, _trained(ad))),
            sum(map(_nbytes, _trained(ad))),
            _kind.kind_of(ad).name,
        )  # fmt: skip
        for path, ad in by_path.items()
    )
    base = jax.tree.leaves(params, is_leaf=_paths.path_leaf)  # a quantized kernel: its shape, its stored bytes
    trainable_params = sum(t.params for t in targets)
    trainable_bytes = sum(t.bytes for t in targets)
    return Summary(
        targets=targets,
        trainable_params=trainable_params,
        total_params=trainable_params + sum(map(_count, base)),
        trainable_bytes=trainable_bytes,
        total_bytes=trainable_bytes + sum(map(_nbytes, base)),
    )


def _trained(adapter: Any) -> list:
    frozen = _kind.kind_of(adapter).frozen
    return [x for name, x in _kind.arrays(adapter).items() if name not in frozen]


def _count(x: Any) -> int:
    return math.prod(x.shape if hasattr(x, "shape") else np.shape(x))


def _nbytes(x: Any) -> int:
    if _paths.path_leaf(x):
        return x.nbytes
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # a Python scalar leaf too
    return _count(x) * np.dtype(dtype).itemsize


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} TiB"
