"""puremesh.supervised: the shared optimisation, the batches, SFT and PRM training, the step-labelled
data and its layout (equal to the PRM service's, token for token and score for score), and AUC
on hand-derived cases. Real tiny models from tests/conftest.py."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from puremesh.services.prm.scorer import PrmScorer
from puremesh.supervised.prm import auc, evaluate_prm, load_base, step_scores, train_prm
from puremesh.supervised.prm_data import PrmLayout, StepRecord, load_records, parse_record
from puremesh.supervised.sft import IGNORE_INDEX, lm_batch, sft_rows, train_causal_lm
from puremesh.supervised.training import BATCHES_PER_WINDOW, SupervisedTraining, length_batches

RECORD = {
    "prompt": "Question: 2 + 3?\n",
    "steps": ["2 + 3 = 5", "The answer is \\boxed{5}"],
    "labels": [1, 1],
}


def test_length_batches_cover_each_row_once_in_sorted_windows() -> None:
    lengths = [random.Random(i).randint(1, 50) for i in range(203)]
    batches = length_batches(lengths, 4, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(203))
    assert all(1 <= len(batch) <= 4 for batch in batches)
    for batch in batches:  # each batch is a slice of one length-sorted window
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert len(batches) == sum(math.ceil(len(w) / 4) for w in _windows(203, 4 * BATCHES_PER_WINDOW))
    assert batches == length_batches(lengths, 4, random.Random(0))
    assert batches != length_batches(lengths, 4, random.Random(1))


def _windows(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def test_supervised_training_schedule_clipping_and_loss_window() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    lines: list[str] = []
    training = SupervisedTraining(model, total=40, lr=1.0, name="t", log=lines.append, log_every=10)
    assert model.training
    # warm-up over 40 // 20 = 2 steps, then cosine: lr(s) = min(1, (s+1)/2) * (1 + cos(pi s / 40)) / 2
    assert training.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    losses = []
    for step in range(1, 41):
        loss = (model(torch.ones(1, 3)) * 1000).sum()  # a huge gradient: clipped to norm 1
        losses.append(loss.item())
        training.step(step, loss)
        expected = min(1.0, (step + 1) / 2) * 0.5 * (1 + math.cos(math.pi * step / 40))
        assert training.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert [line.split()[2] for line in lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert training.last == pytest.approx(sum(losses[30:]) / 10)


def test_lm_batch_masks_prompt_and_padding() -> None:
    batch = lm_batch([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_sft_learns_and_is_deterministic(tiny_policy_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_policy_dir), local_files_only=True)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": RECORD["prompt"], "solution": "\n\n".join(RECORD["steps"])}) + "\n")
    [(ids, mask)] = sft_rows(tokenizer, data)
    prompt_len = len(tokenizer.encode(RECORD["prompt"], add_special_tokens=False))
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len) and ids[-1] == tokenizer.eos_token_id

    def trained() -> tuple[float, torch.nn.Module]:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_policy_dir), local_files_only=True)
        loss = train_causal_lm(model, [(ids, mask)] * 8, steps=30, batch_size=4, lr=3e-3, seed=0, pad_id=0)
        return loss, model

    first_loss, first = trained()
    second_loss, second = trained()
    assert not first.training
    assert first_loss < 0.5 * math.log(len(tokenizer))  # far below a random model's loss
    assert first_loss == second_loss
    weights = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ([1], "expected an object"),
        ({"steps": ["a"], "labels": [1]}, "'prompt' must be a string"),
        ({"prompt": "p", "steps": [], "labels": []}, "'steps' must be a non-empty list"),
        ({"prompt": "p", "steps": ["a\n\nb"], "labels": [1]}, "blank line"),
        ({"prompt": "p", "steps": ["a"], "labels": [1.0]}, "'labels' must be a list of 0/1"),
        ({"prompt": "p", "steps": ["a", "b"], "labels": [1]}, "2 steps but 1 labels"),
    ],
)
def test_parse_record_rejects_malformed_rows(row: object, why: str) -> None:
    with pytest.raises(ValueError, match="where: ") as error:
        parse_record(row, "where")
    assert why in str(error.value)


def test_load_records_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(RECORD) + "\n\n" + "{not json\n")
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        load_records(path)
    path.write_text(json.dumps(RECORD) + "\n\n")
    assert load_records(path) == [StepRecord(RECORD["prompt"], tuple(RECORD["steps"]), (1, 1))]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_records(path)


def test_layout_and_scores_equal_the_prm_service(tiny_prm_dir: Path) -> None:
    model, tokenizer = load_base(tiny_prm_dir)
    layout = PrmLayout(tokenizer)
    scorer = PrmScorer(tiny_prm_dir, device="cpu", dtype="float32")
    record = parse_record(RECORD, "record")
    encoded = layout.encode(record)
    response = [*scorer.tokenize("\n\n".join(record.steps)), scorer.eos_id]
    _, input_ids, positions = scorer.prepare(scorer.tokenize(record.prompt), response)
    assert (encoded.input_ids, encoded.positions) == (input_ids, positions)
    assert all(encoded.input_ids[p] == layout.newline_id for p in encoded.positions)
    [(_, served)] = scorer.score_responses([(scorer.tokenize(record.prompt), response)])
    assert step_scores(model, [encoded])[0] == pytest.approx(served, abs=1e-5)
    with pytest.raises(ValueError, match="tokenise into 3 steps, not 2"):
        layout.encode(StepRecord("p", ("a", "\n\nb"), (1, 1)))  # a separator hidden in a step


def test_train_prm_separates_right_from_wrong_steps(tiny_prm_dir: Path) -> None:
    model, tokenizer = load_base(tiny_prm_dir)
    layout = PrmLayout(tokenizer)
    rng = random.Random(0)
    records = []
    for _ in range(32):
        a, b = rng.randint(10, 40), rng.randint(2, 9)
        right = rng.random() < 0.5
        step = f"{a} + {b} = {a + b if right else a + b + 5}"
        records.append(StepRecord(f"Question: {a} + {b}?\n", (step,), (int(right),)))
    rows = [layout.encode(r) for r in records]
    before = evaluate_prm(model, rows)
    train_prm(model, rows, epochs=30, lr=3e-3, batch_size=8, seed=0)
    after = evaluate_prm(model, rows)
    assert after.steps == 32 and not model.training
    assert after.auc > max(0.9, before.auc)


def test_auc_hand_cases() -> None:
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count one half
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the sklearn docs' example
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
