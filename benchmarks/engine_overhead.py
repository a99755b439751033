"""What the engine costs before the first step: tracing through ``lj.wrap`` vs the plain model.

``lj.wrap`` traces the model to a jaxpr and evaluates that jaxpr again with each use of an
adapted kernel factored. This adds Python work to the first trace of a jitted step, and none
to the steps after it. Measured on the main job's model (Gemma 3 270M's shapes, rank 8 on
q/k/v/o/gate/up/down, 8 × 64 tokens, logits at 24 positions, AdamW), with abstract weights (no
file is read): the trace of the LoRA step, the trace of the same step on the plain model
(gradients of the full parameters), the trace of the model's forward alone (the extra pass
the engine makes to get the jaxpr), and the XLA compile time of the LoRA step. The difference
of the two steps' traces holds the engine's extra pass and the LoRA branches' own tracing.

    python benchmarks/engine_overhead.py   # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gemma3 import Gemma3, Gemma3Config

import lora_jax as lj

TARGETS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="traces of each step (the median is reported)")
    args = parser.parse_args()

    cfg = Gemma3Config()
    model = nnx.eval_shape(lambda: Gemma3(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    lora = jax.eval_shape(lambda: lj.init(jax.random.key(0), model, lj.LoraConfig(rank=8, targets=TARGETS)))
    ids = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    at = jax.ShapeDtypeStruct((8, 24), jnp.int32)
    tx = optax.adamw(1e-4)

    def loss(logits):
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    def make_lora_step():  # a new function and a new wrap each time: nothing cached by JAX or lora_jax
        apply = lj.wrap(graphdef)

        def lora_step(lora, opt_state, state, ids, at):
            grads = jax.grad(lambda lora: loss(apply(state, lora, ids, at=at)))(lora)
            updates, opt_state = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state

        return lora_step

    def make_plain_step():
        def plain_step(state, opt_state, ids, at):
            grads = jax.grad(lambda s: loss(nnx.merge(graphdef, s)(ids, at=at)))(state)
            updates, opt_state = tx.update(grads, opt_state, state)
            return optax.apply_updates(state, updates), opt_state

        return plain_step

    lora_args = (lora, jax.eval_shape(tx.init, lora), state, ids, at)
    plain_args = (state, jax.eval_shape(tx.init, state), ids, at)

    def trace_seconds(make, fn_args):
        times = []
        for _ in range(args.reps):
            fn = make()
            start = time.perf_counter()
            traced = jax.jit(fn).trace(*fn_args)
            times.append(time.perf_counter() - start)
        return statistics.median(times), traced

    def make_forward():  # the engine's own extra pass: the model traced to a jaxpr
        return lambda state, ids, at: nnx.merge(graphdef, state)(ids, at=at)

    t_plain, _ = trace_seconds(make_plain_step, plain_args)
    t_forward, _ = trace_seconds(make_forward, (state, ids, at))
    t_lora, traced = trace_seconds(make_lora_step, lora_args)
    start = time.perf_counter()
    traced.lower().compile()
    t_compile = time.perf_counter() - start
    print(f"Gemma 3 270M shapes, rank 8 on 7 kernels x {cfg.layers} layers, batch 8 x 64, jax {jax.__version__}")
    print(f"trace of the plain step (full gradients)   {t_plain:6.2f} s")
    print(f"trace of the LoRA step through lj.wrap     {t_lora:6.2f} s")
    print(f"compile of the LoRA step (XLA)             {t_compile:6.2f} s")
    print(f"trace of the model's forward to a jaxpr    {t_forward:6.2f} s")
    print(f"LoRA step trace - plain step trace: {t_lora - t_plain:.2f} s = {(t_lora - t_plain) / t_compile:.1%} of the "
          f"compile time; of it the engine's extra trace of the model: {t_forward:.2f} s = "
          f"{t_forward / t_compile:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
