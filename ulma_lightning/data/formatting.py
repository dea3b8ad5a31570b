"""Turning prompts and responses into the text the model sees.

With a tokenizer that has a chat template, the prompt (a message list, or an HH string parsed into
one) goes through ``apply_chat_template(..., add_generation_prompt=True)``. Without one, prompts are
plain HH text: ``"\\n\\nHuman: ...\\n\\nAssistant:"`` and the response follows after one space.
"""

from __future__ import annotations

import re
from typing import Any

from ulma_lightning.data.records import ASSISTANT_MARKER, HUMAN_MARKER, Prompt

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


def format_prompt(prompt: Prompt, tokenizer: Any) -> str:
    """The prompt text, ending where the response begins."""
    if has_chat_template(tokenizer):
        if isinstance(prompt, str):
            messages = hh_to_messages(prompt) if HUMAN_MARKER in prompt else [{"role": "user", "content": prompt}]
        else:
            messages = prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
