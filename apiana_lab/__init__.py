"""apiana_lab: whole chat-history exports into reflective memories with local LLMs, in parallel.

Importing this package is cheap: torch, vllm and ray load only when a backend is chosen.
"""

from .chunking import Chunk, ChunkingOptions, ConversationChunkerComponent
from .errors import ApianaError, ConfigError, ExportError, ProviderError
from .export import ChatGPTExportReader, Conversation, Entry, read_export
from .pipeline import Pipeline, RunConfig, chatgpt_parallel_processing_pipeline, run_export
from .prompts import load_prompt
from .providers import Completion, GenerationOptions, LLMProvider, get_provider
from .store import ChatFragmentWriter, SQLiteStore
from .summarize import ParallelSummarizerTransform, SummarizerTransform

__all__ = [
    "ApianaError",
    "ChatFragmentWriter",
    "ChatGPTExportReader",
    "Chunk",
    "ChunkingOptions",
    "Completion",
    "ConfigError",
    "Conversation",
    "ConversationChunkerComponent",
    "Entry",
    "ExportError",
    "GenerationOptions",
    "LLMProvider",
    "ParallelSummarizerTransform",
    "Pipeline",
    "ProviderError",
    "RunConfig",
    "SQLiteStore",
    "SummarizerTransform",
    "chatgpt_parallel_processing_pipeline",
    "get_provider",
    "load_prompt",
    "read_export",
    "run_export",
]
