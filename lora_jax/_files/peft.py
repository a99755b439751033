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

Parameters adapted directly (PEFT's ``target_parameters``: the ``(experts, d1, d2)`` expert
weights of a mixture-of-experts block such as GPT-OSS's ``mlp.experts.gate_up_proj``) hold one
rank-``r`` adapter per expert, stacked: ``<m>.lora_A.weight`` ``(r·E, d2)`` with expert ``e``'s
rows at ``e·r + j``, ``<m>.lora_B.weight`` ``(d1, r·E)`` with its columns at ``j·E + e``, and
``ΔW[e] = scale · B_e ⋅ A_e``. Several parameters of one module are nested wrappers, in the
order the module registers them: the last one's keys are ``<m>.lora_A.weight``, the one before
``<m>.base_layer.lora_A.weight``, and so on.

Parameters trained fully (:class:`FullWeight`, PEFT's ``modules_to_save``) are stored whole
as ``base_model.model.<m>.weight``/``.bias`` in PyTorch's layout, their modules listed under
``modules_to_save``. The weights file records the config fields that change the math, so a
config and weights from different writes are never read as a pair.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import paths as _paths
from lora_jax._core import tree as _tree
from lora_jax._files import portable as _portable
from lora_jax._files import safetensors as _safetensors
from lora_jax._files import torch_names as _torch_names
from lora_jax._kinds.full import FullWeight
from lora_jax._kinds.lora import Adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_[a-z_]+)"  # a kind's own: lora_…
)
WHOLE_KEY = re.compile(r"base_model\.model\.(?P<name>(?P<module>.+)\.[^.]+)")
# The weights file's metadata records the config fields that change the math, so that a config
# and weights from different writes are never read as a pair.
PAIRED = "lora_jax_config"
MATH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "modules_to_save",
               "ensure_weight_tying", "target_parameters")  # fmt: skip  (and each registered kind's PeftForm.config)
