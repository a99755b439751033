"""``save`` / ``load``: adapter checkpoints as safetensors plus JSON metadata.

One ``.safetensors`` file holds the arrays, named ``<path>/a`` and ``<path>/b``; its header
metadata holds, under the key ``lora_jax``, a JSON document with each adapter's keys, rank,
alpha, roles, rsLoRA flag, dropout and a CRC-32 of each array's bytes. No pickle.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from jax.experimental import multihost_utils

from lora_jax import _adapter, _merge, _paths, _sharding

FORMAT_VERSION = 1
_META_KEY = "lora_jax"


def save(path: str | os.PathLike, adapters: Any) -> None:
    """Write ``adapters`` to ``path`` (a ``.safetensors`` file), atomically.

    The file is written next to ``path`` under a temporary name and renamed over it, so a
    crash or error mid-save leaves any previous checkpoint at ``path`` intact. Sharded
    arrays are gathered whole first (across processes too: in a multi-host run, call
    ``save`` on every process; process 0 writes).

    Args:
      path: the file to write.
      adapters: an adapter tree (from :func:`init`, or trained).

    Raises:
      TypeError: if ``adapters`` holds something other than :class:`Adapter` leaves, or a
        key that is not a ``str`` or ``int``.
      ValueError: if a key contains ``/`` or the tree is empty.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
      >>> ad = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2))
      >>> file = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
      >>> lj.save(file, ad)
      >>> bool((lj.load(file)["dense"]["kernel"].a == ad["dense"]["kernel"].a).all())
      True
    """
    _merge.adapters_by_path(adapters, "lora_jax.save")  # type-checks the leaves
    by_keys = _paths.leaves_with_paths(adapters, is_leaf=_adapter.is_adapter)
    if not by_keys:
        raise ValueError("lora_jax.save: the adapter tree is empty; there is nothing to save.")
    tensors, entries = {}, {}
    for keys, ad in by_keys:
        bad = [k for k in keys if not isinstance(k, (str, int)) or isinstance(k, bool)]
        if bad or any("/" in str(k) for k in keys):
            raise (TypeError if bad else ValueError)(
                f"lora_jax.save: adapter keys must be str or int without '/', found {keys!r}."
            )
        path_str = _paths.join(keys)
        arrays = {"a": _to_host(ad.a), "b": _to_host(ad.b)}
        for name, arr in arrays.items():
            tensors[f"{path_str}/{name}"] = np.ascontiguousarray(arr)
        entries[path_str] = {
            "keys": list(keys), "rank": ad.rank, "alpha": ad.alpha, "roles": list(ad.roles),
            "rslora": ad.rslora, "dropout": ad.dropout,
            "crc32": {n: zlib.crc32(tensors[f"{path_str}/{n}"].tobytes()) for n in arrays},
        }  # fmt: skip
    meta = {_META_KEY: json.dumps({"version": FORMAT_VERSION, "adapters": entries})}
    if jax.process_index() == 0:
        atomic_write(path, safetensors.numpy.save(tensors, metadata=meta))


def _to_host(x: Any) -> np.ndarray:
    """The whole array on the host, gathered from every device (and process) that holds a part."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def load(path: str | os.PathLike, *, shardings: Any = None) -> dict:
    """Read an adapter checkpoint written by :func:`save`.

    Everything is validated before anything is returned: the safetensors header, the
    metadata, the presence, shapes, dtypes and checksums of all arrays.

    Args:
      path: the file written by :func:`save`.
      shardings: optional ``NamedSharding`` tree (from :func:`adapter_shardings`) to place
        the arrays on; by default they go to the default device.

    Returns:
      The adapter tree, nested like the one saved.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is truncated, corrupt, not a lora_jax checkpoint, or its
        arrays disagree with its metadata (every problem is listed).

    Example:
      >>> import lora_jax as lj
      >>> lj.load("no/such/adapter.safetensors")
      Traceback (most recent call last):
      ...
      FileNotFoundError: lora_jax.load: no adapter checkpoint at 'no/such/adapter.safetensors'.
    """
    tensors, metadata, where = read_safetensors(path, "lora_jax.load", "adapter checkpoint")
    if _META_KEY not in metadata:
        raise ValueError(
            f"{where} has no lora_jax metadata: it was not written by lora_jax.save "
            "(for a Hugging Face PEFT adapter use lj.from_peft)."
        )
    try:
        doc = json.loads(metadata[_META_KEY])
        version, entries = doc["version"], doc["adapters"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: its lora_jax metadata is not valid ({e!r}).") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: format version {version!r}, this lora_jax reads version {FORMAT_VERSION}.")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: its metadata lists no adapters.")
    problems, leaves = [], []
    for path_str, entry in entries.items():
        try:
            leaves.append(_entry_to_adapter(path_str, entry, tensors))
        except _Invalid as e:
            problems.append(f"{path_str!r}: {e}")
    expected = {f"{p}/{n}" for p in entries for n in ("a", "b")}
    problems += [f"{name!r}: an array not described by the metadata" for name in sorted(set(tensors) - expected)]
    if problems:
        raise ValueError(f"{where} is inconsistent:" + "".join(f"\n  {p}" for p in problems))
    adapters = _paths.nest(leaves)
    return adapters if shardings is None else _sharding.place(adapters, shardings, where)


