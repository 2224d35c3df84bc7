"""Find the conversations in an export (file, folder or zip) and yield them one at a time."""

from __future__ import annotations

import json
import logging
import operator
import os
import pickle
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Self

from apiana_lab.errors import ConversationError, ExportError
from apiana_lab.export import chatgpt, claude
from apiana_lab.export.jsonstream import open_json
from apiana_lab.export.types import DUPLICATE_DETAIL_LIMIT, Conversation, Entry, ReadReport

logger = logging.getLogger(__name__)

CHATGPT = "chatgpt"
CHATGPT_SHARDED = "chatgpt-sharded"
CLAUDE = "claude"

_EXPECTED = (
    "expected a ChatGPT or Claude export: the .zip as downloaded, the folder it unpacks to, "
    "or its conversations.json (or conversations-000.json, ... shards)"
)
_SHARD = re.compile(r"conversations-\d+\.json", re.IGNORECASE)
_PLAIN = "conversations.json"
_MANIFEST = "export_manifest.json"
_MANIFEST_LIST_KEYS = ("files", "shards", "conversations", "conversation_files", "parts", "entries")
_MANIFEST_NAME_KEYS = ("name", "path", "file", "filename", "file_name")
_SPOOL_BUFFER = 1024 * 1024
# Entries go to the spool as their field values: the dataclass's own pickling looks its fields up
# once per object, which cost as much as parsing them again.
_ENTRY_FIELDS = operator.attrgetter(*(f.name for f in fields(Entry)))
_CONVERSATION_FIELDS = operator.attrgetter(*(f.name for f in fields(Conversation)))
_SPOOL_REDUCERS = {
    Entry: lambda entry: (Entry, _ENTRY_FIELDS(entry)),
    Conversation: lambda conversation: (Conversation, _CONVERSATION_FIELDS(conversation)),
}
_PARSERS: dict[str, Callable[[Any, int, str], Conversation]] = {
    CHATGPT: chatgpt.parse_conversation,
    CHATGPT_SHARDED: chatgpt.parse_conversation,
    CLAUDE: claude.parse_conversation,
}
_IDS: dict[str, Callable[[dict], str | None]] = {
    CHATGPT: chatgpt.conversation_id,
    CHATGPT_SHARDED: chatgpt.conversation_id,
    CLAUDE: claude.conversation_id,
}


@dataclass(frozen=True)
class _Layout:
    """Where the conversation files of one export are."""

    path: Path
    is_zip: bool
    members: tuple[str, ...]  # zip member names, or file paths
    sharded: bool

    def display(self, member: str) -> str:
        return f"{self.path}!{member}" if self.is_zip else member


def read_export(
    paths: str | os.PathLike | Iterable[str | os.PathLike], *, report: ReadReport | None = None
) -> Iterator[Conversation]:
    """Yield the conversations of one export, or of several merged by id, one at a time.

    Inputs may mix kinds: zips, folders, conversations.json files, shards, Claude exports. Every
    path is checked at once (ExportError naming the bad one). A conversation id seen more than once
    keeps its version with the newest `update_time`; a tie goes to the later input, or the later
    position in one input. Every input is read once: each conversation is parsed as it streams in
    and kept in a private temporary file (under half the export's size, in TMPDIR) until the
    last input is through. Nothing is yielded before that, so a broken file stops the read before
    any work is done, and what is yielded is each input as it was when read. `report`, when given,
    holds the inputs, formats, skipped conversations and duplicates from the first conversation on,
    and the count once the iterator is exhausted.
    """
    report = report if report is not None else ReadReport()
    inputs = _as_paths(paths)
    layouts = [_locate(Path(p).expanduser()) for p in inputs]
    report.inputs = inputs
    report.path = report.path or ", ".join(inputs)
    return _read(layouts, report)


def detect_format(path: str | os.PathLike) -> str:
    """ "chatgpt", "chatgpt-sharded" or "claude", from the layout and the first conversation."""
    layout = _locate(Path(path).expanduser())
    if layout.sharded:
        return CHATGPT_SHARDED
    with _opened(layout) as open_member:
        member = layout.members[0]
        with _guard(layout, member), open_member(member) as stream:
            kind, values = open_json(stream, layout.display(member))
            for value in values:
                if kind == "value":
                    return _classify(value) or _single_format(value, layout.display(member))
                found = _classify(value)
                if found:
                    return found
    return CHATGPT


