"""``from_peft``: read a PEFT LoRA adapter directory (the format is described in ``peft``).

Everything is validated before anything is returned: the config (only LoRA, no feature that
changes the math unless lora_jax imports it), the weights' keys, each module's shapes against
its kernel, and that config and weights were written together.
"""

from __future__ import annotations

import collections
import difflib
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._files import peft as _peft
from lora_jax._files import safetensors as _safetensors
from lora_jax._files import torch_names as _torch_names
from lora_jax._files.peft import CONFIG, KNOWN_KEYS, LORA_KEY, NEUTRAL_KEYS, PAIRED, WEIGHTS, WHOLE_KEY
from lora_jax._kinds.full import FullWeight
from lora_jax._kinds.lora import Adapter


def from_peft(
    directory: str | os.PathLike,
    params: Any,
    *,
    name_map: Callable[[str], str] | None = None,
    roles: Mapping[str, tuple[str, ...]] | None = None,
    dtype: Any = jnp.float32,
    parameters: Sequence[str] = (),
) -> dict:
    """Read a PEFT LoRA adapter directory (written by PEFT or :func:`to_peft`) as adapters for ``params``.

    Every module in the file must map to a kernel of ``params`` whose shape fits; ranks,
    alphas (``rank_pattern``/``alpha_pattern``) and rsLoRA are taken from the config. The
    parameters of ``modules_to_save`` (a classification head saved whole) become
    :class:`FullWeight` leaves of the tree, trained fully. Unknown config keys are ignored
    with a warning; everything is validated before anything is returned.

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
      parameters: for an adapter with ``target_parameters`` (mixture-of-experts weights), the
        PyTorch parameter names in the order their module registers them, as for
        :func:`to_peft`; needed only where one module has several adapted parameters whose
        shapes do not tell them apart. A ``(experts, d1, d2)`` parameter is read as used
        ``x ⋅ W[e]`` (roles ``("stack", "in", "out")``) unless ``roles`` says otherwise.

    Returns:
      An adapter tree for ``params``.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: on a config that is not LoRA, lacks ``r``/``lora_alpha`` or uses an
        unsupported PEFT feature (``lora_bias``, …); on a corrupt file; on modules
        that match no kernel (listing the nearest names) or shapes that do not fit; on a
        config and weights that were not written together.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> lj.to_peft(out, lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)))
      >>> lj.from_peft(out, params)["q_proj"]["kernel"].a.shape
      (8, 2)
    """
    directory = _safetensors.user_path(directory, "lora_jax.from_peft")
    config = _read_config(directory)
    weights_path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        hint = " (a pickled adapter_model.bin is never read: save with safe_serialization=True)" if pickled else ""
        raise FileNotFoundError(f"lora_jax.from_peft: no {WEIGHTS} in {directory!r}{hint}.")
    name_of = name_map or _torch_names.default_name
    with _safetensors.reading(weights_path, "lora_jax.from_peft", WEIGHTS) as f:
        where, paired = f.where, f.metadata.get(PAIRED)
        parts, whole = _read_tensors(f, _saved_modules(config))
    kernels = _kernels_by_module(params, name_of)
    problems: list[str] = []
    leaves: list[tuple[str, Any]] = []
    experts = _parameter_targets(parts, kernels, config.get("target_parameters") or [], parameters, problems)
    for name, part in sorted(experts.items()):
        try:
            leaves.append((name, _expert_from_torch(name, part, kernels[name], config, roles, dtype)))
        except _Mismatch as e:
            problems.append(f"parameter {name!r} -> {kernels[name][0]!r}: {e}")
    for module, part in sorted(parts.items()):
        if module not in kernels:
            near = difflib.get_close_matches(module, list(kernels), n=3, cutoff=0.3)
            problems.append(f"module {module!r} matches no kernel of params (nearest: {near or sorted(kernels)[:3]})")
            continue
        try:
            leaves.append((module, _from_torch(module, part, kernels[module], config, roles, dtype)))
        except (_Mismatch, ValueError, TypeError) as e:
            problems.append(f"module {module!r} -> {kernels[module][0]!r}: {e}")
    full = _whole_weights(whole, params, name_of, roles, dtype, problems) if whole else []
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
    differ = {k: (recorded.get(k), config.get(k)) for k in _peft.math_fields() if recorded.get(k) != config.get(k)}
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