# Keys PEFT writes that do not change how saved LoRA weights are applied.
KNOWN_KEYS = {
    "peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
    "bias", "base_model_name_or_path", "task_type", "fan_in_fan_out", "inference_mode", "init_lora_weights",
    "revision", "layers_pattern", "layers_to_transform", "exclude_modules", "auto_mapping", "peft_version",
    "loftq_config", "eva_config", "corda_config", "kasa_config", "lora_ga_config", "monteclora_config",
    "megatron_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "velora_config",
    "modules_to_save", "target_parameters",
}  # fmt: skip  (and each registered kind's PeftForm.config)
# Keys naming PEFT features that change the math; lora_jax imports them only at their neutral value.
NEUTRAL_KEYS = {
    "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None,
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
    ensure_weight_tying: bool = False,
    parameters: Sequence[str] = (),
    portable: bool = False,
) -> None:
    """Write ``adapters`` as a PEFT LoRA adapter directory, loadable by ``PeftModel.from_pretrained``.

    Args:
      directory: created if missing; ``adapter_config.json`` and
        ``adapter_model.safetensors`` in it are replaced atomically.
      adapters: an adapter tree: its LoRA-like adapters are written as ``lora_A``/``lora_B``,
        its :class:`FullWeight` parameters whole, their modules listed as ``modules_to_save``.
      name_map: ``path -> module name`` (default: drop the final ``kernel``/``embedding``,
        join with ``.``). For a kernel stacked by ``nn.scan`` it must return a name with a
        ``{}`` placeholder for the layer index, e.g. ``"model.layers.{}.self_attn.q_proj"``.
      base_model_name_or_path, task_type: written to the config as they are.
      conv: paths of convolution kernels (regex, list or callable). By default a 4-D or
        5-D kernel whose axes are all ``in`` but the last is a ``Conv2d``/``Conv3d``; pass
        ``conv`` for ``Conv1d`` kernels.
      ensure_weight_tying: write PEFT's ``ensure_weight_tying=True`` (PEFT 0.19+): on a model
        whose output head is tied to its input embedding (``tie_word_embeddings``, as Gemma's),
        PEFT then applies the embedding's adapter to the head too, transposed, as ``lj.wrap``
        does with one adapter on a tied table. Needs an adapted embedding.
      parameters: names of PyTorch parameters adapted directly, PEFT's ``target_parameters``
        (mixture-of-experts weights: ``["gate_up_proj", "down_proj"]`` for GPT-OSS), in the
        order their module registers them (PEFT nests the wrappers of one module's parameters
        in that order). A kernel whose name (``name_map``) ends in one of them is written as a
        parameter target: ``(experts, d1, d2)`` with one adapter per expert, its leading stack
        axis (``nn.scan``'s layers, ``{}`` in the name) before the expert axis.
      portable: write what every reader of PEFT's format computes the same way (vLLM, llama.cpp's
        converter, PEFT): one rank (smaller ones zero-padded), one alpha, each adapter's scale
        (its alpha, rsLoRA) folded into ``lora_B``; no ``rank_pattern``, ``alpha_pattern`` or
        ``use_rslora``. DoRA and fully trained parameters are refused. The same ``ΔW``;
        :func:`check_portable` checks a directory.

    Raises:
      ValueError: if adapters disagree on ``use_rslora`` (PEFT has one flag), a stacked
        kernel has no ``{}`` in its name, two kernels map to one module name, an adapter's
        kind has no plain LoRA form, or the config is not JSON (nothing is written then).

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> lj.to_peft(out, lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2)))
      >>> sorted(os.listdir(out))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    by_path: dict[str, Any] = _tree.adapters_by_path(adapters, "lora_jax.to_peft")
    if not by_path:
        raise ValueError("lora_jax.to_peft: the adapter tree is empty; there is nothing to export.")
    if portable:
        by_path = _portable.portable(by_path, "lora_jax.to_peft")
    is_conv = _paths.compile_pattern(conv, "conv", "lora_jax.to_peft")
    name_of = name_map or _torch_names.default_name
    tensors: list[_safetensors.Tensor] = []
    modules: dict[str, tuple[str, Any]] = {}  # module -> (path, the adapter written there)
    whole: dict[str, str] = {}  # module of each FullWeight -> its path
    params_of: dict[str, dict[str, tuple[str, Any]]] = collections.defaultdict(dict)  # module -> param -> (path, ad)
    problems = []
    for path, adapter in by_path.items():
        name = name_of(path)
        try:
            if isinstance(adapter, FullWeight):
                module, tensor = _whole_tensor(path, adapter, name_of, is_conv)
                whole[module] = path
                tensors.append(tensor)
            elif isinstance(name, str) and name.rpartition(".")[2] in parameters:
                for module, param, layer in _parameter_layers(path, adapter, name):
                    params_of[module][param] = (path, layer)
            else:
                tensors += _module_tensors(path, adapter, name, is_conv, modules)
        except ValueError as e:
            problems.append(f"{path!r}: {e}")
    tensors += _parameter_tensors(params_of, parameters, modules)
    clash = sorted(set(whole) & set(modules))
    problems += [f"module {m!r} is both LoRA-adapted and trained fully ({whole[m]!r})" for m in clash]
    if ensure_weight_tying and not any(_torch_names.layer_kind(path, ad.roles, is_conv) == "embedding"
                                       for path, ad in modules.values()):  # fmt: skip
        problems.append("ensure_weight_tying=True ties a head to an adapted input embedding, but none is adapted")
    if problems:
        raise ValueError("lora_jax.to_peft: cannot export:" + "".join(f"\n  {p}" for p in problems))
    config = _config(modules, sorted(whole), base_model_name_or_path, task_type, targeted=set(params_of))
    config["ensure_weight_tying"] = bool(ensure_weight_tying)
    _write(directory, tensors, config)


def _whole_tensor(path: str, adapter: FullWeight, name_of: Callable, is_conv: Any) -> tuple[str, _safetensors.Tensor]:
    """``(module, tensor)``: a fully trained parameter in PyTorch's layout."""
    keys, shape = tuple(path.split("/")), tuple(adapter.value.shape)
    name, layout, _ = _torch_names.param_layout(keys, shape, name_of, None, is_conv)
    value = adapter.value
    shape = tuple(layout(np.empty(value.shape, np.bool_)).shape)
    produce = lambda: layout(_safetensors.to_host(value))
    return name.rsplit(".", 1)[0], _safetensors.Tensor(PREFIX + name, shape, np.dtype(value.dtype), produce)


