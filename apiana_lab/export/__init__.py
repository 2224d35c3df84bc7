"""Read ChatGPT and Claude exports into plain Conversation objects."""

from apiana_lab.export.reader import ChatGPTExportReader, detect_format, read_export
from apiana_lab.export.types import (
    BROWSING,
    CODE,
    CONTEXT,
    DIALOGUE,
    ENTRY_KINDS,
    EXECUTION_OUTPUT,
    HIDDEN,
    OTHER,
    REASONING,
    SYSTEM,
    THOUGHTS,
    TOOL_CALL,
    TOOL_OUTPUT,
    Conversation,
    Entry,
    ReadReport,
)

__all__ = [
    "read_export",
    "ChatGPTExportReader",
    "detect_format",
    "Conversation",
    "Entry",
    "ReadReport",
    "ENTRY_KINDS",
    "DIALOGUE",
    "TOOL_CALL",
    "TOOL_OUTPUT",
    "CODE",
    "EXECUTION_OUTPUT",
    "BROWSING",
    "THOUGHTS",
    "REASONING",
    "CONTEXT",
    "HIDDEN",
    "SYSTEM",
    "OTHER",
]
