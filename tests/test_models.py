import json

import pandas as pd
import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from alignlib import PairError, decoder_layers, final_norm, load_pair, patch_sweep, score, sublayer
from alignlib.models import check_tokenizers

V = 512
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         max_position_embeddings=256)),
}


def naive_logprob(model, ids, start):
    """One sequence, no padding, full logits: the plain definition of logp(response | prompt)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layers_and_sublayers_are_found_in_every_architecture(arch, tiny, builtin_prefs):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    layers = decoder_layers(model)
    assert len(layers) == 3
    for layer in layers:
        assert sublayer(layer, "attn") is not layer and sublayer(layer, "mlp") is not layer
    assert isinstance(final_norm(model), torch.nn.Module)
    # The batched, masked scorer agrees with the one-sequence full-logits definition here too.
    pair = load_pair(model, model, tokenizer=tiny.tokenizer)
    table = score(pair, builtin_prefs[:3], batch_size=4, progress=False)
    from alignlib.data import encode_pairs

    for e, row in zip(encode_pairs(tiny.tokenizer, builtin_prefs[:3]), table.itertuples()):
        assert row.logp_chosen_base == pytest.approx(naive_logprob(model, e.chosen, e.chosen_start), rel=1e-5)
    assert (table.reward_gain == 0).all()


def test_tiny_pair_reloads_identically_and_is_really_a_pair(tiny):
    again = load_pair("tiny")  # from the cache; DPO's own determinism is tested in test_tuning
    for a, b in zip(tiny.base.state_dict().values(), again.base.state_dict().values()):
        assert torch.equal(a, b)
    assert tiny.n_layers == 4
    assert tiny.tuned is not None
    diffs = [not torch.equal(a, b) for a, b in zip(tiny.base.parameters(), tiny.tuned.parameters())]
    assert any(diffs)
    assert tiny.tokenizer.get_vocab() == again.tokenizer.get_vocab()


def test_pair_from_local_folders_matches_the_loaded_pair(tiny, builtin_prefs, tmp_path):
    for role in ("base", "tuned"):
        getattr(tiny, role).save_pretrained(tmp_path / role)
        tiny.tokenizer.save_pretrained(tmp_path / role)
    pair = load_pair(str(tmp_path / "base"), str(tmp_path / "tuned"))
    a = score(pair, builtin_prefs[:4], progress=False)
    b = score(tiny, builtin_prefs[:4], progress=False)
    assert (a.reward_gain - b.reward_gain).abs().max() < 1e-9
    # loaded through a device map, as a model too large for one device is, then a sharded sweep (one
    # device here: the path is exercised, not a placement across devices)
    placed = load_pair(str(tmp_path / "base"), str(tmp_path / "tuned"), device_map="auto")
    kw = dict(site=["resid", "attn"], controls=[], chunk_size=2, progress=False)
    sharded = patch_sweep(placed, builtin_prefs[:4], shard=(0, 1), run_dir=tmp_path / "run", **kw)
    pd.testing.assert_frame_equal(sharded.pairs, patch_sweep(tiny, builtin_prefs[:4], **kw).pairs)


def _variant(**overrides):
    cfg = LlamaConfig(**{**COMMON, **overrides})
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("other, message", [
    (lambda: _variant(num_hidden_layers=4), "number of layers differs"),
    (lambda: _variant(hidden_size=48), "hidden size differs"),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)), "architectures differ"),
    (lambda: _variant(vocab_size=V + 8), "vocabulary size differs"),
])
def test_incompatible_sides_are_refused(other, message, tiny):
    with pytest.raises(PairError, match=message):
        load_pair(_variant(), other(), tokenizer=tiny.tokenizer)


def test_mismatched_tokenizers_are_refused(tiny):
    from tokenizers import Tokenizer

    spec = json.loads(tiny.tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(PairError, match="map tokens to different ids"):
        check_tokenizers(tiny.tokenizer, swapped)
    bigger = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny.tokenizer.backend_tokenizer.to_str()))
    bigger.add_tokens(["<extra>"])
    with pytest.raises(PairError, match="vocabulary sizes"):
        check_tokenizers(tiny.tokenizer, bigger)


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_pair(str(tmp_path / "missing.gguf"))
    with pytest.raises(OSError, match="could not load a causal LM"):
        load_pair(str(tmp_path))
    with pytest.raises(PairError, match="brings its own tuned side"):
        load_pair("tiny", "tiny")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pair("tiny", dtype="float8")
    with pytest.raises(PairError, match="no tokenizer"):
        load_pair(_variant())


def test_base_only_pair(tiny, builtin_prefs):
    pair = load_pair(tiny.base, tokenizer=tiny.tokenizer)
    with pytest.raises(PairError, match="no tuned side"):
        pair.require_tuned()
    table = score(pair, builtin_prefs[:2], progress=False)
    assert "margin_base" in table and "reward_gain" not in table


def test_non_finite_weights_and_log_probs_are_errors_that_name_the_model(tiny, builtin_prefs):
    import copy

    broken = copy.deepcopy(tiny.tuned)
    with torch.no_grad():
        decoder_layers(broken)[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(PairError, match=r"the tuned model has non-finite weights \(NaN or inf\) in "
                                        r"model.layers.2.mlp.down_proj.weight"):
        load_pair(tiny.base, broken, tokenizer=tiny.tokenizer)
    pair = load_pair(tiny.base, tiny.tuned, tokenizer=tiny.tokenizer)
    pair.tuned = broken  # a model that turns NaN after loading: the first forward says so
    with pytest.raises(FloatingPointError, match=r"tuned model: non-finite log-probs on pairs \['builtin-0001'"):
        score(pair, builtin_prefs[:2], progress=False)
