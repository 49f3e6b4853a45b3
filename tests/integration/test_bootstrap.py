"""The tiny world's bootstrap (quick variant): artefacts load and work, the held-out set is disjoint
from training by arithmetic content, the cache is reused fast, and `puremesh prm-train` trains a
PRM from step-labelled JSONL and rejects a malformed file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from puremesh.cli.main import main
from puremesh.services.prm.scorer import PrmScorer
from puremesh.tinyworld.task import parse_question
from puremesh.tinyworld.world import BootstrapConfig, TinyWorld, bootstrap, load_world
from puremesh.trainer.data import format_prompt, load_problems

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    lines: list[str] = []
    built = bootstrap(tmp_path_factory.mktemp("cache") / "tinyworld", quick=True, log=lines.append)
    assert not built.reused
    assert any("[5/5]" in line for line in lines), lines
    return built


def test_task_files(world: TinyWorld) -> None:
    train, heldout = load_problems(world.train_path), load_problems(world.heldout_path)
    assert len(heldout) >= 1000
    assert not {p.question for p in train} & {p.question for p in heldout}
    # disjoint by arithmetic content too: no held-out chain of operations is trained on
    assert not {parse_question(p.question) for p in train} & {parse_question(p.question) for p in heldout}
    assert all(p.answer is not None and int(p.answer) >= 0 for p in heldout)
    sft = [json.loads(line) for line in world.sft_path.read_text().splitlines()]
    assert {row["correct"] for row in sft} == {True, False}  # a mix of right and flawed solutions
    assert 0 < sum(row["pads"] > 0 for row in sft) < len(sft)  # some solutions pad, most do not
    assert all("\\boxed{" in row["solution"] and "\n\n" in row["solution"] for row in sft)
    prm = [json.loads(line) for line in world.prm_data_path.read_text().splitlines()]
    for row in prm:
        assert len(row["steps"]) == len(row["labels"])
        # first-error labelling: once a step is wrong, every later step is labelled 0
        assert row["labels"] == sorted(row["labels"], reverse=True)


def test_policy_generates_steps(world: TinyWorld) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(world.policy_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(world.policy_dir), local_files_only=True)
    question = load_problems(world.heldout_path)[0].question
    encoded = tokenizer(format_prompt(question), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=80, do_sample=False)
    text = tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "\n\n" in text and text.startswith("First, "), text
    assert 0.0 <= world.greedy_accuracy <= 1.0 and world.greedy_problems > 0


def test_prm_scores_with_the_service_scorer(world: TinyWorld) -> None:
    scorer = PrmScorer(world.prm_dir)
    row = json.loads(world.prm_data_path.read_text().splitlines()[0])
    response = [*scorer.tokenize("\n\n".join(row["steps"])), scorer.eos_id]
    [(spans, scores)] = scorer.score_responses([(scorer.tokenize(row["prompt"]), response)])
    assert len(spans) == len(scores) == len(row["steps"])
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert 0.0 <= world.prm_step_accuracy <= 1.0


def test_cache_is_reused_fast(world: TinyWorld) -> None:
    began = time.perf_counter()
    again = bootstrap(world.root, quick=True, log=lambda _: None)
    assert time.perf_counter() - began < 2.0
    assert again.reused and again.policy_dir == world.policy_dir
    assert again.greedy_accuracy == world.greedy_accuracy
    # another configuration does not reuse it
    assert load_world(world.root, BootstrapConfig()) is None


def test_prm_train_command(world: TinyWorld, tmp_path: Path, capsys) -> None:
    data = tmp_path / "steps.jsonl"
    data.write_text("\n".join(world.prm_data_path.read_text().splitlines()[:24]) + "\n")
    out = tmp_path / "prm"
    code = main(
        [
            "prm-train",
            "--data",
            str(data),
            "--base",
            str(world.policy_dir),
            "--out",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    assert code == 0
    assert "prm step 3/3" in capsys.readouterr().err
    scorer = PrmScorer(out)
    assert scorer.model.config.num_labels == 2
    capsys.readouterr()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        data.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "p", "steps": ["a"]}) + "\n"
    )
    code = main(["prm-train", "--data", str(bad), "--base", str(world.policy_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"{bad}:2" in err[0], err
