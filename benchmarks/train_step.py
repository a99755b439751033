"""LoRA train-step and inference cost on a GPT-style Linen LM, side by side in one run.

Compares full fine-tuning, LoRA merged every step (``apply_lora``), LoRA factored
(``wrap``, gradients of the adapters only), factored through the optax mask (gradients of
the whole ``{'params', 'lora'}`` dict with ``lj.optimizer``), and qwix's LoRA when qwix is
installed. For each: XLA's FLOP count and memory (``cost_analysis``/``memory_analysis`` of
the compiled step: noise-free), the median wall time over interleaved repetitions, and the
ratios to full fine-tuning. Then inference: base forward vs factored vs merged.

Then ``--sweep``: rank (4, 8, 16, 64, 256) x width (256, 1024), per row the step of full
fine-tuning, LoRA factored, LoRA merged inside the step and the automatic choice of ``wrap``
(``compute="auto"``), and qwix; ``--plot FILE`` draws cost vs rank.

    python benchmarks/train_step.py            # about a minute on 2 CPU cores
    python benchmarks/train_step.py --size gpu # a larger model for an accelerator
    python benchmarks/train_step.py --sweep --plot benchmarks/cost_vs_rank.png  # ~15 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt import GPT, GPTConfig, next_token_loss

import lora_jax as lj

SIZES = {
    "cpu": (GPTConfig(vocab=1024, max_len=128, features=256, heads=4, layers=4), 8),
    "gpu": (GPTConfig(vocab=32768, max_len=1024, features=1024, heads=16, layers=8), 16),
}
TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"


def cpu_model():
    """``(cfg, batch, model, tokens, base, roles)``: the CPU-size GPT with random tokens, its
    float32 parameters and its kernels' axis roles (the other benchmarks' common set-up)."""
    cfg, batch = SIZES["cpu"]
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.max_len), 0, cfg.vocab)
    base = model.init(jax.random.key(1), tokens)["params"]
    return cfg, batch, model, tokens, base, lj.axis_roles(model, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sweep", action="store_true", help="rank x width sweep of factored / merged / auto")
    parser.add_argument("--plot", help="with --sweep: write a plot of step cost vs rank to this file")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.reps, args.plot)

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


def train_steps(model, base, lora, tokens, modes=None) -> dict:
    """The jitted train steps to compare; with ``modes``, full fine-tuning, ``wrap`` with each
    ``compute`` mode and qwix only."""
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

    if modes is not None:
        steps = {"full fine-tuning": (jax.jit(full_step), (base, adam.init(base), tokens))}
        for mode in modes:
            wrapped = lj.wrap(model.apply, compute=mode)
            loss = lambda ad, p, t, f=wrapped: next_token_loss(f({"params": p, "lora": ad}, t), t)
            steps[mode] = (jax.jit(lora_step(loss)), (base, lora, adam.init(lora), tokens))
        qwix_step = _qwix_step(model, base, tokens, lora)
        if qwix_step is not None:
            steps["qwix"] = qwix_step
        return steps
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
        loss = lambda ad: next_token_loss(qmodel.apply({"params": _deep_merge(qbase, ad)}, tokens), tokens)
        grads = jax.grad(loss)(qlora)
        updates, state = adam.update(grads, state, qlora)
        return optax.apply_updates(qlora, updates), state

    return jax.jit(step), (qbase, qlora, adam.init(qlora), tokens)


def _hlo_body(text: str) -> str:
    """A compiled program's computations without the module line, the source-location tables
    and the ops' metadata (which name the jitted function and the Python lines that traced it)."""
    body = text[text.find("\n%") :] if "\n%" in text else text
    return re.sub(r", metadata=\{[^}]*\}", "", body)


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


def measure(
    fns: dict, reps: int, programs: dict | None = None, stat=statistics.median
) -> dict[str, tuple[float, int, float]]:
    """``{name: (flops, memory bytes, seconds)}`` of jitted ``fns`` ``{name: (fn, args)}``, the
    seconds ``stat`` (median) of ``reps`` runs timed interleaved, so that drifts of a shared
    machine hit every row alike; ``programs``, if given, receives each compiled program's HLO."""
    compiled = {name: fn.lower(*args).compile() for name, (fn, args) in fns.items()}
    if programs is not None:
        programs.update({name: _hlo_body(c.as_text()) for name, c in compiled.items()})
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, (_, args) in fns.items():  # warm up
        jax.block_until_ready(compiled[name](*args))
    for _ in range(reps):
        for name, (_, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - start)
    stats = {}
    for name, c in compiled.items():
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mem = c.memory_analysis()
        memory = mem.temp_size_in_bytes + mem.argument_size_in_bytes
        stats[name] = (cost["flops"], memory, stat(times[name]))
    return stats


def report(title: str, fns: dict, reps: int) -> None:
    stats = measure(fns, reps)
    ref = next(iter(fns))
    f0, m0, t0 = stats[ref]
    print(f"\n{title}: ratios to '{ref}'; median of {reps} interleaved runs")
    print(f"{'':28s} {'GFLOP':>8s} {'ratio':>6s} {'memory MiB':>11s} {'ratio':>6s} {'time ms':>9s} {'ratio':>6s}")
    for name, (f, m, t) in stats.items():
        print(f"{name:28s} {f / 1e9:8.2f} {f / f0:6.3f} {m / 2**20:11.1f} {m / m0:6.3f} {t * 1e3:9.1f} {t / t0:6.3f}")


