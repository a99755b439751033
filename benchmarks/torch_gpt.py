"""A PyTorch twin of ``examples/gpt.py``'s GPT, loaded from the Flax parameters: the anchor
rows of the benchmarks run PEFT on it. Module names follow the Flax paths
(``block_0.attn.query``), so ``path.removesuffix('/kernel').replace('/', '.')`` maps a
lora_jax path to its module."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, features: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(features, features) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, f // self.heads) for proj in (self.query, self.key, self.value))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(f // self.heads)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
        logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
        out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
        return self.out(out.reshape(b, t, f))


class _MLP(nn.Module):
    def __init__(self, features: int, ratio: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(features, ratio * features), nn.Linear(ratio * features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.gelu(self.fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.features, eps=1e-6), nn.LayerNorm(cfg.features, eps=1e-6)
        self.attn, self.mlp = _Attention(cfg.features, cfg.heads), _MLP(cfg.features, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed, self.pos = nn.Embedding(cfg.vocab, cfg.features), nn.Embedding(cfg.max_len, cfg.features)
        self.layers = cfg.layers
        for i in range(cfg.layers):
            setattr(self, f"block_{i}", _Block(cfg))
        self.ln_f, self.head = nn.LayerNorm(cfg.features, eps=1e-6), nn.Linear(cfg.features, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for i in range(self.layers):
            x = getattr(self, f"block_{i}")(x)
        return self.head(self.ln_f(x))


def fastest(fn, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load_flax(net: TorchGPT, params: dict) -> TorchGPT:
    """Copy the Flax GPT's parameters into ``net``: kernels flattened to ``(in, out)`` and transposed."""

    def linear(module: nn.Linear, p: dict) -> None:
        kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
        module.weight.copy_(torch.tensor(kernel.reshape(module.in_features, -1).T))
        module.bias.copy_(torch.tensor(bias.reshape(-1)))

    def norm(module: nn.LayerNorm, p: dict) -> None:
        module.weight.copy_(torch.tensor(np.asarray(p["scale"])))
        module.bias.copy_(torch.tensor(np.asarray(p["bias"])))

    with torch.no_grad():
        net.embed.weight.copy_(torch.tensor(np.asarray(params["embed"]["embedding"])))
        net.pos.weight.copy_(torch.tensor(np.asarray(params["pos"]["embedding"])))
        for i in range(net.layers):
            block, p = getattr(net, f"block_{i}"), params[f"block_{i}"]
            norm(block.ln1, p["ln1"])
            norm(block.ln2, p["ln2"])
            for name in ("query", "key", "value", "out"):
                linear(getattr(block.attn, name), p["attn"][name])
            linear(block.mlp.fc, p["mlp"]["fc"])
            linear(block.mlp.proj, p["mlp"]["proj"])
        norm(net.ln_f, params["ln_f"])
        linear(net.head, params["head"])
    return net
