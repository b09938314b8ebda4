"""Prompt templates: how a record becomes a prompt (source) text and a response (target) text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resofilter_jax.data.records import Record

__all__ = ["TEMPLATES", "Template", "TemplateError", "get_template", "user_query"]


class TemplateError(ValueError):
    """Raised when a template cannot render a record."""


def user_query(record: Record) -> str:
    """The user's message: instruction, plus "\\n" + input when there is an input."""
    return f"{record.instruction}\n{record.input}" if record.input else record.instruction


@dataclass(frozen=True)
class Template:
    """A named pair of functions giving the prompt and the response text of a record.

    Attributes:
        name: Registry name.
        prompt_fn: Record -> prompt text (everything before the response).
        response_fn: Record -> response text.
    """

    name: str
    prompt_fn: Callable[[Record], str]
    response_fn: Callable[[Record], str]

    def prompt(self, record: Record) -> str:
        """The prompt (source) text of ``record``."""
        return self.prompt_fn(record)

    def response(self, record: Record) -> str:
        """The response (target) text of ``record``."""
        return self.response_fn(record)


def _output(record: Record) -> str:
    return record.output


def _none_prompt(record: Record) -> str:
    # Superfiltering's plain prompt; the system prompt is not used.
    if record.input:
        return f"{record.instruction}\n{record.input}\n"
    return f"{record.instruction}\n"


_ALPACA_INTRO_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
_ALPACA_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


def _alpaca_prompt(record: Record) -> str:
    # Stanford Alpaca prompt; the system prompt is not used.
    if record.input:
        return (
            f"{_ALPACA_INTRO_INPUT}### Instruction:\n{record.instruction}\n\n"
            f"### Input:\n{record.input}\n\n### Response:"
        )
    return f"{_ALPACA_INTRO}### Instruction:\n{record.instruction}\n\n### Response:"


def _gemma_prompt(record: Record) -> str:
    query = user_query(record)
    if record.system:
        query = f"{record.system}\n\n{query}"
    return f"<start_of_turn>user\n{query}<end_of_turn>\n"


def _gemma_response(record: Record) -> str:
    return f"<start_of_turn>model\n{record.output}<end_of_turn>"


def _chatml_prompt(record: Record) -> str:
    system = f"<|im_start|>system\n{record.system}<|im_end|>\n" if record.system else ""
    return f"{system}<|im_start|>user\n{user_query(record)}<|im_end|>\n"


def _chatml_response(record: Record) -> str:
    return f"<|im_start|>assistant\n{record.output}<|im_end|>"


def _messages(record: Record) -> list[dict[str, str]]:
    """Chat messages (system if any, then the user query) for ``apply_chat_template``."""
    messages = [{"role": "system", "content": record.system}] if record.system else []
    messages.append({"role": "user", "content": user_query(record)})
    return messages


def _chat_template(tokenizer: Any) -> Template:
    """Template that renders with the tokenizer's own chat template."""
    if tokenizer is None:
        raise TemplateError("template 'chat' needs a tokenizer with a chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"{type(tokenizer).__name__} has no chat_template; pick a template")

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        if not isinstance(text, str):
            raise TemplateError(f"apply_chat_template returned {type(text).__name__}, not str")
        return text

    def prompt(record: Record) -> str:
        return render(_messages(record), True)

    def response(record: Record) -> str:
        messages = _messages(record)
        head = render(messages, True)
        full = render([*messages, {"role": "assistant", "content": record.output}], False)
        if not full.startswith(head):
            raise TemplateError(
                "the chat template's rendering of the full conversation does not start with "
                f"its generation prompt (record {record.index}); the response cannot be split "
                "off. Prompt ends with "
                f"{head[-40:]!r}, full text has {full[len(head) - 40 : len(head)]!r} there"
            )
        return full[len(head) :]

    return Template("chat", prompt, response)


_STATIC = {
    "none": Template("none", _none_prompt, _output),
    "alpaca": Template("alpaca", _alpaca_prompt, _output),
    "gemma": Template("gemma", _gemma_prompt, _gemma_response),
    "chatml": Template("chatml", _chatml_prompt, _chatml_response),
}
TEMPLATES = (*_STATIC, "chat")


def get_template(name: str | Template, tokenizer: Any = None) -> Template:
    """Returns a template by name (``none``, ``alpaca``, ``gemma``, ``chatml``, ``chat``).

    Templates:
        none: prompt ``"{instruction}\\n{input}\\n"`` (or ``"{instruction}\\n"``),
            response = output (Superfiltering).
        alpaca: the Stanford Alpaca prompt ending in ``"### Response:"``, response = output.
        gemma: ``"<start_of_turn>user\\n{query}<end_of_turn>\\n"`` /
            ``"<start_of_turn>model\\n{output}<end_of_turn>"``; the system prompt, if any,
            is put before the query followed by a blank line.
        chatml: optional system block, ``"<|im_start|>user\\n{query}<|im_end|>\\n"`` /
            ``"<|im_start|>assistant\\n{output}<|im_end|>"``.
        chat: the tokenizer's chat template; prompt = rendering with the generation prompt,
            response = what the full conversation's rendering adds after the prompt.

    ``query`` is the instruction plus ``"\\n" + input`` when there is an input. ``none`` and
    ``alpaca`` ignore the system prompt. A :class:`Template` is returned unchanged.

    Raises:
        TemplateError: For an unknown name, or ``chat`` without a usable tokenizer.
    """
    if isinstance(name, Template):
        return name
    if name == "chat":
        return _chat_template(tokenizer)
    try:
        return _STATIC[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; choose from {TEMPLATES}") from None
