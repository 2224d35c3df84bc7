"""The token chunker: sizes, order, splitting, overlap and stable ids."""

import dataclasses
from datetime import UTC, datetime

import pytest

from apiana_lab.chunking import Chunker, ChunkingOptions, ConversationChunkerComponent, render_entry
from apiana_lab.errors import ConfigError
from apiana_lab.export import read_export
from apiana_lab.export.types import CODE, DIALOGUE, HIDDEN, THOUGHTS, TOOL_OUTPUT, Conversation, Entry

SAMPLE = "apiana_lab/data/sample_export.json"


def conversation(texts, cid="c1", extra=()):
    entries = [Entry(role="user" if i % 2 == 0 else "assistant", text=t, kind=DIALOGUE) for i, t in enumerate(texts)]
    return Conversation(
        id=cid,
        title="T",
        source_format="chatgpt",
        entries=entries + list(extra),
        create_time=datetime(2024, 1, 2, tzinfo=UTC),
    )


@pytest.fixture(scope="module")
def sample_conversations():
    return list(read_export(SAMPLE))


def test_no_chunk_exceeds_the_size_except_split_messages(tokenizer, sample_conversations):
    chunker = Chunker(ChunkingOptions(chunk_size=200), tokenizer)
    chunks = [c for conv in sample_conversations for c in chunker.chunk(conv)]
    assert len(chunks) > len(sample_conversations)
    for c in chunks:
        assert c.token_count <= 200
        # The declared count is honest: re-encoding the rendered text gives no more tokens.
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) <= c.token_count


def test_chunks_rebuild_the_dialogue_in_order(tokenizer, sample_conversations):
    chunker = Chunker(ChunkingOptions(chunk_size=150), tokenizer)
    for conv in sample_conversations:
        chunks = chunker.chunk(conv)
        if not conv.dialogue:
            assert chunks == []
            continue
        rebuilt = [m for c in chunks if not c.continued for m in c.messages]
        expected = [render_entry(e, chunker.options) for e in conv.entries]
        expected = [r for r in expected if r is not None]
        # Messages split over several chunks appear once each as "continued" pieces.
        split = {c.first_message for c in chunks if c.continued}
        assert rebuilt == [r for i, r in enumerate(expected) if i not in split]
        dialogue_texts = [e.text for e in conv.dialogue]
        joined = "\n\n".join(c.text for c in chunks)
        at = 0
        for t in dialogue_texts:  # each dialogue message appears, after the one before it
            found = joined.find(t[:40], at)
            assert found >= 0, t[:40]
            at = found


def test_over_long_message_is_split_at_token_boundaries(tokenizer):
    long = " ".join(f"word{i}" for i in range(900))
    conv = conversation(["hello there", long, "thanks"])
    chunks = Chunker(ChunkingOptions(chunk_size=256), tokenizer).chunk(conv)
    pieces = [c for c in chunks if c.continued]
    assert len(pieces) >= 3
    assert all(c.first_message == c.last_message == 1 for c in pieces)
    assert all(c.token_count <= 256 for c in chunks)
    text = "".join(p.text.removeprefix("(continued) ") for p in pieces)
    assert text == "Assistant: " + long
    assert chunks[0].messages == ("User: hello there",) and chunks[-1].messages == ("User: thanks",)


def test_overlap_repeats_messages(tokenizer):
    conv = conversation([f"message number {i} " * 12 for i in range(12)])
    plain = Chunker(ChunkingOptions(chunk_size=120), tokenizer).chunk(conv)
    lapped = Chunker(ChunkingOptions(chunk_size=160, overlap=1), tokenizer).chunk(conv)
    assert len(plain) > 2
    for a, b in zip(lapped, lapped[1:]):
        assert b.first_message == a.last_message  # the last message of one chunk opens the next
    assert lapped[-1].last_message == plain[-1].last_message == 11


def test_messages_method_counts_messages(tokenizer):
    conv = conversation([f"m{i}" for i in range(10)])
    chunks = ConversationChunkerComponent(chunk_method="messages", chunk_size=4, tokenizer=tokenizer).chunk(conv)
    assert [len(c.messages) for c in chunks] == [4, 4, 2]


def test_ids_are_stable_and_depend_on_content_and_parameters(tokenizer, sample_conversations):
    a = [c.id for c in Chunker(ChunkingOptions(chunk_size=300), tokenizer).chunk_all(sample_conversations)]
    b = [c.id for c in Chunker(ChunkingOptions(chunk_size=300), tokenizer).chunk_all(read_export(SAMPLE))]
    other = [c.id for c in Chunker(ChunkingOptions(chunk_size=301), tokenizer).chunk_all(sample_conversations)]
    assert a == b and len(set(a)) == len(a)
    assert not set(a) & set(other)
    conv = sample_conversations[0]
    first = next(i for i, e in enumerate(conv.entries) if e.is_dialogue)
    entries = list(conv.entries)
    entries[first] = dataclasses.replace(entries[first], text=entries[first].text + "!")
    edited = dataclasses.replace(conv, entries=entries)
    chunker = Chunker(ChunkingOptions(chunk_size=300), tokenizer)
    assert chunker.chunk(edited)[0].id != chunker.chunk(conv)[0].id


def test_no_dialogue_gives_no_chunk(tokenizer):
    conv = Conversation(
        id="x", title="", source_format="chatgpt", entries=[Entry(role="tool", text="output", kind=TOOL_OUTPUT)]
    )
    assert Chunker(tokenizer=tokenizer).chunk(conv) == []


def test_non_dialogue_defaults_truncated_or_left_out(tokenizer):
    extra = [
        Entry(role="assistant", text="print('x')\n" * 200, kind=CODE),
        Entry(role="assistant", text="secret chain of thought", kind=THOUGHTS),
        Entry(role="system", text="hidden context", kind=HIDDEN),
    ]
    conv = conversation(["question", "answer"], extra=extra)
    text = Chunker(tokenizer=tokenizer).chunk(conv)[0].text
    assert "Code: print('x')" in text and "more characters]" in text
    assert "secret chain" not in text and "hidden context" not in text
    wide = Chunker(ChunkingOptions(include=frozenset({DIALOGUE, THOUGHTS})), tokenizer).chunk(conv)[0].text
    assert "secret chain" in wide and "print(" not in wide


def test_bad_options_are_errors():
    with pytest.raises(ConfigError):
        ChunkingOptions(method="words")
    with pytest.raises(ConfigError):
        ChunkingOptions(chunk_size=10)
    with pytest.raises(ConfigError, match="unknown entry kinds"):
        ChunkingOptions(include=frozenset({"dialog"}))
