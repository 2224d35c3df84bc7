"""LLM backends behind one small interface; each heavy library loads only when chosen."""

from .base import Completion, GenerationOptions, LLMProvider, Prompt
from .fake import FakeProvider
from .registry import BACKENDS, get_provider, provider_class

__all__ = ["BACKENDS", "Completion", "FakeProvider", "GenerationOptions", "LLMProvider", "Prompt", "get_provider", "provider_class"]
