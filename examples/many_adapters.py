"""Many adapters on one base: three tenants trained together and served in one mixed batch.

A small byte-level GPT (``examples/gpt.py``) first learns to copy a word after ``=``
(``"kiwi=kiwi"``): that is the shared base, then frozen. Three tenants each want another
answer: ``upper`` (``kiwi=KIWI``), ``rot13`` (``kiwi=xvjv``) and ``reverse`` (``kiwi=iwik``).
Their three LoRA adapters live in one bank (``lj.bank``) and are trained *together*: each
example of a batch carries its tenant's slot (``lora_index=``), so one train step updates
every adapter from its own examples only. Then one greedy generation pass answers a mixed
batch of held-out words, each row with its own adapter (slot ``-1``: the base alone), and
the exact-match rate of each tenant is reported, with and without its adapter.

    python examples/many_adapters.py           # about a minute on 2 CPU cores
    python examples/many_adapters.py --quick   # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig

import lora_jax as lj

TENANTS = {
    "upper": str.upper,
    "rot13": lambda w: codecs.encode(w, "rot13"),
    "reverse": lambda w: w[::-1],
}
LENGTH = 16  # "word=answer\n" padded with zero bytes
TARGETS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel"


def words(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 7))) for _ in range(count)]


def encode(prompts: list[str], answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Byte rows ``word=answer\\n`` and a mask of the answer bytes (the loss is on those only)."""
    rows, masks = np.zeros((len(prompts), LENGTH), np.int32), np.zeros((len(prompts), LENGTH), np.float32)
    for i, (w, a) in enumerate(zip(prompts, answers)):
        text = f"{w}={a}\n".encode()
        rows[i, : len(text)] = list(text)
        masks[i, len(w) + 1 : len(text)] = 1
    return rows, masks


def loss_fn(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1)


def generate(forward, prompts: list[str], index: jax.Array) -> list[str]:
    """Greedy answers for ``prompts``, row ``i`` with adapter ``index[i]``, all in one batch."""
    rows, _ = encode(prompts, [""] * len(prompts))
    rows = jnp.asarray(rows)
    starts = jnp.asarray([len(w) + 1 for w in prompts])
    for step in range(LENGTH - 1):
        logits = forward(rows, index)
        positions = jnp.minimum(starts + step, LENGTH - 1)
        next_bytes = jnp.argmax(logits[jnp.arange(len(prompts)), positions - 1], axis=-1)
        rows = rows.at[jnp.arange(len(prompts)), positions].set(jnp.where(starts + step < LENGTH, next_bytes, 0))
    out = []
    for row, start in zip(np.asarray(rows), np.asarray(starts)):
        text = bytes(int(b) for b in row[start:] if b).decode("latin-1")
        out.append(text.split("\n")[0])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test, not a result")
    args = parser.parse_args(argv)
    if args.quick:
        args.base_steps, args.steps = 5, 5

    cfg = GPTConfig(vocab=256, max_len=LENGTH, features=128, heads=4, layers=2)
    model = GPT(cfg)
    train_words, test_words = words(0, 4000), [w for w in words(1, 200) if w not in set(words(0, 4000))][:48]
    params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))["params"]

    # 1. The base: copy the word (full training; it is the shared, then frozen, model).
    adam = optax.adam(3e-3)

    @jax.jit
    def base_step(p, state, rows, mask):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, rows), rows, mask))(p)
        updates, state = adam.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, rng = adam.init(params), np.random.default_rng(0)
    for _ in range(args.base_steps):
        batch = list(rng.choice(train_words, 64))
        params, state, loss = base_step(params, state, *map(jnp.asarray, encode(batch, batch)))
    print(f"base (copy) trained: loss {float(loss):.3f}")

    # 2. Three adapters in one bank, trained together on mixed batches.
    roles = lj.axis_roles(model, jnp.zeros((1, LENGTH), jnp.int32))
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    bank = lj.bank([lj.init(jax.random.key(1 + i), params, config, roles=roles) for i in range(len(TENANTS))])
    apply = lj.wrap(model.apply)
    tx = lj.optimizer(optax.adam(3e-3))
    variables = {"params": params, "lora": bank}

    @jax.jit
    def step(variables, state, rows, mask, index):
        loss_of = lambda v: loss_fn(apply(v, rows, lora_index=index), rows, mask)
        loss, grads = jax.value_and_grad(loss_of)(variables)
        updates, state = tx.update(grads, state, variables, lora_index=index)
        return optax.apply_updates(variables, updates), state, loss

    state, names = tx.init(variables), list(TENANTS)
    for _ in range(args.steps):
        batch, index = list(rng.choice(train_words, 64)), rng.integers(0, len(names), 64)
        answers = [TENANTS[names[k]](w) for w, k in zip(batch, index)]
        variables, state, loss = step(variables, state, *map(jnp.asarray, encode(batch, answers)), jnp.asarray(index))
    print(f"3 adapters trained together: loss {float(loss):.3f}")

    # 3. One mixed batch: every held-out word for every tenant, with its adapter and with the base.
    forward_jit = jax.jit(lambda variables, rows, index: apply(variables, rows, lora_index=index))
    forward = lambda rows, index: forward_jit(variables, rows, index)
    prompts = [w for _ in names for w in test_words] * 2
    index = jnp.asarray([k for k in range(len(names)) for _ in test_words] + [lj.BASE] * len(names) * len(test_words))
    answers = generate(forward, prompts, index)
    n = len(test_words)
    print(f"\none mixed batch of {len(prompts)} rows, {n} held-out words per tenant:")
    print(f"{'tenant':8s} {'adapter':>8s} {'base':>8s}   example")
    results = {}
    for k, name in enumerate(names):
        want = [TENANTS[name](w) for w in test_words]
        own, base = answers[k * n : (k + 1) * n], answers[(len(names) + k) * n : (len(names) + k + 1) * n]
        results[name] = (np.mean([a == b for a, b in zip(own, want)]), np.mean([a == b for a, b in zip(base, want)]))
        print(f"{name:8s} {results[name][0]:8.1%} {results[name][1]:8.1%}   {test_words[0]}= -> {own[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
