"""GGUF for llama.cpp, Ollama and LM Studio: a LoRA adapter file, and the merged model as one file.

llama.cpp's adapter files (what its ``convert_lora_to_gguf.py`` writes, what ``--lora`` and
``llama_adapter_lora_init`` read) hold, per adapted base tensor ``<t>`` (llama.cpp's name:
``blk.N.attn_q.weight``...), the pair ``<t>.lora_a``, ``<t>.lora_b`` and the metadata
``general.type = "adapter"``, ``general.architecture`` (the base's), ``adapter.type = "lora"``
and one ``adapter.lora.alpha``. In NumPy's row-major order (GGUF lists dimensions the other way
round) ``lora_a`` is PEFT's ``A (r, in)`` and ``lora_b`` its ``B (out, r)``; for the token
embedding ``lora_a`` is ``(vocab, r)`` and ``lora_b`` ``(features, r)``. llama.cpp adds
``alpha / r · B ⋅ A`` with ``r`` read off ``lora_b``, so an adapter whose scale is not
``alpha / r`` with the file's one alpha (another alpha per kernel, rsLoRA's ``alpha / √r``) gets
the ratio folded into ``lora_b``: every reader computes the same ``ΔW``.

Names: a lora_jax path maps to a PyTorch module name as for PEFT (``name_map``), and that name to
llama.cpp's through the ``gguf`` package's table for the base's architecture. Architectures whose
converter stores the Hugging Face weights unchanged are accepted (the Gemma family); others
(LLaMA's converter permutes the query and key rows) are refused rather than written wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lora_jax._core import kind as _kind
from lora_jax._core import tree as _tree
from lora_jax._files import safetensors as _safetensors
from lora_jax._files import torch_names as _torch_names
from lora_jax._kinds.full import FullWeight

DTYPES = ("f32", "f16", "bf16", "q8_0")
# Architectures whose llama.cpp converter keeps each projection's Hugging Face weight as it is.
VERBATIM = ("gemma", "gemma2", "gemma3")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("lora_jax: GGUF files need the gguf package: pip install gguf") from None
    return gguf


class Base:
    """What an export needs of a base GGUF: its architecture, tensor names and shapes."""

    def __init__(self, path: str | os.PathLike, where: str):
        gguf = _gguf()
        path = _safetensors.user_path(path, where)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: the base GGUF {path!r} does not exist.")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, struct and numpy errors on a bad file
            raise ValueError(f"{where}: {path!r} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
        self.arch = _field(self.reader, "general.architecture")
        kind = _field(self.reader, "general.type", "model")
        if not isinstance(self.arch, str) or kind != "model":
            raise ValueError(f"{where}: {path!r} is not a model GGUF (general.type {kind!r}, architecture "
                             f"{self.arch!r}).")  # fmt: skip
        if self.arch not in VERBATIM:
            raise ValueError(
                f"{where}: the base's architecture is {self.arch!r}; lora_jax writes GGUF for architectures whose "
                f"llama.cpp converter keeps the Hugging Face weights as they are: {', '.join(VERBATIM)}."
            )
        blocks = _field(self.reader, f"{self.arch}.block_count")
        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        self.names = gguf.get_tensor_name_map(arch_enum, int(blocks))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.tied = "token_embd.weight" in self.tensors and "output.weight" not in self.tensors

    def name_of(self, module: str) -> str | None:
        """llama.cpp's name of the weight of the PyTorch module ``module``, or ``None``."""
        name = self.names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        return name if name in self.tensors else None

    def modules(self) -> dict[str, str]:
        """``{llama.cpp tensor name: PyTorch module name}`` for the base's weights, in transformers'
        naming (``model.layers.N...``) where the table knows several."""
        out: dict[str, str] = {}
        for key, (_, name) in self.names.mapping.items():
            name = f"{name}.weight"
            if name in self.tensors and (name not in out or key.startswith("model.") > out[name].startswith("model.")):
                out[name] = key
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in NumPy's row-major order: ``(out, in)`` for a projection."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def targets(adapters: Any, base: Base, name_map: Callable[[str], str] | None, where: str,
            plain: bool) -> list[tuple[str, str, Any, int | None]]:  # fmt: skip
    """``[(path, GGUF tensor name, adapter, stack index)]`` for each adapted base tensor, in file
    order. ``plain``: every adapter is given in its plain LoRA form (``lj.Adapter``, for the
    adapter file) and must have one; otherwise as it is, any kind that merges (the merged model).
    Raises one ``ValueError`` listing every problem."""
    by_path = _tree.adapters_by_path(adapters, where)
    if not by_path:
        raise ValueError(f"{where}: the adapter tree is empty; there is nothing to export.")
    name_of = name_map or _torch_names.default_name
    found: list[tuple[str, str, Any, int | None]] = []
    problems: list[str] = []
    taken: dict[str, str] = {}
    for path, adapter in by_path.items():
        if plain:  # the adapter file holds plain LoRA factors: the kind must have that form
            adapter = _plain(adapter)
            if adapter is None:
                kind = _kind.kind_of(by_path[path])
                what = "a fully trained parameter (PEFT's modules_to_save)" if kind.name == "full" else (
                    f"a {type(by_path[path]).__name__} ({kind.name})")  # fmt: skip
                problems.append(f"{path!r}: {what} has no llama.cpp LoRA form; export the merged model with "
                                "lj.to_gguf(path, base_gguf, adapters) instead")  # fmt: skip
                continue
        roles = getattr(adapter, "roles", ())
        if "shared" in roles:
            problems.append(f"{path!r}: an adapter shared along a kernel axis (roles {roles}) has no GGUF form")
            continue
        n_stack = roles.count("stack") if not isinstance(adapter, FullWeight) else 0
        module = name_of(path)
        if not isinstance(module, str) or (n_stack > 0) != ("{}" in module) or n_stack > 1:
            problems.append(f"{path!r}: name_map gave {module!r}; a kernel stacked by nn.scan needs one '{{}}' for "
                            "the layer index, any other kernel none")  # fmt: skip
            continue
        size = _kind.full_shape(adapter)[0] if n_stack else 1
        for i in range(size) if n_stack else [None]:
            torch_name = module.format(i) if i is not None else module
            name = base.name_of(torch_name)
            if name is None:
                problems.append(f"{path!r}: module {torch_name!r} has no tensor in the base GGUF ({base.arch})")
                continue
            if name in taken:
                problems.append(f"{path!r} and {taken[name]!r} both map to {name!r}")
                continue
            if name == "token_embd.weight" and base.tied:
                problems.append(f"{path!r}: the base ties its output head to token_embd.weight; llama.cpp would "
                                "apply an embedding adapter to the head with the wrong layout")  # fmt: skip
                continue
            taken[name] = path
            found.append((path, name, adapter, i))
    if problems:
        raise ValueError(f"{where}: cannot export:" + "".join(f"\n  {p}" for p in problems))
    return found


