"""Gemma 3 (text) in Flax NNX, its weights and tokenizer read from a GGUF file.

The model follows Hugging Face transformers' ``Gemma3ForCausalLM`` layer for layer, with the
same module names (``model.layers.N.self_attn.q_proj``...), so lora_jax's PEFT export
addresses it as PEFT does: RMSNorm with ``1 + weight`` in float32, query/key RMSNorm, rotary
embeddings with base 10,000 on sliding-window layers and ``rope.freq_base`` on every sixth
(global) layer, grouped-query attention scaled by ``query_pre_attn_scalar ** -0.5``, a GeGLU MLP
(tanh GELU), embeddings scaled by ``√width`` and tied to the output head. Nothing here knows
about LoRA.

``load(path)`` reads a GGUF file (llama.cpp's layout: ``blk.N.attn_q.weight``... with norm
weights stored as ``1 + weight``), dequantizes it with the ``gguf`` package and returns
``(config, model, tokenizer)``; the tokenizer (``sentencepiece_bpe.py``) is SentencePiece's
BPE over the file's vocabulary and scores.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sentencepiece_bpe import BYTE, CONTROL, NORMAL, UNKNOWN, Tokenizer


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """The shape of a Gemma 3 text model (defaults: Gemma 3 270M)."""

    vocab: int = 262144
    width: int = 640
    layers: int = 18
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    mlp: int = 2048
    eps: float = 1e-6
    sliding_window: int = 512
    global_every: int = 6  # layer i attends globally when (i + 1) % global_every == 0
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    query_pre_attn_scalar: float = 256.0
    context: int = 32768
    dtype: Any = jnp.float32

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...])).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding of ``x (batch, time, heads, dim)`` at ``positions (batch, time)``,
    the halves of the last axis rotated as a pair (transformers' ``rotate_half``)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (b, t, half)
    cos, sin = (jnp.concatenate([f(angles)] * 2, axis=-1)[:, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=cfg.dtype, rngs=rngs)
        self.q_proj = linear(cfg.width, cfg.heads * cfg.head_dim)
        self.k_proj = linear(cfg.width, cfg.kv_heads * cfg.head_dim)
        self.v_proj = linear(cfg.width, cfg.kv_heads * cfg.head_dim)
        self.o_proj = linear(cfg.heads * cfg.head_dim, cfg.width)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.cfg = cfg

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, rope_base: float) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        groups = cfg.heads // cfg.kv_heads
        q = self.q_norm(self.q_proj(x).reshape(b, t, cfg.heads, cfg.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_dim))
        v = self.v_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        q, k = rope(q, positions, rope_base), rope(k, positions, rope_base)
        q = q.reshape(b, t, cfg.kv_heads, groups, cfg.head_dim)  # query head h uses kv head h // groups
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(cfg.query_pre_attn_scalar**-0.5, x.dtype)
        logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), -1e30)
        weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, cfg.heads * cfg.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=cfg.dtype, rngs=rngs)
        self.gate_proj = linear(cfg.width, cfg.mlp)
        self.up_proj = linear(cfg.width, cfg.mlp)
        self.down_proj = linear(cfg.mlp, cfg.width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        norm = lambda: RMSNorm(cfg.width, cfg.eps)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x, positions, mask, rope_base):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, mask, rope_base))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TextModel(nnx.Module):
    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab, cfg.width, dtype=cfg.dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.width, cfg.eps)
        self.cfg = cfg

    def __call__(self, ids: jax.Array, valid: jax.Array) -> jax.Array:
        cfg = self.cfg
        t = ids.shape[1]
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)  # left padding keeps positions from 0
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        causal = (j <= i)[None] & valid[:, None, :].astype(bool)
        local = causal & (i - j < cfg.sliding_window)[None]
        x = self.embed_tokens(ids) * jnp.asarray(math.sqrt(cfg.width), cfg.dtype)
        for n, layer in enumerate(self.layers):
            is_global = cfg.is_global(n)
            x = layer(x, positions, causal if is_global else local, cfg.rope_global if is_global else cfg.rope_local)
        return self.norm(x)


class Gemma3(nnx.Module):
    """``Gemma3(cfg, rngs)(ids, valid=None, at=None)``: logits ``(batch, time, vocab)`` for int
    ``ids (batch, time)``; ``valid`` marks real tokens (left padding is masked and gets no
    position); ``at (batch, n)`` computes the logits at those positions only (the 262k-row
    head dominates the cost of a step otherwise)."""

    def __init__(self, cfg: Gemma3Config, rngs: nnx.Rngs):
        self.model = TextModel(cfg, rngs)

    def __call__(self, ids: jax.Array, valid: jax.Array | None = None, at: jax.Array | None = None) -> jax.Array:
        if ids.shape[1] > self.model.cfg.context:
            raise ValueError(f"{ids.shape[1]} tokens exceed the model's context of {self.model.cfg.context}")
        valid = jnp.ones(ids.shape, jnp.int32) if valid is None else valid.astype(jnp.int32)
        h = self.model(ids, valid)
        if at is not None:
            h = jnp.take_along_axis(h, at[..., None], axis=1)
        return self.model.embed_tokens.attend(h)


# ---- GGUF ------------------------------------------------------------------------------

_GGUF_NAMES = {  # llama.cpp's per-block tensor names -> this model's (transposed for kernels)
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "attn_q_norm": ("self_attn", "q_norm", "weight"),
    "attn_k_norm": ("self_attn", "k_norm", "weight"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "attn_norm": ("input_layernorm", "weight"),
    "post_attention_norm": ("post_attention_layernorm", "weight"),
    "ffn_norm": ("pre_feedforward_layernorm", "weight"),
    "post_ffw_norm": ("post_feedforward_layernorm", "weight"),
}


class GGUFError(ValueError):
    """A GGUF file that is not a readable Gemma 3 model."""


def _open(path: str | Path) -> tuple[Any, dict[str, Any]]:
    try:
        import gguf
    except ImportError as e:
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf") from e
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, OSError, IndexError, KeyError) as e:  # numpy memmaps raise ValueError on a short file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = fields.get("general.architecture")
    if arch != "gemma3":
        raise GGUFError(f"{path}: a GGUF of architecture {arch!r}; this example runs Gemma 3 ('gemma3') models")
    return reader, fields


def read_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Gemma 3 GGUF file (its metadata only: no weights are read)."""
    _, fields = _open(path)
    return tokenizer_of(_tokenizer_meta(fields), path)