SWEEP_RANKS = (4, 8, 16, 64, 256)
SWEEP_MODELS = {  # width: the GPT of the default benchmark at that width (fewer blocks at 1024)
    256: GPTConfig(vocab=1024, max_len=128, features=256, heads=4, layers=4),
    1024: GPTConfig(vocab=1024, max_len=128, features=1024, heads=8, layers=2),
}
MODES = ("factored", "merged", "auto")
INFERENCE = ("factored", "auto", "merged once")


def inference_forwards(model, base, lora, tokens) -> dict:
    """The base model's forward, ``wrap``'s factored and automatic forwards, and the forward of
    the tree merged once with ``apply_lora`` (serving)."""
    fns = {"base forward": (jax.jit(lambda p, t: model.apply({"params": p}, t)), (base, tokens))}
    for mode in ("factored", "auto"):
        apply = lj.wrap(model.apply, compute=mode)
        fns[mode] = (jax.jit(lambda p, ad, t, f=apply: f({"params": p, "lora": ad}, t)), (base, lora, tokens))
    fns["merged once"] = (jax.jit(lambda p, t: model.apply({"params": p}, t)), (lj.apply_lora(base, lora), tokens))
    return fns


def sweep(reps: int, plot: str | None) -> None:
    """Per (width, rank): FLOPs and wall of each LoRA step as ratios to full fine-tuning, measured
    side by side; then how far auto is from the cheaper of factored and merged."""
    print(f"{_machine()}: {jax.devices()[0].device_kind}, jax {jax.__version__}; batch 8x128 tokens, float32; "
          f"wall: the fastest of {reps} interleaved runs per row")  # fmt: skip
    rows = []
    header = "  ".join(f"{m:>16s}" for m in MODES + ("qwix",))
    print(f"{'width':>5s} {'rank':>4s}  {header}   (FLOPs / wall vs full fine-tuning)")
    for width, cfg in SWEEP_MODELS.items():
        model = GPT(cfg)
        tokens = jax.random.randint(jax.random.key(0), (8, cfg.max_len), 0, cfg.vocab)
        base = model.init(jax.random.key(1), tokens)["params"]
        roles = lj.axis_roles(model, tokens)
        for rank in SWEEP_RANKS:
            config = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
            lora = lj.init(jax.random.key(2), base, config, roles=roles)
            steps = train_steps(model, base, lora, tokens, modes=MODES)
            programs: dict[str, str] = {}
            stats = measure(steps, reps, programs, stat=min)
            f0, _, t0 = stats["full fine-tuning"]
            row = {name: (f / f0, t / t0) for name, (f, _, t) in stats.items() if name != "full fine-tuning"}
            forwards = inference_forwards(model, base, lora, tokens)
            inference = measure(forwards, reps, stat=min)
            f0, _, t0 = inference["base forward"]
            row.update({f"inference {n}": (f / f0, t / t0) for n, (f, _, t) in inference.items() if n in INFERENCE})
            same = next((m for m in ("factored", "merged") if programs[m] == programs["auto"]), "mixed")
            rows.append((width, rank, row, same))
            cells = [f"{row[k][0]:7.3f} / {row[k][1]:6.3f}" if k in row else f"{'-':>16s}" for k in MODES + ("qwix",)]
            print(f"{width:5d} {rank:4d}  " + "  ".join(cells) + f"   auto = {same}", flush=True)
    print("\ninference forward, FLOPs / wall vs the base model's forward")
    print(f"{'width':>5s} {'rank':>4s}  " + "  ".join(f"{m:>16s}" for m in INFERENCE))
    for width, rank, row, _ in rows:
        cells = (row["inference " + m] for m in INFERENCE)
        print(f"{width:5d} {rank:4d}  " + "  ".join(f"{f:7.3f} / {t:6.3f}" for f, t in cells))
    print("\nauto vs the cheaper of factored and merged (targets: FLOPs <= 1.02, wall <= 1.05)")
    for width, rank, row, same in rows:
        best_f = min(row["factored"][0], row["merged"][0])
        best_t = min(row["factored"][1], row["merged"][1])
        note = f"(the same compiled program as {same})" if same != "mixed" else "(a mix of both forms)"
        ratios = f"FLOPs {row['auto'][0] / best_f:6.3f}  wall {row['auto'][1] / best_t:6.3f}"
        print(f"{width:5d} {rank:4d}  {ratios}  {note}")
    if plot:
        _plot(rows, plot)


def _plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({w for w, _, _, _ in rows})
    fig, axes = plt.subplots(2, len(widths), figsize=(5 * len(widths), 7), sharex=True, squeeze=False)
    styles = {"factored": "o-", "merged": "s-", "auto": "k*--", "qwix": "x:"}
    for col, width in enumerate(widths):
        sel = [(rank, row) for w, rank, row, _ in rows if w == width]
        for line, (metric, label) in enumerate(((0, "step FLOPs / full FT"), (1, "step wall / full FT"))):
            ax = axes[line][col]
            for name, style in styles.items():
                points = [(rank, row[name][metric]) for rank, row in sel if name in row]
                if points:
                    ax.plot(*zip(*points), style, label=name)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_ylabel(label)
            ax.set_title(f"width {width}") if line == 0 else ax.set_xlabel("rank")
            ax.legend(fontsize=8)
    fig.suptitle("LoRA train step cost vs rank (GPT, CPU): factored, merged in the step, and wrap's auto choice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
