"""The seed notebook's ``LoRALinear`` (in 8 -> out 4, r=2, alpha=2, batch 3), with lora_jax.

A one-layer Flax model is adapted without touching its code: the adapter lives beside the
frozen base parameters, a fresh adapter leaves the output unchanged, and a few optax steps
on the adapter alone move the output towards a target.

    python examples/seed_lora_linear.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


def main() -> None:
    model = nn.Dense(features=4)  # in 8 -> out 4
    x = jax.random.normal(jax.random.key(0), (3, 8))  # batch 3
    params = model.init(jax.random.key(1), x)["params"]

    config = lj.LoraConfig(rank=2, alpha=2.0, targets="kernel")
    adapters = lj.init(jax.random.key(2), params, config)
    ad = adapters["kernel"]
    print(f"base kernel {params['kernel'].shape}, a {ad.a.shape}, b {ad.b.shape}, scale {ad.scale}")

    y_base = model.apply({"params": params}, x)
    y_lora = model.apply({"params": lj.apply_lora(params, adapters)}, x)
    print(f"output shape {y_lora.shape}; fresh adapter changes nothing: {bool((y_lora == y_base).all())}")
    print(lj.summary(params, adapters))

    # Train the adapter (and only it) to add a fixed offset to the output.
    target = y_base + 1.0
    variables = {"params": params, "lora": adapters}
    tx = lj.optimizer(optax.adam(0.05))

    def loss_fn(variables):
        merged = lj.apply_lora(variables["params"], variables["lora"])
        return jnp.mean((model.apply({"params": merged}, x) - target) ** 2)

    @jax.jit
    def step(variables, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    opt_state = tx.init(variables)
    for i in range(101):
        variables, opt_state, loss = step(variables, opt_state)
        if i % 25 == 0:
            print(f"step {i:3d}  loss {float(loss):.4f}")
    unchanged = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(variables["params"])))
    print(f"base parameters bit-identical after training: {unchanged}")


if __name__ == "__main__":
    main()
