"""Preference pairs: loading, validation, and tokenisation for a model pair.

A pair is (prompt, chosen, rejected) with one shared prompt. Every loader returns a
`Preferences`: the valid pairs plus a `DropReport` that says which rows were dropped and why,
so that nothing is ever filtered silently (``strict=True`` turns every drop into an error).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.resources
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

#: The turn marker that ends every HH-RLHF prompt; the response is what follows the last one.
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
#: Environment variable naming a local copy of HH-RLHF (a .jsonl/.jsonl.gz file, or a folder).
HH_ENV = "ALIGNLIB_HH_RLHF"
HH_HUB_ID = "Anthropic/hh-rlhf"


class PreferenceError(ValueError):
    """A preference row is invalid (raised in strict mode, recorded otherwise); `reason` names the kind."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    category: str = ""  # the source's ``category`` field, when it has one (the built-in set does)


@dataclass
class DropReport:
    """Which rows were dropped, and why: a list of (row id, reason, detail)."""

    dropped: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, row_id: str, reason: str, detail: str = "") -> None:
        self.dropped.append((row_id, reason, detail))

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.dropped))

    def __len__(self) -> int:
        return len(self.dropped)

    def __str__(self) -> str:
        if not self.dropped:
            return "nothing dropped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))
        return f"dropped {len(self.dropped)} rows: {parts}"


@dataclass
class Preferences(Sequence[PreferencePair]):
    """The valid pairs of a source, in source order, with the report of what was dropped."""

    pairs: list[PreferencePair]
    report: DropReport = field(default_factory=DropReport)
    source: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return Preferences(self.pairs[i], self.report, self.source)
        return self.pairs[i]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]


# --------------------------------------------------------------------------------------------
# Loading


def load_preferences(
    source: str | os.PathLike | Iterable[dict] = "builtin",
    *,
    subset: str = "harmless-base",
    split: str = "test",
    rows: tuple[int, int] | range | None = None,
    strict: bool = False,
    max_chars: int | None = None,
) -> Preferences:
    """Load preference pairs from a named source, a file, or rows in memory.

    source: ``"builtin"`` (the set shipped with alignlib), ``"hh-rlhf"`` (Anthropic HH-RLHF:
        the local copy named by ``$ALIGNLIB_HH_RLHF`` if set, else the hub through ``datasets``),
        a path to a ``.jsonl``/``.jsonl.gz``/``.csv`` file, or an iterable of dicts. Rows have
        ``prompt``/``chosen``/``rejected``, or HH-style whole dialogues in ``chosen``/``rejected``.
    subset, split: the HH-RLHF data folder and split (hub names). ``test`` is the default because
        it is the split the project's local copy holds, so hub and local give the same rows.
    rows: ``(start, stop)`` row range of the source, applied before validation; ids keep the
        source row number, so row 1000 is ``<name>/1000`` whatever was dropped before it.
    strict: raise `PreferenceError` on the first invalid row instead of dropping it.
    max_chars: drop (or, strict, reject) pairs whose prompt plus longer response exceeds this.
    """
    start, stop = _row_range(rows)
    if isinstance(source, (str, os.PathLike)) and str(source) == "builtin":
        name = "builtin"
        records = _read_file(_builtin_path())
    elif isinstance(source, (str, os.PathLike)) and str(source) == "hh-rlhf":
        name = f"hh-rlhf/{subset}/{split}"
        records = _read_hh_rlhf(subset, split)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"no preference file at {path}; give 'builtin', 'hh-rlhf', or a .jsonl/.jsonl.gz/.csv path"
            )
        name = path.name
        records = _read_file(path)
    else:
        name = "memory"
        records = list(source)
    _check_columns(records, name)
    records = _slice(records, start, stop, name)
    report = DropReport()
    pairs = []
    for i, rec in zip(range(start, start + len(records)), records):
        row_id = str(rec.get("id", f"{name}/{i}")) if isinstance(rec, dict) else f"{name}/{i}"
        try:
            pairs.append(_to_pair(rec, row_id, max_chars))
        except PreferenceError as err:
            if strict:
                raise
            report.add(row_id, err.reason, str(err))
    if report.dropped:
        warnings.warn(f"{name}: {report} (see Preferences.report)", stacklevel=2)
    if not pairs:
        raise PreferenceError(f"{name}: no valid preference pairs ({report})")
    return Preferences(pairs, report, name)


