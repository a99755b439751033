"""The train step of expert LoRA on a mixture-of-experts model, side by side with full
fine-tuning of the experts and with the adapters merged into every expert inside the step.

Four GPT-OSS MoE blocks (``examples/moe.py``: router, top-2, ``ragged_dot`` experts; hidden
256, expert width 512) on 512 tokens, rank 8 on every expert's ``gate_up_proj`` and
``down_proj``, AdamW; 4, 16 and 64 experts. Reported: the program's FLOPs (read off the jaxpr,
a ``ragged_dot`` counted as the grouped GEMM it is on GPU/TPU), each step's ratio to full
fine-tuning of the experts, the LoRA branch's FLOPs per routed token-expert pair (it must not
grow with the number of experts), and the wall time of the steps measured side by side
(XLA:CPU computes ``ragged_dot`` densely, every token by every expert, so its wall times and
its own cost analysis grow with the experts for all three steps alike).

    python benchmarks/moe_step.py   # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)
from moe import GptOssMoE  # noqa: E402
from program_flops import program_flops  # noqa: E402

import lora_jax as lj  # noqa: E402

HIDDEN, FFN, TOKENS, LAYERS, RANK, TOP_K = 256, 512, 512, 4, 8, 2
TARGETS = r".*/(gate_up_proj|down_proj)"


class Stack(nn.Module):
    experts: int

    @nn.compact
    def __call__(self, x):
        for _ in range(LAYERS):
            x = x + GptOssMoE(self.experts, TOP_K, HIDDEN, FFN)(nn.RMSNorm()(x))
        return x


def steps(experts: int):
    model = Stack(experts)
    x = jax.random.normal(jax.random.key(1), (TOKENS, HIDDEN))
    params = model.init(jax.random.key(0), x)["params"]
    lora = lj.init(jax.random.key(2), params, lj.LoraConfig(rank=RANK, targets=TARGETS), roles=lj.axis_roles(model, x))
    tx = optax.adamw(1e-3)
    loss = lambda y: jnp.mean(y**2)

    def lora_step(compute):
        apply = lj.wrap(model.apply, compute=compute)

        def step(lora, opt, params, x):
            grads = jax.grad(lambda lora: loss(apply({"params": params, "lora": lora}, x)))(lora)
            updates, opt = tx.update(grads, opt, lora)
            return optax.apply_updates(lora, updates), opt

        return step, (lora, tx.init(lora), params, x)

    is_expert = lambda path: path[-1].key in ("gate_up_proj", "down_proj")
    experts_only = jax.tree_util.tree_map_with_path(lambda p, w: w if is_expert(p) else None, params)
    rest = jax.tree_util.tree_map_with_path(lambda p, w: None if is_expert(p) else w, params)
    join = lambda e, r: jax.tree.map(lambda a, b: a if b is None else b, r, e, is_leaf=lambda v: v is None)

    def full_step(w, opt, rest, x):
        grads = jax.grad(lambda w: loss(model.apply({"params": join(w, rest)}, x)))(w)
        updates, opt = tx.update(grads, opt, w)
        return optax.apply_updates(w, updates), opt

    return {
        "full fine-tuning of the experts": (full_step, (experts_only, tx.init(experts_only), rest, x)),
        "LoRA, factored": lora_step("factored"),
        "LoRA, merged per expert": lora_step("merged"),
    }


def wall(step, args, reps):
    jitted = jax.jit(step)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    routed = TOKENS * TOP_K * LAYERS
    print(f"{LAYERS} GPT-OSS MoE blocks, hidden {HIDDEN}, expert width {FFN}, top-{TOP_K}, {TOKENS} tokens, "
          f"rank {RANK}")
    print("| experts | step | program GFLOPs | vs full | LoRA branch FLOPs per routed pair | wall (ms) | vs full |")
    print("|---|---|---|---|---|---|---|")
    for experts in args.experts:
        made = steps(experts)
        flops = {name: program_flops(step, *a) for name, (step, a) in made.items()}
        times = {name: wall(step, a, args.reps) for name, (step, a) in made.items()}
        full = "full fine-tuning of the experts"
        # The branch's FLOPs: the LoRA step minus full fine-tuning plus the experts' weight gradients
        # (2 FLOPs per multiply-add of each routed pair through gate_up and down), per routed pair;
        # expected 6·r·(in + out) summed over the two kernels, whatever the number of experts, less
        # 2·r·in for the first block, whose input needs no gradient.
        weight_grads = 2 * routed * (HIDDEN * 2 * FFN + FFN * HIDDEN)
        branch = (flops["LoRA, factored"] - flops[full] + weight_grads) / routed
        expected = 6 * RANK * (HIDDEN + 2 * FFN + FFN + HIDDEN) - 2 * RANK * HIDDEN / LAYERS
        for name in made:
            factored = name == "LoRA, factored"
            branch_cell = f"{branch:,.0f} (expected {expected:,.0f})" if factored else ""
            print(f"| {experts} | {name} | {flops[name] / 1e9:.3f} | {flops[name] / flops[full]:.3f} | {branch_cell} | "
                  f"{times[name] * 1e3:.1f} | {times[name] / times[full]:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
