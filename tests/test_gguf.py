"""GGUF exports for llama.cpp: the LoRA adapter file (`lj.to_gguf_lora`) and the merged model
(`lj.to_gguf`), on a tiny random Gemma 3 written as GGUF in llama.cpp's layout.

References, none of them lora_jax: the adapter file is read with `gguf`'s reader and applied
with NumPy as llama.cpp does (`W + alpha / r · lora_b ⋅ lora_a`, `r` from `lora_b`) and compared
with PEFT's merged weights on transformers' Gemma 3 (loaded from the same GGUF); the merged GGUF
is loaded by transformers (`gguf_file=`) and compared with the PEFT model's logits. A real
llama.cpp, where `llama_cpp` is importable, runs both (marked slow)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from tiny_gemma import MIXED, TINY, gemma3, scalar

import lora_jax as lj

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(directory, base GGUF path, model, trained adapters)``."""
    root = tmp_path_factory.mktemp("gguf")
    base = gemma3.write_tiny_gguf(root / "base.gguf", TINY, seed=0)
    _, model, _ = gemma3.load(base)
    lora = randomize(lj.init(jax.random.key(1), model, MIXED), jax.random.key(2), std=0.05)
    return root, base, model, lora


def _tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}  # fmt: skip


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def _apply_like_llama_cpp(base_path, lora_path) -> dict[str, np.ndarray]:
    """The base's tensors with the adapter file added as llama.cpp adds it, in float64."""
    weights = {k: v.astype(np.float64) for k, v in _tensors(base_path).items()}
    alpha = float(_fields(lora_path)["adapter.lora.alpha"])
    lora = _tensors(lora_path)
    for name in {k.rsplit(".", 1)[0] for k in lora}:
        a, b = lora[f"{name}.lora_a"].astype(np.float64), lora[f"{name}.lora_b"].astype(np.float64)
        weights[name] = weights[name] + alpha / b.shape[1] * (b @ a)  # r = lora_b's ne[0] = its last NumPy axis
    return weights


def _peft_model(root, base, lora, name="peft"):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    lj.to_peft(root / name, lora)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        root, gguf_file=os.path.basename(base), dtype=torch.float32, query_pre_attn_scalar=scalar(base)
    )  # fmt: skip
    return peft.PeftModel.from_pretrained(hf, root / name).eval()


def _gguf_names(state_dict: dict) -> dict[str, np.ndarray]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, TINY.layers)
    out = {}
    for k, v in state_dict.items():
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[name] = v.detach().numpy().astype(np.float64)
    return out


