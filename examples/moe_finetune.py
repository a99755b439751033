"""Expert LoRA end to end: a small mixture-of-experts GPT pretrained on English prose learns
Python code, with one LoRA adapter per expert.

The model is ``examples/gpt.py``'s GPT with each MLP replaced by GPT-OSS's mixture-of-experts
block (``examples/moe.py``: a router, top-2 of 8 experts, ``jax.lax.ragged_dot``). It is
pretrained on the Python standard library's docstrings (cached), then fine-tuned on its
source code (the data of ``examples/gpt_finetune.py``) two ways with the same batches and
steps: expert LoRA (rank 8 on every expert's ``gate_up_proj``/``down_proj`` and on the
attention projections; the routers frozen) and full fine-tuning of every parameter. Reported:
held-out code loss (modules never seen in training), trainable parameters, step times; the
adapter is written as a lora_jax file and as a PEFT directory with ``target_parameters``.

    python examples/moe_finetune.py            # a few minutes on 2 CPU cores
    python examples/moe_finetune.py --quick    # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data
from gpt import Attention, GPTConfig, next_token_loss
from moe import GptOssMoE

import lora_jax as lj

TARGETS = r"block_\d+_(attn/(query|key|value|out)/kernel|moe/(gate_up_proj|down_proj))"
EXPERT_PARAMS = ["gate_up_proj", "down_proj"]  # in GPT-OSS's registration order (PEFT nests them so)
_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: GPTConfig
    experts: int
    batch: int
    corpus_bytes: int
    pretrain_steps: int
    steps: int
    eval_batches: int


DEFAULT = Settings(GPTConfig(max_len=64, features=64, heads=4, layers=3), experts=8, batch=16,
                   corpus_bytes=400_000, pretrain_steps=400, steps=200, eval_batches=8)  # fmt: skip
QUICK = Settings(GPTConfig(max_len=32, features=32, heads=2, layers=2), experts=4, batch=4,
                 corpus_bytes=60_000, pretrain_steps=10, steps=6, eval_batches=2)  # fmt: skip


class MoEGPT(nn.Module):
    """GPT with a top-2 mixture-of-experts MLP in each block: tokens ``(batch, time)`` -> logits."""

    cfg: GPTConfig
    experts: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.features, name="embed")(tokens)
        x = x + nn.Embed(cfg.max_len, cfg.features, name="pos")(jnp.arange(tokens.shape[1]))
        for i in range(cfg.layers):
            block = f"block_{i}"
            x = x + Attention(cfg, name=f"{block}_attn")(nn.LayerNorm(name=f"{block}_ln1")(x))
            moe = GptOssMoE(self.experts, 2, cfg.features, 2 * cfg.features, name=f"{block}_moe")
            x = x + moe(nn.LayerNorm(name=f"{block}_ln2")(x))
        return nn.Dense(cfg.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def peft_name(path: str) -> str:
    """A Flax path -> the PyTorch name a GPT-OSS-like model gives it (``model.layers.N.mlp.experts.gate_up_proj``)."""
    keys = path.split("/")
    layer, part = keys[0].removeprefix("block_").split("_", 1)
    if part == "moe":
        return f"model.layers.{layer}.mlp.experts.{keys[1]}"
    return f"model.layers.{layer}.self_attn.{_PROJ[keys[1]]}"


def train(name, state, tx, loss_fn, frozen, batches, steps):
    """``steps`` Adam-style steps of ``loss_fn(state, frozen, tokens)``; the frozen weights are an
    argument of the jitted step, never a constant baked into it."""

    @jax.jit
    def step(state, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state, times, loss = tx.init(state), [], None
    for i in range(1, steps + 1):
        start = time.perf_counter()
        state, opt_state, loss = step(state, opt_state, frozen, next(batches))
        loss = float(loss)
        times.append(time.perf_counter() - start)
        if i % max(1, steps // 5) == 0 or i == steps:
            print(f"{name}: step {i}/{steps}, train loss {loss:.3f}")
    return state, statistics.median(times[1:] or times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    p.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    p.add_argument("--out", default=os.path.join("runs", "moe_finetune"))
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else DEFAULT
    os.makedirs(args.out, exist_ok=True)
    texts = data.corpora(s.corpus_bytes)
    length = s.model.max_len
    held_out = data.eval_batches(texts["code_test"], s.batch, length, s.eval_batches)
    model = MoEGPT(s.model, s.experts)
    loss = lambda params, tokens: next_token_loss(model.apply({"params": params}, tokens), tokens)
    evaluate = jax.jit(lambda params, batches: jnp.mean(jnp.stack([loss(params, b) for b in batches])))

    params = model.init(jax.random.key(0), held_out[0])["params"]
    prose = data.batches(texts["prose_train"], s.batch, length, 1)
    params, _ = train("pretrain on prose", params, optax.adam(2e-3), lambda p, _, t: loss(p, t), None, prose,
                      s.pretrain_steps)  # fmt: skip
    base_loss = float(evaluate(params, held_out))

    roles = lj.axis_roles(model, held_out[0])
    lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS),
                   roles=roles)  # fmt: skip
    summary = lj.summary(params, lora)
    apply = lj.wrap(model.apply)
    lora_loss = lambda ad, base, t: next_token_loss(apply({"params": base, "lora": ad}, t), t)
    code = data.batches(texts["code_train"], s.batch, length, 2)
    lora, lora_time = train("expert LoRA", lora, optax.adam(args.lr), lora_loss, params, code, s.steps)
    lora_eval = jax.jit(lambda ad, base, b: jnp.mean(jnp.stack([lora_loss(ad, base, t) for t in b])))
    code = data.batches(texts["code_train"], s.batch, length, 2)  # the same batches
    full, full_time = train("full fine-tuning", params, optax.adam(args.full_lr), lambda p, _, t: loss(p, t), None,
                            code, s.steps)  # fmt: skip
    results = {"base": base_loss, "lora": float(lora_eval(lora, params, held_out)),
               "full": float(evaluate(full, held_out))}  # fmt: skip

    lj.save(os.path.join(args.out, "adapter.safetensors"), lora)
    lj.to_peft(os.path.join(args.out, "peft"), lora, name_map=peft_name, parameters=EXPERT_PARAMS)
    total = sum(x.size for x in jax.tree.leaves(params))
    print(f"\n{s.model.layers} blocks of {s.experts} experts (top-2), {total:,} parameters; held-out code loss "
          "(nats/byte):")  # fmt: skip
    rows = [("base (pretrained on prose)", results["base"], ""),
            (f"expert LoRA (rank {args.rank})", results["lora"], f"{summary.trainable_params:,} trained "
             f"({summary.trainable_params / total:.1%}), {lora_time * 1e3:.0f} ms/step"),
            ("full fine-tuning", results["full"], f"{total:,} trained, {full_time * 1e3:.0f} ms/step")]  # fmt: skip
    for label, value, extra in rows:
        print(f"  {label:<28} {value:.3f}   {extra}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"held_out_loss": results, "trainable_params": summary.trainable_params, "total_params": total,
                   "step_time_s": {"lora": lora_time, "full": full_time}}, f, indent=1)  # fmt: skip
    print(f"wrote adapter.safetensors, peft/ and metrics.json to {args.out}")


if __name__ == "__main__":
    main()