def _plain(adapter: Any) -> Any:
    """The adapter's plain LoRA form, or ``None`` if its kind has none."""
    kind = _kind.kind_of(adapter)
    if isinstance(adapter, FullWeight) or kind.as_lora is None:
        return None
    try:
        return kind.as_lora(adapter)
    except ValueError:  # a bank: many adapters, no one LoRA
        return None


def factors(path: str, adapter: Any, index: int | None) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """``(A (r, in), B (out, r), scale, is_embedding)`` of one ``lj.Adapter``, PEFT's layout."""
    a, b = _safetensors.to_host(adapter.a), _safetensors.to_host(adapter.b)
    if index is not None:
        a, b = a[index], b[index]
    embedding = path.split("/")[-1] == "embedding"
    torch = _torch_names.lora_to_torch("embedding" if embedding else "linear", a, b)
    if embedding:
        return torch["lora_embedding_A"], torch["lora_embedding_B"], float(adapter.scale), True
    return torch["lora_A.weight"], torch["lora_B.weight"], float(adapter.scale), False


def encode(gguf: Any, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """``array`` as GGUF data of ``dtype`` (1-D tensors stay f32; a row that q8_0's blocks of 32
    do not divide falls back to f16, as llama.cpp's converters do)."""
    types = gguf.GGMLQuantizationType
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    array = np.ascontiguousarray(array, np.float32)
    if array.ndim <= 1:
        qtype = types.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, types.F16), types.F16


