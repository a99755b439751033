"""LoRA train-step and inference cost on a GPT-style Linen LM, side by side in one run.

Compares full fine-tuning, LoRA merged every step (``apply_lora``), LoRA factored
(``wrap``, gradients of the adapters only), factored through the optax mask (gradients of
the whole ``{'params', 'lora'}`` dict with ``lj.optimizer``), and qwix's LoRA when qwix is
installed. For each: XLA's FLOP count and memory (``cost_analysis``/``memory_analysis`` of
the compiled step: noise-free), the median wall time over interleaved repetitions, and the
ratios to full fine-tuning. Then inference: base forward vs factored vs merged.

    python benchmarks/train_step.py            # about a minute on 2 CPU cores
    python benchmarks/train_step.py --size gpu # a larger model for an accelerator
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt import GPT, GPTConfig, next_token_loss  # noqa: E402

import lora_jax as lj  # noqa: E402

SIZES = {
    "cpu": (GPTConfig(vocab=1024, max_len=128, features=256, heads=4, layers=4), 8),
    "gpu": (GPTConfig(vocab=32768, max_len=1024, features=1024, heads=16, layers=8), 16),
}
TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    cfg, batch = SIZES[args.size]
    dtype = jnp.dtype(args.dtype)
    cfg = GPTConfig(**{**cfg.__dict__, "dtype": dtype})
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.max_len), 0, cfg.vocab)
    base = jax.tree.map(lambda p: p.astype(dtype), model.init(jax.random.key(1), tokens)["params"])
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    lora = lj.init(jax.random.key(2), base, config, roles=lj.axis_roles(model, tokens))
    print(f"{_machine()}: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}; GPT {cfg.layers}x{cfg.features} vocab {cfg.vocab}, batch {batch}x{cfg.max_len} "
          f"tokens, {args.dtype}, rank {args.rank}")  # fmt: skip
    print(lj.summary(base, lora).__str__().splitlines()[-2])

    steps = train_steps(model, base, lora, tokens)
    report("train step (forward + backward + adam)", steps, args.reps)
    merged = lj.apply_lora(base, lora)
    apply = lj.wrap(model.apply)
    forwards = {
        "base forward": (jax.jit(lambda p, t: model.apply({"params": p}, t)), (base, tokens)),
        "factored (wrap)": (jax.jit(lambda p, ad, t: apply({"params": p, "lora": ad}, t)), (base, lora, tokens)),
        "merged (apply_lora once)": (jax.jit(lambda p, t: model.apply({"params": p}, t)), (merged, tokens)),
    }
    report("inference forward", forwards, args.reps)


def train_steps(model, base, lora, tokens) -> dict:
    adam = optax.adam(1e-3)
    apply = lj.wrap(model.apply)

    def lora_step(loss):
        def step(base, lora, state, tokens):
            grads = jax.grad(loss)(lora, base, tokens)
            updates, state = adam.update(grads, state, lora)
            return optax.apply_updates(lora, updates), state

        return step

    def full_step(params, state, tokens):
        grads = jax.grad(lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens))(params)
        updates, state = adam.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    merged = lora_step(lambda ad, p, t: next_token_loss(model.apply({"params": lj.apply_lora(p, ad)}, t), t))
    factored = lora_step(lambda ad, p, t: next_token_loss(apply({"params": p, "lora": ad}, t), t))
    masked_tx = lj.optimizer(adam)

    def masked_step(variables, state, tokens):
        grads = jax.grad(lambda v: next_token_loss(apply(v, tokens), tokens))(variables)
        updates, state = masked_tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state

    variables = {"params": base, "lora": lora}
    steps = {
        "full fine-tuning": (jax.jit(full_step), (base, adam.init(base), tokens)),
        "LoRA merged (apply_lora)": (jax.jit(merged), (base, lora, adam.init(lora), tokens)),
        "LoRA factored (wrap)": (jax.jit(factored), (base, lora, adam.init(lora), tokens)),
        "LoRA factored, optax mask": (jax.jit(masked_step), (variables, masked_tx.init(variables), tokens)),
    }
    qwix_step = _qwix_step(model, base, tokens, lora)
    if qwix_step is not None:
        steps["qwix LoRA"] = qwix_step
    return steps


def _qwix_step(model, base, tokens, lora):
    try:
        import qwix
    except ImportError:
        print("(qwix not installed: its row is skipped; `pip install qwix` to compare)")
        return None
    (rank,) = {ad.rank for ad in jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, lj.Adapter))}
    rule = qwix.LoraRule(module_path=TARGETS.removesuffix("/kernel"), rank=rank, alpha=2.0 * rank)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    qlora = _lora_leaves(qmodel.init(jax.random.key(3), tokens)["params"])  # 'kernel_lora_a/b' beside kernels
    qbase = base  # the same base weights
    adam = optax.adam(1e-3)

    def step(qbase, qlora, state, tokens):
        loss = lambda ad: next_token_loss(qmodel.apply({"params": _deep_merge(qbase, ad)}, tokens), tokens)  # noqa: E731
        grads = jax.grad(loss)(qlora)
        updates, state = adam.update(grads, state, qlora)
        return optax.apply_updates(qlora, updates), state

    return jax.jit(step), (qbase, qlora, adam.init(qlora), tokens)


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _lora_leaves(tree: dict) -> dict:
    """The qwix LoRA arrays of a params dict (keys containing '_lora_'), nesting kept."""
    out = {}
    for key, value in tree.items():
        sub = _lora_leaves(value) if isinstance(value, dict) else value if "_lora_" in key else None
        if sub is not None and not (isinstance(sub, dict) and not sub):
            out[key] = sub
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    return {**a, **{k: _deep_merge(a[k], v) if isinstance(v, dict) and k in a else v for k, v in b.items()}}


def report(title: str, fns: dict, reps: int) -> None:
    compiled = {name: fn.lower(*args).compile() for name, (fn, args) in fns.items()}
    times = {name: [] for name in fns}
    for name, (_, args) in fns.items():  # warm up
        jax.block_until_ready(compiled[name](*args))
    for _ in range(reps):  # interleaved, so drifts of a shared machine hit every row alike
        for name, (_, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - start)
    ref = next(iter(fns))
    stats = {}
    for name, c in compiled.items():
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mem = c.memory_analysis()
        stats[name] = (
            cost["flops"],
            mem.temp_size_in_bytes + mem.argument_size_in_bytes,
            statistics.median(times[name]),
        )
    f0, m0, t0 = stats[ref]
    print(f"\n{title}: ratios to '{ref}'; median of {reps} interleaved runs")
    print(f"{'':28s} {'GFLOP':>8s} {'ratio':>6s} {'memory MiB':>11s} {'ratio':>6s} {'time ms':>9s} {'ratio':>6s}")
    for name, (f, m, t) in stats.items():
        print(f"{name:28s} {f / 1e9:8.2f} {f / f0:6.3f} {m / 2**20:11.1f} {m / m0:6.3f} {t * 1e3:9.1f} {t / t0:6.3f}")


if __name__ == "__main__":
    main()
