"""Mixture-of-experts LoRA: one adapter per expert on ``(experts, in, out)`` kernels used by
``jax.lax.ragged_dot`` (tokens sorted by expert) or by an einsum with an expert axis, against
an independent per-expert reference; gradients per expert; FLOPs proportional to routed
tokens; scan over layers; DoRA, QLoRA and the cost model on expert kernels."""

import sys
import warnings
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize

import lora_jax as lj
from lora_jax._files import peft as _peft

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from moe import GptOssMoE
from program_flops import program_flops

E, D, F, T = 4, 8, 6, 20
GROUPS = jnp.array([5, 0, 9, 6], jnp.int32)  # expert 1 gets no token
X = jax.random.normal(jax.random.key(1), (T, D))
PARAMS = {"experts": {"kernel": jax.random.normal(jax.random.key(0), (E, D, F))}}


def ragged(params, x, group_sizes):
    return jax.lax.ragged_dot(x, params["experts"]["kernel"], group_sizes)


def _reference(kernel, lora, x, group_sizes):
    """Each token through its own expert's merged kernel W_e + s·a_e⋅b_e, in float64 NumPy."""
    ad = lora["experts"]["kernel"]
    w = np.asarray(kernel, np.float64) + ad.scale * np.einsum("eir,ero->eio", np.asarray(ad.a, np.float64),
                                                              np.asarray(ad.b, np.float64))  # fmt: skip
    ids = np.repeat(np.arange(E), np.asarray(group_sizes))
    return np.stack([np.asarray(x[t], np.float64) @ w[ids[t]] for t in range(len(ids))])


def _lora(roles=None, seed=2, **config):
    roles = roles or lj.axis_roles(ragged, PARAMS, X, GROUPS)
    return randomize(lj.init(jax.random.key(seed), PARAMS, lj.LoraConfig(rank=2, **config), roles=roles),
                     jax.random.key(seed + 1))  # fmt: skip


@pytest.mark.slow
def test_the_expert_axis_is_a_stack_role_found_from_use():
    assert lj.axis_roles(ragged, PARAMS, X, GROUPS) == {"experts/kernel": ("stack", "in", "out")}
    ad = _lora()["experts"]["kernel"]
    assert ad.a.shape == (E, D, 2) and ad.b.shape == (E, 2, F)  # one adapter per expert


@pytest.mark.parametrize("jit", [False, True])
def test_ragged_dot_factored_equals_each_expert_merged(jit):
    lora = _lora()
    apply = lj.wrap(ragged, compute="factored")
    run = jax.jit(apply) if jit else apply
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # factored: no merged use
        got = run(PARAMS, lora, X, GROUPS)
    np.testing.assert_allclose(got, _reference(PARAMS["experts"]["kernel"], lora, X, GROUPS), rtol=1e-5, atol=1e-5)
    merged = ragged(lj.apply_lora(PARAMS, lora), X, GROUPS)
    np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-5)


def test_gradients_reach_each_expert_through_its_tokens_only():
    lora = _lora()
    apply = lj.wrap(ragged, compute="factored")
    loss = lambda lora, p: jnp.sum(jnp.sin(apply(p, lora, X, GROUPS)))
    merged_loss = lambda lora: jnp.sum(jnp.sin(ragged(lj.apply_lora(PARAMS, lora), X, GROUPS)))
    got = jax.jit(jax.grad(loss))(lora, PARAMS)
    chex.assert_trees_all_close(got, jax.grad(merged_loss)(lora), rtol=1e-4, atol=1e-5)
    g = got["experts"]["kernel"]
    assert not np.asarray(g.a[1]).any() and not np.asarray(g.b[1]).any()  # expert 1 has no token: exactly zero
    assert np.asarray(g.a[0]).any() and np.asarray(g.b[2]).any()
    # The base experts get no weight gradient: no product of the step yields a kernel-shaped array.
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lora, PARAMS).jaxpr
    shapes = [v.aval.shape for e in jaxpr.eqns if "dot" in e.primitive.name for v in e.outvars]
    assert (E, D, F) not in shapes