@pytest.mark.slow
def test_adapter_file_has_llama_cpp_metadata_names_and_layouts(tiny):
    root, base, _, lora = tiny
    alpha = lj.to_gguf_lora(root / "lora.gguf", lora, base)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(root / "lora.gguf").st_mode & 0o777 == 0o666 & ~umask  # readable as any other file written
    fields = _fields(root / "lora.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "gemma3" and fields["adapter.lora.alpha"] == pytest.approx(alpha)
    tensors = _tensors(root / "lora.gguf")
    assert len(tensors) == 2 * 7 * TINY.layers
    # PEFT's A (r, in) and B (out, r): blk.0.attn_q is (heads·head_dim, width) = (64, 64) in the base
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    assert tensors["blk.0.attn_q.weight.lora_b"].shape == (64, 4)
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == (2, 128)  # rank_pattern: rank 2
    assert tensors["blk.1.ffn_down.weight.lora_b"].shape == (64, 2)


@pytest.mark.slow
@pytest.mark.interop
def test_adapter_file_applied_as_llama_cpp_does_equals_peft(tiny):
    """Folding: rsLoRA and per-kernel ranks and alphas reach a single-alpha reader exactly."""
    root, base, _, lora = tiny
    lj.to_gguf_lora(root / "lora.gguf", lora, base)
    got = _apply_like_llama_cpp(base, root / "lora.gguf")
    model = _peft_model(root, base, lora)
    assert model.peft_config["default"].use_rslora
    want = _gguf_names(model.merge_and_unload().state_dict())
    adapted = [n for n in want if n.startswith("blk.") and "norm" not in n]
    assert len(adapted) == 7 * TINY.layers
    for name in adapted:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    base_weights = _tensors(base)
    assert max(np.abs(want[n] - base_weights[n]).max() for n in adapted) > 1e-2  # the adapter does something


@pytest.mark.interop
def test_merged_gguf_gives_peft_logits_and_keeps_the_base(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, base, _, lora = tiny
    lj.to_gguf(root / "merged.gguf", base, lora)
    model = _peft_model(root, base, lora)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        root, gguf_file="merged.gguf", dtype=torch.float32, query_pre_attn_scalar=scalar(base)
    ).eval()  # fmt: skip
    ids = torch.tensor(np.random.default_rng(0).integers(3, TINY.vocab, (2, 12)))
    with torch.no_grad():
        want, got = model(ids).logits.numpy(), merged(ids).logits.numpy()
        model.disable_adapter_layers()
        plain = model(ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(want - plain).max() > 0.1
    assert {k: v for k, v in _fields(root / "merged.gguf").items()} == _fields(base)  # tokenizer, config: all kept
    before, after = _tensors(base), _tensors(root / "merged.gguf")
    assert before.keys() == after.keys()
    np.testing.assert_array_equal(after["token_embd.weight"], before["token_embd.weight"])


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_dtypes(tiny, dtype):
    root, base, _, lora = tiny
    lj.to_gguf_lora(root / f"lora-{dtype}.gguf", lora, base, dtype=dtype)
    lj.to_gguf(root / f"merged-{dtype}.gguf", base, lora, dtype=dtype)
    lj.to_gguf_lora(root / "lora.gguf", lora, base)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(root / f"lora-{dtype}.gguf").tensors}
    # q8_0 quantizes rows in blocks of 32: lora_a rows (in = 64 or 128) are, lora_b rows (r = 2 or 4) fall back
    want_a, want_b = {"f16": ("F16", "F16"), "bf16": ("BF16", "BF16"), "q8_0": ("Q8_0", "F16")}[dtype]
    assert types["blk.0.attn_q.weight.lora_a"] == want_a and types["blk.0.attn_q.weight.lora_b"] == want_b
    exact, rounded = _tensors(root / "lora.gguf"), _tensors(root / f"lora-{dtype}.gguf")
    tolerance = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[dtype]  # relative: 2^-11, 2^-8, q8_0's 1/127 of a block
    for name, value in exact.items():
        assert np.abs(rounded[name] - value).max() <= tolerance * np.abs(value).max(), name
    merged = {t.name: t.tensor_type.name for t in gguf.GGUFReader(root / f"merged-{dtype}.gguf").tensors}
    assert merged["blk.0.attn_q.weight"] == dtype.upper() and merged["token_embd.weight"] == "F32"


def test_quantized_base_tensors_are_copied_byte_for_byte(tiny, tmp_path):
    root, base, _, lora = tiny
    quantized = tmp_path / "q8.gguf"  # the base with its embedding table stored Q8_0
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(quantized, "gemma3")
    for f in reader.fields.values():
        if f.name != "general.architecture" and not f.name.startswith("GGUF."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            writer.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    lj.to_gguf(tmp_path / "merged.gguf", quantized, lora)
    old = {t.name: t for t in gguf.GGUFReader(quantized).tensors}
    new = {t.name: t for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors}
    assert new["token_embd.weight"].tensor_type.name == "Q8_0"
    np.testing.assert_array_equal(np.asarray(new["token_embd.weight"].data), np.asarray(old["token_embd.weight"].data))


@pytest.mark.slow
@pytest.mark.interop
def test_dora_merges_into_the_gguf_but_has_no_adapter_file(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, base, model, _ = tiny
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=r".*self_attn/(q|v)_proj/kernel", use_dora=True)
    dora = randomize(lj.init(jax.random.key(3), model, config), jax.random.key(4), std=0.05)
    with pytest.raises(ValueError, match=r"self_attn/q_proj/kernel'.*DoraAdapter.*no llama.cpp LoRA form.*lj.to_gguf"):
        lj.to_gguf_lora(tmp_path / "dora.gguf", dora, base)
    assert not (tmp_path / "dora.gguf").exists()
    lj.to_gguf(tmp_path / "dora-merged.gguf", base, dora)
    peft_model = _peft_model(root, base, dora, name="peft-dora")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="dora-merged.gguf", dtype=torch.float32,
        query_pre_attn_scalar=scalar(base),
    ).eval()  # fmt: skip
    ids = torch.tensor(np.random.default_rng(1).integers(3, TINY.vocab, (2, 10)))
    with torch.no_grad():
        want, got = peft_model(ids).logits.numpy(), merged(ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny, tmp_path):
    root, base, model, lora = tiny
    out = tmp_path / "out.gguf"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lj.to_gguf_lora(out, lora, tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        lj.to_gguf(out, tmp_path / "junk.gguf", lora)
    with pytest.raises(ValueError, match="dtype must be one of f32, f16, bf16, q8_0"):
        lj.to_gguf_lora(out, lora, base, dtype="q4_k")
    # an adapter for another base: a Gemma 3 of another width
    other = gemma3.write_tiny_gguf(tmp_path / "wide.gguf", gemma3.Gemma3Config(**{**TINY.__dict__, "width": 96}))
    with pytest.raises(ValueError, match=r"model/layers/0/self_attn/q_proj/kernel'.*\(64, 64\).*\(64, 96\)"):
        lj.to_gguf_lora(out, lora, other)
    with pytest.raises(ValueError, match=r"model/layers/0/self_attn/q_proj/kernel'.*the base's is"):
        lj.to_gguf(out, other, lora)
    # a module the base does not have
    with pytest.raises(ValueError, match=r"'head/kernel'.*module 'head' has no tensor in the base GGUF"):
        lj.to_gguf_lora(out, {"head": {"kernel": lora["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]}}, base)
    # the tied embedding: llama.cpp would apply the adapter to the head with the wrong layout
    emb = lj.init(jax.random.key(5), model, lj.LoraConfig(rank=2, targets=r"model/embed_tokens/embedding"))
    with pytest.raises(ValueError, match="ties its output head to token_embd.weight"):
        lj.to_gguf_lora(out, emb, base)
    # a bank, a fully trained parameter
    with pytest.raises(ValueError, match="Bank.*no llama.cpp LoRA form"):
        lj.to_gguf_lora(out, lj.bank([lora, lora]), base)
    full = {"model": {"norm": {"weight": lj.FullWeight(jnp.ones(TINY.width))}}}
    with pytest.raises(ValueError, match="fully trained parameter.*no llama.cpp LoRA form"):
        lj.to_gguf_lora(out, full, base)
    # an architecture whose converter permutes weights (LLaMA's q/k rows) is refused, not written wrong
    llama = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(llama, "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture is 'llama'"):
        lj.to_gguf_lora(out, lora, llama)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_stacked_layers_export_per_layer(tmp_path):
    """A kernel stacked by nn.scan (roles ('stack', 'in', 'out')) with '{}' in its module name."""
    root = tmp_path
    base = gemma3.write_tiny_gguf(root / "base.gguf", TINY, seed=0)
    weights = _tensors(base)
    q = np.stack([weights[f"blk.{i}.attn_q.weight"].T for i in range(TINY.layers)])  # (layers, in, out)
    params = {"layers": {"q": {"kernel": jnp.asarray(q)}}}
    roles = {"layers/q/kernel": ("stack", "in", "out")}
    lora = randomize(lj.init(jax.random.key(0), params, lj.LoraConfig(rank=2), roles=roles), jax.random.key(1))
    name_map = lambda path: "model.layers.{}.self_attn.q_proj"
    lj.to_gguf_lora(root / "lora.gguf", lora, base, name_map=name_map)
    got = _apply_like_llama_cpp(base, root / "lora.gguf")
    want = np.asarray(lj.apply_lora(params, lora)["layers"]["q"]["kernel"])
    for i in range(TINY.layers):
        np.testing.assert_allclose(got[f"blk.{i}.attn_q.weight"], want[i].T, rtol=1e-5, atol=1e-6)
    lj.to_gguf(root / "merged.gguf", base, lora, name_map=name_map)
    merged = _tensors(root / "merged.gguf")
    for i in range(TINY.layers):
        np.testing.assert_allclose(merged[f"blk.{i}.attn_q.weight"], want[i].T, rtol=1e-6, atol=1e-6)


@pytest.mark.interop
@pytest.mark.slow
def test_llama_cpp_runs_the_adapter_and_the_merged_model(tiny):
    """The real llama.cpp (llama-cpp-python), where installed: its logits with the adapter file
    (--lora) and with the merged GGUF against the PEFT model's; its base against transformers'
    as the floor of what two implementations agree to."""
    llama_cpp = pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")
    root, base, _, lora = tiny
    lj.to_gguf_lora(root / "lora.gguf", lora, base)
    lj.to_gguf(root / "merged.gguf", base, lora)
    model = _peft_model(root, base, lora)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, TINY.vocab, 12)]

    def llama(path, **kw):
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, n_threads=2, **kw)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()[0]
        model.disable_adapter_layers()
        plain = model(torch.tensor([ids])).logits.numpy()[0]
    floor = np.abs(llama(base) - plain).max()
    for got in (llama(base, lora_path=str(root / "lora.gguf")), llama(root / "merged.gguf")):
        assert np.abs(got - want).max() <= max(2 * floor, 1e-3 * np.abs(want).max())
    assert np.abs(want - plain).max() > 50 * floor  # the adapter's effect is far above the floor
