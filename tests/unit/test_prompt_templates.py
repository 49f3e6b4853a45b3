"""Prompt templates as settings (trainer/data.py PromptTemplate, trainer/settings.py
PromptSettings): the presets, a format string, the chat template with a system prompt, the
refusals in one line (settings and `puremesh eval`), and the learner's prompt ids."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import qwen2
from transformers import AutoTokenizer

from puremesh.cli.main import main
from puremesh.rpc.settings import SettingsError, load_settings
from puremesh.trainer.data import PROMPT_TEMPLATE, PURE_TEMPLATE, PromptTemplate, TemplatePreset
from puremesh.trainer.loop import Learner
from puremesh.trainer.settings import LearnerSettings, PromptSettings

PURE_PROMPT = (
    'What is 2 + 3?\n\nPlease reason step by step with steps separated by "\\n\\n", and put your final '
    "answer within \\boxed{}."
)


@pytest.fixture(scope="module")
def qwen_tokenizer(request):
    return AutoTokenizer.from_pretrained(str(qwen2.cached_dir(request.config)), local_files_only=True)


def test_presets_render_pure_and_the_tiny_world_prompt() -> None:
    pure = PromptSettings(preset=TemplatePreset.PURE).prompt_template()
    assert pure == PromptTemplate(PURE_TEMPLATE) and not pure.chat
    assert pure.render("  What is 2 + 3?\n") == PURE_PROMPT
    tiny = PromptSettings().prompt_template()  # the default keeps the tiny world's prompt
    assert tiny.render("What is 2 + 3?") == PROMPT_TEMPLATE.format(question="What is 2 + 3?")


def test_a_format_string_replaces_the_preset() -> None:
    template = PromptSettings(preset="pure", template="Q: {question}\nA (in \\boxed{{}}):").prompt_template()
    assert template.render(" 1+1 ") == "Q: 1+1\nA (in \\boxed{}):"


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("Solve it step by step.", "has no {question} field"),
        ("{problem}", "has no {question} field"),
        ("{question} and {answer}", "fields other than {question}: {answer}"),
        ("{question", "is not a format string"),
    ],
)
def test_a_template_without_question_is_refused_in_one_line(tmp_path, template, why) -> None:
    config = tmp_path / "learner.yaml"
    config.write_text(f"policy_path: p\ntrain_path: t\nprompt:\n  template: {template!r}\n")
    with pytest.raises(SettingsError) as error:
        load_settings(LearnerSettings, config)
    message = str(error.value)
    assert message.startswith("invalid setting prompt:") and why in message and "\n" not in message


def test_a_system_prompt_needs_the_chat_template() -> None:
    with pytest.raises(ValueError, match="needs the chat template"):
        PromptSettings(system_prompt="You are careful.")


def test_the_chat_template_wraps_the_prompt_with_a_system_turn(qwen_tokenizer) -> None:
    settings = PromptSettings(preset="pure", chat_template=True, system_prompt="You are careful.")
    text = settings.prompt_template().render("What is 2 + 3?", qwen_tokenizer)
    assert text == (
        "<|im_start|>system\nYou are careful.<|im_end|>\n"
        f"<|im_start|>user\n{PURE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = qwen_tokenizer(text)["input_ids"]
    assert ids[0] == qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, not text
    no_system = (
        PromptSettings(preset="pure", chat_template=True).prompt_template().render("Q", qwen_tokenizer)
    )
    assert no_system.startswith("<|im_start|>user\nQ\n\n")


def test_the_chat_template_needs_a_tokenizer_that_has_one(tiny_tokenizer_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    with pytest.raises(ValueError, match="the tokenizer has none"):
        PromptTemplate(chat=True).render("Q", tokenizer)


def test_the_learner_encodes_its_questions_with_the_template(qwen_tokenizer) -> None:
    settings = LearnerSettings(policy_path="p", train_path="t", prompt=PromptSettings(preset="pure"))
    learner = SimpleNamespace(settings=settings, tokenizer=qwen_tokenizer)
    ids = Learner.encode(learner, "What is 2 + 3?")  # type: ignore[arg-type]
    assert ids == qwen_tokenizer(PURE_PROMPT)["input_ids"]
    assert qwen_tokenizer.decode(ids) == PURE_PROMPT


def test_puremesh_eval_refuses_a_bad_template_in_one_line(tiny_policy_dir, tmp_path, capsys) -> None:
    data = tmp_path / "set.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    argv = ["eval", "--model", str(tiny_policy_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "--prompt-format", "no field here"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no {question} field" in err
    assert main([*argv, "--chat-template"]) == 2  # the tiny tokenizer has no chat template
    assert "has no chat template" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["score", "--question", "Q", "--response", "R"], ["generate", "--prompt", "Q"]]
)
def test_the_clients_refuse_a_bad_template_in_one_line(command, capsys) -> None:
    # refused before any connection is made (the target is never dialled)
    assert main([*command, "--target", "127.0.0.1:1", "--prompt-format", "{answer}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no {question} field" in err
