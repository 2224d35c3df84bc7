"""A prompt through the model's chat template into token ids, and the one check that it fits the context."""

from __future__ import annotations

from apiana_lab.errors import PermanentProviderError
from apiana_lab.providers.base import Prompt, as_messages


def encode_chat(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt as a chat, through the tokenizer's chat template with the generation prompt, as token ids.

    `tokenizer` is a Hugging Face tokenizer (vLLM's is one too). Backends tokenize each prompt
    this once, then count, check and send those ids.
    """
    ids = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def check_fits(
    ids: list[int],
    max_tokens: int,
    context: int | None,
    what: str,
    *,
    limit: str = "the model's context",
    remedy: str = "",
) -> None:
    """Raise PermanentProviderError(reason="too_long") when the prompt plus `max_tokens` exceeds `context`.

    `what` names the prompt ("prompt 3", "request 'k'"), `limit` names the bound the backend
    enforces, `remedy` adds a backend's own way out to the message. No check when `context` is None.
    """
    if context is None or len(ids) + max_tokens <= context:
        return
    raise PermanentProviderError(
        f"{what} has {len(ids)} tokens; with max_tokens={max_tokens} it exceeds {limit} of {context}. "
        f"Use a smaller --chunk-size or --max-length{remedy}.",
        reason="too_long",
    )
