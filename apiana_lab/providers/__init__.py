"""LLM backends behind one small interface; each heavy library loads only when chosen."""

from .base import Completion, EngineOption, GenerationOptions, LLMProvider, Prompt
from .fake import FakeProvider
from .registry import BACKENDS, backend_names, get_provider, provider_class

__all__ = [
    "BACKENDS",
    "Completion",
    "EngineOption",
    "FakeProvider",
    "GenerationOptions",
    "LLMProvider",
    "Prompt",
    "backend_names",
    "get_provider",
    "provider_class",
]