class ChatGPTExportReader:
    """Iterable over the conversations of one export or several; `report` says what was read and skipped."""

    def __init__(self, path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]):
        self.path = path_or_paths if isinstance(path_or_paths, (str, os.PathLike)) else _as_paths(path_or_paths)
        self.report = ReadReport(path=", ".join(_as_paths(self.path)))

    def __iter__(self) -> Iterator[Conversation]:
        # A fresh report per pass, so iterating twice does not double the counts.
        self.report = ReadReport(path=self.report.path)
        return read_export(self.path, report=self.report)


def _as_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    listed = [os.fspath(p) for p in paths]
    if not listed:
        raise ExportError(f"no input given; {_EXPECTED}")
    return listed


def _classify(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "mapping" in value:
        return CHATGPT
    if "chat_messages" in value or "current_leaf_message_uuid" in value:
        return CLAUDE
    if "uuid" in value and "name" in value:
        return CLAUDE
    return None


def _single_format(value: Any, name: str) -> str:
    """Format of a file whose top level is not a list; ExportError when it is not a conversation."""
    if isinstance(value, dict) and isinstance(value.get("conversations"), list):
        return next(filter(None, map(_classify, value["conversations"])), CHATGPT)
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:8]) or "none"
        raise ExportError(f"the top-level object is not a conversation (keys: {keys}); {_EXPECTED}", path=name)
    found = "null" if value is None else type(value).__name__
    raise ExportError(f"the top level is a JSON {found}, not a list of conversations; {_EXPECTED}", path=name)


def _read(layouts: list[_Layout], report: ReadReport) -> Iterator[Conversation]:
    """Read every input through once, then yield the kept conversations in input order, then position."""
    with _Spool() as spool:
        drop = _plan(layouts, report, spool)
        logger.debug(
            "%d conversations (%.1f MB) kept in a temporary file until every input was read",
            spool.count,
            spool.file.tell() / 1e6,
        )
        for k, position, conversation in spool:
            if (k, position) in drop:
                continue
            report.conversations += 1
            yield conversation
    logger.info(
        "read %d conversations from %s (%d skipped, %d older duplicates dropped)",
        report.conversations,
        report.path,
        len(report.skipped),
        report.duplicates,
    )


def _plan(layouts: list[_Layout], report: ReadReport, spool: _Spool) -> set[tuple[int, int]]:
    """The one pass over the inputs: parse each conversation, skip the malformed, spool the rest.

    Returns the (input, position) pairs of older versions of a repeated id, which must not be
    yielded. Only ids, timestamps and positions are held, never conversations, so memory stays flat.
    """
    newest: dict[str, tuple[float, int, int]] = {}  # id -> (update time, input, position) of the version kept
    drop: set[tuple[int, int]] = set()
    for k, layout in enumerate(layouts):
        fmt = CHATGPT_SHARDED if layout.sharded else CHATGPT  # an empty input's; else its last conversation's
        count = 0
        for position, fmt, value in _values(layout):
            count += 1
            try:
                conversation = _parse(value, k, position, fmt, report.inputs[k])
            except ConversationError as e:
                _skip(report, e, report.inputs[k])
                continue
            loser = None
            if _IDS[fmt](value) is not None:
                loser = _merge(newest, conversation, k, position)
            if loser is not None:
                drop.add(loser)
                report.duplicates += 1
                if len(report.duplicate_detail) < DUPLICATE_DETAIL_LIMIT:
                    report.duplicate_detail.append(
                        {"id": conversation.id, "input": report.inputs[loser[0]], "index": loser[1]}
                    )
            if loser != (k, position):
                spool.add(k, position, conversation)
        report.formats.append(fmt)
        if count == 0:
            logger.warning("%s holds no conversations", layout.path)
    for detail in report.duplicate_detail:
        _, k, position = newest[detail["id"]]
        detail.update(kept_input=report.inputs[k], kept_index=position)
    report.format = report.formats[0] if len(set(report.formats)) == 1 else "mixed"
    if report.duplicates:
        logger.info("%d older versions of repeated conversation ids dropped", report.duplicates)
    return drop


def _merge(
    newest: dict[str, tuple[float, int, int]], conversation: Conversation, k: int, position: int
) -> tuple[int, int] | None:
    """Record this version of its id; the (input, position) of the version that loses, or None if it is the first."""
    updated = conversation.update_time
    stamp = updated.timestamp() if updated is not None else float("-inf")
    held = newest.get(conversation.id)
    # Versions arrive in (input, position) order, so on a tie this one is the later.
    if held is None or stamp >= held[0]:
        newest[conversation.id] = (stamp, k, position)
        return held[1:] if held is not None else None
    return k, position


