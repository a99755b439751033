"""Many adapters on one base: mixed batches vs one adapter vs the base, side by side in one run.

The GPT benchmark model (``train_step.py``'s CPU size) with a bank of 8 adapters of ranks
4-16 (padded to 16). Each example of the mixed batch uses a random slot. Rows, for inference
(forward) and for a train step (forward + backward + adam through ``lj.optimizer``):

- base alone; one plain adapter of rank 16 (the bank's padded rank: the same FLOPs per token);
- the bank with every example on one slot; the bank with a mixed batch;

for each batch shape (``--shapes``: 8 sequences x 128 tokens and 64 x 32 by default), and with
``--profile`` the time of XLA's kernels by kind in the one-adapter and the mixed forward.

Then: the branch of one layer computed by per-example gather (BGMV, what ``lj.Bank`` does) vs
sorted segments with ``jax.lax.ragged_dot`` vs a one-hot product over all the slots, forward and
gradient; the number of traces of
the compiled forward and step over 10 swaps (``lj.bank_set``, other ranks and alphas); and,
when torch and peft are installed, PEFT's mixed-batch inference (``adapter_names=``) on a
PyTorch twin of the same model with the same weights, as an anchor.

    python benchmarks/many_adapters.py              # about 4 minutes on 2 CPU cores
    python benchmarks/many_adapters.py --profile    # and where the time goes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]
from gpt import GPT  # noqa: E402
from train_step import TARGETS, _machine, cpu_model, measure, next_token_loss  # noqa: E402
from xla_profile import grouped, op_times, print_grouped  # noqa: E402

import lora_jax as lj  # noqa: E402

RANKS = (4, 4, 8, 8, 12, 12, 16, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shapes", default="8x128,64x32", help="sequences x tokens, comma-separated")
    parser.add_argument("--profile", action="store_true", help="where XLA spends the mixed vs the one-adapter forward")
    args = parser.parse_args()
    cfg, _, model, _, base, roles = cpu_model()

    def adapter(i: int, rank: int) -> dict:
        lora = lj.init(jax.random.key(10 + i), base, lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS),
                       roles=roles)  # fmt: skip
        return jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(i), x.shape), lora)

    adapters = [adapter(i, r) for i, r in enumerate(RANKS)]
    bank = lj.bank(adapters, rank=max(RANKS))
    single = adapter(99, max(RANKS))
    apply = lj.wrap(model.apply)
    forward = jax.jit(lambda p, lora, t, i: apply({"params": p, "lora": lora}, t, lora_index=i))
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    print(f"{_machine()}: {jax.devices()[0].device_kind}, jax {jax.__version__}; GPT {cfg.layers}x{cfg.features}; "
          f"bank of {len(RANKS)} adapters, ranks {RANKS}")  # fmt: skip
    for batch, length in shapes:
        tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, cfg.vocab)
        mixed = jax.random.randint(jax.random.key(3), (batch,), 0, len(RANKS))
        print(f"\n=== batch {batch} x {length} tokens; mixed index {np.asarray(mixed).tolist()}")
        _compare(model, apply, forward, base, bank, single, tokens, mixed, args)
    batch, length = shapes[0]
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, cfg.vocab)
    mixed = jax.random.randint(jax.random.key(3), (batch,), 0, len(RANKS))
    _swaps(model, base, bank, tokens, mixed, roles)
    _segments(cfg, batch, length, args.reps)
    _peft_anchor(cfg, base, adapters, tokens, mixed, forward, bank, args.reps)


def _compare(model, apply, forward, base, bank, single, tokens, mixed, args) -> None:
    """The inference and train-step tables for one batch shape (and, with --profile, where the time goes)."""
    one_slot = jnp.full(mixed.shape, len(RANKS) - 1)
    plain = jax.jit(lambda p, lora, t: apply({"params": p, "lora": lora}, t))
    forwards = {
        "base alone": (jax.jit(lambda p, t: model.apply({"params": p}, t)), (base, tokens)),
        "one adapter, rank 16": (plain, (base, single, tokens)),
        "bank, all on one slot": (forward, (base, bank, tokens, one_slot)),
        "bank, mixed batch": (forward, (base, bank, tokens, mixed)),
    }
    infer = _report("inference forward", forwards, args.reps, "one adapter, rank 16")

    tx = lj.optimizer(optax.adam(1e-3))

    def step_fn(indexed: bool):
        def step(variables, state, t, index=None):
            kw = {"lora_index": index} if indexed else {}
            loss = lambda v: next_token_loss(apply(v, t, **kw), t)
            grads = jax.grad(loss)(variables)
            updates, state = tx.update(grads, state, variables, **kw)
            return optax.apply_updates(variables, updates), state

        return jax.jit(step)

    single_vars, bank_vars = {"params": base, "lora": single}, {"params": base, "lora": bank}
    steps = {
        "one adapter, rank 16": (step_fn(False), (single_vars, tx.init(single_vars), tokens)),
        "bank, all on one slot": (step_fn(True), (bank_vars, tx.init(bank_vars), tokens, one_slot)),
        "bank, mixed batch": (step_fn(True), (bank_vars, tx.init(bank_vars), tokens, mixed)),
    }
    train = _report("train step (forward + backward + adam)", steps, args.reps, "one adapter, rank 16")
    ref = "one adapter, rank 16"
    print(f"\nmixed-batch inference throughput / one adapter's: {infer[ref] / infer['bank, mixed batch']:.3f} "
          f"(target >= 0.85); mixed train step / one adapter's: {train['bank, mixed batch'] / train[ref]:.3f} "
          "(target <= 1.15)")  # fmt: skip
    if args.profile:
        print("\nXLA:CPU's trace of the inference forward, by kind of kernel (ynn_fusion: the GEMMs):")
        for name in (ref, "bank, mixed batch"):
            print_grouped(name, grouped(op_times(*forwards[name])))


def _report(title: str, fns: dict, reps: int, ref: str) -> dict[str, float]:
    stats = measure(fns, reps, stat=min)
    f0, _, t0 = stats[ref]
    print(f"\n{title}: fastest of {reps} interleaved runs, ratios to '{ref}'")
    print(f"{'':24s} {'GFLOP':>8s} {'ratio':>6s} {'time ms':>9s} {'ratio':>6s}")
    for name, (f, _, t) in stats.items():
        print(f"{name:24s} {f / 1e9:8.3f} {f / f0:6.3f} {t * 1e3:9.2f} {t / t0:6.3f}")
    return {name: t for name, (_, _, t) in stats.items()}


def _swaps(model, base, bank, tokens, index, roles) -> None:
    """Traces of a compiled forward and train step over 10 swaps of other adapters into slot 3."""
    traces = {"forward": 0, "step": 0}
    apply = lj.wrap(model.apply)
    tx = lj.optimizer(optax.adam(1e-3))

    @jax.jit
    def forward(lora, i, base, tokens):
        traces["forward"] += 1
        return apply({"params": base, "lora": lora}, tokens, lora_index=i)

    @jax.jit
    def step(variables, state, i, tokens):
        traces["step"] += 1
        grads = jax.grad(lambda v: next_token_loss(apply(v, tokens, lora_index=i), tokens))(variables)
        updates, state = tx.update(grads, state, variables, lora_index=i)
        return optax.apply_updates(variables, updates), state

    state = tx.init({"params": base, "lora": bank})
    for swap in range(10):
        rank = 4 + swap
        config = lj.LoraConfig(rank=rank, alpha=float(swap + 1), targets=TARGETS)
        new = lj.init(jax.random.key(200 + swap), base, config, roles=roles)
        bank = lj.bank_set(bank, 3, new)
        jax.block_until_ready(forward(bank, index, base, tokens))
        (variables, state) = step({"params": base, "lora": bank}, state, index, tokens)
        bank = variables["lora"]
    print(f"\nswaps: 10 adapters of ranks 4-13 and alphas 1-10 put into slot 3: {traces['forward']} trace of the "
          f"forward, {traces['step']} of the train step")  # fmt: skip


def _segments(cfg, batch: int, length: int, reps: int) -> None:
    """One MLP layer's branch (features -> 4·features) by per-example gather vs ragged_dot."""
    n, rank, d_in, d_out = len(RANKS), max(RANKS), cfg.features, 4 * cfg.features
    key = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(key[0], (batch, length, d_in))
    a = jax.random.normal(key[1], (n, d_in, rank)) * 0.05
    b = jax.random.normal(key[2], (n, rank, d_out)) * 0.05
    index = jax.random.randint(key[3], (batch,), 0, n)

    def gather(x, a, b, index):  # what lj.Bank computes: per-example adapters, a batched product
        return jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a[index]), b[index])

    def segments(x, a, b, index):  # tokens sorted by adapter, one ragged product per factor
        tokens = jnp.repeat(index, x.shape[1])
        order = jnp.argsort(tokens)
        sizes = jnp.bincount(tokens, length=n).astype(jnp.int32)
        flat = x.reshape(-1, d_in)[order]
        y = jax.lax.ragged_dot(jax.lax.ragged_dot(flat, a, sizes), b, sizes)
        return jnp.zeros_like(y).at[order].set(y).reshape(x.shape[:2] + (d_out,))

    def one_hot(x, a, b, index):  # every slot's branch, the other slots' columns zeroed per example
        u = jnp.einsum("bti,nir->btnr", x, a) * jax.nn.one_hot(index, n)[:, None, :, None]
        return jnp.einsum("btnr,nro->bto", u, b)

    for f in (segments, one_hot):
        np.testing.assert_allclose(gather(x, a, b, index), f(x, a, b, index), rtol=1e-4, atol=1e-4)
    grad = lambda f: jax.jit(jax.grad(lambda x, a, b, i: jnp.sum(f(x, a, b, i) ** 2), argnums=(0, 1, 2)))
    fns = {
        "gather forward": (jax.jit(gather), (x, a, b, index)),
        "ragged_dot forward": (jax.jit(segments), (x, a, b, index)),
        "gather gradient": (grad(gather), (x, a, b, index)),
        "ragged_dot gradient": (grad(segments), (x, a, b, index)),
        "one-hot forward": (jax.jit(one_hot), (x, a, b, index)),
        "one-hot gradient": (grad(one_hot), (x, a, b, index)),
    }
    _report(f"one layer's branch ({batch}x{length} tokens, {d_in}->{d_out}, {n} adapters of rank {rank})",
            fns, reps, "gather forward")  # fmt: skip


