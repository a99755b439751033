"""Move LoRA adapters between lora_jax and Hugging Face PEFT, both ways, in one call each.

A small PyTorch MLP and its Flax twin share their weights. (1) An adapter trained with
lora_jax is written with `lj.to_peft` and loaded by `peft.PeftModel.from_pretrained`;
(2) an adapter made by PEFT (`get_peft_model` + `save_pretrained`) is read with
`lj.from_peft`. Each time both frameworks' outputs are compared.

    pip install torch peft            # PyTorch's CPU build is enough
    python examples/peft_interop.py
"""

from __future__ import annotations

import copy
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

try:
    import peft
    import torch
except ImportError:
    print("this example needs PyTorch and PEFT: pip install torch peft")
    sys.exit(0)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))


def flax_twin(net: torch.nn.Module) -> dict:
    """The torch weights as Flax params: kernels are the transposed ``(out, in)`` weights."""
    w = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}
    return {m: {"kernel": w[f"{m}.weight"].T, "bias": w[f"{m}.bias"]} for m in ("up", "down")}


def torch_out(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.array(x))).numpy()


def main() -> None:
    torch.manual_seed(0)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    y = jnp.sin(x[:, :4] * 2)
    base_net = TorchMLP()
    params = flax_twin(base_net)
    apply = lj.wrap(FlaxMLP().apply)

    # (1) lora_jax -> PEFT: train an adapter here, load it in PyTorch.
    lora = lj.init(jax.random.key(1), params, lj.LoraConfig(rank=4, alpha=8, targets=r"(up|down)/kernel"))
    tx = optax.adam(1e-2)
    opt_state = tx.init(lora)

    @jax.jit
    def step(lora, opt_state, params):  # the frozen weights as an argument, not compiled-in constants
        grads = jax.grad(lambda ad: jnp.mean((apply({"params": params, "lora": ad}, x) - y) ** 2))(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    for _ in range(50):
        lora, opt_state = step(lora, opt_state, params)
    with tempfile.TemporaryDirectory() as directory:
        lj.to_peft(directory, lora)
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base_net), directory)
        diff = np.abs(torch_out(model, x) - np.asarray(apply({"params": params, "lora": lora}, x))).max()
    print(f"lora_jax -> PEFT: max |PyTorch - JAX| = {diff:.2e}")

    # (2) PEFT -> lora_jax: an adapter made and saved by PEFT, read here.
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["up", "down"], use_rslora=True,
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base_net), config)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        lora = lj.from_peft(directory, params)
    diff = np.abs(torch_out(model, x) - np.asarray(apply({"params": params, "lora": lora}, x))).max()
    print(f"PEFT -> lora_jax: max |PyTorch - JAX| = {diff:.2e} (rsLoRA scale {lora['up']['kernel'].scale:g})")


if __name__ == "__main__":
    main()
