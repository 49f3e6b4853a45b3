"""PRM layouts as settings (contract/steps.py StepLayout): PURE's ("\\n" after each step, the
softmax difference) and a dedicated tag token with the positive-class read-out (Qwen2.5-Math-PRM's
kind), each on a tiny PRM trained by `puremesh prm-train`, which writes its layout into the model
directory; serving picks it up (scorer and service), and training and serving read the same
scores. Also: a one-logit head (sigmoid read-out), refusals, and the settings' override."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForTokenClassification

from puremesh.cli.main import main
from puremesh.contract import steps as layout
from puremesh.rpc.server import ServiceHost
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.client import PrmClient
from puremesh.services.prm.scorer import PrmScorer
from puremesh.services.prm.settings import PrmSettings
from puremesh.supervised import prm
from puremesh.supervised.prm_data import PrmLayout, load_records
from puremesh.tinyworld.models import build_policy

TAG = "<step>"
PROMPT = "Question: 2 + 3?\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prm-data") / "steps.jsonl"
    rows = []
    for a in range(1, 9):
        for b in range(1, 4):
            right = (a + b) % 2 == 0
            step = f"{a} + {b} = {a + b if right else a + b + 1}"
            rows.append(
                {"prompt": f"Question: {a} + {b}?\n", "steps": [step, "so"], "labels": [int(right), 1]}
            )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tag_base(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny policy whose tokenizer has a dedicated step tag token."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [TAG]})
    out = tmp_path_factory.mktemp("tag-base")
    build_policy(out, tokenizer, seed=0)
    return out


def train(base: Path, data: Path, out: Path, *flags: str) -> Path:
    argv = ["prm-train", "--data", str(data), "--base", str(base), "--out", str(out), "--epochs", "2"]
    assert main([*argv, "--batch-size", "8", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def pure_prm(tmp_path_factory, tiny_policy_dir, data) -> Path:
    return train(tiny_policy_dir, data, tmp_path_factory.mktemp("pure-prm"))


@pytest.fixture(scope="module")
def tag_prm(tmp_path_factory, tag_base, data) -> Path:
    out = tmp_path_factory.mktemp("tag-prm")
    return train(tag_base, data, out, "--step-tag", TAG, "--readout", "positive")


def test_prm_training_writes_its_layout_and_serving_picks_it_up(pure_prm, tag_prm) -> None:
    pure = layout.StepLayout.from_json((pure_prm / layout.LAYOUT_FILE).read_text())
    assert pure == layout.StepLayout("\n", layout.Readout.DIFFERENCE)
    tagged = layout.StepLayout.from_json((tag_prm / layout.LAYOUT_FILE).read_text())
    assert tagged == layout.StepLayout(TAG, layout.Readout.POSITIVE)
    assert PrmScorer(pure_prm).layout == pure and PrmScorer(tag_prm).layout == tagged


@pytest.mark.parametrize("which", ["pure", "tag"])
def test_training_and_serving_read_the_same_scores_at_the_tag(which, pure_prm, tag_prm, data) -> None:
    directory = pure_prm if which == "pure" else tag_prm
    scorer = PrmScorer(directory)
    tag_id = scorer.tokenize(scorer.layout.step_tag)[0]
    assert scorer.newline_id == tag_id and scorer.tokenizer.decode([tag_id]) == scorer.layout.step_tag
    rows = [PrmLayout(scorer.tokenizer, scorer.layout).encode(r) for r in load_records(data)[:6]]
    trained = prm.step_scores(scorer.model, rows, readout=scorer.layout.readout)
    for row, expected in zip(rows, trained, strict=True):
        assert [row.input_ids[p] for p in row.positions] == [tag_id] * len(row.positions)
        [served] = scorer.score([(row.input_ids, row.positions)])
        assert served == pytest.approx(expected, abs=1e-5)
        with torch.no_grad():
            z = scorer.model(input_ids=torch.tensor([row.input_ids])).logits[0, row.positions].float()
        p = torch.softmax(z, -1)[:, 1]
        # for a two-label head both read-outs give p1 - p0 = 2 p1 - 1
        assert served == pytest.approx((2 * p - 1).tolist(), abs=1e-5)
    # the response's "\n\n" separators are replaced by the tag
    prompt_ids = scorer.tokenize(PROMPT)
    _, input_ids, positions = scorer.prepare(prompt_ids, scorer.tokenize("2 + 3 = 5\n\nso"))
    assert [input_ids[p] for p in positions] == [tag_id, tag_id]
    assert input_ids[len(prompt_ids) :].count(tag_id) == 2


async def test_the_service_reports_and_uses_the_trained_layout(tag_prm) -> None:
    settings = PrmSettings(model_path=str(tag_prm), max_wait_ms=5)
    host = ServiceHost([prm_service(settings)], settings.server)
    await host.start()
    try:
        async with PrmClient(host.target) as client:
            identity = await client.describe_tokenizer()
            [result] = await client.score([(PROMPT, "2 + 3 = 5\n\nso")])
    finally:
        await host.drain(grace=1)
    assert (identity.step_tag, identity.readout) == (TAG, "positive")
    scorer = PrmScorer(tag_prm)
    [(_, expected)] = scorer.score_responses([(scorer.tokenize(PROMPT), scorer.tokenize("2 + 3 = 5\n\nso"))])
    assert result.scores == pytest.approx(expected, abs=1e-5) and len(result.steps) == 2


def test_settings_override_the_model_directorys_layout(tag_prm, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="puremesh.services.prm.scorer"):
        scorer = PrmScorer(tag_prm, step_tag="\n", readout=layout.Readout.DIFFERENCE)
    assert scorer.layout == layout.StepLayout() and scorer.newline_id == scorer.tokenize("\n")[0]
    assert "not the" in caplog.text and "it was trained with" in caplog.text


def test_a_one_logit_head_reads_the_sigmoid(tmp_path, tiny_tokenizer_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    policy = tmp_path / "policy"
    build_policy(policy, tokenizer, seed=1)
    model = Qwen2ForTokenClassification.from_pretrained(str(policy), num_labels=1)
    model.save_pretrained(str(tmp_path / "prm"))
    tokenizer.save_pretrained(str(tmp_path / "prm"))
    with pytest.raises(ValueError, match="readout 'difference' needs a PRM with 2 labels, this one has 1"):
        PrmScorer(tmp_path / "prm")
    (tmp_path / "prm" / layout.LAYOUT_FILE).write_text(
        layout.StepLayout(readout=layout.Readout.POSITIVE).to_json()
    )
    scorer = PrmScorer(tmp_path / "prm")
    _, input_ids, positions = scorer.prepare(scorer.tokenize(PROMPT), scorer.tokenize("2 + 3 = 5\n\nso"))
    [scores] = scorer.score([(input_ids, positions)])
    with torch.no_grad():
        z = scorer.model(input_ids=torch.tensor([input_ids])).logits[0, positions, 0]
    assert scores == pytest.approx((2 * torch.sigmoid(z) - 1).tolist(), abs=1e-5)


def test_read_score_and_layout_files() -> None:
    assert layout.read_score([0.0, 2.0], layout.Readout.DIFFERENCE) == pytest.approx(math.tanh(1.0))
    assert layout.read_score([0.0, 2.0], layout.Readout.POSITIVE) == pytest.approx(math.tanh(1.0))
    three = [1.0, 2.0, 3.0]  # three labels: p = softmax(z)_1, not p1 - p0
    p1 = math.exp(2) / sum(math.exp(z) for z in three)
    assert layout.read_score(three, layout.Readout.POSITIVE) == pytest.approx(2 * p1 - 1)
    assert layout.read_score([0.0], layout.Readout.POSITIVE) == 0.0
    tagged = layout.StepLayout("<extra_0>", layout.Readout.POSITIVE)
    assert layout.StepLayout.from_json(tagged.to_json()) == tagged
    for bad in (
        "{",
        '{"step_tag": "\\n"}',
        '{"step_tag": "", "readout": "difference"}',
        '{"step_tag": "x", "readout": "max"}',
    ):
        with pytest.raises(ValueError, match=r"f\.json: "):
            layout.StepLayout.from_json(bad, "f.json")


def test_prm_train_refuses_a_tag_that_is_not_one_token(tiny_policy_dir, data, tmp_path, capsys) -> None:
    argv = ["prm-train", "--data", str(data), "--base", str(tiny_policy_dir), "--out", str(tmp_path / "o")]
    assert main([*argv, "--step-tag", "<no such tag>"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step tag '<no such tag>' as one token" in err and "\n" not in err
