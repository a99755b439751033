"""``to_peft`` / ``from_peft``: adapters in Hugging Face PEFT's on-disk format.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with,
per adapted PyTorch module ``<m>``:

| layer | keys | shapes |
|---|---|---|
| ``Linear`` | ``base_model.model.<m>.lora_A.weight``, ``….lora_B.weight`` | ``(r, in)``, ``(out, r)`` |
| ``Conv{1,2,3}d`` | the same | ``(r, cin, k…)``, ``(cout, r, 1…)`` |
| ``Embedding`` | ``….lora_embedding_A``, ``….lora_embedding_B`` | ``(r, vocab)``, ``(features, r)`` |

so ``A = aᵀ`` and ``B = bᵀ`` (a Flax N-D kernel flattened to its ``(in, out)`` matrix), and
``scale = lora_alpha / r`` (``/ √r`` with ``use_rslora``), ``r`` and ``lora_alpha`` per module
from ``rank_pattern``/``alpha_pattern``. A Flax path maps to a module name by dropping the
final ``kernel``/``embedding`` and joining with ``.``; ``name_map`` overrides that.

Parameters trained fully (:class:`FullWeight`, PEFT's ``modules_to_save``) are stored whole
as ``base_model.model.<m>.weight``/``.bias`` in PyTorch's layout, their modules listed under
``modules_to_save``. The weights file records the config fields that change the math, so a
config and weights from different writes are never read as a pair.
"""

from __future__ import annotations

import collections
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _adapter, _merge, _paths, _safetensors, _torch
from lora_jax._full import FullWeight
from lora_jax._lora import Adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)"
)
_WHOLE = re.compile(r"base_model\.model\.(?P<name>(?P<module>.+)\.[^.]+)")
# The weights file's metadata records the config fields that change the math, so that a config
# and weights from different writes are never read as a pair.
_PAIRED = "lora_jax_config"
_MATH = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "modules_to_save")
# Keys PEFT writes that do not change how saved LoRA weights are applied.
_KNOWN = {
    "peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
    "bias", "base_model_name_or_path", "task_type", "fan_in_fan_out", "inference_mode", "init_lora_weights",
    "revision", "layers_pattern", "layers_to_transform", "exclude_modules", "auto_mapping", "peft_version",
    "loftq_config", "eva_config", "corda_config", "kasa_config", "lora_ga_config", "monteclora_config",
    "megatron_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "velora_config",
    "modules_to_save",
}  # fmt: skip
# Keys naming PEFT features that change the math; lora_jax imports them only at their neutral value.
_NEUTRAL = {
    "use_dora": False, "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None, "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None,
    "use_bdlora": None, "arrow_config": None,
}  # fmt: skip


