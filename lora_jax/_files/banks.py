"""Banks from and to files: :func:`bank` stacks adapter trees, lora_jax adapter files and PEFT
directories; :func:`bank_to_peft` writes each slot as a PEFT directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from lora_jax._files import adapters as _adapters
from lora_jax._files import safetensors as _safetensors
from lora_jax._files.from_peft import from_peft
from lora_jax._files.peft import to_peft
from lora_jax._ops import slots as _slots


def bank(adapters: Sequence[Any], *, rank: int | None = None, params: Any = None) -> dict:
    """Stack adapter trees into one bank tree, ranks zero-padded to one ``rank``.

    Args:
      adapters: adapter trees for the same params (``lj.init``, ``lj.load``, ``lj.from_peft``),
        or paths: a lora_jax adapter file, or a PEFT adapter directory (read with ``params``).
        They may adapt different kernels (a kernel an adapter lacks is zero in its slot).
      rank: the padded rank, the largest rank a slot can hold (default: the largest given).
        Leave room to swap in bigger adapters later without recompiling.
      params: the base parameters, needed only to read PEFT directories.

    Returns:
      A tree of :class:`Bank`, keyed like the adapter trees; slot ``i`` is ``adapters[i]``.

    Raises:
      TypeError, ValueError: on an empty list, an adapter kind with no LoRA form, adapters
        of one kernel that disagree on its shape or roles, a rank below a given adapter's,
        or a PEFT directory without ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
      >>> ads = [lj.init(jax.random.key(i), params, lj.LoraConfig(rank=r)) for i, r in ((0, 2), (1, 4))]
      >>> b = lj.bank(ads, rank=8)
      >>> b["dense"]["kernel"]
      Bank(a=(2, 6, 8), b=(2, 8, 4), scales=(2,), rank=8, roles=('in', 'out'))
      >>> lj.bank_get(b, 0)["dense"]["kernel"].rank
      2
    """
    where = "lora_jax.bank"
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"{where}: adapters must be a non-empty list of adapter trees or paths, found {adapters!r}.")
    return _slots.stack([_read(item, params, where) for item in adapters], rank, where)


def bank_to_peft(
    directory: str | os.PathLike, banks: Any, *, names: Sequence[str] | None = None, **kwargs: Any
) -> None:
    """Write every non-empty slot of a bank as a PEFT adapter directory, ``directory/<name>``.

    Args:
      directory: created if missing.
      banks: a bank tree.
      names: one directory name per slot (default: ``"0"``, ``"1"``, ...).
      **kwargs: passed to :func:`lora_jax.to_peft` (``name_map``, ``base_model_name_or_path``...).

    The export replaces ``directory`` as a whole: the slots are written into a new directory
    beside it, which then takes its place, so slots of an earlier export that the bank no longer
    has do not linger, and a failure midway leaves the earlier export as it was. A directory
    that holds anything but an earlier bank export is refused rather than replaced.

    Raises:
      ValueError: if ``names`` has the wrong length, repeats or holds a path separator, or
        ``directory`` exists and is not an earlier export of a bank.
    """
    where = "lora_jax.bank_to_peft"
    by_path = _slots.banks_by_path(banks, where)
    n = next(iter(by_path.values()))[1].size
    names = [str(k) for k in range(n)] if names is None else list(names)
    bad = [x for x in names if not isinstance(x, str) or not x or x in (".", "..") or "/" in x or os.sep in x]
    if len(names) != n or len(set(names)) != n or bad:
        raise ValueError(
            f"{where}: names must be {n} distinct directory names (one per slot, no path separators), found {names!r}."
        )
    directory = os.path.abspath(_safetensors.user_path(directory, where))
    if os.path.exists(directory) and not os.path.isfile(os.path.join(directory, _MANIFEST)) and os.listdir(directory):
        raise ValueError(
            f"{where}: {directory!r} exists and is not an earlier bank export (it has no {_MANIFEST}); the export "
            "replaces its directory whole, so give it a new or empty one."
        )
    slots = [(name, _slots.bank_get(banks, k)) for k, name in enumerate(names)]
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".tmp")
    try:
        for name, adapters in slots:
            if adapters:
                to_peft(os.path.join(staging, name), adapters, **kwargs)
        with open(os.path.join(staging, _MANIFEST), "w") as f:
            json.dump({"slots": [name for name, adapters in slots if adapters]}, f)
        os.chmod(staging, 0o777 & ~_safetensors._umask())
        old = None
        if os.path.exists(directory):
            old = staging + ".old"
            os.replace(directory, old)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_MANIFEST = "lora_jax_bank.json"  # marks a directory written by bank_to_peft (the slots it holds)


def _read(item: Any, params: Any, where: str) -> Any:
    if not isinstance(item, (str, os.PathLike)):
        return item
    if os.path.isdir(item):
        if params is None:
            raise ValueError(f"{where}: {os.fspath(item)!r} is a PEFT directory; pass params= to read it.")
        return from_peft(item, params)
    return _adapters.load(item)