class _Invalid(Exception):
    pass


def _entry_to_adapter(path_str: str, entry: Any, tensors: dict[str, np.ndarray]):
    if not isinstance(entry, dict):
        raise _Invalid(f"metadata entry is a {type(entry).__name__}, expected an object")
    missing = sorted({"keys", "rank", "alpha", "roles", "rslora", "dropout", "crc32"} - set(entry))
    if missing:
        raise _Invalid(f"metadata entry lacks {missing}")
    keys, rank, alpha, roles = entry["keys"], entry["rank"], entry["alpha"], entry["roles"]
    if not isinstance(keys, list) or _paths.join(keys) != path_str or not keys:
        raise _Invalid(f"metadata keys {keys!r} do not spell the path")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _Invalid(f"rank {rank!r} is not an int >= 1")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not alpha > 0:
        raise _Invalid(f"alpha {alpha!r} is not a number > 0")
    if not isinstance(entry["rslora"], bool):
        raise _Invalid(f"rslora {entry['rslora']!r} is not a bool")
    dropout = entry["dropout"]
    if not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise _Invalid(f"dropout {dropout!r} is not in [0, 1)")
    if not isinstance(roles, list) or len(roles) < 2:
        raise _Invalid(f"roles {roles!r} are not a list of >= 2 roles")
    why = _adapter.roles_problem(roles, [1] * len(roles))
    if why:
        raise _Invalid(why)
    if not isinstance(entry["crc32"], dict):
        raise _Invalid(f"crc32 {entry['crc32']!r} is not an object")
    arrays = {}
    for name in ("a", "b"):
        arr = tensors.get(f"{path_str}/{name}")
        if arr is None:
            raise _Invalid(f"array {name!r} is missing")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise _Invalid(f"array {name!r} has dtype {arr.dtype}, expected a floating dtype")
        if zlib.crc32(np.ascontiguousarray(arr).tobytes()) != entry["crc32"].get(name):
            raise _Invalid(f"array {name!r} fails its checksum (the file is corrupt)")
        arrays[name] = arr
    a, b = arrays["a"], arrays["b"]
    n_stack, n_in = roles.count("stack"), roles.count("in")
    if a.ndim != n_stack + n_in + 1 or b.ndim != len(roles) - n_in + 1:
        raise _Invalid(f"a {a.shape} and b {b.shape} do not fit roles {roles}")
    if a.shape[-1] != rank or b.shape[n_stack] != rank or a.shape[:n_stack] != b.shape[:n_stack]:
        raise _Invalid(f"a {a.shape} and b {b.shape} do not fit rank {rank} and roles {roles}")
    adapter = _adapter.Adapter(
        jnp.asarray(a), jnp.asarray(b), rank=rank, alpha=float(alpha), roles=tuple(roles),
        rslora=entry["rslora"], dropout=float(dropout),
    )  # fmt: skip
    return tuple(keys), adapter


def read_safetensors(path: str | os.PathLike, function: str, what: str) -> tuple[dict, dict, str]:
    """All arrays and the header metadata of a safetensors file, and ``"<function>: '<path>'"``
    for messages; a ``FileNotFoundError`` or a clear ``ValueError`` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{function}: no {what} at {path!r}.")
    where = f"{function}: {path!r}"
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        size = os.path.getsize(path)
        raise ValueError(
            f"{where} is not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}"
        ) from None
    return tensors, metadata, where


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
