"""DoRA's train step vs LoRA's and full fine-tuning's, side by side in one run.

The GPT of ``train_step.py`` (CPU size), rank 8 on every block kernel: full fine-tuning, LoRA
factored and DoRA factored (``LoraConfig(use_dora=True)``), each a jitted forward + backward
+ adam step: XLA's FLOP count and memory of the compiled step, and the fastest of interleaved
runs. Then, when torch and peft are installed, the same comparison for PEFT's LoRA and DoRA on
a PyTorch twin of the model (same weights), as an anchor. Last, DoRA vs LoRA on a plain MLP
(4 × Dense 256 + gelu, 64 × 32 tokens), where the output-sized work of DoRA weighs most.

    python benchmarks/dora_step.py     # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]
from train_step import TARGETS, _machine, cpu_model, measure, next_token_loss  # noqa: E402

import lora_jax as lj  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    cfg, batch, model, tokens, base, roles = cpu_model()
    adam = optax.adam(1e-3)
    apply = lj.wrap(model.apply)
    print(f"{_machine()}: {jax.devices()[0].device_kind}, jax {jax.__version__}; GPT {cfg.layers}x{cfg.features}, "
          f"batch {batch}x{cfg.max_len} tokens, rank {args.rank}")  # fmt: skip

    def full_step(params, state, tokens):
        grads = jax.grad(lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens))(params)
        updates, state = adam.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def adapter_step(lora, state, base, tokens):  # the base as an argument, not a compiled-in constant
        grads = jax.grad(lambda ad: next_token_loss(apply({"params": base, "lora": ad}, tokens), tokens))(lora)
        updates, state = adam.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    steps = {"full fine-tuning": (jax.jit(full_step), (base, adam.init(base), tokens))}
    for name, dora in (("LoRA", False), ("DoRA", True)):
        config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS, use_dora=dora)
        lora = lj.init(jax.random.key(2), base, config, roles=roles)
        steps[name] = (jax.jit(adapter_step), (lora, adam.init(lora), base, tokens))
    stats = measure(steps, args.reps, stat=min)
    print(f"\ntrain step (forward + backward + adam), fastest of {args.reps} interleaved runs")
    ratios = f"{'/LoRA':>6s} {'/full':>6s}"
    print(f"{'':18s} {'GFLOP':>8s} {ratios} {'memory MiB':>11s} {'time ms':>9s} {ratios}")
    fl, _, tl = stats["LoRA"]
    ff, _, tf = stats["full fine-tuning"]
    for name, (f, m, t) in stats.items():
        print(f"{name:18s} {f / 1e9:8.2f} {f / fl:6.3f} {f / ff:6.3f} {m / 2**20:11.1f} {t * 1e3:9.1f} {t / tl:6.3f} "
              f"{t / tf:6.3f}")  # fmt: skip
    _peft_anchor(cfg, base, tokens, args.rank, args.reps)
    _mlp(args.rank, args.reps)


def _mlp(rank: int, reps: int) -> None:
    """DoRA's step vs LoRA's on 4 × (Dense 256, gelu), 64 × 32 tokens."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(4):
                x = nn.gelu(nn.Dense(256, name=f"dense_{i}")(x))
            return x

    model, x = MLP(), jax.random.normal(jax.random.key(0), (64, 32, 256))
    params = model.init(jax.random.key(1), x)["params"]
    apply, adam = lj.wrap(model.apply), optax.adam(1e-3)

    def step(lora, state, params, x):
        grads = jax.grad(lambda ad: jax.numpy.mean(apply({"params": params, "lora": ad}, x) ** 2))(lora)
        updates, state = adam.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    steps = {}
    for name, dora in (("LoRA", False), ("DoRA", True)):
        lora = lj.init(jax.random.key(2), params, lj.LoraConfig(rank=rank, use_dora=dora))
        steps[name] = (jax.jit(step), (lora, adam.init(lora), params, x))
    stats = measure(steps, reps, stat=min)
    (fl, ml, tl), (fd, md, td) = stats["LoRA"], stats["DoRA"]
    print(f"\nMLP 4 x (Dense 256, gelu), 64 x 32 tokens, rank {rank}, fastest of {reps} interleaved runs: LoRA "
          f"{tl * 1e3:.2f} ms, DoRA {td * 1e3:.2f} ms, DoRA / LoRA {td / tl:.3f} (FLOPs {fd / fl:.3f}, memory "
          f"{md / ml:.3f})")  # fmt: skip


def _peft_anchor(cfg, base, tokens, rank: int, reps: int) -> None:
    try:
        import peft
        import torch
    except ImportError:
        print("\n(PEFT anchor skipped: pip install torch peft)")
        return
    from torch_gpt import TorchGPT, fastest, load_flax

    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    modules = ["query", "key", "value", "out", "fc", "proj"]
    times = {}
    for name, dora in (("LoRA", False), ("DoRA", True)):
        torch.manual_seed(0)
        net = load_flax(TorchGPT(cfg), base)
        model = peft.get_peft_model(net, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                         use_dora=dora))  # fmt: skip
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, opt=opt):
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

        times[name] = fastest(step, reps)
    print(f"\nPEFT anchor (torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads): "
          f"LoRA step {times['LoRA'] * 1e3:.1f} ms, DoRA step {times['DoRA'] * 1e3:.1f} ms, "
          f"DoRA / LoRA {times['DoRA'] / times['LoRA']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
