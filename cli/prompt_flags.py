"""The prompt template on the command line: the learner's PromptSettings (trainer/settings.py)
as flags, for `puremesh eval` and for the clients' text paths (`puremesh score`, `puremesh
generate`), with the same checks; a bad template is one CliError line."""

from __future__ import annotations

import argparse

from puremesh.trainer.data import PromptTemplate, TemplatePreset
from puremesh.trainer.settings import PromptSettings

from .errors import CliError


def add_template_flags(parser: argparse.ArgumentParser, default: str | None, chat: bool) -> None:
    """--template PRESET and --prompt-format; with `chat`, --chat-template and --system-prompt.
    `default` None: no template unless a flag asks for one (the text is sent as given)."""
    parser.add_argument(
        "--template",
        choices=[str(t) for t in TemplatePreset],
        default=default,
        help="prompt template preset: PURE's, or the tiny world's"
        + (" (default: %(default)s)" if default else " (default: the text as given)"),
    )
    parser.add_argument(
        "--prompt-format", default="", help="a format string with {question}; replaces the preset"
    )
    if chat:
        parser.add_argument(
            "--chat-template",
            action="store_true",
            help="wrap the prompt in the model tokenizer's chat template",
        )
        parser.add_argument("--system-prompt", default="", help="the chat template's system turn")


def prompt_template(args: argparse.Namespace) -> PromptTemplate | None:
    """The flags' template (None when no flag asks for one); CliError in one line."""
    if args.template is None and not args.prompt_format:
        return None
    try:
        return PromptSettings(
            preset=args.template or TemplatePreset.PURE,
            template=args.prompt_format,
            chat_template=getattr(args, "chat_template", False),
            system_prompt=getattr(args, "system_prompt", ""),
        ).prompt_template()
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        reason = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
        raise CliError(f"prompt template: {reason.removeprefix('Value error, ')}") from None
