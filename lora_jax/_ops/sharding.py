"""``adapter_shardings``: adapters sharded like their kernels, for SPMD training on a mesh.

For a kernel sharded by ``PartitionSpec(s_0, …, s_n)`` (one entry per kernel axis), each
adapter array takes the entry of the kernel axis each of its axes follows (its kind's
``axes``), ``None`` for its own axes. For LoRA, ``a`` gets the specs of the kernel's stack and
in axes plus ``None`` for the rank axis, and ``b`` the stack specs, ``None`` for the rank, and
the out-axis specs. FSDP (a sharded ``in`` axis) thus shards ``a``; tensor parallelism over
``out`` shards ``b``; nothing is gathered.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree


def adapter_shardings(param_shardings: Any, adapters: Any, *, mesh: Mesh | None = None) -> dict:
    """The shardings of each adapter's arrays, derived from its kernel's sharding.

    Args:
      param_shardings: a tree like ``params`` whose leaves are ``NamedSharding`` or
        ``PartitionSpec`` (e.g. what ``nn.get_partition_spec`` or your sharding rules give).
      adapters: an adapter tree (concrete, or abstract from ``jax.eval_shape(lj.init…)``).
      mesh: turns ``PartitionSpec`` leaves into ``NamedSharding`` on this mesh (and checks
        their axis names); without it, specs stay specs.

    Returns:
      A tree like ``adapters`` whose adapters hold shardings in place of their arrays: pass
      it as ``out_shardings`` of a jitted ``init``, to ``jax.device_put``, or to
      :func:`load`.

    Raises:
      TypeError: if the arguments come in the old order ``(adapters, param_shardings)``.
      ValueError: if ``param_shardings`` has no sharding for an adapted kernel, a spec has
        more entries than the kernel has axes, or names an axis the mesh lacks (every
        problem listed).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"mlp": {"kernel": jnp.ones((8, 4))}}
      >>> lora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))
      >>> s = lj.adapter_shardings({"mlp": {"kernel": P("fsdp", "tensor")}}, lora)
      >>> tuple(s["mlp"]["kernel"].a), tuple(s["mlp"]["kernel"].b)
      (('fsdp', None), (None, 'tensor'))
    """
    if jax.tree.leaves(param_shardings, is_leaf=_kind.is_adapter) and all(
        _kind.is_adapter(x) for x in jax.tree.leaves(param_shardings, is_leaf=_kind.is_adapter)
    ):
        raise TypeError(
            "lora_jax.adapter_shardings: the first argument holds adapters; the order is "
            "adapter_shardings(param_shardings, adapters), params before adapters as everywhere in lora_jax."
        )
    flat_adapters = _tree.flatten(adapters, "lora_jax.adapter_shardings")
    flat = _paths.leaves_with_paths(param_shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, PartitionSpec)))
    given = {_paths.join(keys): s for keys, s in flat}
    problems, leaves = [], []
    for path, (keys, ad) in flat_adapters.items():
        n_axes = len(_kind.kernel_shape(ad))
        sharding = given.get(path)
        if not isinstance(sharding, (NamedSharding, PartitionSpec)):
            problems.append(f"{path!r}: no NamedSharding or PartitionSpec in param_shardings (found {sharding!r})")
            continue
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        on = sharding.mesh if isinstance(sharding, NamedSharding) else mesh
        if len(spec) > n_axes:
            problems.append(f"{path!r}: P{tuple(spec)} has more entries than the kernel's {n_axes} axes")
            continue
        entries = tuple(spec) + (None,) * (n_axes - len(spec))
        if on is not None:
            unknown = sorted({n for entry in entries for n in _names(entry)} - set(on.axis_names))
            if unknown:
                problems.append(f"{path!r}: P{entries} names mesh axes {unknown}, the mesh has {on.axis_names}")
                continue
        specs = {name: PartitionSpec(*e) for name, e in _kind.array_specs(ad, entries).items()}
        shardings: dict[str, Any] = specs if on is None else {n: NamedSharding(on, s) for n, s in specs.items()}
        leaves.append((keys, _kind.replace(ad, **shardings)))
    if problems:
        raise ValueError(
            "lora_jax.adapter_shardings: cannot shard the adapters:" + "".join(f"\n  {p}" for p in problems)
        )
    return _paths.nest(leaves)


def _names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def place(tree: Any, shardings: Any, where: str) -> Any:
    """``jax.device_put`` of ``tree`` onto ``shardings`` (same structure), with a clear error."""
    is_sharding = lambda x: isinstance(x, (NamedSharding, PartitionSpec))
    want, have = jax.tree.structure(shardings, is_leaf=is_sharding), jax.tree.structure(tree)
    specs = [s for s in jax.tree.leaves(shardings, is_leaf=is_sharding) if not isinstance(s, NamedSharding)]
    if want != have or specs:  # type: ignore[operator]
        raise ValueError(
            f"{where}: shardings must be a tree of NamedSharding shaped like the adapters; found {want} for "
            f"adapters {have}. Build them with lj.adapter_shardings(param_shardings, adapters, mesh=mesh)."
        )
    return jax.device_put(tree, shardings)
