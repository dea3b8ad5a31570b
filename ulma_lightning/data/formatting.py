"""Turning prompts and responses into the text the model sees.

With a tokenizer that has a chat template, the prompt (a message list, or an HH string parsed into
one) goes through ``apply_chat_template(..., add_generation_prompt=True)``. Without one, prompts are
plain HH text: ``"\\n\\nHuman: ...\\n\\nAssistant:"`` and the response follows after one space.

A conversational completion (one assistant message) is, with a chat template, the assistant turn as
the template writes it: the whole conversation templated, less the templated prompt, so that prompt
and completion tokens are those of ``apply_chat_template`` on the whole conversation. Language-modeling
text (no prompt) is trained on as it is.
"""

from __future__ import annotations

import re
from typing import Any

from ulma_lightning.data.records import ASSISTANT_MARKER, HUMAN_MARKER, Prompt, Response

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """Parse an HH prompt (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into chat messages.

    A trailing empty ``Assistant:`` turn (the generation prompt) is dropped.
    """
    parts = _TURN.split(text)
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLES[speaker], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def messages_to_hh(messages: list[dict[str, str]]) -> str:
    """Render chat messages as an HH prompt ending in ``"\\n\\nAssistant:"``."""
    turns = "".join(f"\n\n{_SPEAKERS.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return turns + ASSISTANT_MARKER


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as chat messages (an HH string parsed into turns, any other string one user turn)."""
    if isinstance(prompt, list):
        return prompt
    return hh_to_messages(prompt) if HUMAN_MARKER in prompt else [{"role": "user", "content": prompt}]


def format_prompt(prompt: Prompt, tokenizer: Any) -> str:
    """The prompt text, ending where the response begins (empty for language-modeling text)."""
    if prompt is None:
        return ""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, list):
        return messages_to_hh(prompt)
    if prompt.lstrip().startswith("Human:") or HUMAN_MARKER in prompt:
        return prompt if prompt.rstrip().endswith("Assistant:") else prompt.rstrip() + ASSISTANT_MARKER
    return f"{HUMAN_MARKER} {prompt}{ASSISTANT_MARKER}"


def format_response(response: str, tokenizer: Any) -> str:
    """The response text as it follows the formatted prompt (EOS is appended as a token id)."""
    if has_chat_template(tokenizer):
        return response.strip()
    return response if response[:1].isspace() else " " + response


def format_pair(prompt: Prompt, response: Response, tokenizer: Any) -> tuple[str, str, bool]:
    """``(prompt text, response text, append EOS)`` for one sample.

    A conversational completion with a chat template is the template's assistant turn; EOS is then
    appended only when the template writes none in it (most end the turn with their EOS token).
    """
    if prompt is None:  # language-modeling text: no prompt, the text as it is
        return "", response if isinstance(response, str) else response[0]["content"], True
    prompt_text = format_prompt(prompt, tokenizer)
    if isinstance(response, list):
        if not has_chat_template(tokenizer):
            return prompt_text, format_response(response[0]["content"], tokenizer), True
        whole = tokenizer.apply_chat_template(prompt_messages(prompt) + response, tokenize=False)
        if not whole.startswith(prompt_text):
            raise ValueError(
                "the tokenizer's chat template writes the conversation differently from its prompt with the "
                f"generation prompt, so the completion cannot be cut from it: {prompt_text!r} is not a prefix of "
                f"{whole!r}"
            )
        completion = whole[len(prompt_text) :]
        eos = getattr(tokenizer, "eos_token", None)
        return prompt_text, completion, not (eos and eos in completion)
    return prompt_text, format_response(response, tokenizer), True
