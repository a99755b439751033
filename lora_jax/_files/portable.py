"""PEFT adapters that every runtime reads the same way: one rank, one alpha, nothing optional.

PEFT applies ``rank_pattern``/``alpha_pattern`` and rsLoRA, but other readers of its format do
not all: llama.cpp's ``convert_lora_to_gguf.py`` reads one ``lora_alpha`` (the patterns are
lost), vLLM has ignored rsLoRA's scaling for some adapters (vllm #55545) and refuses
``use_dora`` and ``modules_to_save``. :func:`portable` rewrites plain LoRA adapters so that the
config needs none of that: every rank zero-padded to the largest (a zero column of ``a`` facing
a zero row of ``b`` adds nothing), one alpha, and each adapter's own scale folded into ``b``.
``ΔW`` is unchanged; :func:`check_portable` says what a directory still needs.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._kinds.full import FullWeight
from lora_jax._kinds.lora import Adapter


def portable(by_path: dict[str, Any], where: str) -> dict[str, Any]:
    """``{path: adapter}`` as plain LoRA adapters of one rank and one alpha with the same ``ΔW``.

    Raises:
      ValueError: naming each fully trained parameter and each adapter of a kind without a
        plain LoRA form, such as DoRA (vLLM refuses ``use_dora`` and ``modules_to_save``).
    """
    problems, plain = [], {}
    for path, adapter in by_path.items():
        kind = _kind.kind_of(adapter)
        if isinstance(adapter, FullWeight):
            problems.append(f"{path!r}: a fully trained parameter (modules_to_save), which vLLM refuses")
        elif kind.as_lora is None:
            problems.append(f"{path!r}: a {type(adapter).__name__} ({kind.name}) has no plain LoRA form; merge it "
                            "instead")  # fmt: skip
        else:
            plain[path] = kind.as_lora(adapter)
    if problems:
        raise ValueError(f"{where}: no portable PEFT form:" + "".join(f"\n  {p}" for p in problems))
    rank = max(ad.rank for ad in plain.values())
    scales = [float(np.float32(ad.scale)) for ad in plain.values()]
    alpha = collections.Counter(scales).most_common(1)[0][0] * rank  # the most common scale needs no folding
    out = {}
    for path, ad in plain.items():
        n_stack, extra = ad.roles.count("stack"), rank - ad.rank
        fold = ad.scale / (alpha / rank)
        a = jnp.pad(ad.a, [(0, 0)] * (ad.a.ndim - 1) + [(0, extra)])
        b = jnp.pad(ad.b, [(0, extra) if k == n_stack else (0, 0) for k in range(ad.b.ndim)])
        b = b if fold == 1.0 else (b * fold).astype(ad.b.dtype)
        out[path] = Adapter(a, b, rank=rank, alpha=alpha, roles=ad.roles, dropout=ad.dropout)
    return out


# Config fields (and their neutral values) that some reader of PEFT's format ignores or refuses.
_NOT_PORTABLE = {
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "use_rslora": (False, None),
    "use_dora": (False, None), "modules_to_save": (None, []), "lora_bias": (False, None),
    "layers_to_transform": (None,), "layer_replication": (None,), "trainable_token_indices": (None,),
}  # fmt: skip


def check_portable(directory: str | os.PathLike) -> list[str]:
    """What keeps a PEFT adapter directory from being read the same way by PEFT, vLLM and
    llama.cpp's converter: an empty list when nothing does.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q": {"kernel": jnp.ones((8, 4))}, "v": {"kernel": jnp.ones((8, 4))}}
      >>> config = lj.LoraConfig(rank=2, rank_pattern={"v/kernel": 4})
      >>> lora, out = lj.init(jax.random.key(0), params, config), tempfile.mkdtemp()
      >>> lj.to_peft(out, lora)
      >>> lj.check_portable(out)
      ["rank_pattern is {'^v': 4}: one rank for every module is portable (to_peft(..., portable=True))"]
      >>> lj.to_peft(out, lora, portable=True)
      >>> lj.check_portable(out)
      []
    """
    path = os.path.join(os.fspath(directory), "adapter_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"lora_jax.check_portable: cannot read {path!r}: {e}") from None
    problems = []
    for key in ("r", "lora_alpha", "target_modules"):
        if not config.get(key):
            problems.append(f"{key} is missing or empty: vLLM and llama.cpp's converter need it")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key, neutral in _NOT_PORTABLE.items():
        if key in config and config[key] not in neutral:
            fix = {"rank_pattern": "one rank for every module", "alpha_pattern": "one alpha for every module",
                   "use_rslora": "rsLoRA's scale folded into lora_B"}.get(key)  # fmt: skip
            hint = f": {fix} is portable (to_peft(..., portable=True))" if fix else ": not read by every runtime"
            problems.append(f"{key} is {config[key]!r}{hint}")
    return problems
