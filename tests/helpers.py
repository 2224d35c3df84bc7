"""Helpers several test modules share: export and chunk builders.

Not collected (no test_ prefix). Test modules import from here, never from each other or from
apiana_lab.bench, so each test file runs alone.
"""

from __future__ import annotations

import json
import random

# ---- exports -------------------------------------------------------------------------------------------


def write_dialogue_export(path, conversations=12, messages=12, seed=0):
    """A ChatGPT conversations.json of linear chats; each message ~40 tokens, tagged "Message <conv>-<msg>:"."""
    rng = random.Random(seed)
    vocab = (
        "garden river morning coffee letter train window music walk kitchen friend book "
        "winter project code tired happy plan budget doctor sleep travel idea question"
    ).split()
    convs = []
    for c in range(conversations):
        mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
        parent = "root"
        for m in range(messages):
            node = f"c{c}-n{m}"
            role = "user" if m % 2 == 0 else "assistant"
            text = f"Message {c}-{m}: " + " ".join(rng.choice(vocab) for _ in range(25))
            message = {
                "id": node,
                "author": {"role": role, "name": None, "metadata": {}},
                "create_time": 1700000000 + c * 1000 + m,
                "update_time": None,
                "content": {"content_type": "text", "parts": [text]},
                "status": "finished_successfully",
                "end_turn": None,
                "weight": 1.0,
                "metadata": {},
                "recipient": "all",
            }
            mapping[node] = {"id": node, "message": message, "parent": parent, "children": []}
            mapping[parent]["children"].append(node)
            parent = node
        convs.append(
            {
                "title": f"Chat {c}",
                "create_time": 1700000000 + c * 1000,
                "update_time": None,
                "mapping": mapping,
                "current_node": parent,
                "id": f"conv-{c}",
                "conversation_id": f"conv-{c}",
            }
        )
    path.write_text(json.dumps(convs), encoding="utf-8")
    return path


def write_mixed_export(path):
    """The dialogue export with one conversation moved to February 2024 and two malformed ones added."""
    write_dialogue_export(path)
    data = json.loads(path.read_text())
    data[0]["create_time"] = 1707000000  # 2024-02-03; the rest are in November 2023
    data += [17, {"id": "no-map", "title": "x"}]
    path.write_text(json.dumps(data))
    return path


# ---- chunks for the fake provider ----------------------------------------------------------------------

VOCAB = "apple bread candle door engine forest glass harbor island jacket kettle lemon".split()


def make_chunks(n, seed=0, words=(5, 60), tags=None):
    """`n` chunks of random lengths; chunk i's text starts with "chunk-i" and its tag, if any."""
    from apiana_lab.chunking import Chunk

    rng = random.Random(seed)
    tags = tags or {}
    chunks = []
    for i in range(n):
        body = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(*words)))
        text = f"chunk-{i} {tags.get(i, '')} {body}"
        chunks.append(
            Chunk(
                id=f"id-{i:04d}",
                conversation_id=f"conv-{i // 10}",
                title=f"Chat {i // 10}",
                date=None,
                index=i % 10,
                first_message=0,
                last_message=0,
                token_count=len(text.split()),
                text=text,
            )
        )
    return chunks


def expected_summary(t, chunk):
    """What the fake answers for this chunk's prompt, computed apart from the run under test."""
    from apiana_lab.providers.fake import FakeProvider

    return FakeProvider().complete(t.prompt(chunk), t.options).text