def _tokenizer_meta(fields: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("tokenizer.ggml."): v for k, v in fields.items() if k.startswith("tokenizer.ggml.")}


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (not a bool, NaN or infinite), else ``None``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def tokenizer_of(meta: dict[str, Any], path: str | Path) -> Tokenizer:
    """The tokenizer of a GGUF's ``tokenizer.ggml.*`` metadata, checked: pieces (strings), scores
    (finite numbers) and types of one length, known piece types with normal pieces among them,
    byte pieces spelled ``<0xHH>``, special token ids inside the vocabulary."""
    missing = [k for k in ("tokens", "scores", "token_type") if meta.get(k) is None]
    if missing:
        raise GGUFError(f"{path}: the tokenizer metadata lacks {', '.join('tokenizer.ggml.' + k for k in missing)}")
    pieces, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
    for name, value, ok in [
        ("tokens", pieces, lambda p: isinstance(p, str)),
        ("scores", scores, lambda x: _whole(x) is not None or (isinstance(x, float) and math.isfinite(x))),
        ("token_type", types, lambda t: _whole(t) is not None and abs(t) < 2**31),
    ]:
        if not isinstance(value, (list, tuple, np.ndarray)) or not all(map(ok, value)):
            raise GGUFError(f"{path}: tokenizer.ggml.{name} must be a list of "
                            f"{'strings' if name == 'tokens' else 'finite numbers' if name == 'scores' else 'ints'}")
    types = np.asarray(types, np.int64)
    if not len(pieces) == len(scores) == len(types):
        raise GGUFError(f"{path}: {len(pieces)} tokens, {len(scores)} scores and {len(types)} token types differ")
    unknown = sorted({int(t) for t in types if not NORMAL <= t <= BYTE})
    if unknown or not (types == NORMAL).any():
        raise GGUFError(f"{path}: token types must be SentencePiece's 1..6 with normal (1) pieces among them; found "
                        f"{sorted({int(t) for t in types})}")  # fmt: skip
    bad_bytes = [p for p, t in zip(pieces, types) if t == BYTE and not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", str(p))]
    if bad_bytes:
        raise GGUFError(f"{path}: byte pieces must be spelled <0xHH>, found {bad_bytes[:3]}")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        if key in meta and not (_whole(meta[key]) is not None and 0 <= _whole(meta[key]) < len(pieces)):
            raise GGUFError(f"{path}: {key} {meta[key]!r} is outside the vocabulary of {len(pieces)} pieces")
    for key in ("add_bos_token", "add_space_prefix"):
        if key in meta and not isinstance(meta[key], (bool, np.bool_)):
            raise GGUFError(f"{path}: tokenizer.ggml.{key} is {meta[key]!r}, expected a bool")
    return Tokenizer(pieces, scores, types, meta)


def config_of(fields: dict[str, Any], path: str | Path) -> Gemma3Config:
    """The model config of a GGUF's ``gemma3.*`` metadata, checked: each field present, a finite
    number > 0 (a whole one where it counts something)."""

    def number(key: str, whole: bool = True, default: Any = None) -> Any:
        value = fields.get(f"gemma3.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: the metadata lacks gemma3.{key}")
        real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
        if not real or (whole and _whole(value) is None):
            raise GGUFError(f"{path}: gemma3.{key} is {value!r}, expected a {'whole ' if whole else ''}number")
        if not value > 0:
            raise GGUFError(f"{path}: gemma3.{key} is {value!r}, expected a number > 0")
        return int(value) if whole else float(value)

    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise GGUFError(f"{path}: the metadata lacks tokenizer.ggml.tokens" if tokens is None else
                        f"{path}: tokenizer.ggml.tokens must be a non-empty list of strings")  # fmt: skip
    return Gemma3Config(
        width=number("embedding_length"),
        layers=number("block_count"),
        heads=number("attention.head_count"),
        kv_heads=number("attention.head_count_kv"),
        head_dim=number("attention.key_length"),
        mlp=number("feed_forward_length"),
        eps=number("attention.layer_norm_rms_epsilon", whole=False),
        sliding_window=number("attention.sliding_window"),
        rope_global=number("rope.freq_base", whole=False, default=1_000_000.0),
        context=number("context_length"),
        vocab=len(tokens),
        query_pre_attn_scalar=number("attention.key_length", whole=False),
    )


def read_gguf(path: str | Path) -> tuple[Gemma3Config, dict[tuple, np.ndarray], dict[str, Any]]:
    """``(config, {state path: float32 array}, tokenizer metadata)`` of a Gemma 3 GGUF file."""
    import gguf

    reader, fields = _open(path)
    cfg = config_of(fields, path)
    arrays: dict[tuple, np.ndarray] = {}
    for tensor in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        data = data.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # (out, in), as PyTorch stores it
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            arrays[("model", "embed_tokens", "embedding")] = data
        elif tensor.name == "output_norm.weight":
            arrays[("model", "norm", "weight")] = data - 1.0
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES and parts[-1] == "weight":
            if not parts[1].isdigit() or int(parts[1]) >= cfg.layers:
                raise GGUFError(f"{path}: tensor {tensor.name!r} is not in blocks 0..{cfg.layers - 1} (block_count "
                                f"{cfg.layers})")  # fmt: skip
            keys = ("model", "layers", int(parts[1])) + _GGUF_NAMES[parts[2]]
            arrays[keys] = data.T if keys[-1] == "kernel" else data - 1.0  # GGUF stores 1 + norm weight
        else:
            raise GGUFError(f"{path}: unexpected tensor {tensor.name!r} for a Gemma 3 text model")
    return cfg, arrays, _tokenizer_meta(fields)


def load(path: str | Path, dtype: Any = jnp.float32) -> tuple[Gemma3Config, Gemma3, Tokenizer]:
    """``(config, model, tokenizer)`` of a Gemma 3 GGUF file, weights dequantized to ``dtype``."""
    cfg, arrays, meta = read_gguf(path)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    model = nnx.eval_shape(lambda: Gemma3(cfg, nnx.Rngs(0)))
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) - set(arrays))
    if missing:
        raise GGUFError(f"{path}: the file lacks {len(missing)} tensors, e.g. {'/'.join(map(str, missing[0]))}")
    for keys, variable in flat.items():
        value = arrays[keys]
        if value.shape != variable.shape:
            raise GGUFError(f"{path}: {'/'.join(map(str, keys))} has shape {value.shape}, expected {variable.shape}")
        dt = jnp.float32 if keys[-1] == "weight" else dtype  # norms stay float32
        variable.set_value(jnp.asarray(value, dt))
    nnx.update(model, state)
    return cfg, model, tokenizer_of(meta, path)


