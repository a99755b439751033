"""QLoRA: a LoRA train step over a bf16, int8 and NF4 base, side by side in one run.

The GPT of ``train_step.py`` (CPU size), its block kernels stored in bfloat16, or quantized to
int8 or NF4 (double quantization, block 64) with ``lj.quantize``; rank 8 LoRA on the same
kernels, trained with the factored ``wrap`` (the quantized kernels are dequantized inside the
step). Per base: the bytes of the block kernels and of the whole base, XLA's memory of the
compiled step (arguments + temporaries) and the fastest of interleaved runs.

Then a model whose weights dominate the step's memory: 8 layers of 1024 × 1024 (a Python loop
of ``nn.Dense``, and the same stacked by ``nn.scan``), batch 4 × 16 tokens, rank 8: XLA's
memory of the compiled step over a bf16 and an NF4 base. The engine dequantizes each kernel
at its use inside a ``jax.checkpoint`` of that use (inside the ``scan`` body for the stacked
one), so the step never holds every dequantized kernel at once.

    python benchmarks/qlora.py     # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]
from train_step import TARGETS, _machine, cpu_model, measure, next_token_loss  # noqa: E402

import lora_jax as lj  # noqa: E402


def nbytes(tree) -> int:
    return lj.summary(tree, {}).total_bytes  # a quantized kernel counted by its stored bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    cfg, batch, model, tokens, base, roles = cpu_model()
    base = jax.tree.map(lambda p: p.astype(jnp.bfloat16), base)
    lora = lj.init(jax.random.key(2), base, lj.LoraConfig(rank=8, alpha=16.0, targets=TARGETS), roles=roles)
    bases = {
        "bf16": base,
        "int8": lj.quantize(base, method="int8", targets=TARGETS),
        "nf4": lj.quantize(base, method="nf4", targets=TARGETS),
    }
    print(f"{_machine()}: {jax.devices()[0].device_kind}, jax {jax.__version__}; GPT {cfg.layers}x{cfg.features}, "
          f"batch {batch}x{cfg.max_len} tokens, LoRA rank 8 on the block kernels")  # fmt: skip
    adam = optax.adam(1e-3)
    apply = lj.wrap(model.apply)

    def step(lora, state, base, tokens):
        grads = jax.grad(lambda ad: next_token_loss(apply({"params": base, "lora": ad}, tokens), tokens))(lora)
        updates, state = adam.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    fns = {name: (jax.jit(step), (lora, adam.init(lora), b, tokens)) for name, b in bases.items()}
    stats = measure(fns, args.reps, stat=min)
    whole_bf16 = nbytes(base)
    block = {name: sum(nbytes(b[f"block_{i}"]) for i in range(cfg.layers)) for name, b in bases.items()}
    print(f"\n{'base':6s} {'block MiB':>10s} {'ratio':>6s} {'base MiB':>9s} {'ratio':>6s} {'step memory MiB':>16s} "
          f"{'ratio':>6s} {'step ms':>8s} {'ratio':>6s}")  # fmt: skip
    _, m0, t0 = stats["bf16"]
    for name in bases:
        _, m, t = stats[name]
        whole = nbytes(bases[name])
        print(f"{name:6s} {block[name] / 2**20:10.2f} {block[name] / block['bf16']:6.3f} {whole / 2**20:9.2f} "
              f"{whole / whole_bf16:6.3f} {m / 2**20:16.1f} {m / m0:6.3f} {t * 1e3:8.1f} {t / t0:6.3f}")  # fmt: skip


class Deep(nn.Module):
    """8 layers of 1024 × 1024: weights dominate a step on 64 tokens."""

    width: int = 1024
    layers: int = 8
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scanned:
            layer = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            return layer(self.width, name="layers")(x, None)[0]
        for i in range(self.layers):
            x, _ = _Layer(self.width, name=f"layer_{i}")(x, None)
        return x


class _Layer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(self.width, use_bias=False)(x)), None


def weights_dominate() -> None:
    x = jax.random.normal(jax.random.key(0), (4, 16, 1024))
    print("\nweights dominate: 8 x 1024 x 1024 kernels, batch 4 x 16, rank 8: XLA memory of the step (MiB)")
    print(f"{'model':22s} {'bf16 base':>10s} {'nf4 base':>10s} {'ratio':>6s}")
    for scanned in (False, True):
        model = Deep(scanned=scanned)
        base = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(1), x)["params"])
        roles = lj.axis_roles(model, x)
        lora = lj.init(jax.random.key(2), base, lj.LoraConfig(rank=8), roles=roles)
        apply = lj.wrap(model.apply)
        memory = {}
        for name, b in (("bf16", base), ("nf4", lj.quantize(base, method="nf4"))):
            grad = jax.jit(jax.grad(lambda ad, b: jnp.mean(apply({"params": b, "lora": ad}, x) ** 2)))  # noqa: B023
            mem = grad.lower(lora, b).compile().memory_analysis()
            memory[name] = mem.temp_size_in_bytes + mem.argument_size_in_bytes
        label = "nn.scan (stacked)" if scanned else "Python loop of Dense"
        print(f"{label:22s} {memory['bf16'] / 2**20:10.1f} {memory['nf4'] / 2**20:10.1f} "
              f"{memory['nf4'] / memory['bf16']:6.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
    weights_dominate()
