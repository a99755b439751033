"""LoRA fine-tuning end to end: a small GPT pretrained on English prose learns Python code.

1. Pretrain (or load from the cache) a byte-level GPT on the Python standard library's
   docstrings.
2. Fine-tune it on the standard library's source code with LoRA (lora_jax: `axis_roles`,
   `init`, the factored `wrap` forward; only the adapters are differentiated and updated),
   and, for reference, fully with the same step budget. Variants: `--dora`, `--init pissa`,
   `--loraplus-ratio 16`, `--quantize nf4` (QLoRA).
3. Report held-out losses on code from modules never seen in training, parameter and file
   sizes and step times as a table; write the adapter, the merged model, metrics.json and
   loss.png to the run directory.

    python examples/gpt_finetune.py            # a few minutes on 2 CPU cores
    python examples/gpt_finetune.py --quick    # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data
from gpt import GPT, GPTConfig, next_token_loss

import lora_jax as lj


@dataclasses.dataclass(frozen=True)
class Settings:
    model: GPTConfig
    batch: int
    corpus_bytes: int
    pretrain_steps: int
    pretrain_lr: float
    full_lr: float
    eval_batches: int
    eval_every: int


DEFAULT = Settings(GPTConfig(vocab=256, max_len=128, features=128, heads=4, layers=4), batch=16,
                   corpus_bytes=1_000_000, pretrain_steps=600, pretrain_lr=2e-3, full_lr=1e-3,
                   eval_batches=16, eval_every=50)  # fmt: skip
QUICK = Settings(GPTConfig(vocab=256, max_len=64, features=64, heads=2, layers=2), batch=8,
                 corpus_bytes=100_000, pretrain_steps=40, pretrain_lr=3e-3, full_lr=1e-3,
                 eval_batches=4, eval_every=10)  # fmt: skip
TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning of a small GPT from English prose to Python code.")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", default=TARGETS, help="regex of the kernels to adapt (default: every block kernel)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300; 20 with --quick)")
    p.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (default 3e-3)")
    p.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude per output feature")
    p.add_argument("--init", default="lora", choices=["lora", "gaussian", "pissa", "pissa_niter_4", "olora"],
                   help="adapter init (pissa/olora: from the kernels; the base becomes the residual)")  # fmt: skip
    p.add_argument("--quantize", choices=["nf4", "int8"], help="QLoRA: the adapted kernels stored quantized")
    p.add_argument("--loraplus-ratio", type=float, default=None,
                   help="LoRA+: b's learning rate is this many times --lr (e.g. 16)")  # fmt: skip
    out = os.path.join("runs", "gpt_finetune")
    p.add_argument("--out", default=out, help=f"run directory (default {out})")
    p.add_argument("--base-dir", default=os.path.join("runs", "base"), help="cache of pretrained bases")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 300
    if args.rank < 1 or args.steps < 1:
        p.error("--rank and --steps must be >= 1")
    if args.loraplus_ratio is not None and not args.loraplus_ratio > 0:
        p.error("--loraplus-ratio must be > 0")
    return args


class UserError(Exception):
    """A mistake in the command line or the environment: reported without a traceback."""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else DEFAULT
    cfg = dataclasses.replace(settings.model, dtype=jnp.dtype(args.dtype))
    check_writable(args.out)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; run directory {args.out}")
    texts = data.corpora(settings.corpus_bytes)
    length = cfg.max_len
    code_eval = data.eval_batches(texts["code_test"], settings.batch, length, settings.eval_batches)
    prose_eval = data.eval_batches(texts["prose_test"], settings.batch, length, settings.eval_batches)
    model = GPT(cfg)

    base = pretrained_base(model, settings, texts, args)
    roles = lj.axis_roles(model, code_eval[0])
    config = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets, use_dora=args.dora, init=args.init)
    try:  # PiSSA/OLoRA: the adapters start from the kernels and the frozen base is the residual
        lora, residual = lj.init_residual(jax.random.key(args.seed + 1), base, config, roles=roles)
    except ValueError as e:
        raise UserError(f"--targets {args.targets!r}: {e}") from None
    initial = lora
    frozen = jax.tree.map(lambda p: p.astype(cfg.dtype), residual)  # the frozen base may live in bf16
    if args.quantize:  # QLoRA: dequantized inside each step
        frozen = lj.quantize(frozen, method=args.quantize, targets=args.targets)
    summary = lj.summary(frozen, lora)
    print(summary)

    apply = lj.wrap(model.apply)
    evaluate = jax.jit(lambda v, t: next_token_loss(apply(v, t), t))
    base_eval = jax.jit(lambda p, t: next_token_loss(model.apply({"params": p}, t), t))
    base_code = _mean(base_eval, base, code_eval)
    print(f"base model, held-out code loss {base_code:.3f} nats/byte")

    if args.loraplus_ratio is None:
        tx = optax.adam(args.lr)
    else:
        tx = lj.loraplus(optax.adam, learning_rate=args.lr, ratio=args.loraplus_ratio)
    # Only the adapters are differentiated and updated (the frozen base may be quantized: integer codes).
    code_train = data.batches(texts["code_train"], settings.batch, length, args.seed + 2)
    with_base = lambda ad: {"params": frozen, "lora": ad}
    lora_run = train(
        "LoRA", lora, tx, lambda ad, t, base: next_token_loss(apply({"params": base, "lora": ad}, t), t),
        code_train, args.steps, lambda ad: _mean(evaluate, with_base(ad), code_eval), settings.eval_every,
        frozen=frozen,
    )  # fmt: skip
    lora = lora_run["state"]
    code_train = data.batches(texts["code_train"], settings.batch, length, args.seed + 2)  # the same batches
    full_run = train(
        "full fine-tuning", base, optax.adam(settings.full_lr),
        lambda p, t: next_token_loss(model.apply({"params": p}, t), t),
        code_train, args.steps, lambda p: _mean(base_eval, p, code_eval), settings.eval_every,
    )  # fmt: skip

    lora_vars = {"params": frozen, "lora": lora}
    results = {
        "base": {"code": base_code, "prose": _mean(base_eval, base, prose_eval)},
        "lora": {"code": lora_run["evals"][-1][1], "prose": _mean(evaluate, lora_vars, prose_eval)},
        "full": {"code": full_run["evals"][-1][1], "prose": _mean(base_eval, full_run["state"], prose_eval)},
    }
    outputs = write_outputs(args, frozen, lora, base, initial)
    report(args, summary, results, lora_run, full_run, outputs)
    samples(model, apply, frozen, lora, cfg, args.seed)
    metrics = {
        "settings": {**vars(args), "model": {k: str(v) for k, v in dataclasses.asdict(cfg).items()}},
        "held_out_loss": results,
        "trainable_params": summary.trainable_params, "total_params": summary.total_params,
        "step_time_s": {"lora": lora_run["step_time"], "full": full_run["step_time"]},
        "curves": {"lora": lora_run["losses"], "full": full_run["losses"], "lora_eval": lora_run["evals"],
                   "full_eval": full_run["evals"], "base_eval": base_code},
        "files": outputs,
    }  # fmt: skip
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot(os.path.join(args.out, "loss.png"), base_code, lora_run, full_run)
    print(f"\nwrote {', '.join(sorted(os.listdir(args.out)))} to {args.out}")


def pretrained_base(model: GPT, settings: Settings, texts: dict, args) -> dict:
    """The pretrained base from the cache, or pretrained now (and cached)."""
    tokens = jnp.zeros((1, model.cfg.max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    key = hashlib.sha256(
        repr(
            (
                model.cfg.vocab,
                model.cfg.max_len,
                model.cfg.features,
                model.cfg.heads,
                model.cfg.layers,
                settings,
                args.seed,
                len(texts["prose_train"]),
            )
        ).encode()
    )
    path = os.path.join(args.base_dir, f"base-{key.hexdigest()[:12]}.safetensors")
    if os.path.exists(path):
        try:
            params = lj.load_params(path)
            if jax.tree.map(jnp.shape, params) != jax.tree.map(lambda s: s.shape, shapes):
                raise ValueError("its parameters do not match the model")
            print(f"pretrained base loaded from the cache {path}")
            return params
        except ValueError as e:
            print(f"the cached base {path} is unusable ({str(e).splitlines()[0]}); pretraining it again")
    print(f"pretraining the base on English prose (stdlib docstrings): {settings.pretrain_steps} steps")
    params = model.init(jax.random.key(args.seed), tokens)["params"]
    loss = lambda p, t: next_token_loss(model.apply({"params": p}, t), t)
    prose = data.batches(texts["prose_train"], settings.batch, model.cfg.max_len, args.seed)
    warmup = min(50, settings.pretrain_steps // 4)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, settings.pretrain_lr, warmup, settings.pretrain_steps))
    params = train("pretraining", params, tx, loss, prose, settings.pretrain_steps)["state"]
    os.makedirs(args.base_dir, exist_ok=True)
    lj.save_params(path, params)
    return params


def train(name, state, tx, loss_fn, batches, steps, evaluate=None, eval_every=0, frozen=None) -> dict:
    """Adam-style training with a tqdm bar; returns the state, losses, evals and step time.
    ``loss_fn(state, tokens)``, or ``loss_fn(state, tokens, frozen)`` with ``frozen`` given: the
    frozen base goes into the jitted step as an argument, not baked into it as constants."""

    @jax.jit
    def step(state, opt_state, tokens, frozen):
        args = (state, tokens) if frozen is None else (state, tokens, frozen)
        loss, grads = jax.value_and_grad(loss_fn)(*args)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = tx.init(state)
    losses, evals, times = [], [(0, evaluate(state))] if evaluate is not None else [], []
    bar = tqdm(range(1, steps + 1), desc=name, unit="step", dynamic_ncols=True, mininterval=1.0)
    for i in bar:
        tokens = next(batches)
        start = time.perf_counter()
        state, opt_state, loss = step(state, opt_state, tokens, frozen)
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens.size / times[-1]:,.0f}")
        if evaluate is not None and (i % eval_every == 0 or i == steps):
            evals.append((i, evaluate(state)))
            bar.write(f"{name}: step {i}, held-out code loss {evals[-1][1]:.3f}")
    step_time = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"state": state, "losses": losses, "evals": evals, "step_time": step_time}


def write_outputs(args, frozen, lora, base, initial) -> dict:
    adapter = os.path.join(args.out, "adapter.safetensors")
    merged = os.path.join(args.out, "merged.safetensors")
    lj.save(adapter, lora)  # the adapter of the frozen base it was trained on
    lj.save_params(merged, lj.dequantize(frozen), lora)
    # Hugging Face PEFT's format, against the original base (a PiSSA/OLoRA adapter converted).
    residual = args.init in ("pissa", "pissa_niter_4", "olora")
    lj.to_peft(os.path.join(args.out, "peft"), lj.convert_to_lora(lora, initial) if residual else lora)
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    return {"adapter": adapter, "merged": merged, "adapter_bytes": os.path.getsize(adapter), "model_bytes": model_bytes}


def report(args, summary, results, lora_run, full_run, outputs) -> None:
    kind = ("Q" if args.quantize else "") + ("DoRA" if args.dora else "LoRA")
    kind += "" if args.init == "lora" else f" ({args.init})"
    kind += "" if args.loraplus_ratio is None else f" (LoRA+ {args.loraplus_ratio:g})"
    rows = [
        ("base (prose only)", results["base"], "-", "-", "-"),
        (f"{kind} r={args.rank}", results["lora"], f"{summary.trainable_params:,}", f"{summary.trainable_percent:.2f}%",
         f"{lora_run['step_time'] * 1e3:.0f} ms"),
        ("full fine-tuning", results["full"], f"{summary.total_params - summary.trainable_params:,}", "100%",
         f"{full_run['step_time'] * 1e3:.0f} ms"),
    ]  # fmt: skip
    print(f"\nheld-out loss in nats/byte, after {args.steps} fine-tuning steps each")
    print(f"{'model':28s} {'code (new)':>10s} {'prose (old)':>11s} {'trainable':>11s} {'% of model':>10s} {'step':>8s}")
    for name, r, n, pct, t in rows:
        print(f"{name:28s} {r['code']:10.3f} {r['prose']:11.3f} {n:>11s} {pct:>10s} {t:>8s}")
    gain = results["base"]["code"] - results["lora"]["code"]
    print(f"{kind} lowers the held-out code loss by {gain:.3f} nats/byte "
          f"({100 * gain / results['base']['code']:.1f}%); full fine-tuning by "
          f"{results['base']['code'] - results['full']['code']:.3f}.")  # fmt: skip
    print(f"adapter file {outputs['adapter_bytes'] / 2**10:,.0f} KiB vs model {outputs['model_bytes'] / 2**20:.1f} MiB "
          f"({100 * outputs['adapter_bytes'] / outputs['model_bytes']:.1f}%); LoRA step "
          f"{lora_run['step_time'] / full_run['step_time']:.2f}x the full fine-tuning step")  # fmt: skip


def samples(model, apply, frozen, lora, cfg, seed, prompt=b"def ", n=100) -> None:
    """Sampled continuations of ``prompt`` before and after LoRA."""

    @jax.jit
    def generate(variables, key):
        buf = jnp.zeros((1, cfg.max_len), jnp.int32).at[0, : len(prompt)].set(jnp.array(list(prompt)))

        def body(i, carry):
            buf, key = carry
            key, sub = jax.random.split(key)
            logits = apply(variables, buf)[0, i - 1]
            return buf.at[0, i].set(jax.random.categorical(sub, logits / 0.8)), key

        return jax.lax.fori_loop(len(prompt), len(prompt) + n, body, (buf, key))[0]

    empty = jax.tree.map(jnp.zeros_like, lora)  # b = 0: exactly the base model
    for name, adapters in (("base", empty), ("LoRA", lora)):
        out = np.asarray(generate({"params": frozen, "lora": adapters}, jax.random.key(seed)))[0, : len(prompt) + n]
        text = bytes(out.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        print(f"\n--- sample, {name} ---\n{text}")


def plot(path, base_code, lora_run, full_run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    smooth = lambda xs: np.convolve(xs, np.ones(10) / 10, mode="valid") if len(xs) >= 10 else np.asarray(xs)
    for name, run, color in (("LoRA", lora_run, "C0"), ("full fine-tuning", full_run, "C1")):
        ax.plot(np.arange(len(smooth(run["losses"]))) + 1, smooth(run["losses"]), color=color, alpha=0.5,
                label=f"{name}, train")  # fmt: skip
        steps, values = zip(*run["evals"])
        ax.plot(steps, values, "o-", color=color, label=f"{name}, held-out")
    ax.axhline(base_code, color="gray", linestyle="--", label="base, held-out")
    ax.set(xlabel="fine-tuning step", ylabel="loss (nats/byte)", title="New domain: Python code")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean(fn, state, batches) -> float:
    return float(np.mean([fn(state, b) for b in batches]))


def check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {directory!r} ({e.strerror}); pass --out DIR") from None


if __name__ == "__main__":
    sys.exit(main())