def _module_tensors(path: str, adapter: Any, name: Any, is_conv: Any, modules: dict) -> list[_safetensors.Tensor]:
    """The tensors of an adapter on the module ``name`` (one per layer of a stacked kernel):
    ``lora_A``/``lora_B`` and the kind's own (:class:`lora_jax.extend.PeftForm`); each module
    is recorded in ``modules``."""
    kind = _kind.kind_of(adapter)
    form = kind.peft
    if form is None:
        if kind.as_lora is None:
            raise ValueError(f"a {type(adapter).__name__} ({kind.name}) has no plain LoRA form for PEFT")
        adapter = kind.as_lora(adapter)
    if "shared" in adapter.roles:
        raise ValueError(f"an adapter shared along a kernel axis (roles {adapter.roles}) has no PEFT form")
    n_stack = adapter.roles.count("stack")
    why = _name_problem(name, n_stack)
    if why:
        raise ValueError(f"{why} (got {name!r})")
    tensors = []
    for i in range(adapter.a.shape[0]) if n_stack else [None]:
        module = name.format(i) if n_stack else name
        if module in modules:
            raise ValueError(f"it and {modules[module][0]!r} both map to module {module!r}")
        ad = adapter if i is None else _kind.stack_entry(adapter, i)
        layer = _torch_names.layer_kind(path, ad.roles, is_conv)
        own = form.tensors(ad, layer) if form else {}
        factors = _torch_names.lora_to_torch(layer, np.empty(ad.a.shape, np.bool_), np.empty(ad.b.shape, np.bool_))
        for suffix, like in factors.items():

            def produce(ad=ad, layer=layer, suffix=suffix) -> np.ndarray:
                return _torch_names.lora_to_torch(layer, _safetensors.to_host(ad.a), _safetensors.to_host(ad.b))[suffix]

            tensors.append(_safetensors.Tensor(f"{PREFIX}{module}.{suffix}", like.shape, np.dtype(ad.a.dtype), produce))
        tensors += [_safetensors.Tensor(f"{PREFIX}{module}.{suffix}", tuple(x.shape), np.dtype(x.dtype),
                                        functools.partial(_safetensors.to_host, x))
                    for suffix, x in own.items()]  # fmt: skip
        modules[module] = (path, ad)
    return tensors


def _parameter_layers(path: str, adapter: Any, name: str) -> list[tuple[str, str, Adapter]]:
    """``[(module, parameter, adapter)]`` of a PEFT ``target_parameters`` entry (one per layer of
    a stacked kernel)."""
    kind = _kind.kind_of(adapter)
    why = _parameter_problem(adapter, name, kind)
    if why:
        raise ValueError(why)
    assert kind.as_lora is not None  # checked by _parameter_problem
    ad = kind.as_lora(adapter)
    module, _, param = name.rpartition(".")
    if ad.roles.count("stack") == 1:
        return [(module, param, ad)]
    return [(module.format(i), param, _kind.stack_entry(ad, i)) for i in range(ad.a.shape[0])]


def _parameter_tensors(params_of: dict, parameters: Sequence[str], modules: dict) -> list[_safetensors.Tensor]:
    """The nested wrappers of each module's adapted parameters, the last registered outermost;
    each recorded in ``modules`` as ``<module>.<parameter>``."""
    tensors = []
    for module, adapted in params_of.items():
        order = [p for p in parameters if p in adapted]
        for depth, param in enumerate(reversed(order)):
            path, ad = adapted[param]
            prefix = f"{PREFIX}{module}{'.base_layer' * depth}"
            for suffix, array in zip(("lora_A.weight", "lora_B.weight"), expert_factors(ad)):
                tensors.append(_safetensors.Tensor(f"{prefix}.{suffix}", tuple(array.shape), np.dtype(array.dtype),
                                                   functools.partial(_safetensors.to_host, array)))  # fmt: skip
            modules[f"{module}.{param}"] = (path, ad)
    return tensors