def write_tiny_gguf(path: str | Path, cfg: Gemma3Config, seed: int = 0) -> Path:
    """A Gemma 3 GGUF file with random float32 weights of shape ``cfg`` and a small vocabulary
    (4 control pieces, 256 bytes, printable ASCII and ``▁``, then joined pairs up to
    ``cfg.vocab``), in llama.cpp's layout: for tests and ``--quick`` runs without the real weights."""
    import gguf

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN] + [BYTE] * 256
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += chars
    types += [NORMAL] * len(chars)
    rng = np.random.default_rng(seed)
    while len(pieces) < cfg.vocab:
        joined = str(rng.choice(chars[:60])) + str(rng.choice(chars[:60]))
        if joined not in pieces:
            pieces.append(joined)
            types.append(NORMAL)
    pieces, types = pieces[: cfg.vocab], types[: cfg.vocab]
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces) - 260)]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(cfg.context)
    writer.add_embedding_length(cfg.width)
    writer.add_block_count(cfg.layers)
    writer.add_feed_forward_length(cfg.mlp)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.eps)
    writer.add_rope_freq_base(cfg.rope_global)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_key_value("tokenizer.ggml.add_space_prefix", False, gguf.GGUFValueType.BOOL)

    def tensor(name: str, *shape: int, norm: bool = False) -> None:
        value = rng.normal(0.0, 0.3 if norm else 0.05, shape).astype(np.float32)
        writer.add_tensor(name, value + 1.0 if norm else value)  # norms as llama.cpp stores them: 1 + weight

    tensor("token_embd.weight", cfg.vocab, cfg.width)
    tensor("output_norm.weight", cfg.width, norm=True)
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for n in range(cfg.layers):
        for name, shape in (("attn_q", (q, cfg.width)), ("attn_k", (kv, cfg.width)), ("attn_v", (kv, cfg.width)),
                            ("attn_output", (cfg.width, q)), ("ffn_gate", (cfg.mlp, cfg.width)),
                            ("ffn_up", (cfg.mlp, cfg.width)), ("ffn_down", (cfg.width, cfg.mlp))):  # fmt: skip
            tensor(f"blk.{n}.{name}.weight", *shape)
        for name, dim in (("attn_q_norm", cfg.head_dim), ("attn_k_norm", cfg.head_dim), ("attn_norm", cfg.width),
                          ("post_attention_norm", cfg.width), ("ffn_norm", cfg.width),
                          ("post_ffw_norm", cfg.width)):  # fmt: skip
            tensor(f"blk.{n}.{name}.weight", dim, norm=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