class _Spool:
    """Parsed conversations, kept in a private temporary file until every input has been read through.

    It lets the read parse each conversation once and still yield nothing before the last input
    is through. It takes under half the export's size on disk, in TMPDIR, and no memory.
    """

    def __init__(self) -> None:
        self.count = 0
        with self._guard():
            # Closed by __exit__: the spool is always used as a context manager.
            self.file = tempfile.TemporaryFile(prefix="apiana-read-", buffering=_SPOOL_BUFFER)  # noqa: SIM115

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def add(self, k: int, position: int, conversation: Conversation) -> None:
        with self._guard():
            pickler = pickle.Pickler(self.file, pickle.HIGHEST_PROTOCOL)
            pickler.dispatch_table = _SPOOL_REDUCERS
            pickler.dump((k, position, conversation))
        self.count += 1

    def __iter__(self) -> Iterator[tuple[int, int, Conversation]]:
        with self._guard():
            self.file.seek(0)
            for _ in range(self.count):
                yield pickle.load(self.file)

    @staticmethod
    @contextmanager
    def _guard() -> Iterator[None]:
        try:
            yield
        except OSError as e:
            where = tempfile.gettempdir()
            raise ExportError(
                f"cannot keep the parsed conversations in a temporary file ({e.strerror or e}); "
                f"free space there or set TMPDIR to a folder with room for half the export",
                path=where,
            ) from None


def _values(layout: _Layout) -> Iterator[tuple[int, str, Any]]:
    """(position, format, raw conversation value) for every conversation of one input, in order."""
    fmt = CHATGPT_SHARDED if layout.sharded else None
    position = 0
    with _opened(layout) as open_member:
        for member in layout.members:
            name = layout.display(member)
            with _guard(layout, member), open_member(member) as stream:
                kind, values = open_json(stream, name)
                if kind == "value":
                    value = next(values)
                    found = _classify(value)
                    if found is None:
                        inner = _single_format(value, name)
                        fmt = fmt or inner
                        values = iter(value["conversations"])
                    else:
                        fmt = fmt or found
                        values = iter([value])
                for value in values:
                    if fmt is None:
                        # The first recognisable conversation decides the format of a plain list.
                        fmt = _classify(value) or (CHATGPT if isinstance(value, dict) else None)
                    yield position, fmt or CHATGPT, value
                    position += 1


def _parse(value: Any, k: int, position: int, fmt: str, source: str) -> Conversation:
    """One raw conversation as a Conversation; ConversationError when it is malformed."""
    try:
        conversation = _PARSERS[fmt](value, position, fmt)
    except ConversationError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
        # Wrong types deep inside one conversation must not stop the read.
        conv_id = (value.get("id") or value.get("uuid")) if isinstance(value, dict) else None
        raise ConversationError(
            "bad_type", f"{type(e).__name__}: {e}", conversation_id=str(conv_id) if conv_id else None, index=position
        ) from None
    if k and _IDS[fmt](value) is None:
        # Positions repeat across inputs, so an id made from one must say which input it is.
        conversation.id = f"index-{k}-{position}"
    conversation.source = source
    return conversation


def _skip(report: ReadReport, error: ConversationError, source: str) -> None:
    logger.warning("%s: %s", source, error)
    report.skipped.append(
        {
            "input": source,
            "index": error.index,
            "id": error.conversation_id,
            "reason": error.reason,
            "detail": error.detail,
        }
    )


@contextmanager
def _opened(layout: _Layout) -> Iterator[Callable[[str], BinaryIO]]:
    """A function that opens one member as a binary stream, valid inside the block."""
    if not layout.is_zip:
        yield lambda member: open(member, "rb")
        return
    with _guard(layout, None), zipfile.ZipFile(layout.path) as archive:
        yield archive.open


@contextmanager
def _guard(layout: _Layout, member: str | None) -> Iterator[None]:
    """Turn I/O and zip failures into an ExportError that names the file."""
    where = layout.display(member) if member else str(layout.path)
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ExportError(f"the zip archive is damaged ({e}); download the export again", path=where) from None
    except PermissionError:
        raise ExportError("permission denied: make the file readable and try again", path=where) from None
    except OSError as e:
        raise ExportError(f"cannot read the file ({e.strerror or e})", path=where) from None


