"""The reflective-summary prompts: loaded from prompts/, filled from a chunk.

The files live in the package (apiana_lab/data/prompts/, so a wheel carries them); the checkout's
top-level prompts/ is a symlink to that folder, the place to edit or add a prompt.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

from .errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parent / "data" / "prompts"
SYSTEM_PROMPT = "self-reflective-system-message"
USER_TEMPLATE = "self-reflective-prompt-template"
PLACEHOLDERS = ("conversation_date", "title", "formatted_messages")


def load_prompt(name: str, folder: str | Path | None = None) -> str:
    """The text of `prompts/<name>.txt` (or a path to a file)."""
    path = Path(name)
    if not path.is_file():
        path = Path(folder or PROMPTS_DIR) / (name if name.endswith(".txt") else f"{name}.txt")
    if not path.is_file():
        available = sorted(p.stem for p in Path(folder or PROMPTS_DIR).glob("*.txt"))
        raise ConfigError(f"Prompt {name!r} not found at {path}. Available prompts: {', '.join(available) or 'none'}.")
    return path.read_text(encoding="utf-8")


def check_template(template: str) -> None:
    """Raise when the user template lacks a placeholder or names an unknown one."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    missing = [p for p in PLACEHOLDERS if p not in fields]
    unknown = sorted(fields - set(PLACEHOLDERS))
    if missing or unknown:
        raise ConfigError(
            f"The prompt template must use exactly the placeholders {{{'}, {'.join(PLACEHOLDERS)}}}; "
            f"missing: {missing or 'none'}, unknown: {unknown or 'none'}. Escape literal braces as {{{{ }}}}."
        )


def render_user_prompt(template: str, *, title: str, date, text: str) -> str:
    """The template filled with one chunk's title, date and messages."""
    return template.format(
        conversation_date=date.strftime("%Y-%m-%d") if date else "unknown",
        title=title or "(untitled)",
        formatted_messages=text,
    )


def prompt_hash(system_prompt: str, user_template: str) -> str:
    """Stable hash of the prompt pair, part of the key under which summaries are stored."""
    return hashlib.sha256(f"{system_prompt}\x00{user_template}".encode()).hexdigest()[:16]
