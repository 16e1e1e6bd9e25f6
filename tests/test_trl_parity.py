"""alignlib's hand-written DPO loss equals TRL's `DPOTrainer` loss on the same batch.

`alignlib.tuning` trains with its own loop (packed pairs, a shared prompt, vocabulary projection only
at response positions) rather than TRL, for speed on a small CPU. This test is why users can trust
it: on the same token ids, with the same policy and reference, alignlib's summed response log-probs
and its `dpo_loss` agree with what TRL computes (unpacked sequences, its own label shift and
masking), to float32 rounding. TRL is a test-only dependency (requirements-test.txt).

TRL always appends EOS to string responses, so the first check encodes with ``add_eos=True``; the
second feeds the loop's own encoding (the tiny recipe's: no EOS, prompt cut from the left,
responses cut) to TRL's collator. TRL's ``max_length=None``: it never truncates, so only alignlib's cuts apply.
"""

import copy

import pytest
import torch

pytest.importorskip("trl", reason="TRL is a test-only dependency: pip install -r requirements-test.txt")

from datasets import Dataset
from trl import DPOConfig as TRLConfig, DPOTrainer

from alignlib.builtin import TINY_DPO
from alignlib.data import encode_pairs
from alignlib.tuning import dpo_loss

BETA = TINY_DPO.beta  # the recipe that built the tiny pair's tuned model


def pair_logps(model, encoded) -> torch.Tensor:
    """(n, 2) summed (chosen, rejected) response log-probs, as alignlib's DPO loop computes them.

    The one place that names alignlib's log-prob function (to change if it is renamed).
    """
    from alignlib.tuning import _pair_logprobs

    return _pair_logprobs(model, encoded, model.config.pad_token_id or 0)  # padding is masked: any id serves


def check_parity(trainer, batch, encoded, tiny):
    """TRL's loss, metrics and per-pair log-probs on ``batch`` equal alignlib's on ``encoded`` (same order)."""
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        trl_policy = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch), 1)  # TRL's log-prob path
        trl_ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, batch), 1)
        policy, ref = pair_logps(tiny.tuned, encoded), pair_logps(tiny.base, encoded)
    # the log-probs: same tokens scored, same shift, summed not averaged (any such slip is >= 0.1 nat)
    torch.testing.assert_close(trl_policy.double(), policy, rtol=1e-5, atol=0)
    torch.testing.assert_close(trl_ref.double(), ref, rtol=1e-5, atol=0)
    # the formula and the batch mean: dpo_loss on TRL's own log-probs is TRL's loss (bit-equal as measured)
    same = dpo_loss(trl_policy[:, 0], trl_policy[:, 1], trl_ref[:, 0], trl_ref[:, 1], BETA)
    torch.testing.assert_close(trl_loss, same.mean(), rtol=1e-6, atol=0)
    # end to end: alignlib's loss is TRL's. The sums (~400 nats) carry float32 rounding (~3e-5 nats), which
    # moves a small loss by up to ~1e-5 of itself (measured: 2e-6); a real slip moves it by > 1e-3 of itself.
    ours = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], BETA)
    torch.testing.assert_close(trl_loss.double(), ours.mean(), rtol=1e-4, atol=0)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}  # what compute_loss itself used
    assert metrics["logps/chosen"] == pytest.approx(policy[:, 0].mean().item(), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(policy[:, 1].mean().item(), rel=1e-5)
    margin = BETA * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    assert metrics["rewards/margins"] == pytest.approx(margin.mean().item(), rel=1e-5, abs=1e-5)


def test_alignlib_dpo_loss_and_logps_equal_trl(tiny, builtin_prefs, tmp_path):
    prefs = builtin_prefs[:8]
    args = TRLConfig(output_dir=str(tmp_path), beta=BETA, loss_type="sigmoid", max_length=None,
                     per_device_train_batch_size=len(prefs), report_to=[], eval_strategy="no",
                     use_cpu=True, bf16=False, activation_checkpointing=False)
    data = Dataset.from_list([dict(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in prefs])
    # copies: TRL patches its models' forward (fused LM head) and config
    trainer = DPOTrainer(model=copy.deepcopy(tiny.tuned), ref_model=copy.deepcopy(tiny.base), args=args,
                         train_dataset=data, processing_class=tiny.tokenizer)

    # 1. TRL's own tokenisation and dataloader: every sequence is alignlib's, with the EOS TRL appends
    encoded = encode_pairs(tiny.tokenizer, prefs, max_length=1024, add_eos=True)
    batch = next(iter(trainer.get_train_dataloader()))  # one batch of all pairs: chosen rows, then rejected
    rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    chosen = [tuple(e.chosen) for e in encoded]
    assert sorted(rows[: len(prefs)]) == sorted(chosen), "TRL tokenised prompt+chosen differently"
    order = [chosen.index(r) for r in rows[: len(prefs)]]  # the dataloader shuffles
    assert rows[len(prefs):] == [tuple(encoded[i].rejected) for i in order], "TRL tokenised rejected differently"
    completion = batch["completion_mask"][: len(prefs)].sum(1).tolist()
    assert completion == [len(encoded[i].chosen) - encoded[i].chosen_start for i in order]
    check_parity(trainer, batch, [encoded[i] for i in order], tiny)

    # 2. The loop's own encoding (the tiny recipe's cuts, no EOS) through TRL's collator
    encoded = encode_pairs(tiny.tokenizer, prefs, max_length=TINY_DPO.max_length,
                           max_response_tokens=TINY_DPO.max_response_tokens)
    assert any(e.prompt_truncated for e in encoded) and any(e.response_truncated for e in encoded)
    batch = trainer.data_collator([dict(prompt_ids=e.chosen[: e.chosen_start], chosen_ids=e.chosen[e.chosen_start:],
                                        rejected_ids=e.rejected[e.rejected_start:]) for e in encoded])
    check_parity(trainer, batch, encoded, tiny)