def to_peft(
    directory: str | os.PathLike,
    adapters: Any,
    *,
    name_map: Callable[[str], str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    conv: _paths.Pattern | None = None,
) -> None:
    """Write ``adapters`` as a PEFT LoRA adapter directory, loadable by ``PeftModel.from_pretrained``.

    Args:
      directory: created if missing; ``adapter_config.json`` and
        ``adapter_model.safetensors`` in it are replaced atomically.
      adapters: an adapter tree.
      name_map: ``path -> module name`` (default: drop the final ``kernel``/``embedding``,
        join with ``.``). For a kernel stacked by ``nn.scan`` it must return a name with a
        ``{}`` placeholder for the layer index, e.g. ``"model.layers.{}.self_attn.q_proj"``.
      base_model_name_or_path, task_type: written to the config as they are.
      conv: paths of convolution kernels (regex, list or callable). By default a 4-D or
        5-D kernel whose axes are all ``in`` but the last is a ``Conv2d``/``Conv3d``; pass
        ``conv`` for ``Conv1d`` kernels.

    Raises:
      ValueError: if adapters disagree on ``use_rslora`` (PEFT has one flag), a stacked
        kernel has no ``{}`` in its name, or two kernels map to one module name.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> lj.to_peft(out, lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)))
      >>> sorted(os.listdir(out))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    by_path = _merge.adapters_by_path(adapters, "lora_jax.to_peft")
    if not by_path:
        raise ValueError("lora_jax.to_peft: the adapter tree is empty; there is nothing to export.")
    is_conv = _paths.compile_pattern(conv, "conv", "lora_jax.to_peft")
    name_of = name_map or _torch.default_name
    tensors: list[_safetensors.Tensor] = []
    modules: dict[str, tuple[str, Adapter]] = {}
    whole: dict[str, str] = {}  # module of each FullWeight -> its path
    problems = []
    for path, adapter in by_path.items():
        kind = _adapter.kind_of(adapter)
        if isinstance(adapter, FullWeight):
            try:
                name, layout, _ = _torch.param_layout(tuple(path.split("/")), tuple(adapter.value.shape), name_of,
                                                      None, is_conv)  # fmt: skip
            except ValueError as e:
                problems.append(f"{path!r}: {e}")
                continue
            value = adapter.value
            shape = tuple(layout(np.empty(value.shape, np.bool_)).shape)
            produce = lambda value=value, layout=layout: layout(_safetensors.to_host(value))  # noqa: E731
            tensors.append(_safetensors.Tensor(_PREFIX + name, shape, np.dtype(value.dtype), produce))
            whole[name.rsplit(".", 1)[0]] = path
            continue
        if kind.as_lora is None:
            problems.append(f"{path!r}: a {type(adapter).__name__} ({kind.name}) has no plain LoRA form for PEFT")
            continue
        ad = kind.as_lora(adapter)
        name = name_of(path)
        n_stack = ad.roles.count("stack")
        if n_stack and (n_stack > 1 or "{}" not in name):
            problems.append(f"{path!r}: stacked over {n_stack} axes; name_map must return a name with one '{{}}' "
                            f"for the layer index (got {name!r})")  # fmt: skip
            continue
        for i in range(ad.a.shape[0]) if n_stack else [None]:
            module = name.format(i) if n_stack else name
            if module in modules:
                problems.append(f"{path!r} and {modules[module][0]!r} both map to module {module!r}")
                continue
            a, b = (ad.a, ad.b) if i is None else (ad.a[i], ad.b[i])
            layer = _torch.layer_kind(path, ad.roles[n_stack:], is_conv)
            shapes = _torch.lora_to_torch(layer, np.empty(a.shape, np.bool_), np.empty(b.shape, np.bool_))
            for suffix, shape in shapes.items():
                produce = lambda a=a, b=b, layer=layer, suffix=suffix: _torch.lora_to_torch(  # noqa: E731
                    layer, _safetensors.to_host(a), _safetensors.to_host(b)
                )[suffix]
                tensors.append(_safetensors.Tensor(f"{_PREFIX}{module}.{suffix}", shape.shape, np.dtype(a.dtype),
                                                   produce))  # fmt: skip
            modules[module] = (path, ad)
    clash = sorted(set(whole) & set(modules))
    problems += [f"module {m!r} is both LoRA-adapted and trained fully ({whole[m]!r})" for m in clash]
    if problems:
        raise ValueError("lora_jax.to_peft: cannot export:" + "".join(f"\n  {p}" for p in problems))
    config = _config(modules, sorted(whole), base_model_name_or_path, task_type)
    try:
        config_bytes = json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora_jax.to_peft: the adapter config cannot be written as JSON ({e}).") from None
    os.makedirs(directory, exist_ok=True)
    # The weights first, then the config: each replaced atomically, and the weights record the
    # config's fields that change the math, so a crash between the two renames is detected by from_peft.
    meta = {"format": "pt", _PAIRED: json.dumps({k: config[k] for k in _MATH}, sort_keys=True)}
    _safetensors.write(os.path.join(directory, WEIGHTS), tensors, meta, "lora_jax.to_peft")
    if jax.process_index() == 0:
        _safetensors.atomic_write(os.path.join(directory, CONFIG), lambda f: f.write(config_bytes))


def _config(modules: dict[str, tuple[str, Adapter]], whole: list[str], base_model: str | None,
            task_type: str | None) -> dict:  # fmt: skip
    ads = [ad for _, ad in modules.values()] or [Adapter(np.zeros((1, 1)), np.zeros((1, 1)), rank=1, alpha=1.0)]
    rslora = {ad.rslora for ad in ads}
    if len(rslora) > 1:
        raise ValueError("lora_jax.to_peft: adapters mix rsLoRA and plain LoRA scaling; PEFT has one use_rslora flag.")
    common = lambda values: collections.Counter(values).most_common(1)[0][0]  # noqa: E731
    r, alpha = common(ad.rank for ad in ads), common(ad.alpha for ad in ads)
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora.pop(),
        "target_modules": sorted(modules),
        "rank_pattern": {m: ad.rank for m, (_, ad) in sorted(modules.items()) if ad.rank != r},
        "alpha_pattern": {m: ad.alpha for m, (_, ad) in sorted(modules.items()) if ad.alpha != alpha},
        "lora_dropout": common(ad.dropout for ad in ads), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": whole or None,
        "base_model_name_or_path": base_model, "task_type": task_type,
    }  # fmt: skip


def from_peft(
    directory: str | os.PathLike,
    params: Any,
    *,
    name_map: Callable[[str], str] | None = None,
    roles: Mapping[str, tuple[str, ...]] | None = None,
    dtype: Any = jnp.float32,
) -> dict:
    """Read a PEFT LoRA adapter directory (written by PEFT or :func:`to_peft`) as adapters for ``params``.

    Every module in the file must map to a kernel of ``params`` whose shape fits; ranks,
    alphas (``rank_pattern``/``alpha_pattern``) and rsLoRA are taken from the config.
    Unknown config keys are ignored with a warning; everything is validated before
    anything is returned.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax parameters the adapter is for.
      name_map: the same ``path -> module name`` function given to :func:`to_peft`
        (default: drop the final ``kernel``/``embedding``, join with ``.``); it is applied to
        every kernel path of ``params`` to find each module's kernel.
      roles: axis roles of N-D kernels (as for :func:`init`); without them, an N-D kernel's
        leading axes are taken as ``in`` when that split of its shape is the only one that
        matches the PyTorch ``(in, out)``.
      dtype: the adapters' dtype (float32 by default; ``None`` keeps the file's).

    Returns:
      An adapter tree for ``params``.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: on a config that is not LoRA, lacks ``r``/``lora_alpha`` or uses an
        unsupported PEFT feature (DoRA, ``modules_to_save``, …); on a corrupt file; on
        modules that match no kernel (listing the nearest names) or shapes that do not fit.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> lj.to_peft(out, lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)))
      >>> lj.from_peft(out, params)["q_proj"]["kernel"].a.shape
      (8, 2)
    """
    directory = os.fspath(directory)
    config = _read_config(directory)
    weights_path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        hint = " (a pickled adapter_model.bin is never read: save with safe_serialization=True)" if pickled else ""
        raise FileNotFoundError(f"lora_jax.from_peft: no {WEIGHTS} in {directory!r}{hint}.")
    name_of = name_map or _torch.default_name
    saved = _saved_modules(config)
    with _safetensors.reading(weights_path, "lora_jax.from_peft", WEIGHTS) as f:
        where = f.where
        paired = f.metadata.get(_PAIRED)
        parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
        whole, unknown = {}, []
        for key in f.names:
            m, w = _KEY.fullmatch(key), _WHOLE.fullmatch(key)
            if m is not None:
                parts[m["module"]][m["part"]] = f.get(key)
            elif w is not None and any(w["module"] == s or w["module"].endswith("." + s) for s in saved):
                whole[w["name"]] = f.get(key)
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"{where} holds keys that are not LoRA A/B weights (nor parameters of the config's "
                         f"modules_to_save {saved}): {sorted(unknown)[:5]}")  # fmt: skip
    kernels = _kernels_by_module(params, name_of)
    problems, leaves = [], []
    for module, part in sorted(parts.items()):
        if module not in kernels:
            near = difflib.get_close_matches(module, list(kernels), n=3, cutoff=0.3)
            problems.append(f"module {module!r} matches no kernel of params (nearest: {near or sorted(kernels)[:3]})")
            continue
        try:
            leaves.append((module, _from_torch(module, part, kernels[module], config, roles, dtype)))
        except _Mismatch as e:
            problems.append(f"module {module!r} -> {kernels[module][0]!r}: {e}")
    full = []
    if whole:
        names = _torch.param_names(params, name_of, roles, None)
        for name, value in sorted(whole.items()):
            if name not in names:
                near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.3)
                problems.append(f"{name!r} (modules_to_save) matches no parameter of params (nearest: {near})")
                continue
            keys, shape, inverse = names[name]
            if value.size != math.prod(shape):
                problems.append(f"{name!r} (modules_to_save) has shape {value.shape}, {_paths.join(keys)!r} is {shape}")
                continue
            cast = value if dtype is None else value.astype(dtype)
            full.append((keys, FullWeight(jnp.asarray(inverse(cast)))))
    if problems:
        raise ValueError(f"{where} does not fit params:" + "".join(f"\n  {p}" for p in problems)
                         + "\nPass name_map (path -> module name) if the names differ from the default.")  # fmt: skip
    _check_pair(paired, config, where)
    return _assemble(leaves, kernels, full)


def _check_pair(paired: str | None, config: dict, where: str) -> None:
    """The config fields recorded in the weights (by :func:`to_peft`) are those of the config."""
    if paired is None:
        return  # written by PEFT itself
    try:
        recorded = json.loads(paired)
    except ValueError:
        recorded = {}
    differ = {k: (recorded.get(k), config.get(k)) for k in _MATH if recorded.get(k) != config.get(k)}
    if differ:
        raise ValueError(
            f"{where} was written together with another {CONFIG} (weights vs config: {differ}); the two files "
            "come from different writes (an interrupted lora_jax.to_peft?). Write the adapter again."
        )


def _saved_modules(config: dict) -> list[str]:
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise ValueError(f"lora_jax.from_peft: modules_to_save {saved!r} is not a list of module names.")
    return saved


class _Mismatch(Exception):
    pass


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora_jax.from_peft: no {CONFIG} in {directory!r}.")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"lora_jax.from_peft: {path!r} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"lora_jax.from_peft: {path!r} holds a {type(config).__name__}, expected an object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"lora_jax.from_peft: {path!r} has peft_type {config.get('peft_type')!r}; only 'LORA' is supported."
        )
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise ValueError(f"lora_jax.from_peft: {path!r} lacks the required keys {missing}.")
    unsupported = {
        k: config[k]
        for k, neutral in _NEUTRAL.items()
        if k in config and config[k] not in (neutral, None, False, [], {})
    }
    if unsupported:
        raise ValueError(f"lora_jax.from_peft: {path!r} uses PEFT features lora_jax does not import: {unsupported}.")
    extra = sorted(set(config) - _KNOWN - set(_NEUTRAL))
    if extra:
        warnings.warn(f"lora_jax.from_peft: ignoring unknown adapter_config.json keys {extra}.", stacklevel=3)
    return config


def _kernels_by_module(params: Any, name_of: Callable[[str], str]) -> dict[str, tuple]:
    """``{module name: (path, shape, layer index or None, keys)}`` for every >=2-D array of params."""
    out = {}
    for keys, leaf in _paths.leaves_with_paths(params):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2:
            continue
        path = _paths.join(keys)
        name = name_of(path)
        if "{}" in name:
            out.update({name.format(i): (path, shape[1:], i, keys) for i in range(shape[0])})
        else:
            out[name] = (path, shape, None, keys)
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _from_torch(module: str, part: dict, kernel: tuple, config: dict, roles: Mapping | None, dtype) -> Adapter:
    path, shape, _, _ = kernel
    if "lora_embedding_A" in part or "lora_embedding_B" in part:
        lora_a, lora_b = part.get("lora_embedding_A"), part.get("lora_embedding_B")
    else:
        lora_a, lora_b = part.get("lora_A.weight"), part.get("lora_B.weight")
    if lora_a is None or lora_b is None:
        raise _Mismatch(f"the file has {sorted(part)} only; A and B are both needed")
    r = lora_a.shape[0]
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if rank != r or lora_b.shape[1] != r:
        raise _Mismatch(f"A {lora_a.shape} and B {lora_b.shape} do not have the config's rank {rank}")
    conv = lora_a.ndim > 2
    if "lora_embedding_A" in part:
        kernel_roles, a, b = ("in", "out"), lora_a.T, lora_b.T
    elif conv:  # (r, cin, k...) -> (k..., cin, r); (cout, r, 1...) -> (r, cout)
        n = lora_a.ndim - 2
        kernel_roles = ("in",) * (n + 1) + ("out",)
        a, b = _torch.conv_lora_from_torch(lora_a, lora_b)
    else:
        kernel_roles = _linear_roles(path, shape, lora_a.shape[1], lora_b.shape[0], roles)
        a, b = lora_a.T, lora_b.T
    a_shape, b_shape = _adapter.factor_shapes(shape, kernel_roles, r)
    if math.prod(a_shape) != a.size or math.prod(b_shape) != b.size or (conv and a.shape != a_shape):
        raise _Mismatch(
            f"A {lora_a.shape} and B {lora_b.shape} do not fit the kernel {shape} with roles {kernel_roles}"
        )
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return Adapter(
        cast(a.reshape(a_shape)), cast(b.reshape(b_shape)), rank=r, alpha=alpha, roles=kernel_roles,
        rslora=bool(config.get("use_rslora", False)), dropout=float(config.get("lora_dropout") or 0.0),
    )  # fmt: skip


def _linear_roles(path: str, shape: tuple, fan_in: int, fan_out: int, roles: Mapping | None) -> tuple[str, ...]:
    """Roles for a kernel read from a PEFT ``Linear``: given, 2-D, or the one in/out split of its shape."""
    given = _adapter.roles_for(path, shape, roles)
    if given is not None:
        return given[given.count("stack") :] if len(given) == len(shape) + 1 else given
    splits = [i for i in range(1, len(shape)) if math.prod(shape[:i]) == fan_in and math.prod(shape[i:]) == fan_out]
    if len(splits) != 1:
        raise _Mismatch(f"cannot tell which axes of the kernel {shape} are in (PyTorch in={fan_in}, "
                        f"out={fan_out}); pass roles=lj.axis_roles(model, ...)")  # fmt: skip
    return ("in",) * splits[0] + ("out",) * (len(shape) - splits[0])


def _assemble(leaves: list[tuple[str, Adapter]], kernels: dict, full: list) -> dict:
    """Nest per-module adapters by kernel path, restacking the layers of stacked kernels."""
    whole: list = list(full)
    stacked: dict = collections.defaultdict(dict)
    for module, ad in leaves:
        path, _, layer, keys = kernels[module]
        if layer is None:
            whole.append((keys, ad))
        else:
            stacked[keys][layer] = ad
    for keys, layers in stacked.items():
        path = _paths.join(keys)
        n = sum(1 for (p, _, i, _) in kernels.values() if p == path)
        if sorted(layers) != list(range(n)):
            raise ValueError(f"lora_jax.from_peft: the stacked kernel {path!r} has {n} layers, the file adapts "
                             f"layers {sorted(layers)}; lora_jax needs all of them.")  # fmt: skip
        first = layers[0]
        if len({(ad.rank, ad.alpha) for ad in layers.values()}) > 1:
            raise ValueError(
                f"lora_jax.from_peft: the layers of {path!r} differ in rank or alpha; a stacked kernel has one."
            )
        a = jnp.stack([layers[i].a for i in range(n)])
        b = jnp.stack([layers[i].b for i in range(n)])
        whole.append((keys, _adapter.replace(first, a=a, b=b, roles=("stack",) + first.roles)))
    return _paths.nest(whole)