def _read_tensors(f: Any, saved: list[str]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``({module: {part: tensor}}, {name: whole tensor})`` of an open weights file, every key
    classified before any tensor is read."""
    lora_keys, whole_keys, unknown = [], [], []
    for key in f.names:
        m, w = LORA_KEY.fullmatch(key), WHOLE_KEY.fullmatch(key)
        if m is not None:
            lora_keys.append((key, m["module"], m["part"]))
        elif w is not None and any(w["module"] == s or w["module"].endswith("." + s) for s in saved):
            whole_keys.append((key, w["name"]))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{f.where} holds keys that are not LoRA A/B weights (nor parameters of the config's "
                         f"modules_to_save {saved}): {sorted(unknown)[:5]}")  # fmt: skip
    parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, module, part in lora_keys:
        parts[module][part] = f.get(key)
    return parts, {name: f.get(key) for key, name in whole_keys}


def _whole_weights(whole: dict, params: Any, name_of: Callable, roles: Any, dtype: Any, problems: list) -> list:
    """``[(keys, FullWeight)]`` of the ``modules_to_save`` tensors, in the Flax layout."""
    names = _torch_names.param_names(params, name_of, roles, None)
    full = []
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
    return full


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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"lora_jax.from_peft: {path!r} is not valid JSON ({type(e).__name__}: {e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"lora_jax.from_peft: {path!r} holds a {type(config).__name__}, expected an object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"lora_jax.from_peft: {path!r} has peft_type {config.get('peft_type')!r}; only 'LORA' is supported."
        )
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise ValueError(f"lora_jax.from_peft: {path!r} lacks the required keys {missing}.")
    wrong = _config_problems(config)
    if wrong:
        raise ValueError(f"lora_jax.from_peft: {path!r} has invalid values:" + "".join(f"\n  {w}" for w in wrong))
    unsupported = {
        k: config[k]
        for k, neutral in NEUTRAL_KEYS.items()
        if k in config and config[k] not in (neutral, None, False, [], {})
    }
    if unsupported:
        raise ValueError(f"lora_jax.from_peft: {path!r} uses PEFT features lora_jax does not import: {unsupported}.")
    extra = sorted(set(config) - KNOWN_KEYS - set(NEUTRAL_KEYS) - set(_peft.form_fields()))
    if extra:
        warnings.warn(f"lora_jax.from_peft: ignoring unknown adapter_config.json keys {extra}.", stacklevel=3)
    return config


def _config_problems(config: dict) -> list[str]:
    """What is wrong with the config fields lora_jax reads (each named, all at once)."""
    problems = []

    def check(key: str, ok: Callable[[Any], bool], expected: str, optional: bool = False) -> None:
        value = config.get(key)
        if (value is None and optional) or (key not in config and optional):
            return
        try:
            good = ok(value)
        except Exception:
            good = False
        if not good:
            problems.append(f"{key}: {value!r}; expected {expected}")

    is_rank = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
    is_alpha = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    def is_patterns(check_value: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def ok(v: Any) -> bool:
            return isinstance(v, dict) and all(
                isinstance(k, str) and re.compile(k) is not None and check_value(x) for k, x in v.items()
            )

        return ok

    check("r", is_rank, "an int >= 1")
    check("lora_alpha", is_alpha, "a finite number > 0")
    check("use_rslora", lambda v: isinstance(v, bool), "true or false", optional=True)
    check("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false", optional=True)
    for key, kind in _peft.form_fields().items():  # a kind's own fields: of the type of the value marking it
        marker_type = type(kind.peft.config[key])
        check(key, functools.partial(_is_type, marker_type), f"a {marker_type.__name__} ({kind.name})", optional=True)
    check("lora_dropout", lambda v: is_alpha(v + 1) and 0 <= v < 1, "a number in [0, 1)", optional=True)
    check("rank_pattern", is_patterns(is_rank), "an object {regex: int >= 1}", optional=True)
    check("alpha_pattern", is_patterns(is_alpha), "an object {regex: number > 0}", optional=True)
    return problems


def _is_type(t: type, value: Any) -> bool:
    return type(value) is t


def _kernels_by_module(params: Any, name_of: Callable[[str], str]) -> dict[str, tuple]:
    """``{module name: (path, shape, layer index or None, keys)}`` for every >=2-D array of params."""
    out: dict[str, tuple] = {}
    for keys, leaf in _paths.leaves_with_paths(params):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2:
            continue
        path = _paths.join(keys)
        name = name_of(path)
        if not isinstance(name, str) or not name:
            raise TypeError(f"lora_jax.from_peft: name_map must return a non-empty str for {path!r}, found {name!r}.")
        if "{}" in name:
            out.update({name.format(i): (path, shape[1:], i, keys) for i in range(shape[0])})
        else:
            out[name] = (path, shape, None, keys)
    return out


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _from_torch(module: str, part: dict, kernel: tuple, config: dict, roles: Mapping | None, dtype) -> Any:
    path, shape, _, _ = kernel
    if "lora_embedding_A" in part or "lora_embedding_B" in part:
        lora_a, lora_b = part.get("lora_embedding_A"), part.get("lora_embedding_B")
    else:
        lora_a, lora_b = part.get("lora_A.weight"), part.get("lora_B.weight")
    if lora_a is None or lora_b is None:
        raise _Mismatch(f"the file has {sorted(part)} only; A and B are both needed")
    if lora_a.ndim < 2 or lora_b.ndim != lora_a.ndim or not jnp.issubdtype(lora_a.dtype, jnp.floating):
        raise _Mismatch(f"A {lora_a.dtype}{list(lora_a.shape)} and B {lora_b.dtype}{list(lora_b.shape)} are not "
                        "floating-point factors of equal rank >= 2")  # fmt: skip
    r = lora_a.shape[0]
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if rank != r or lora_b.shape[1] != r:
        raise _Mismatch(f"A {lora_a.shape} and B {lora_b.shape} do not have the config's rank {rank}")
    conv = lora_a.ndim > 2
    kernel_roles: tuple[str, ...]
    if "lora_embedding_A" in part:
        kernel_roles, a, b = ("in", "out"), lora_a.T, lora_b.T
    elif conv:  # (r, cin, k...) -> (k..., cin, r); (cout, r, 1...) -> (r, cout)
        n = lora_a.ndim - 2
        kernel_roles = ("in",) * (n + 1) + ("out",)
        a, b = _torch_names.conv_lora_from_torch(lora_a, lora_b)
    else:
        if config.get("fan_in_fan_out") is True and _kind.roles_for(path, shape, roles) in (None, ("in", "out")):
            raise _Mismatch(
                "the config says fan_in_fan_out: true (a PyTorch Conv1D, as in GPT-2), so the Flax kernel may be "
                "stored (out, in): pass its roles, roles=lj.axis_roles(model, ...) (which reports ('out', 'in') for a "
                "kernel the model uses as x @ W.T) or roles={path: ('out', 'in')}"
            )
        kernel_roles = _linear_roles(path, shape, lora_a.shape[1], lora_b.shape[0], roles)
        a, b = lora_a.T, lora_b.T
    a_shape, b_shape = _kind.factor_shapes(shape, kernel_roles, r)
    if math.prod(a_shape) != a.size or math.prod(b_shape) != b.size or (conv and a.shape != a_shape):
        raise _Mismatch(
            f"A {lora_a.shape} and B {lora_b.shape} do not fit the kernel {shape} with roles {kernel_roles}"
        )
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    adapter = Adapter(
        cast(a.reshape(a_shape)), cast(b.reshape(b_shape)), rank=r, alpha=alpha, roles=kernel_roles,
        rslora=config.get("use_rslora") is True, dropout=float(config.get("lora_dropout") or 0.0),
    )  # fmt: skip
    own = {k: cast(v) for k, v in part.items() if k not in _FACTORS}
    layer = "embedding" if "lora_embedding_A" in part else "conv" if conv else "linear"
    form = _form_of(config)
    if form is None:
        if own:
            raise _Mismatch(f"it has {sorted(own)} besides its factors, which the config's adapter kind (plain LoRA, "
                            f"no field of {sorted(_peft.form_fields())}) does not have")  # fmt: skip
        return adapter
    return form.read(adapter, own, layer)


_FACTORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def _form_of(config: dict) -> Any:
    """The :class:`PeftForm` of the kind whose config fields the file's config holds, or ``None``
    (plain LoRA)."""
    forms = [kind.peft for kind in _kind.kinds() if kind.peft and kind.peft.config
             and all(config.get(k) == v for k, v in kind.peft.config.items())]  # fmt: skip
    return forms[0] if forms else None


def _parameter_targets(parts: dict, kernels: dict, targets: list, order: Sequence[str], problems: list) -> dict:
    """The entries of ``parts`` that are PEFT ``target_parameters`` wrappers, removed from it and
    keyed by the full parameter name they adapt (``<module>.<param>``): a module's wrappers nest
    in its parameters' registration order, the last one outermost (no ``.base_layer``)."""
    targeted: dict[str, list[str]] = collections.defaultdict(list)  # module -> its targeted parameters
    for n in kernels:
        if any(n == t or n.endswith("." + t) for t in targets):
            targeted[n.rpartition(".")[0]].append(n)
    by_module: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for name in list(parts):
        base = name
        while base.endswith(".base_layer"):
            base = base.removesuffix(".base_layer")
        if base in targeted:
            by_module[base][(len(name) - len(base)) // len(".base_layer")] = parts.pop(name)
    out = {}
    for module, wrappers in by_module.items():
        names = targeted[module]
        given = [f"{module}.{p}" for p in order if f"{module}.{p}" in names]
        if len(names) != len(wrappers) or sorted(wrappers) != list(range(len(names))):
            problems.append(f"module {module!r} has {len(wrappers)} parameter adapters; the config's target_parameters "
                            f"match {len(names)} parameters of params there: {sorted(names)}")  # fmt: skip
            continue
        if len(given) == len(names):
            assignment = {d: given[len(given) - 1 - d] for d in wrappers}
        else:  # the registration order told by the shapes: each wrapper's factors fit one parameter only
            fits = {d: [n for n in names if _fits_expert(wrappers[d], kernels[n][1])] for d in wrappers}
            if any(len(f) != 1 for f in fits.values()) or len({f[0] for f in fits.values()}) != len(names):
                problems.append(f"module {module!r}: cannot tell which of {sorted(names)} each of its "
                                f"{len(names)} parameter adapters adapts; pass parameters=[...] in the order the "
                                "PyTorch module registers them")  # fmt: skip
                continue
            assignment = {d: f[0] for d, f in fits.items()}
        out.update({assignment[d]: wrappers[d] for d in wrappers})
    return out


def _fits_expert(part: dict, shape: tuple) -> bool:
    lora_a, lora_b = part.get("lora_A.weight"), part.get("lora_B.weight")
    if lora_a is None or lora_b is None or len(shape) != 3 or lora_a.ndim != 2 or lora_b.ndim != 2:
        return False
    experts, d1, d2 = shape
    return lora_a.shape[1] == d2 and lora_b.shape[0] == d1 and lora_a.shape[0] == lora_b.shape[1] and \
        lora_a.shape[0] % experts == 0  # fmt: skip


def _expert_from_torch(name: str, part: dict, kernel: tuple, config: dict, roles: Mapping | None, dtype) -> Adapter:
    path, shape, _, _ = kernel
    if not _fits_expert(part, shape):
        found = {k: tuple(v.shape) for k, v in part.items()}
        raise _Mismatch(f"its factors {found} do not fit a (experts, d1, d2) parameter of shape {shape} (A (r·experts, "
                        "d2), B (d1, r·experts))")  # fmt: skip
    lora_a, lora_b = part["lora_A.weight"], part["lora_B.weight"]
    r = lora_a.shape[0] // shape[0]
    if r != config["r"]:
        raise _Mismatch(f"its rank per expert is {r}, the config's r is {config['r']}")
    given = _kind.roles_for(path, (0,) * (len(shape) + 1), roles, "lora_jax.from_peft") if roles else None
    kernel_roles = tuple(given[-3:]) if given else ("stack", "in", "out")
    if kernel_roles not in (("stack", "in", "out"), ("stack", "out", "in")):
        raise _Mismatch(f"roles {kernel_roles}; a parameter target is (experts, in, out) or (experts, out, in)")
    a, b = _peft.expert_adapter(lora_a, lora_b, shape[0], kernel_roles)
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    return Adapter(cast(a), cast(b), rank=r, alpha=float(config["lora_alpha"]), roles=kernel_roles,
                   rslora=config.get("use_rslora") is True,
                   dropout=float(config.get("lora_dropout") or 0.0))  # fmt: skip


def _linear_roles(path: str, shape: tuple, fan_in: int, fan_out: int, roles: Mapping | None) -> tuple[str, ...]:
    """Roles for a kernel read from a PEFT ``Linear``: given, 2-D, or the one in/out split of its shape."""
    given = _kind.roles_for(path, shape, roles, "lora_jax.from_peft")
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
        arrays = {name: jnp.stack([getattr(layers[i], name) for i in range(n)]) for name in _kind.arrays(first)}
        whole.append((keys, _kind.replace(first, **arrays, roles=("stack",) + first.roles)))
    return _paths.nest(whole, "lora_jax.from_peft")