def _peft_anchor(cfg, base, adapters, tokens, index, forward, bank, reps: int) -> None:
    try:
        import peft
        import torch
    except ImportError:
        print("\n(PEFT anchor skipped: pip install torch peft)")
        return
    from torch_gpt import TorchGPT, fastest, load_flax

    torch.manual_seed(0)
    net = load_flax(TorchGPT(cfg), base).eval()
    ids = torch.tensor(np.asarray(tokens))
    with torch.no_grad():
        twin = float(np.abs(net(ids).numpy() - np.asarray(jax.jit(GPT(cfg).apply)({"params": base}, tokens))).max())
    model = None
    with tempfile.TemporaryDirectory() as root:
        names = [f"a{i}" for i in range(len(adapters))]
        lj.bank_to_peft(root, bank, names=names, name_map=_torch_names)
        for name in names:
            if model is None:
                model = peft.PeftModel.from_pretrained(net, os.path.join(root, name), adapter_name=name)
            else:
                model.load_adapter(os.path.join(root, name), adapter_name=name)
    model.eval()
    chosen = [names[i] for i in np.asarray(index)]
    with torch.no_grad():
        ours = np.asarray(forward(base, bank, tokens, index))
        diff = float(np.abs(model(ids, adapter_names=chosen).numpy() - ours).max())

        model.set_adapter(names[-1])
        single = fastest(lambda: model(ids), reps)
        mixed = fastest(lambda: model(ids, adapter_names=chosen), reps)
    ours_mixed = fastest(lambda: jax.block_until_ready(forward(base, bank, tokens, index)), reps)
    print(f"\nPEFT anchor (torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads; twin "
          f"logits vs ours {twin:.1e}, mixed-batch logits PEFT vs lora_jax {diff:.1e}):")  # fmt: skip
    print(f"  PEFT one adapter {single * 1e3:.2f} ms, PEFT mixed batch {mixed * 1e3:.2f} ms "
          f"(throughput ratio {single / mixed:.3f}); lora_jax mixed batch {ours_mixed * 1e3:.2f} ms")  # fmt: skip


def _torch_names(path: str) -> str:
    """lora_jax paths of the GPT's kernels -> the PyTorch twin's module names."""
    return path.removesuffix("/kernel").replace("/", ".")


if __name__ == "__main__":
    main()