def _write(directory: str | os.PathLike, tensors: list[_safetensors.Tensor], config: dict) -> None:
    """The weights first, then the config: each replaced atomically, and the weights record the
    config's fields that change the math, so a crash between the two renames is detected by
    :func:`from_peft`."""
    try:
        config_bytes = json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora_jax.to_peft: the adapter config cannot be written as JSON ({e}).") from None
    directory = _safetensors.user_path(directory, "lora_jax.to_peft")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"lora_jax.to_peft: {directory!r} exists and is not a directory.")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise type(e)(f"lora_jax.to_peft: cannot create the directory {directory!r}: {e.strerror or e}") from None
    meta = {"format": "pt", PAIRED: json.dumps({k: config.get(k) for k in math_fields()}, sort_keys=True)}
    _safetensors.write(os.path.join(directory, WEIGHTS), tensors, meta, "lora_jax.to_peft")
    if jax.process_index() == 0:
        _safetensors.atomic_write(os.path.join(directory, CONFIG), lambda f: f.write(config_bytes), "lora_jax.to_peft")


def _parameter_problem(adapter: Any, name: str, kind: Any) -> str | None:
    """Why an adapter cannot be written as a PEFT ``target_parameters`` entry (``None``: it can)."""
    if kind.peft is not None or kind.as_lora is None:
        return f"a {type(adapter).__name__} on a parameter target; PEFT's target_parameters take plain LoRA only"
    roles = kind.as_lora(adapter).roles
    n_stack = roles.count("stack")
    if n_stack not in (1, 2) or roles[n_stack - 1] != "stack" or sorted(roles[n_stack:]) != ["in", "out"]:
        return (f"roles {roles}; a parameter target is (experts, in, out) or (experts, out, in), after at most one "
                "leading stack axis of layers")
    return _name_problem(name, n_stack - 1)


def expert_factors(ad: Adapter) -> tuple[Any, Any]:
    """PEFT's ``(lora_A, lora_B)`` of an expert adapter on a ``(experts, d1, d2)`` parameter
    (roles ``("stack", "in", "out")`` or ``("stack", "out", "in")``): ``ΔW[e] = s·B_e⋅A_e``."""
    a, b = ad.a, ad.b  # (E, in, r), (E, r, out)
    experts, r = a.shape[0], ad.rank
    if ad.roles[1] == "in":  # d1 = in: B_e = a_e, A_e = b_e
        return b.reshape(experts * r, -1), a.transpose(1, 2, 0).reshape(a.shape[1], r * experts)
    return a.transpose(0, 2, 1).reshape(experts * r, -1), b.transpose(2, 1, 0).reshape(b.shape[2], r * experts)


def expert_adapter(lora_a: Any, lora_b: Any, experts: int, roles: tuple[str, ...]) -> tuple[Any, Any]:
    """``(a, b)`` of PEFT's expert factors (the inverse of :func:`expert_factors`)."""
    r = lora_a.shape[0] // experts
    d1, d2 = lora_b.shape[0], lora_a.shape[1]
    if roles[1] == "in":
        return lora_b.reshape(d1, r, experts).transpose(2, 0, 1), lora_a.reshape(experts, r, d2)
    return lora_a.reshape(experts, r, d2).transpose(0, 2, 1), lora_b.reshape(d1, r, experts).transpose(2, 1, 0)


