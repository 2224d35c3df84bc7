"""Stream the elements of a top-level JSON list without loading the whole file."""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from apiana_lab.errors import ExportError

logger = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_TRUNCATED_HINT = "the file ends early: the download was probably cut off, download the export again"
_CORRUPT_HINT = "the file is not valid JSON: download the export again, or check that it is the right file"


class _Buffer:
    """A sliding window of decoded text over a byte stream, with byte offsets for errors."""

    def __init__(self, stream: BinaryIO, name: str, block_size: int):
        self.stream = stream
        self.name = name
        self.block_size = block_size
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.dropped = 0  # characters already dropped from the front of `text`
        self.bytes_read = 0
        self.eof = False
        self.first = True

    def fill(self, size: int | None = None) -> None:
        """Drop consumed text and append the next block (at least `size` bytes)."""
        data = self.stream.read(max(size or 0, self.block_size))
        pending = len(self.decoder.getstate()[0])
        start = self.bytes_read - pending
        self.bytes_read += len(data)
        try:
            new = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise ExportError(
                f"the file is not UTF-8 text ({e.reason}); a ChatGPT or Claude export is UTF-8 JSON",
                path=self.name,
                offset=start + e.start,
            ) from None
        if not data:
            self.eof = True
        if self.first and new:
            # Byte offsets are counted back from the end, so dropping the BOM character is enough.
            self.first = False
            new = new.removeprefix("\ufeff")
        # Slicing copies, so only drop consumed text when a block comes in, never per element.
        self.text = self.text[self.pos :] + new
        self.dropped += self.pos
        self.pos = 0

    def peek(self) -> str:
        """Skip whitespace and return the next character, or "" at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.fill()

    def byte_offset(self, pos: int) -> int:
        """Byte offset in the file of character `pos` of the current text."""
        # Counted back from the end so the happy path never pays for encoding.
        decoded_end = self.bytes_read - len(self.decoder.getstate()[0])
        return decoded_end - len(self.text[pos:].encode("utf-8", "surrogatepass"))

    def error(self, message: str, pos: int) -> ExportError:
        return ExportError(message, path=self.name, offset=self.byte_offset(pos))

    def decode_value(self) -> Any:
        """Decode the JSON value at the cursor, reading more blocks until it is complete."""
        last = None
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                if self.eof:
                    cut_off = e.msg.startswith("Unterminated string") or e.pos >= len(self.text.rstrip())
                    hint = _TRUNCATED_HINT if cut_off else _CORRUPT_HINT
                    raise self.error(f"invalid JSON ({e.msg}); {hint}", e.pos) from None
                # An error that stays put after more data arrives is real; an unterminated
                # string only proves itself at the end of the file.
                seen = (e.msg, self.dropped + e.pos)
                if seen == last and not e.msg.startswith("Unterminated string"):
                    raise self.error(f"invalid JSON ({e.msg}); {_CORRUPT_HINT}", e.pos) from None
                last = seen
                # Grow geometrically so a many-MB element is not re-parsed once per block.
                self.fill(len(self.text) - self.pos)
                continue
            except RecursionError:
                raise self.error("JSON nested too deeply to read", self.pos) from None
            if end == len(self.text) and not self.eof and not isinstance(value, (dict, list, str)):
                # A number or literal at the very end may continue in the next block.
                self.fill()
                continue
            self.pos = end
            return value


def open_json(stream: BinaryIO, name: str, *, block_size: int = BLOCK_SIZE) -> tuple[str, Iterator[Any]]:
    """Peek at a JSON file: ("list", its elements one by one) or ("value", the one top-level value).

    Only a top-level list is streamed; any other top-level value is decoded whole.
    `name` is used in error messages (for a zip member: `archive.zip!conversations.json`).
    """
    buf = _Buffer(stream, name, block_size)
    first = buf.peek()
    if first == "":
        raise ExportError("the file is empty; expected a JSON list of conversations", path=name, offset=0)
    if first == "[":
        buf.pos += 1
        return "list", _iter_list(buf)
    value = buf.decode_value()
    if buf.peek() != "":
        raise buf.error(f"extra data after the top-level JSON value; {_CORRUPT_HINT}", buf.pos)
    return "value", iter([value])


def _iter_list(buf: _Buffer) -> Iterator[Any]:
    if buf.peek() == "]":
        buf.pos += 1
    else:
        while True:
            yield buf.decode_value()
            sep = buf.peek()
            if sep == ",":
                buf.pos += 1
                buf.peek()
                continue
            if sep == "]":
                buf.pos += 1
                break
            if sep == "":
                raise buf.error(f"the list of conversations is not closed; {_TRUNCATED_HINT}", buf.pos)
            raise buf.error(f"invalid JSON (expecting ',' or ']' after a list element); {_CORRUPT_HINT}", buf.pos)
    if buf.peek() != "":
        raise buf.error(f"extra data after the end of the list; {_CORRUPT_HINT}", buf.pos)