#: What a row needs: prompt, chosen and rejected, or HH-style whole dialogues in chosen and rejected.
EXPECTED = "columns prompt, chosen, rejected (or HH-style whole dialogues in chosen and rejected)"


def _check_columns(records: list, name: str) -> None:
    """A source with no rows, or without the columns a pair needs, is one error naming the problem."""
    if not records:
        raise PreferenceError(f"{name} holds no rows; expected rows with {EXPECTED}", "empty source")
    found = set().union(*(r.keys() for r in records if isinstance(r, dict)))
    missing = [c for c in ("chosen", "rejected") if c not in found]
    if missing:
        raise PreferenceError(f"{name} has no {' or '.join(map(repr, missing))} column (it has "
                              f"{sorted(found) or 'none'}); expected {EXPECTED}", "missing columns")


def split_dialogue(text: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt up to and including the last Assistant marker, response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise PreferenceError(f"dialogue has no {ASSISTANT!r} turn", "no assistant turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def _to_pair(rec: Any, row_id: str, max_chars: int | None) -> PreferencePair:
    if not isinstance(rec, dict):
        raise PreferenceError(f"{row_id}: row is a {type(rec).__name__}, not a mapping", "wrong type")
    for key in ("chosen", "rejected"):
        if key not in rec or rec[key] is None:
            raise PreferenceError(f"{row_id}: missing field {key!r}; expected {EXPECTED}", "missing field")
    fields = {k: rec[k] for k in ("prompt", "chosen", "rejected") if rec.get(k) is not None}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise PreferenceError(f"{row_id}: field {key!r} is {type(value).__name__}, not str", "wrong type")
    if "prompt" in fields:
        prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    else:  # HH-style: each side is a whole dialogue; both must share the prompt.
        try:
            prompt, chosen = split_dialogue(fields["chosen"])
            prompt_r, rejected = split_dialogue(fields["rejected"])
        except PreferenceError as err:
            raise PreferenceError(f"{row_id}: {err}", err.reason) from None
        if prompt != prompt_r:
            raise PreferenceError(
                f"{row_id}: chosen and rejected dialogues have different prompts "
                f"({len(prompt)} vs {len(prompt_r)} characters)",
                "differing prompts",
            )
    if not prompt.strip():
        raise PreferenceError(f"{row_id}: empty prompt", "empty prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise PreferenceError(f"{row_id}: empty {key} response", "empty response")
    if chosen == rejected:
        raise PreferenceError(f"{row_id}: chosen and rejected are identical", "identical responses")
    if max_chars is not None and len(prompt) + max(len(chosen), len(rejected)) > max_chars:
        raise PreferenceError(f"{row_id}: longer than max_chars={max_chars}", "over-long")
    category = rec.get("category")
    return PreferencePair(row_id, prompt, chosen, rejected, category if isinstance(category, str) else "")


def _row_range(rows) -> tuple[int, int | None]:
    if rows is None:
        return 0, None
    if isinstance(rows, range):
        if rows.step != 1:
            raise ValueError("rows must be a contiguous range (step 1)")
        return rows.start, rows.stop
    start, stop = rows
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"rows={rows!r}: need 0 <= start < stop")
    return start, stop


def _slice(records: list, start: int, stop: int | None, name: str) -> list:
    if start >= len(records) or (stop is not None and stop > len(records)):
        raise ValueError(f"{name} has {len(records)} rows; rows=({start}, {stop}) is out of range")
    return records[start:stop]


def _builtin_path() -> Path:
    return Path(str(importlib.resources.files("alignlib") / "resources" / "builtin_preferences.jsonl"))


def _read_file(path: Path) -> list[dict]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            out = []
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise PreferenceError(f"{path}: line {n + 1} is not valid JSON ({err.msg})") from err
            return out
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz or .csv")


def _read_hh_rlhf(subset: str, split: str) -> list[dict]:
    """HH-RLHF rows from the local copy named by $ALIGNLIB_HH_RLHF, else from the hub."""
    local = os.environ.get(HH_ENV)
    if local:
        return _read_file(_local_hh_file(Path(local), subset, split))
    from datasets import load_dataset  # the hub path: needs network access

    ds = load_dataset(HH_HUB_ID, data_dir=subset, split=split)
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in ds]


def _local_hh_file(path: Path, subset: str, split: str) -> Path:
    if path.is_file():
        return path
    candidates = [path / subset / f"{split}.jsonl.gz", path / subset / f"{split}.jsonl",
                  path / f"{subset}-{split}.jsonl.gz", path / f"{subset}-{split}.jsonl"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"${HH_ENV}={path}: no {subset}/{split} file there (looked for "
        + ", ".join(str(c) for c in candidates) + "); point it at the .jsonl.gz file itself"
    )


# --------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of prompt+chosen and prompt+rejected, and where each response starts."""

    id: str
    chosen: list[int]
    rejected: list[int]
    chosen_start: int  # index of the first response token in `chosen`
    rejected_start: int
    prompt_truncated: int  # prompt tokens cut from the left to fit max_length
    response_truncated: int = 0  # response tokens cut on request (max_response_tokens), both sides


def encode_pairs(
    tokenizer,
    prefs: Iterable[PreferencePair],
    *,
    max_length: int = 1024,
    chat_template: bool = False,
    add_eos: bool = False,
    max_response_tokens: int | None = None,
) -> list[EncodedPair]:
    """Tokenise pairs so both responses follow the very same prompt ids.

    Prompt and response are tokenised separately and concatenated, so the response tokens are
    exactly the positions scored. When a sequence exceeds ``max_length`` the prompt is cut from the
    left; a response that cannot fit with at least one prompt token is an error, never cut silently.
    ``max_response_tokens`` asks explicitly for responses cut to their first N tokens (training
    does this; the cut is counted in `EncodedPair.response_truncated`).
    ``chat_template`` renders the HH dialogue with the tokenizer's chat template (instruct models).
    """
    out = []
    for p in prefs:
        prompt_ids = _prompt_ids(tokenizer, p.prompt, chat_template)
        responses = [_response_ids(tokenizer, r, chat_template, add_eos) for r in (p.chosen, p.rejected)]
        cut_response = 0
        if max_response_tokens is not None:
            cut_response = sum(max(0, len(r) - max_response_tokens) for r in responses)
            responses = [r[:max_response_tokens] for r in responses]
        longest = max(len(r) for r in responses)
        if longest + 1 > max_length:
            raise PreferenceError(
                f"{p.id}: a response has {longest} tokens, which does not fit max_length={max_length} "
                "with any prompt; raise max_length or drop the pair (load_preferences(max_chars=...))",
                "over-long",
            )
        if any(len(r) == 0 for r in responses):
            raise PreferenceError(f"{p.id}: a response tokenises to nothing", "empty response")
        cut = max(0, len(prompt_ids) + longest - max_length)
        prompt_ids = prompt_ids[cut:]
        n = len(prompt_ids)
        out.append(EncodedPair(p.id, prompt_ids + responses[0], prompt_ids + responses[1], n, n, cut, cut_response))
    return out


def _prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(dialogue_messages(prompt), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _response_ids(tokenizer, response: str, chat_template: bool, add_eos: bool) -> list[int]:
    text = response.strip() if chat_template else response
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def dialogue_messages(prompt: str) -> list[dict[str, str]]:
    """Turn an HH-style prompt into chat messages (the final empty Assistant turn is dropped)."""
    messages = []
    for chunk in prompt.split(HUMAN)[1:]:
        human, *assistant = chunk.split(ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        for a in assistant:
            if a.strip():
                messages.append({"role": "assistant", "content": a.strip()})
    if not messages:
        raise PreferenceError(f"prompt has no {HUMAN!r} turn to render with a chat template")
    return messages


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (shortest first), so that little of a batch is padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def pad_id(tokenizer) -> int:
    """Any valid id serves as padding: padded positions are masked and never scored."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


#: `PackedBatch.segment` values: what each position of a packed row holds.
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


@dataclass
class PackedBatch:
    """Preference pairs packed one per row, prompt + chosen + rejected, right-padded.

    The rejected response attends to the prompt and to itself only, and its positions continue the
    prompt's, so every token has exactly the context it has in its own unpacked sequence, while the
    shared prompt runs once instead of twice: fewer token rows by the prompt's share (about a third
    on HH-RLHF dialogues). Needs an attention implementation that takes a 4-D mask (sdpa, eager).
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    segment: torch.Tensor  # (B, T): PROMPT, CHOSEN, REJECTED, or PAD
    spans: list[tuple[int, int, int]]  # per row: (prompt, chosen, rejected) lengths
    ids: list[str] = field(default_factory=list)  # per row: the pair's id (for error messages)

    @property
    def real(self) -> torch.Tensor:
        return self.segment != PAD

    @property
    def response(self) -> torch.Tensor:
        return (self.segment == CHOSEN) | (self.segment == REJECTED)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.segment.to(device), self.spans,
                           self.ids)

    def allowed(self) -> torch.Tensor:
        """(B, T, T) bool: whether query position i may attend to key position j."""
        seg, width, device = self.segment, self.segment.shape[1], self.segment.device
        ok = torch.ones(width, width, dtype=torch.bool, device=device).tril() & (seg != PAD)[:, None, :]
        ok &= ~((seg == REJECTED)[:, :, None] & (seg == CHOSEN)[:, None, :])
        return ok | torch.eye(width, dtype=torch.bool, device=device)  # a padding query attends to itself

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, T, T) additive mask: 0 where a query may attend to a key, the dtype's minimum elsewhere."""
        return additive(self.allowed(), dtype)[:, None]

    @functools.cached_property
    def predictors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position of the predicting token, position of the response token) of every response token.

        A response token is predicted by the position before it, except the first rejected token,
        which is predicted by the last prompt token, as in its own sequence. Ordinary tensors even
        when first asked for in inference mode, so that gradients can flow through what they index.
        """
        with torch.inference_mode(False):
            rows, cols = self.response.nonzero(as_tuple=True)
            src = cols - 1
            for i, (p, c, _) in enumerate(self.spans):
                src[(rows == i) & (cols == p + c)] = p - 1
        return rows, src, cols


def additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask from a boolean one: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def packed_length(e: EncodedPair) -> int:
    return len(e.chosen) + len(e.rejected) - e.chosen_start


def pack_pairs(encoded: Sequence[EncodedPair], pad_id: int) -> PackedBatch:
    """Pack each pair into one row (see `PackedBatch`); both responses must follow the same prompt ids."""
    width = max(packed_length(e) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(encoded), width), dtype=torch.long)
    segment = torch.full((len(encoded), width), PAD, dtype=torch.long)
    spans = []
    for b, e in enumerate(encoded):
        p = e.chosen_start
        if e.rejected_start != p or e.chosen[:p] != e.rejected[:p]:
            raise ValueError(f"{e.id}: chosen and rejected do not follow the same prompt ids, so the pair "
                             "cannot be packed; encode it with encode_pairs")
        if p < 1:
            raise ValueError(f"{e.id}: no prompt token to predict the first response token")
        c, r = len(e.chosen) - p, len(e.rejected) - p
        input_ids[b, : p + c + r] = torch.tensor(e.chosen + e.rejected[p:])
        position_ids[b, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        segment[b, :p], segment[b, p : p + c], segment[b, p + c : p + c + r] = PROMPT, CHOSEN, REJECTED
        spans.append((p, c, r))
    return PackedBatch(input_ids, position_ids, segment, spans, [e.id for e in encoded])