def _locate(path: Path) -> _Layout:
    """Find the conversation files of an export, or raise an ExportError that says what was expected."""
    if not path.exists():
        raise ExportError(f"no such file or folder; {_EXPECTED}", path=str(path))
    if path.is_dir():
        return _locate_in_folder(path)
    if not os.access(path, os.R_OK):
        raise ExportError("permission denied: make the file readable and try again", path=str(path))
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return _locate_in_zip(path)
    sharded = bool(_SHARD.fullmatch(path.name))
    return _Layout(path=path, is_zip=False, members=(str(path),), sharded=sharded)


def _locate_in_folder(folder: Path) -> _Layout:
    names: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except PermissionError:
        raise ExportError("permission denied: make the folder readable and try again", path=str(folder)) from None
    # Two levels deep: the unpacked folder, or the folder that holds it.
    for entry in entries:
        if entry.is_file():
            names.append(entry.name)
        elif entry.is_dir() and not entry.name.startswith((".", "__MACOSX")):
            try:
                names.extend(f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path) if sub.is_file())
            except OSError as e:
                logger.debug("not looking inside %s: %s", entry.path, e)

    def read(name: str) -> bytes:
        return (folder / name).read_bytes()

    members, sharded = _pick(names, read, str(folder))
    return _Layout(path=folder, is_zip=False, members=tuple(str(folder / m) for m in members), sharded=sharded)


def _locate_in_zip(path: Path) -> _Layout:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
            members, sharded = _pick(names, archive.read, str(path))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ExportError(f"not a readable zip archive ({e}); download the export again", path=str(path)) from None
    return _Layout(path=path, is_zip=True, members=tuple(members), sharded=sharded)


def _depth_key(name: str) -> tuple[int, str]:
    return name.count("/"), name


def _shard_key(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", PurePosixPath(name).name)
    return (int(digits[-1]) if digits else -1), name


def _pick(names: list[str], read: Callable[[str], bytes], where: str) -> tuple[list[str], bool]:
    """The conversation files among `names` (posix paths relative to the export), and whether sharded."""
    by_base: dict[str, list[str]] = {}
    for name in names:
        by_base.setdefault(PurePosixPath(name).name.lower(), []).append(name)
    manifests = sorted(by_base.get(_MANIFEST, []), key=_depth_key)
    shards = [n for n in names if _SHARD.fullmatch(PurePosixPath(n).name)]
    if manifests:
        listed = _manifest_files(read(manifests[0]), manifests[0], set(names), where)
        if listed:
            return listed, True
    if shards:
        folder = PurePosixPath(manifests[0]).parent if manifests else PurePosixPath(min(shards, key=_depth_key)).parent
        return sorted((n for n in shards if PurePosixPath(n).parent == folder), key=_shard_key), True
    plain = by_base.get(_PLAIN)
    if plain:
        return [min(plain, key=_depth_key)], False
    raise ExportError(f"no conversations.json or conversations-000.json inside; {_EXPECTED}", path=where)


def _manifest_files(raw: bytes, manifest: str, names: set[str], where: str) -> list[str]:
    """Conversation files listed by an export manifest, resolved against the export; [] when it lists none."""
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        logger.warning("%s: unreadable %s (%s); looking for shards by name", where, manifest, e)
        return []
    entries = data if isinstance(data, list) else None
    if isinstance(data, dict):
        lists = [data[k] for k in _MANIFEST_LIST_KEYS if isinstance(data.get(k), list)]
        lists += [v for v in data.values() if isinstance(v, list)]
        entries = lists[0] if lists else None
    listed = []
    for item in entries or []:
        if isinstance(item, dict):
            item = next((item[k] for k in _MANIFEST_NAME_KEYS if isinstance(item.get(k), str)), None)
        if (
            isinstance(item, str)
            and PurePosixPath(item).name.lower().startswith("conversations")
            and item.lower().endswith(".json")
        ):
            listed.append(item)
    base = PurePosixPath(manifest).parent
    resolved = []
    for item in listed:
        clean = str(PurePosixPath(item.replace("\\", "/").lstrip("/")))
        candidates = [str(base / clean), clean, str(base / PurePosixPath(clean).name)]
        found = next((c.removeprefix("./") for c in candidates if c.removeprefix("./") in names), None)
        if found is None:
            raise ExportError(
                f"{manifest} lists {item!r}, which is missing: the export is incomplete, download it again",
                path=where,
            )
        resolved.append(found)
    return resolved