@pytest.mark.slow
def test_the_branch_costs_grow_with_routed_tokens_not_experts():
    """The program's FLOPs of the factored forward: the branch adds 2·r·(in + out) per routed
    token, whatever the number of experts."""
    def flops(experts):
        params = {"experts": {"kernel": jnp.zeros((experts, 64, 64))}}
        gs = jnp.full((experts,), 256 // experts, jnp.int32)
        lora = lj.init(jax.random.key(0), params, lj.LoraConfig(rank=4), roles={"experts/kernel": ("stack", "in", "out")})
        x = jnp.ones((256, 64))
        return program_flops(lj.wrap(ragged, compute="factored"), params, lora, x, gs) - program_flops(ragged, params, x, gs)

    branch = {experts: flops(experts) for experts in (4, 16, 64)}
    want = 2 * 256 * 4 * (64 + 64)
    assert branch == {4: want, 16: want, 64: want}


def test_expert_einsum_dense_dispatch():
    """The dense form: tokens dispatched to every expert's capacity slots, 'ecd,edf->ecf'."""
    def dense(params, x):
        return jnp.einsum("ecd,edf->ecf", x, params["experts"]["kernel"])

    x = jax.random.normal(jax.random.key(4), (E, 3, D))
    roles = lj.axis_roles(dense, PARAMS, x)
    assert roles == {"experts/kernel": ("stack", "in", "out")}
    lora = _lora(roles)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lj.wrap(dense, compute="factored")(PARAMS, lora, x)
    np.testing.assert_allclose(got, dense(lj.apply_lora(PARAMS, lora), x), rtol=1e-5, atol=1e-5)


class _Layers(nn.Module):
    """Three MoE blocks stacked by nn.scan: expert kernels (layers, experts, in, out)."""

    @nn.compact
    def __call__(self, x):
        block = nn.scan(lambda m, x, _: (x + m(x), None), variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)  # fmt: skip
        return block(GptOssMoE(experts=4, top_k=2, hidden=D, ffn=F), x, None)[0]


@pytest.mark.slow
def test_moe_blocks_under_scan_dora_qlora_and_auto():
    model, x = _Layers(), jax.random.normal(jax.random.key(5), (2, 5, D))
    params = model.init(jax.random.key(0), x)["params"]
    roles = lj.axis_roles(model, x)
    assert roles["GptOssMoE_0/gate_up_proj"] == ("stack", "stack", "in", "out")
    assert roles["GptOssMoE_0/router/kernel"] == ("stack", "in", "out")
    targets = r".*(gate_up_proj|down_proj)"
    loss = lambda lora, p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    wrapped = lambda lora, p: jnp.sum(jnp.sin(lj.wrap(model.apply, compute="factored")({"params": p, "lora": lora}, x)))
    for config in (lj.LoraConfig(rank=2, targets=targets), lj.LoraConfig(rank=2, targets=targets, use_dora=True)):
        lora = randomize(lj.init(jax.random.key(1), params, config, roles=roles), jax.random.key(2), std=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = jax.jit(jax.value_and_grad(wrapped))(lora, params)
        want = jax.value_and_grad(lambda lora: loss(lora, lj.apply_lora(params, lora)))(lora)
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    # QLoRA: the expert kernels quantized (blocks along each expert's in axis), dequantized at use.
    quantized = lj.quantize(params, targets=targets, block_size=4)
    lora = randomize(lj.init(jax.random.key(1), quantized, lj.LoraConfig(rank=2, targets=targets), roles=roles),
                     jax.random.key(2), std=0.1)  # fmt: skip
    got = lj.wrap(model.apply)({"params": quantized, "lora": lora}, x)
    want = model.apply({"params": lj.apply_lora(lj.dequantize(quantized), lora)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # compute="auto" keeps low-rank expert adapters factored (cheaper for any token count).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.wrap(model.apply, compute="auto")({"params": quantized, "lora": lora}, x)


def test_a_bank_on_a_ragged_use_is_refused_clearly():
    lora = _lora()
    b = lj.bank([lora, _lora(seed=7)])
    with pytest.raises(ValueError, match="a Bank needs .* examples along .* leading axis"):
        lj.wrap(ragged)(PARAMS, b, X, GROUPS, lora_index=jnp.zeros(T, jnp.int32))


# ---- PEFT's target_parameters on transformers' GPT-OSS ---------------------------------------

HIDDEN, FFN, EXPERTS, TOP_K = 16, 8, 4, 2


def _gpt_oss(torch, transformers):
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        max_position_embeddings=64, layer_types=["full_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # weights on the scale of a trained model's, so the adapters matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _flax_blocks(model):
    """The Flax twin's parameters of each GPT-OSS MLP block, and PEFT's name of each."""
    blocks = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        t = lambda x: jnp.asarray(x.detach().numpy())
        blocks[f"layers_{i}"] = {
            "router": {"kernel": t(mlp.router.weight).T, "bias": t(mlp.router.bias)},
            **{n: t(getattr(mlp.experts, n)) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")},
        }  # fmt: skip
    return blocks


def _name(path):
    keys = path.split("/")
    i = keys[0].removeprefix("layers_")
    return f"model.layers.{i}.mlp.router" if keys[1] == "router" else f"model.layers.{i}.mlp.experts.{keys[1]}"


@pytest.mark.slow
@pytest.mark.interop
def test_gpt_oss_expert_adapters_both_ways_with_peft(tmp_path):
    """A PEFT adapter on GPT-OSS's experts (target_parameters) read by from_peft gives PEFT's
    MoE block outputs and gradients on the Flax twin; to_peft writes it back as PEFT wrote it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _gpt_oss(torch, transformers)
    blocks = _flax_blocks(model)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "theirs")
    h = np.random.default_rng(0).normal(size=(1, 12, HIDDEN)).astype(np.float32)
    th = torch.tensor(h, requires_grad=False)
    mlp = peft_model.base_model.model.model.layers[0].mlp
    out = mlp(th)[0]
    torch.sin(out).sum().backward()
    theirs = out.detach().numpy()

    lora = lj.from_peft(tmp_path / "theirs", blocks, name_map=_name)
    ad = lora["layers_0"]["gate_up_proj"]
    assert (ad.a.shape, ad.b.shape, ad.roles) == ((EXPERTS, HIDDEN, 2), (EXPERTS, 2, 2 * FFN), ("stack", "in", "out"))
    block = GptOssMoE(experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, ffn=FFN)
    apply = lj.wrap(block.apply, compute="factored")
    run = lambda lora: apply({"params": blocks["layers_0"], "lora": lora}, jnp.asarray(h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = run(lora["layers_0"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # Gradients: ours in PEFT's layout against torch autograd through PEFT's wrappers.
    grads = jax.grad(lambda lora: jnp.sum(jnp.sin(run(lora))))(lora["layers_0"])
    experts = peft_model.base_model.model.model.layers[0].mlp.experts
    for param, wrapper in (("gate_up_proj", experts.base_layer), ("down_proj", experts)):
        g_a, g_b = _peft.expert_factors(grads[param])
        np.testing.assert_allclose(g_a, wrapper.lora_A["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g_b, wrapper.lora_B["default"].weight.grad.numpy(), rtol=1e-4, atol=1e-5)

    # Back to PEFT: the same tensors under the same keys, and PEFT computes the same block.
    lj.to_peft(tmp_path / "ours", lora, name_map=_name, parameters=["gate_up_proj", "down_proj"])
    from safetensors.numpy import load_file

    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "ours"))
    assert sorted(got) == sorted(k.replace(".default", "") for k in want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key.replace(".default", "")], value)
    again = peft.PeftModel.from_pretrained(_gpt_oss(torch, transformers), tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again.base_model.model.model.layers[0].mlp(th)[0].numpy(), theirs, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"stacked over 1 axes; name_map must return a name with one '\{\}'"):
        lj.to_peft(tmp_path / "unnamed", lora, name_map=_name)  # without parameters=, a 3-D kernel is no module


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ragged_dot", "einsum", "scan"])
def test_one_adapter_shared_by_every_expert(form):
    """The expert axis given the role 'shared': one a (in, r), b (r, out) for all experts,
    factored as (x⋅a)⋅b whatever the expert; values and gradients equal the merged kernels'
    (ΔW added to every expert), so the shared adapter's gradient sums over all experts' tokens."""
    if form == "scan":  # layers stacked by nn.scan, the experts' adapter shared within each layer
        model, x = _Layers(), jax.random.normal(jax.random.key(5), (2, 5, D))
        params = model.init(jax.random.key(0), x)["params"]
        roles = {p: ("stack", "shared", "in", "out") for p in ("GptOssMoE_0/gate_up_proj", "GptOssMoE_0/down_proj")}
        fn = lambda p, x: model.apply({"params": p}, x)
        wrapped = lambda p, lora, x: lj.wrap(model.apply, compute="factored")({"params": p, "lora": lora}, x)
    else:
        params, x = PARAMS, X
        roles = {"experts/kernel": ("shared", "in", "out")}
        if form == "einsum":
            x = jax.random.normal(jax.random.key(4), (E, 3, D))
            fn = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["experts"]["kernel"])
        else:
            fn = lambda p, x: ragged(p, x, GROUPS)
        wrapped = lj.wrap(fn, compute="factored")
    config = lj.LoraConfig(rank=2, targets=".*(kernel|gate_up_proj|down_proj)" if form != "scan" else ".*_proj")
    lora = randomize(lj.init(jax.random.key(1), params, config, roles=roles), jax.random.key(2), std=0.1)
    ad = jax.tree.leaves(lora, is_leaf=lambda t: isinstance(t, lj.Adapter))[0]
    assert ad.a.ndim == (3 if form == "scan" else 2)  # no expert axis (a layer axis under scan)
    loss = lambda lora: jnp.sum(jnp.sin(wrapped(params, lora, x)))
    merged = lambda lora: jnp.sum(jnp.sin(fn(lj.apply_lora(params, lora), x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jax.value_and_grad(loss))(lora)
    chex.assert_trees_all_close(got, jax.value_and_grad(merged)(lora), rtol=1e-4, atol=1e-5)
    if form == "ragged_dot":  # the merge adds the same ΔW to every expert, checked in float64
        w = np.asarray(lj.apply_lora(params, lora)["experts"]["kernel"], np.float64)
        delta = ad.scale * np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64)
        np.testing.assert_allclose(w - np.asarray(PARAMS["experts"]["kernel"], np.float64), np.broadcast_to(delta, w.shape),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        with pytest.raises(ValueError, match=r"an adapter shared along a kernel axis .* has no PEFT form"):
            lj.to_peft("unused", lora)
        with pytest.raises(ValueError, match=r"lora_jax.bank: adapters\[0\]: 'experts/kernel' is an adapter shared along a kernel axis"):
            lj.bank([lora, lora])


def _flax_gpt_oss(model):
    """The Flax twin of a PyTorch GptOssForCausalLM with its weights (kernels transposed to (in, out))."""
    from moe import GptOss, torch_name

    cfg = model.config
    rotary = model.model.rotary_emb
    twin = GptOss(vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
                  heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok, ffn=cfg.intermediate_size,
                  rope_inv_freq=tuple(rotary.inv_freq.tolist()), rope_scale=float(rotary.attention_scaling),
                  eps=cfg.rms_norm_eps)  # fmt: skip
    shapes = jax.eval_shape(lambda: twin.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def load(path, like):
        keys = [k.key for k in path]
        name = torch_name("/".join(keys))
        last = keys[-1]
        if last in ("kernel", "embedding", "weight"):  # a module's weight
            value = state[f"{name}.weight"]
            value = value.T if last == "kernel" else value
        else:  # a bias, the sinks, the experts' parameters: named as they are
            value = state[name]
        assert value.shape == like.shape, (name, value.shape, like.shape)
        return jnp.asarray(value)

    return twin, jax.tree_util.tree_map_with_path(load, shapes)


@pytest.mark.slow
@pytest.mark.interop
def test_gpt_oss_logits_with_a_peft_adapter_both_ways(tmp_path):
    """The whole GPT-OSS: a PEFT adapter on the experts (target_parameters) and on the attention
    projections, read by from_peft into the Flax twin, gives PEFT's logits; to_peft writes it
    back and PEFT, loading it, gives the same logits again."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from moe import torch_name

    model = _gpt_oss(torch, transformers)
    twin, params = _flax_gpt_oss(model)
    ids = np.random.default_rng(1).integers(0, 64, size=(2, 10))
    with torch.no_grad():
        base_logits = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(twin.apply({"params": params}, jnp.asarray(ids)), base_logits, rtol=1e-5, atol=1e-5)
    config = peft.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "v_proj", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()
    lora = lj.from_peft(tmp_path / "theirs", params, name_map=torch_name, parameters=["gate_up_proj", "down_proj"])
    ours = lj.wrap(twin.apply)({"params": params, "lora": lora}, jnp.asarray(ids))
    assert not np.allclose(theirs, base_logits, atol=1e-3)  # the adapter changes the model
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    lj.to_peft(tmp_path / "ours", lora, name_map=torch_name, parameters=["gate_up_proj", "down_proj"])
    again = peft.PeftModel.from_pretrained(_gpt_oss(torch, transformers), tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(ids)).logits.numpy(), theirs, rtol=1e-5, atol=1e-5)
