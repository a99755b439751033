"""``save`` / ``load``: adapter checkpoints as safetensors plus JSON metadata.

One ``.safetensors`` file holds the arrays, named ``<path>/<array>`` (``<path>/a`` and
``<path>/b`` for LoRA); its header metadata holds, under the key ``lora_jax``, a JSON
document with each adapter's keys, kind, static fields and a CRC-32 of each array's bytes.
No pickle. Version 1 files (plain LoRA only, before adapter kinds) are still read.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._files import safetensors as _safetensors
from lora_jax._ops import sharding as _sharding

FORMAT_VERSION = 2
_META_KEY = "lora_jax"


def save(path: str | os.PathLike, adapters: Any) -> None:
    """Write ``adapters`` to ``path`` (a ``.safetensors`` file), atomically.

    The file is written next to ``path`` under a temporary name and renamed over it, so a
    crash or error mid-save leaves any previous checkpoint at ``path`` intact. Sharded
    arrays are gathered whole first (across processes too: in a multi-host run, call
    ``save`` on every process; process 0 writes).

    Args:
      path: the file to write.
      adapters: an adapter tree (from :func:`init`, or trained), of any registered kind.

    Raises:
      TypeError: if ``adapters`` holds something other than adapters, or a key that is not
        a ``str`` or ``int``.
      ValueError: if a key contains ``/``, the tree is empty, or a static field of an
        adapter is not a plain JSON value.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))
      >>> file = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
      >>> lj.save(file, ad)
      >>> bool((lj.load(file)["dense"]["kernel"].a == ad["dense"]["kernel"].a).all())
      True
    """
    flat = _tree.flatten(adapters, "lora_jax.save")
    if not flat:
        raise ValueError("lora_jax.save: the adapter tree is empty; there is nothing to save.")
    tensors, entries = [], {}
    for keys, ad in flat.values():
        bad = [k for k in keys if not isinstance(k, (str, int)) or isinstance(k, bool)]
        if bad or any("/" in str(k) for k in keys):
            raise (TypeError if bad else ValueError)(
                f"lora_jax.save: adapter keys must be str or int without '/', found {keys!r}."
            )
        path_str = _paths.join(keys)
        static = _kind.static(ad)
        try:
            json.dumps(static, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"lora_jax.save: {path_str!r}: the static fields {static!r} of its {type(ad).__name__} are not "
                "plain JSON values."
            ) from None
        arrays = _kind.arrays(ad)
        for name, x in arrays.items():  # the writer checksums every tensor and the metadata
            shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype)
            tensors.append(_safetensors.Tensor(f"{path_str}/{name}", shape, dtype, functools.partial(_same, x)))
        kind = _kind.kind_of(ad).name
        entries[path_str] = {"keys": list(keys), "kind": kind, "static": static, "arrays": list(arrays)}
    meta = {_META_KEY: json.dumps({"version": FORMAT_VERSION, "adapters": entries})}
    _safetensors.write(path, tensors, meta, "lora_jax.save")


def load(path: str | os.PathLike, *, shardings: Any = None) -> dict:
    """Read an adapter checkpoint written by :func:`save`.

    Everything is validated before anything is returned, and the metadata before any array
    is read: the safetensors header, the metadata (known adapter kinds, valid fields), the
    presence, shapes, dtypes and checksums of all arrays.

    Args:
      path: the file written by :func:`save`.
      shardings: optional ``NamedSharding`` tree (from :func:`adapter_shardings`) to place
        the arrays on; by default they go to the default device.

    Returns:
      The adapter tree, nested like the one saved.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is truncated, corrupt, not a lora_jax checkpoint, holds an
        adapter kind this program has not registered, or its arrays disagree with its
        metadata (every problem is listed).

    Example:
      >>> import lora_jax as lj
      >>> lj.load("no/such/adapter.safetensors")
      Traceback (most recent call last):
      ...
      FileNotFoundError: lora_jax.load: no adapter checkpoint at 'no/such/adapter.safetensors'.
    """
    with _safetensors.reading(path, "lora_jax.load", "adapter checkpoint") as f:
        where = f.where
        entries = _entries(f.metadata, where)
        problems, parsed = [], {}
        for path_str, entry in entries.items():
            try:
                parsed[path_str] = _parse_entry(path_str, entry)
            except _Invalid as e:
                problems.append(f"{path_str!r}: {e}")
        expected = {f"{p}/{n}" for p, (_, _, _, names) in parsed.items() for n in names}
        leaves = []
        for path_str, (keys, cls, static, names) in parsed.items():
            missing = [n for n in names if f"{path_str}/{n}" not in f.names]
            try:
                if missing:
                    raise _Invalid(", ".join(f"array {n!r} is missing" for n in missing))
                leaves.append((keys, _build(cls, static, names, path_str, f.get)))
            except _Invalid as e:
                problems.append(f"{path_str!r}: {e}")
        problems += [f"{name!r}: an array not described by the metadata" for name in sorted(set(f.names) - expected)]
    if problems:
        raise ValueError(f"{where} is inconsistent:" + "".join(f"\n  {p}" for p in problems))
    adapters = _paths.nest(leaves, where)
    return adapters if shardings is None else _sharding.place(adapters, shardings, where)


class _Invalid(Exception):
    pass


def _entries(metadata: dict, where: str) -> dict:
    if _META_KEY not in metadata:
        raise ValueError(
            f"{where} has no lora_jax metadata: it was not written by lora_jax.save "
            "(for a Hugging Face PEFT adapter use lj.from_peft)."
        )
    try:
        doc = json.loads(metadata[_META_KEY])
        version, entries = doc["version"], doc["adapters"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{where}: its lora_jax metadata is not valid ({type(e).__name__}).") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: format version {version!r}, this lora_jax reads version {FORMAT_VERSION}.")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: its metadata lists no adapters.")
    if _safetensors.CHECKSUMS not in metadata:
        raise ValueError(f"{where}: its checksums are missing (the file is corrupt or was altered).")
    return entries


def _parse_entry(path_str: str, entry: Any) -> tuple:
    if not isinstance(entry, dict):
        raise _Invalid(f"metadata entry is a {type(entry).__name__}, expected an object")
    missing = sorted({"keys", "kind", "static", "arrays"} - set(entry))
    if missing:
        raise _Invalid(f"metadata entry lacks {missing}")
    keys, kind, static, names = entry["keys"], entry["kind"], entry["static"], entry["arrays"]
    if (
        not isinstance(keys, list)
        or not keys
        or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys)
        or _paths.join(keys) != path_str
    ):
        raise _Invalid(f"metadata keys {keys!r} do not spell the path")
    cls = _kind.class_named(kind) if isinstance(kind, str) else None
    if cls is None:
        known = _kind.kind_names()
        raise _Invalid(f"adapter kind {kind!r} is not registered in this program (known: {known}); "
                       "register it with lj.extend.register_kind before loading")  # fmt: skip
    if not isinstance(static, dict) or set(static) - set(_kind.field_names(cls, static=True)):
        raise _Invalid(f"static fields {static!r} are not those of a {cls.__name__}")
    if not isinstance(names, list) or set(names) != set(_kind.field_names(cls, static=False)):
        raise _Invalid(f"arrays {names!r} are not those of a {cls.__name__}")
    return tuple(keys), cls, {k: _tuples(v) for k, v in static.items()}, names


def _build(cls: type, static: dict, names: list[str], path_str: str, get) -> Any:
    arrays = {}
    for name in names:
        arr = get(f"{path_str}/{name}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise _Invalid(f"array {name!r} has dtype {arr.dtype}, expected a floating dtype")
        arrays[name] = jnp.asarray(arr)
    try:
        adapter = cls(**arrays, **static)
    except (TypeError, ValueError) as e:
        raise _Invalid(str(e)) from None
    for name, axes in _kind.kind_of(cls).axes(adapter).items():  # no stack axis may be missing in a file
        if arrays[name].ndim != len(axes):
            raise _Invalid(f"array {name!r} {arrays[name].shape} has {arrays[name].ndim} axes, its "
                           f"{cls.__name__} ({_tree.describe(adapter)}) needs {len(axes)}")  # fmt: skip
    return adapter


def _same(x: Any) -> Any:
    return x


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples that static (hashable) fields hold."""
    return tuple(map(_tuples, value)) if isinstance(value, list) else value
