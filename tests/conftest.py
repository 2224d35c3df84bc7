"""Shared fixtures. Real engines are module-scoped in test_vllm.py / test_transformers.py, one alive at a time."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def model_dir():
    from apiana_lab.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from apiana_lab.chunking import load_tokenizer

    return load_tokenizer(model_dir)


def write_dialogue_export(path, conversations=12, messages=12, seed=0):
    """A ChatGPT conversations.json of linear chats; each message ~40 tokens, tagged "Message <conv>-<msg>:"."""
    import json
    import random

    rng = random.Random(seed)
    vocab = ("garden river morning coffee letter train window music walk kitchen friend book "
             "winter project code tired happy plan budget doctor sleep travel idea question").split()
    convs = []
    for c in range(conversations):
        mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
        parent = "root"
        for m in range(messages):
            node = f"c{c}-n{m}"
            role = "user" if m % 2 == 0 else "assistant"
            text = f"Message {c}-{m}: " + " ".join(rng.choice(vocab) for _ in range(25))
            message = {
                "id": node, "author": {"role": role, "name": None, "metadata": {}},
                "create_time": 1700000000 + c * 1000 + m, "update_time": None,
                "content": {"content_type": "text", "parts": [text]}, "status": "finished_successfully",
                "end_turn": None, "weight": 1.0, "metadata": {}, "recipient": "all",
            }
            mapping[node] = {"id": node, "message": message, "parent": parent, "children": []}
            mapping[parent]["children"].append(node)
            parent = node
        convs.append({"title": f"Chat {c}", "create_time": 1700000000 + c * 1000, "update_time": None,
                      "mapping": mapping, "current_node": parent, "id": f"conv-{c}", "conversation_id": f"conv-{c}"})
    path.write_text(json.dumps(convs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def dialogue_export(tmp_path_factory):
    """A small ChatGPT export that cuts into one chunk per message at --chunk-size 64 (144 chunks)."""
    return write_dialogue_export(tmp_path_factory.mktemp("export") / "conversations.json")
