"""LoRA train-step cost on the NNX twin of the benchmark GPT, side by side in one run.

Rows: NNX full fine-tuning; lora_jax NNX functional (``wrap(model)``, a ``jax.jit`` step over
``(state, lora, tokens)``); lora_jax NNX stateful (``attach`` + ``nnx.Optimizer(wrt=nnx.LoRAParam)``,
jitted through ``nnx.split``/``nnx.merge`` as ``nnx.jit`` does); the Linen model's factored
LoRA step on the same shapes. Then the MLP-only comparison with Flax's own ``nnx.LoRALinear``
(it has no form for the ``LinearGeneral`` attention projections). XLA's FLOPs and memory of the
compiled step, median wall time of interleaved repetitions, ratios to the first row.

    python benchmarks/nnx_step.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt import GPT, next_token_loss
from gpt_nnx import GPT as NNXGPT
from train_step import SIZES, TARGETS, _machine, report

import lora_jax as lj

NNX_TARGETS = r"blocks/\d+/(attn/(query|key|value|out)|fc|proj)/kernel"
MLP_TARGETS = r"blocks/\d+/(fc|proj)/kernel"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    cfg, batch = SIZES["cpu"]
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.max_len), 0, cfg.vocab)
    adam = optax.adam(1e-3)
    print(f"{_machine()}: jax {jax.__version__}; NNX GPT {cfg.layers}x{cfg.features}, batch {batch}x{cfg.max_len}, "
          f"rank {args.rank}")  # fmt: skip

    model = NNXGPT(cfg, nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=NNX_TARGETS)
    lora = lj.init(jax.random.key(2), state, config, roles=lj.axis_roles(model, tokens))
    apply = lj.wrap(model)

    def full_step(state, opt_state, tokens):
        grads = jax.grad(lambda st: next_token_loss(nnx.merge(graphdef, st)(tokens), tokens))(state)
        updates, opt_state = adam.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state

    stateful = nnx.merge(graphdef, state)
    lj.attach(stateful, lora)

    linen = GPT(cfg)
    base = linen.init(jax.random.key(1), tokens)["params"]
    linen_lora = lj.init(jax.random.key(2), base, config.__class__(**{**config.__dict__, "targets": TARGETS}),
                         roles=lj.axis_roles(linen, tokens))  # fmt: skip
    linen_apply = lj.wrap(linen.apply)

    def linen_step(base, lora, opt_state, tokens):
        grads = jax.grad(lambda ad: next_token_loss(linen_apply({"params": base, "lora": ad}, tokens), tokens))(lora)
        updates, opt_state = adam.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    steps = {
        "NNX full fine-tuning": (jax.jit(full_step), (state, adam.init(state), tokens)),
        "lora_jax NNX functional": _functional_step(apply, state, lora, adam, tokens),
        "lora_jax NNX stateful": _stateful_step(stateful, adam, tokens),
        "lora_jax Linen (twin)": (jax.jit(linen_step), (base, linen_lora, adam.init(linen_lora), tokens)),
    }
    qwix_step = _qwix_step(cfg, tokens, args.rank, adam)
    if qwix_step is not None:
        steps["qwix NNX LoRA"] = qwix_step
    report("NNX train step (forward + backward + adam)", steps, args.reps)
    report("MLP kernels only: lora_jax vs Flax nnx.LoRALinear", _mlp_only(cfg, tokens, args.rank, adam), args.reps)


def _qwix_step(cfg, tokens, rank, adam):
    try:
        import qwix
    except ImportError:
        print("(qwix not installed: its row is skipped; `pip install qwix` to compare)")
        return None
    rule = qwix.LoraRule(module_path=NNX_TARGETS.removesuffix("/kernel"), rank=rank, alpha=2.0 * rank)
    model = qwix.apply_lora_to_model(NNXGPT(cfg, nnx.Rngs(1)), qwix.LoraProvider([rule]), tokens, rngs=nnx.Rngs(3))
    return _stateful_step(model, adam, tokens)


def _functional_step(apply, state, lora, adam, tokens):
    """A jitted ``jax.grad`` step over the separate adapter tree, and its arguments."""

    def step(state, lora, opt_state, tokens):
        grads = jax.grad(lambda ad: next_token_loss(apply(state, ad, tokens), tokens))(lora)
        updates, opt_state = adam.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    return jax.jit(step), (state, lora, adam.init(lora), tokens)


def _stateful_step(model, adam, tokens):
    """A step training ``model``'s ``nnx.LoRAParam``s with ``nnx.Optimizer``, jitted through
    ``nnx.split``/``nnx.merge`` as ``nnx.jit`` does (so that it can be lowered), and its arguments."""
    optimizer = nnx.Optimizer(model, adam, wrt=nnx.LoRAParam)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss = lambda m: next_token_loss(m(tokens), tokens)
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
        return nnx.state((model, optimizer))

    return jax.jit(step), (state, tokens)


def _mlp_only(cfg, tokens, rank, adam) -> dict:
    """Flax's own LoRA layers need the model built with them: the twin with nnx.LoRALinear MLPs."""
    model = NNXGPT(cfg, nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    lora = lj.init(jax.random.key(2), state, lj.LoraConfig(rank=rank, alpha=rank, targets=MLP_TARGETS))
    flax_model = NNXGPT(cfg, nnx.Rngs(1))
    for block in flax_model.blocks:
        for name in ("fc", "proj"):
            layer = getattr(block, name)
            lora_layer = nnx.LoRALinear(layer.in_features, layer.out_features, lora_rank=rank, rngs=nnx.Rngs(3))
            setattr(block, name, lora_layer)
    return {
        "lora_jax NNX, MLP only": _functional_step(lj.wrap(model), state, lora, adam, tokens),
        "nnx.LoRALinear, MLP only": _stateful_step(flax_model, adam, tokens),
    }


if __name__ == "__main__":
    main()