def _name_problem(name: Any, n_stack: int) -> str | None:
    """Why ``name`` is not a PyTorch module name (with one ``{}`` for a stacked kernel's layer)."""
    if not isinstance(name, str) or not name:
        return "name_map must return a non-empty str"
    if n_stack and (n_stack > 1 or name.count("{}") != 1):
        return f"stacked over {n_stack} axes; name_map must return a name with one '{{}}' for the layer index"
    if not n_stack and "{}" in name:
        return "name_map returned a '{}' (a layer index), which only belongs in the name of a stacked kernel"
    if name.replace("{}", "").count("{") or name.replace("{}", "").count("}"):
        return "name_map returned braces other than the '{}' of a stacked kernel's layer index"
    return None


def pattern_key(module: str) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key that PEFT matches to ``module`` and to nothing else.

    PEFT looks a module up with ``re.match(rf"(.*\\.)?({key})$", module)``; the escaped name with
    a leading ``^`` matches the whole name only (not ``x.<module>``, nor a name differing in a
    ``.``).
    """
    return "^" + re.escape(module)


def _config(modules: dict[str, tuple[str, Any]], whole: list[str], base_model: str | None,
            task_type: str | None, targeted: set[str]) -> dict:  # fmt: skip
    ads = [ad for _, ad in modules.values()] or [Adapter(np.zeros((1, 1)), np.zeros((1, 1)), rank=1, alpha=1.0)]
    linear = [ad for m, (path, ad) in modules.items() if len(ad.roles) - ad.roles.count("stack") == 2
              and not path.endswith("embedding") and m.rpartition(".")[0] not in targeted]  # fmt: skip
    rslora = {ad.rslora for ad in ads}
    if len(rslora) > 1:
        raise ValueError("lora_jax.to_peft: adapters mix rsLoRA and plain LoRA scaling; PEFT has one use_rslora flag.")
    forms = {_form_config(ad) for ad in ads}
    if len(forms) > 1:
        kinds = sorted({_kind.kind_of(ad).name for ad in ads})
        raise ValueError(f"lora_jax.to_peft: adapters mix the kinds {kinds}, which PEFT's config tells apart by "
                         f"{sorted({k for form in forms for k, _ in form})}: one kind per directory.")  # fmt: skip
    common: Callable[[Any], Any] = lambda values: collections.Counter(values).most_common(1)[0][0]
    r, alpha = common(ad.rank for ad in ads), common(ad.alpha for ad in ads)
    is_param = lambda name: name.rpartition(".")[0] in targeted
    odd = sorted(m for m, (_, ad) in modules.items() if is_param(m) and (ad.rank, ad.alpha) != (r, alpha))
    if odd:
        raise ValueError(f"lora_jax.to_peft: the adapted parameters {odd} differ from the common rank {r} / alpha "
                         f"{alpha}; lora_jax writes PEFT's target_parameters with one rank and alpha.")  # fmt: skip
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora.pop(),
        "target_modules": sorted(m for m in modules if not is_param(m)),
        "target_parameters": sorted(m for m in modules if is_param(m)) or None,
        "rank_pattern": {pattern_key(m): ad.rank for m, (_, ad) in sorted(modules.items())
                         if ad.rank != r and not is_param(m)},
        "alpha_pattern": {pattern_key(m): ad.alpha for m, (_, ad) in sorted(modules.items())
                          if ad.alpha != alpha and not is_param(m)},
        "lora_dropout": common(ad.dropout for ad in ads), "bias": "none",
        "fan_in_fan_out": bool(linear) and all(ad.roles[ad.roles.count("stack") :] == ("out", "in") for ad in linear),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": whole or None,
        "base_model_name_or_path": base_model, "task_type": task_type, **dict(forms.pop()),
    }  # fmt: skip


def _form_config(adapter: Any) -> tuple:
    """The PEFT config fields that mark an adapter's kind, as sorted items."""
    form = _kind.kind_of(adapter).peft
    return tuple(sorted(form.config.items())) if form else ()


def form_fields() -> dict[str, Any]:
    """``{field: kind}`` of the PEFT config fields that registered kinds set."""
    return {k: kind for kind in _kind.kinds() if kind.peft for k in kind.peft.config}


def math_fields() -> tuple[str, ...]:
    """The config fields that change the math: those recorded in the weights file."""
    return MATH_FIELDS + tuple(sorted(form_fields()))