def check_dtype(dtype: Any, where: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}, found {dtype!r}.")
    return dtype


# ---- the adapter file ------------------------------------------------------------------------


def to_gguf_lora(
    path: str | os.PathLike,
    adapters: Any,
    base: str | os.PathLike,
    *,
    name_map: Callable[[str], str] | None = None,
    dtype: str = "f32",
) -> float:
    """Write ``adapters`` as a llama.cpp LoRA adapter (GGUF) for the model in the GGUF file ``base``.

    The file is the one llama.cpp's ``convert_lora_to_gguf.py`` writes for the same adapter in
    PEFT's format: ``llama-cli -m base.gguf --lora adapter.gguf`` (or Ollama's ``ADAPTER``)
    applies it. Kernels whose scale differs from ``alpha / r`` with the file's one alpha
    (per-kernel alphas, rsLoRA) have the ratio folded into ``lora_b``.

    Args:
      path: the file to write (replaced atomically).
      adapters: an adapter tree of plain LoRA adapters (DoRA, banks and fully trained
        parameters have no llama.cpp adapter form: export the merged model with :func:`to_gguf`).
      base: the base model's GGUF file: its architecture, names and shapes are checked.
      name_map: ``path -> PyTorch module name`` as for :func:`to_peft` (default: drop the final
        ``kernel``/``embedding``, join with ``.``; ``{}`` for the layer of a stacked kernel).
      dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` (a factor whose rows q8_0's blocks of
        32 do not divide, such as a rank-8 ``lora_b``, is written f16, as llama.cpp does).

    Returns:
      The ``adapter.lora.alpha`` written.

    Raises:
      ValueError: naming each path that has no llama.cpp form, no tensor in the base, or a
        shape the base's tensor does not have (nothing is written then).
    """
    where = "lora_jax.to_gguf_lora"
    check_dtype(dtype, where)
    gguf = _gguf()
    info = Base(base, where)
    pairs, problems = [], []
    for p, name, adapter, i in targets(adapters, info, name_map, where, plain=True):
        lora_a, lora_b, scale, embedding = factors(p, adapter, i)
        want = info.shape(name)
        got = (lora_a.shape[1], lora_b.shape[0]) if embedding else (lora_b.shape[0], lora_a.shape[1])
        if got != want:
            problems.append(f"{p!r}: the adapter is for a {got} tensor, but {name!r} in the base is {want}")
        pairs.append((name, lora_a.T if embedding else lora_a, lora_b, scale, lora_a.shape[0]))
    if problems:
        raise ValueError(f"{where}: cannot export:" + "".join(f"\n  {p}" for p in problems))
    alphas = [np.float32(scale * r) for _, _, _, scale, r in pairs]
    alpha = max(set(alphas), key=alphas.count)  # the most common alpha needs no folding
    with _safetensors.replacing(path, where) as tmp:
        writer = gguf.GGUFWriter(tmp, info.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, lora_a, lora_b, scale, r in pairs:
            fold = np.float64(scale) * r / np.float64(alpha)
            for suffix, array in (("lora_a", lora_a), ("lora_b", lora_b if fold == 1.0 else lora_b * fold)):
                data, qtype = encode(gguf, array, dtype)
                writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return float(alpha)


def read_lora(path: str | os.PathLike, where: str = "lora_jax") -> dict[str, Any]:
    """A llama.cpp LoRA adapter file: ``{"architecture", "alpha", "tensors": {base tensor name:
    (lora_a, lora_b)}}``, the factors dequantized to float32 in NumPy's order."""
    gguf = _gguf()
    path = _safetensors.user_path(path, where)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{where}: {path!r} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise ValueError(f"{where}: {path!r} is a GGUF file but not a LoRA adapter (general.type "
                         f"{_field(reader, 'general.type')!r}, adapter.type {_field(reader, 'adapter.type')!r}).")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, dot, suffix = t.name.rpartition(".")
        if not dot or suffix not in ("lora_a", "lora_b"):
            raise ValueError(f"{where}: {path!r}: tensor {t.name!r} is neither a lora_a nor a lora_b.")
        shape = tuple(int(n) for n in reversed(t.shape))
        parts.setdefault(base, {})[suffix] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    lonely = sorted(b for b, p in parts.items() if len(p) != 2)
    if lonely:
        raise ValueError(f"{where}: {path!r}: {lonely[0]!r} has only one of lora_a, lora_b.")
    alpha = float(_field(reader, "adapter.lora.alpha", 0.0))
    tensors = {b: (p["lora_a"], p["lora_b"]) for b, p in parts.items()}
    return {"architecture": _field(reader, "general.architecture"), "alpha": alpha, "tensors": tensors}


# ---- the merged model ------------------------------------------------------------------------


def to_gguf(
    path: str | os.PathLike,
    base: str | os.PathLike,
    adapters: Any,
    *,
    name_map: Callable[[str], str] | None = None,
    dtype: str = "f32",
    progress: bool = False,
) -> None:
    """Write the model of the GGUF file ``base`` with ``adapters`` merged, as one GGUF file.

    Everything of the base is kept — its metadata (tokenizer, chat template, hyper-parameters)
    and every tensor no adapter touches, quantized types included, byte for byte; each adapted
    tensor is dequantized, merged as :func:`apply_lora` merges it (any kind that merges: LoRA,
    DoRA, a fully trained parameter) and written as ``dtype``. The result loads in llama.cpp,
    Ollama and LM Studio like the base.

    Args:
      path: the file to write (replaced atomically).
      base: the base model's GGUF file.
      adapters: an adapter tree.
      name_map: ``path -> PyTorch module name``, as for :func:`to_gguf_lora`.
      dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the merged tensors.
      progress: show a progress bar (tqdm) while writing.

    Raises:
      ValueError: naming each path with no tensor in the base or a shape the base's tensor does
        not have, or an adapter kind that does not merge (nothing is written then).
    """
    where = "lora_jax.to_gguf"
    check_dtype(dtype, where)
    gguf = _gguf()
    info = Base(base, where)
    name_of = name_map or _torch_names.default_name
    merged, problems = {}, []
    for p, name, adapter, i in targets(adapters, info, name_map, where, plain=False):
        tensor = info.tensors[name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(info.shape(name))
        module = name_of(p) if i is None else name_of(p).format(i)
        try:
            merged[name] = _torch_names.merge_into(p, adapter, weight, module, index=i)
        except ValueError as e:
            problems.append(f"{p!r} ({name!r}): {e}")
    if problems:
        raise ValueError(f"{where}: cannot export:" + "".join(f"\n  {p}" for p in problems))
    with _safetensors.replacing(path, where) as tmp:
        writer = gguf.GGUFWriter(tmp, info.arch, endianess=info.reader.endianess)
        for field in info.reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by the writer itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for tensor in info.reader.tensors:
            if tensor.name in merged:
                data, qtype = encode(gguf, merged[tensor.name], dtype)
                writer.add_tensor(tensor.name, data, raw_dtype=qtype)
            else:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
