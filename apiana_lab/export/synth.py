"""Realistic synthetic ChatGPT and Claude.ai exports, for tests, demos and benchmarks.

The shapes and proportions follow what real exports look like (see the
"Real ChatGPT exports" notes in shared/ENVIRONMENT.md): conversation trees with
regenerations and edits, hidden system messages, custom instructions, images,
tool traffic, reasoning, citation markers, non-ASCII text, and the odd huge
message or conversation. Output is streamed one conversation at a time and is
byte-identical for the same arguments. The word lists it draws from are data, in
apiana_lab/data/synth/*.json; this module holds only the generator.

The committed demo sample is regenerated with::

    write_sample_export(SAMPLE_PATH)
    # == write_synthetic_export(SAMPLE_PATH, size_mb=0.12, seed=7, demo=True)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("chatgpt", "chatgpt-sharded", "claude")
MB = 1_000_000  # size_mb counts decimal megabytes
CLAUDE_ROOT = "00000000-0000-4000-8000-000000000000"
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "data" / "sample_export.json"
SAMPLE_SIZE_MB = 0.12
SAMPLE_SEED = 7
SHARD_MAX_MB = 45.0  # real shards stay under ~50 MB

# Export time span: conversations are written newest first, walking back in time.
_T_NEWEST = 1_780_000_000.0  # 2026-05
_T_OLDEST = 1_673_000_000.0  # 2023-01
_ERA1_START = 1_685_000_000.0  # 2023-05: conversation_id and message status appear
_ERA2_START = 1_735_000_000.0  # 2025-01: channels, thoughts, web.run


@dataclass(frozen=True)
class SynthStats:
    """What write_synthetic_export wrote."""

    path: str
    format: str
    bytes: int
    conversations: int
    messages: int
    seconds: float
    no_dialogue: int = 0  # conversations deliberately left without any user/assistant exchange

    @property
    def mb_per_s(self) -> float:
        """Write throughput in decimal megabytes per second."""
        return self.bytes / MB / self.seconds if self.seconds > 0 else float("inf")


def write_synthetic_export(
    path,
    *,
    size_mb: float,
    format: str = "chatgpt",
    seed: int = 0,
    demo: bool = False,
    conversation_kb: tuple[float, float] | None = None,
) -> SynthStats:
    """Write a synthetic export of about size_mb (±5%) to path; same arguments give the same bytes.

    Args:
        path: a file for "chatgpt" and "claude"; a folder for "chatgpt-sharded".
        format: "chatgpt", "chatgpt-sharded" or "claude".
        demo: short messages and small conversations, for a tiny model summarizing on CPU.
        conversation_kb: each conversation's size drawn evenly from this range of kilobytes
            (e.g. (2, 4) for many short ones, (40, 60) for a few long ones) instead of the
            realistic spread; None keeps the default output byte for byte.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    if conversation_kb is not None and not 0 < conversation_kb[0] <= conversation_kb[1]:
        raise ValueError(f"conversation_kb must be (low, high) with 0 < low <= high, got {conversation_kb}")
    started = time.perf_counter()
    path = Path(path)
    rng = random.Random(seed)
    target = int(size_mb * MB)
    pool = _TextPool(random.Random(seed * 7919 + 1), demo=demo)
    if format == "claude":
        builder = _ClaudeBuilder(rng, pool, demo=demo)
    else:
        builder = _ChatGPTBuilder(rng, pool, sharded=format == "chatgpt-sharded", demo=demo)
    plan = _Plan(rng, target, demo=demo, conversation_kb=conversation_kb)

    if format == "chatgpt-sharded":
        path.mkdir(parents=True, exist_ok=True)
        n_shards = max(2, math.ceil(size_mb / SHARD_MAX_MB))
        names = [f"conversations-{i:03d}.json" for i in range(n_shards)]
        manifest_guess = 120 + 30 * n_shards  # reserve room so the manifest doesn't push the total over
        total = 0
        for i, name in enumerate(names):
            shard_target = (target - manifest_guess - total) // (n_shards - i)
            total += _write_list(path / name, builder, plan, shard_target)
        manifest = {"format": "chatgpt-sharded", "version": 1, "files": names, "conversation_count": plan.conversations}
        blob = json.dumps(manifest, indent=2).encode()
        (path / "export_manifest.json").write_bytes(blob)
        total += len(blob)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        total = _write_list(path, builder, plan, target)

    stats = SynthStats(
        str(path), format, total, plan.conversations, plan.messages, time.perf_counter() - started, plan.no_dialogue
    )
    logger.debug("wrote %s: %d bytes, %d conversations, %.1f MB/s", path, total, stats.conversations, stats.mb_per_s)
    return stats


def write_sample_export(path=SAMPLE_PATH) -> SynthStats:
    """Regenerate the committed demo sample (apiana_lab/data/sample_export.json) exactly."""
    return write_synthetic_export(path, size_mb=SAMPLE_SIZE_MB, format="chatgpt", seed=SAMPLE_SEED, demo=True)


# ---------------------------------------------------------------------------
# Writing: stream conversations into a JSON list until the byte budget is used.


class _Plan:
    """The byte budget, the clock walking back through the export, and the running counts."""

    def __init__(self, rng: random.Random, target: int, *, demo: bool, conversation_kb=None):
        self.rng = rng
        self.target = target
        self.demo = demo
        self.conversation_kb = conversation_kb
        self.written = 0
        self.conversations = 0
        self.messages = 0
        self.no_dialogue = 0
        self.big_done = 0

    def next_time(self) -> float:
        """Newest first: the share of the budget already written says how far back in 2026-2023 we are."""
        span = _T_NEWEST - _T_OLDEST
        return _T_NEWEST - span * min(1.0, self.written / self.target) - self.rng.uniform(0, 0.02 * span)

    def conversation_size(self, remaining: int) -> int:
        """A target size in bytes: mostly 6-170 KB, a few over 1 MB, the last one fills the budget."""
        rng = self.rng
        if self.conversation_kb is not None:
            size = int(rng.uniform(*self.conversation_kb) * 1000)
        elif self.demo:
            size = int(rng.uniform(6_000, 13_000))
        else:
            size = int(min(400_000, max(4_500, rng.lognormvariate(math.log(16_000), 0.95))))
            # Guarantee a huge conversation in any export big enough to hold one comfortably.
            big_room = self.target >= 4 * MB and remaining > 1_900_000
            if big_room and (rng.random() < 0.0015 or (self.big_done == 0 and self.written > 0.25 * self.target)):
                size = int(rng.uniform(1.1, 1.6) * MB)
                self.big_done += 1
        if remaining - size < 4_000:
            size = remaining
        return size


def _write_list(path: Path, builder, plan: _Plan, target: int) -> int:
    """Write one JSON list of conversations of about target bytes; return the bytes written."""
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
    written = 0
    with open(path, "wb") as fh:
        fh.write(b"[")
        written += 1
        first = True
        # Stop when what is left is smaller than the smallest conversation we would make.
        while target - written - 1 > 1_500 or first:
            remaining = target - written - 1
            size = plan.conversation_size(remaining)
            for _ in range(3):
                conv, n_messages, dialogue = builder.conversation(size, plan.next_time(), plan.conversations)
                blob = encode(conv).encode()
                builder.learn(len(blob))
                # Only the last conversation can overshoot the budget; rebuild it smaller.
                if len(blob) <= remaining + max(600, target // 100) or size < 3_000:
                    break
                size = int(size * remaining / len(blob) * 0.97)
            if not first:
                fh.write(b", ")
                written += 2
            fh.write(blob)
            written += len(blob)
            first = False
            plan.conversations += 1
            plan.messages += n_messages
            plan.no_dialogue += not dialogue
            plan.written += len(blob)
        fh.write(b"]")
        written += 1
    return written


# ---------------------------------------------------------------------------
# Vocabulary: the word lists live in apiana_lab/data/synth/*.json, since they are data rather than code.
#   topics.json     English topics: titles, things (noun phrases), actions (verb phrases), goals,
#                   problems (clauses in the user's voice) and fixes (imperatives); some with code.
#   languages.json  whole conversations in another language: titles, questions, answer sentences.
#   phrases.json    templates that combine a topic's words into questions, sentences and replies.
#   chatgpt.json    what else a ChatGPT export carries: model slugs by era, custom instructions,
#                   python tool runs and their outputs, search result sites.

_DATA_FILES = ("topics", "languages", "phrases", "chatgpt")


@functools.cache
def vocabulary() -> dict:
    """The word lists the generator draws from, read once from the package's data/synth/*.json files."""
    folder = resources.files("apiana_lab").joinpath("data").joinpath("synth")
    words: dict = {}
    for name in _DATA_FILES:
        data = json.loads(folder.joinpath(f"{name}.json").read_text(encoding="utf-8"))
        clash = words.keys() & data.keys()
        if clash:
            raise ValueError(f"data/synth/{name}.json repeats the list(s) {sorted(clash)} of another data file")
        words.update(data)
    return words


# ---------------------------------------------------------------------------
# Text pool: rendered once per export so generating text is mostly list picks and joins.


class _TextPool:
    """Pre-rendered questions, paragraphs and lists for every topic and language."""

    def __init__(self, rng: random.Random, *, demo: bool):
        self.demo = demo
        self.words = vocabulary()
        self.topics = [self._render_topic(rng, topic) for topic in self.words["topics"]]
        self.foreign = [self._render_foreign(rng, lang) for lang in self.words["languages"]]
        self.by_language = {t["language"]: t for t in self.foreign}
        self.filler = [p for t in self.topics for p in t["paragraphs"][:8]]

    def _render_topic(self, rng, topic) -> dict:
        w = self.words

        # Template slots: {t} {t2} things, {a} {a2} actions, {g} a goal, {p} a problem, {f} a fix.
        def fill(template: str, assistant: bool = False) -> str:
            t, t2 = rng.sample(topic["things"], 2)
            a, a2 = rng.sample(topic["actions"], 2)
            p = rng.choice(topic["problems"])
            s = template.format(
                t=t,
                t2=t2,
                a=a,
                a2=a2,
                g=rng.choice(topic["goals"]),
                p=_second_person(p) if assistant else p,
                f=rng.choice(topic["fixes"]),
            )
            return s[0].upper() + s[1:]

        per_paragraph = (2, 3) if self.demo else (2, 5)
        sentences = [fill(rng.choice(w["sentences"]), True) for _ in range(140)]
        # Distinct templates within a paragraph, so no paragraph repeats a sentence shape.
        paragraphs = [
            " ".join(fill(x, True) for x in rng.sample(w["sentences"], rng.randint(*per_paragraph))) for _ in range(60)
        ]
        lists = []
        for _ in range(12):
            steps = rng.sample(topic["actions"] + topic["fixes"], 3 if self.demo else rng.randint(3, 6))
            items = "\n".join(f"{i}. {s[0].upper()}{s[1:]}." for i, s in enumerate(steps, 1))
            lists.append(f"{rng.choice(w['headings'])}\n{items}")
        codes = [f"Here's an example:\n\n```{topic.get('lang', '')}\n{c}```" for c in topic.get("code", ())]
        return dict(
            titles=topic["titles"],
            first=[rng.choice(w["openers"]) + fill(rng.choice(w["first_questions"])) for _ in range(30)],
            questions=[fill(rng.choice(w["questions"])) + rng.choice(w["question_endings"]) for _ in range(60)],
            context=[fill(rng.choice(w["context"])) for _ in range(30)],
            sentences=sentences,
            paragraphs=paragraphs,
            lists=lists,
            codes=codes,
            outros=[fill(o) for o in w["outros"] for _ in range(2)],
            goals=topic["goals"],
            things=topic["things"],
            code=topic.get("code", ()),
            foreign=False,
        )

    def _render_foreign(self, rng, lang) -> dict:
        s = lang["sentences"]
        paragraphs = [" ".join(rng.sample(s, rng.randint(2, 4))) for _ in range(30)]
        return dict(
            titles=lang["titles"],
            first=lang["questions"][:4],
            questions=lang["questions"],
            context=lang["questions"],
            sentences=list(s),
            paragraphs=paragraphs,
            lists=[],
            codes=[],
            outros=[s[-1]],
            goals=lang["questions"],
            things=lang["titles"],
            code=(),
            foreign=True,
            language=lang["language"],
        )

    def topic(self, rng: random.Random) -> dict:
        if rng.random() < 0.15:
            return rng.choice(self.foreign)
        return rng.choice(self.topics)

    def question(self, rng: random.Random, topic: dict, first: bool, verbosity: float) -> str:
        q = rng.choice(topic["first"] if first else topic["questions"])
        if not self.demo and rng.random() < 0.08 * verbosity:
            # Users paste material: code, notes, a draft.
            pasted = (
                rng.choice(topic["code"])
                if topic["code"] and rng.random() < 0.5
                else "\n\n".join(rng.choices(topic["paragraphs"], k=rng.randint(1, 4)))
            )
            q = f"{q}\n\nHere's what I have so far:\n\n{pasted}"
        return q

    def reply(self, rng: random.Random, topic: dict, verbosity: float, cite=None) -> str:
        """An assistant answer: intro, paragraphs, maybe a list or code, maybe an outro."""
        if self.demo:
            n = rng.randint(1, 2)
        else:
            n = min(12, max(1, int(rng.expovariate(1 / (1.7 * verbosity)) + 0.8)))
        parts = [rng.choice(self.words["intros"])] if topic["lists"] and rng.random() < 0.7 else []
        pars = rng.choices(topic["paragraphs"], k=n)
        if cite is not None:
            pars = [p + cite(rng) for p in pars]
        parts.extend(pars)
        if topic["lists"] and rng.random() < (0.2 if self.demo else 0.45):
            parts.append(rng.choice(topic["lists"]))
        if topic["codes"] and rng.random() < (0.15 if self.demo else 0.4):
            parts.append(rng.choice(topic["codes"]))
        if rng.random() < 0.5:
            parts.append(rng.choice(topic["outros"]))
        return "\n\n".join(parts)

    def long_text(self, rng: random.Random, topic: dict, min_chars: int = 26_000) -> str:
        """Over 25k characters: a pasted document or a very long answer."""
        parts, n = [], 0
        while n < min_chars:
            p = rng.choice(topic["paragraphs"] if rng.random() < 0.7 else self.filler)
            parts.append(p)
            n += len(p) + 2
        return "\n\n".join(parts)

    def short(self, rng: random.Random, topic: dict) -> str:
        """One sentence in the assistant's voice."""
        return rng.choice(topic["sentences"])

    def context(self, rng: random.Random, topic: dict) -> str:
        """One sentence in the user's voice, saying what they are after."""
        return rng.choice(topic["context"])


_PRONOUNS = {"I": "you", "I'm": "you're", "I've": "you've", "my": "your", "My": "Your", "me": "you"}
_PRONOUN_RE = re.compile(r"\b(?:I'm|I've|I|my|My|me)\b")


def _second_person(clause: str) -> str:
    """'my loaf is dense' -> 'your loaf is dense': the user's problem retold by the assistant."""
    return _PRONOUN_RE.sub(lambda m: _PRONOUNS[m.group(0)], clause)


def _web_cite(rng: random.Random) -> str:
    return f" \ue200cite\ue202turn0search{rng.randint(0, 9)}\ue201"


def _browser_cite(rng: random.Random) -> str:
    return f" 【{rng.randint(0, 5)}†source】"


# ---------------------------------------------------------------------------
# ChatGPT conversations: a mapping tree of nodes.


# Rare features are also forced at fixed conversation slots, so any export of a few MB shows each one.
_RARE_EVERY = 64
_FORCED_LANGUAGES = {3: "ja", 11: "ru", 43: "zh"}  # slot -> language in languages.json
_DEMO_TURNS = ("image", "python", "search", "thinking", "foreign", "canmore", "search", "bio", "image", "plain")


class _ChatGPTBuilder:
    """Builds one ChatGPT conversation dict at a time, sized to a byte target."""

    def __init__(self, rng: random.Random, pool: _TextPool, *, sharded: bool, demo: bool):
        self.rng = rng
        self.pool = pool
        self.words = pool.words
        self.sharded = sharded
        self.demo = demo
        self.ratio = 1.0  # actual JSON bytes per estimated byte, learned as we go

    def learn(self, actual: int) -> None:
        """Compare the last conversation's estimated and real JSON size, so later ones land closer."""
        if self.est > 5_000:
            self.ratio = 0.8 * self.ratio + 0.2 * min(3.0, max(0.3, actual / self.est))

    # -- small helpers -------------------------------------------------------

    def _uuid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def _request_id(self) -> str:
        r = self.rng.getrandbits(66)
        region = ("IAD", "SJC", "FRA", "AMS")[r & 3]
        return f"{r >> 2:016x}-{region}"

    def _tick(self, lo: float = 2.0, hi: float = 90.0) -> float:
        self.t += self.rng.uniform(lo, hi)
        return round(self.t, 6)

    def _add(self, parent: str | None, message: dict | None, node_id: str | None = None, est: int = 0) -> str:
        nid = node_id or message["id"]
        node = {"id": nid, "message": message, "parent": parent}
        if not self.sharded:
            node["children"] = []
            if parent is not None:
                self.mapping[parent]["children"].append(nid)
        self.mapping[nid] = node
        self.est += est + 650
        if message is not None:
            self.n_messages += 1
        return nid

    def _message(
        self,
        role: str,
        content: dict,
        *,
        t,
        metadata: dict,
        name=None,
        recipient="all",
        channel=None,
        end_turn=None,
        weight=1.0,
        status="finished_successfully",
        mid=None,
    ) -> dict:
        author = self.authors.get((role, name))
        if author is None:
            author = self.authors[role, name] = {"role": role, "name": name, "metadata": {}}
        m = {"id": mid or self._uuid(), "author": author, "create_time": t, "update_time": None, "content": content}
        if self.era > 0:
            m["status"] = status
        m["end_turn"] = end_turn
        m["weight"] = weight
        m["metadata"] = metadata
        m["recipient"] = recipient
        if self.era > 0:
            m["channel"] = channel
        return m

    def _metadata_templates(self) -> None:
        """Per-conversation metadata skeletons; copying one is much cheaper than building it."""
        # Sub-objects are shared between messages: each conversation is serialized at once and never mutated.
        user = {"request_id": None, "message_source": None, "timestamp_": "absolute", "message_type": None}
        assistant = {
            "finish_details": {"type": "stop", "stop_tokens": [200002]},
            "is_complete": True,
            "citations": [],
            "content_references": [],
            "message_type": None,
            "model_slug": self.model,
            "default_model_slug": self.model,
            "parent_id": None,
            "request_id": None,
            "timestamp_": "absolute",
        }
        if self.era > 0:
            assistant.update(
                {"message_locale": "en-US", "image_results": [], "search_result_groups": [], "safe_urls": []}
            )
        if self.era == 2:
            user.update(
                {
                    "selected_github_repos": [],
                    "serialization_metadata": {"custom_symbol_offsets": []},
                    "dictation": False,
                }
            )
            assistant["model_switcher_deny"] = []
        self.user_md, self.assistant_md = user, assistant

    def _user_meta(self) -> dict:
        md = self.user_md.copy()
        md["request_id"] = self.request_id
        return md

    def _assistant_meta(self, parent: str, *, citations: list | None = None) -> dict:
        md = self.assistant_md.copy()
        md["parent_id"] = parent
        md["request_id"] = self.request_id
        if citations:
            md["content_references"] = citations
        return md

    # -- message kinds -------------------------------------------------------

    def user(self, parent: str, text: str, *, image=False) -> str:
        self.request_id = self._request_id()
        if image:
            w, h = self.rng.choice(((1024, 768), (1536, 2048), (828, 1792), (1920, 1080)))
            pointer = {
                "content_type": "image_asset_pointer",
                "asset_pointer": "file-service://file-"
                + "".join(self.rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789", k=22)),
                "size_bytes": self.rng.randint(80_000, 2_400_000),
                "width": w,
                "height": h,
                "fovea": None,
                "metadata": {"dalle": None, "gizmo": None, "sanitized": True} if self.era == 2 else None,
            }
            content = {"content_type": "multimodal_text", "parts": [pointer, text]}
        else:
            content = {"content_type": "text", "parts": [text]}
        mid = None
        if self.era == 1:
            h = f"{self.rng.getrandbits(112):028x}"  # client-made user ids start with aaa2 in 2023-24 exports
            mid = f"aaa2{h[:4]}-{h[4:8]}-4{h[9:12]}-a{h[13:16]}-{h[16:]}"
        m = self._message("user", content, t=self._tick(5, 240), metadata=self._user_meta(), mid=mid)
        return self._add(parent, m, est=len(text) + (350 if image else 0))

    def assistant(self, parent: str, text: str, *, citations=None, main=False) -> str:
        m = self._message(
            "assistant",
            {"content_type": "text", "parts": [text]},
            t=self._tick(),
            metadata=self._assistant_meta(parent, citations=citations),
            channel="final" if self.era == 2 else None,
            end_turn=True,
        )
        if self.rng.random() < 0.3:
            m["update_time"] = round(m["create_time"] + self.rng.uniform(1, 30), 6)
        if main:
            self.main_answers.append(m["id"])
        return self._add(parent, m, est=len(text) + 250 + 400 * len(citations or ()))

    def tool_call(self, parent: str, recipient: str, content: dict, est: int) -> str:
        m = self._message(
            "assistant",
            content,
            t=self._tick(1, 8),
            recipient=recipient,
            metadata=self._assistant_meta(parent),
            end_turn=False,
            channel="commentary" if self.era == 2 else None,
        )
        return self._add(parent, m, est=est + 250)

    def tool_output(self, parent: str, name: str, content: dict, est: int, extra_meta: dict | None = None) -> str:
        md = {
            "is_complete": True,
            "model_slug": self.model,
            "parent_id": parent,
            "request_id": self.request_id,
            "timestamp_": "absolute",
        }
        if extra_meta:
            md.update(extra_meta)
        m = self._message("tool", content, t=self._tick(1, 20), name=name, metadata=md)
        return self._add(parent, m, est=est + 100)

    def hidden_system(self, parent: str | None, *, mid=None) -> str:
        m = self._message(
            "system",
            {"content_type": "text", "parts": [""]},
            t=None,
            weight=0.0,
            metadata={"is_visually_hidden_from_conversation": True},
            mid=mid,
        )
        return self._add(parent, m)

    def custom_instructions(self, parent: str) -> str:
        about_user, about_model = self.rng.choice(self.words["about_user"]), self.rng.choice(self.words["about_model"])
        data = {"about_user_message": about_user, "about_model_message": about_model}
        if self.era == 0 or self.rng.random() < 0.3:
            # The older form: a hidden system message carrying the instructions only in metadata.
            m = self._message(
                "system",
                {"content_type": "text", "parts": [""]},
                t=None,
                weight=1.0,
                metadata={
                    "is_visually_hidden_from_conversation": True,
                    "is_user_system_message": True,
                    "user_context_message_data": data,
                },
            )
        else:
            content = {
                "content_type": "user_editable_context",
                "user_profile": self.words["profile_preamble"] + f"```{about_user}```",
                "user_instructions": self.words["instructions_preamble"] + f"```{about_model}```",
            }
            m = self._message(
                "user",
                content,
                t=None,
                metadata={
                    "is_visually_hidden_from_conversation": True,
                    "user_context_message_data": data,
                    "is_user_system_message": True,
                },
            )
        return self._add(parent, m, est=len(about_user) + len(about_model) + 500)

    # -- turns: each starts at tip (the end of the main branch) and returns the new tip --

    def turn_plain(self, tip: str, first: bool = False) -> str:
        rng, pool, topic = self.rng, self.pool, self.topic
        if rng.random() < self.p_branch:
            # An edit: an earlier version of this question, with its answer, left on a side branch.
            old = self.user(tip, pool.question(rng, topic, first, self.verbosity))
            self.assistant(old, pool.reply(rng, topic, self.verbosity))
        u = self.user(tip, self.long_text() if self._long() else pool.question(rng, topic, first, self.verbosity))
        if rng.random() < self.p_branch:
            # A regeneration: the answer the user asked to redo stays as a sibling.
            self.assistant(u, pool.reply(rng, topic, self.verbosity))
        text = self.long_text() if self._long() else pool.reply(rng, topic, self.verbosity)
        return self.assistant(u, text, main=True)

    def turn_image(self, tip: str) -> str:
        rng = self.rng
        q = rng.choice(self.words["image_questions"]) + " " + self.pool.context(rng, self.topic)
        u = self.user(tip, q, image=True)
        return self.assistant(
            u,
            "From the image, it looks like this is related to what we discussed. "
            + self.pool.reply(rng, self.topic, self.verbosity),
            main=True,
        )

    def turn_python(self, tip: str) -> str:
        rng = self.rng
        ask = rng.choice(self.words["python_asks"])
        u = self.user(tip, ask + " " + self.pool.context(rng, self.topic))
        runs = self.words["python_runs"]
        run = runs[rng.randrange(len(runs))]
        code, output = run["code"], run["output"]
        c = self.tool_call(
            u,
            "python",
            {"content_type": "code", "language": "unknown", "response_format_name": None, "text": code},
            len(code),
        )
        t = self.t
        if rng.random() < 0.15:
            error = "Encountered exception: <class 'TimeoutError'>. Code execution state was reset."
            out = self.tool_output(
                c, "python", {"content_type": "system_error", "name": "tool_error", "text": error}, len(error)
            )
        else:
            result = {
                "status": "success",
                "run_id": self._uuid(),
                "start_time": t,
                "update_time": t + 1.2,
                "code": code,
                "end_time": t + 1.2,
                "final_expression_output": output,
                "in_kernel_exception": None,
                "system_exception": None,
                "messages": [],
                "jupyter_messages": [
                    {
                        "msg_type": "status",
                        "parent_header": {"msg_id": self._uuid()},
                        "content": {"execution_state": "idle"},
                    }
                ],
                "timeout_triggered": None,
            }
            out = self.tool_output(
                c,
                "python",
                {"content_type": "execution_output", "text": output},
                len(output) * 2 + len(code) + 450,
                {"aggregate_result": result},
            )
        return self.assistant(out, self.pool.reply(self.rng, self.topic, self.verbosity), main=True)

    def _search_query(self) -> str:
        return self.rng.choice(self.topic["goals"] if self.rng.random() < 0.5 else self.topic["things"])

    def turn_browser(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Can you look up the latest advice on this? " + self.pool.context(rng, self.topic))
        query = self._search_query()
        c = self.tool_call(
            u,
            "browser",
            {"content_type": "code", "language": "unknown", "response_format_name": None, "text": f'search("{query}")'},
            len(query) + 10,
        )
        sites = rng.sample(self.words["sites"], 3)
        result = "\n".join(
            f"# 【{i}†{query} - {name}†{domain}】\n{self.pool.short(rng, self.topic)}"
            for i, (name, domain) in enumerate(sites)
        )
        d = self.tool_output(
            c,
            "browser",
            {
                "content_type": "tether_browsing_display",
                "result": result,
                "summary": None,
                "assets": None,
                "tether_id": None,
            },
            len(result),
            {
                "_cite_metadata": {
                    "citation_format": {"name": "tether_og"},
                    "metadata_list": [
                        {"type": "webpage", "title": n, "url": f"https://{d}/", "text": ""} for n, d in sites
                    ],
                }
            },
        )
        c2 = self.tool_call(
            d,
            "browser",
            {"content_type": "code", "language": "unknown", "response_format_name": None, "text": "mclick([0, 2])"},
            14,
        )
        name, domain = sites[0]
        quote = self.pool.reply(rng, self.topic, 1.0)
        url = f"https://{domain}/articles/{rng.randint(1000, 99999)}"
        q = self.tool_output(
            c2,
            "browser",
            {
                "content_type": "tether_quote",
                "url": url,
                "domain": domain,
                "text": quote,
                "title": f"{query} - {name}",
                "tether_id": None,
            },
            len(quote) + 100,
        )
        return self.assistant(q, self.pool.reply(rng, self.topic, self.verbosity, cite=_browser_cite), main=True)

    def turn_webrun(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Search the web for this please. " + self.pool.context(rng, self.topic))
        query = self._search_query()
        q = json.dumps({"search_query": [{"q": query, "recency": None}], "response_length": "short"})
        c = self.tool_call(
            u,
            "web.run",
            {"content_type": "code", "language": "unknown", "response_format_name": None, "text": q},
            len(q),
        )
        sites = rng.sample(self.words["sites"], 4)
        result = "\n".join(
            f"【turn0search{i}†{name}†{domain}】 {self.pool.short(rng, self.topic)}"
            for i, (name, domain) in enumerate(sites)
        )
        d = self.tool_output(
            c,
            "web.run",
            {
                "content_type": "tether_browsing_display",
                "result": result,
                "summary": None,
                "assets": None,
                "tether_id": None,
            },
            len(result),
        )
        refs = [
            {
                "matched_text": f"\ue200cite\ue202turn0search{i}\ue201",
                "start_idx": 0,
                "end_idx": 0,
                "alt": f"([{name}](https://{domain}/))",
                "type": "grouped_webpages",
                "items": [
                    {
                        "title": f"{query} | {name}",
                        "url": f"https://{domain}/{rng.randint(1000, 99999)}",
                        "pub_date": None,
                        "snippet": None,
                        "attribution": name,
                    }
                ],
            }
            for i, (name, domain) in enumerate(sites[:2])
        ]
        return self.assistant(
            d, self.pool.reply(rng, self.topic, self.verbosity, cite=_web_cite), citations=refs, main=True
        )

    def turn_thinking(self, tip: str) -> str:
        rng, topic = self.rng, self.topic
        u = self.user(tip, self.pool.question(rng, topic, False, self.verbosity))
        thoughts = [
            {
                "summary": f"Considering {rng.choice(topic['things'])}",
                "content": " ".join(rng.sample(topic["sentences"], 3)),
                "chunks": [],
                "finished": True,
            }
            for _ in range(rng.randint(1, 3))
        ]
        m = self._message(
            "assistant",
            {"content_type": "thoughts", "thoughts": thoughts, "source_analysis_msg_id": self._uuid()},
            t=self._tick(2, 10),
            metadata=self._assistant_meta(u),
            end_turn=False,
            channel="commentary",
        )
        th = self._add(u, m, est=sum(len(x["content"]) + 60 for x in thoughts) + 250)
        secs = rng.randint(3, 95)
        m = self._message(
            "assistant",
            {"content_type": "reasoning_recap", "content": f"Thought for {secs}s"},
            t=self._tick(1, 3),
            metadata=self._assistant_meta(th),
            end_turn=False,
            channel="commentary",
        )
        rr = self._add(th, m, est=250)
        return self.assistant(rr, self.pool.reply(rng, topic, self.verbosity), main=True)

    def turn_canmore(self, tip: str) -> str:
        rng = self.rng
        u = self.user(tip, "Can you put that in a document so we can edit it together?")
        doc = self.pool.reply(rng, self.topic, self.verbosity)
        if rng.random() < 0.5:
            recipient = "canmore.create_textdoc"
            body = json.dumps(
                {"name": self.title.lower().replace(" ", "_"), "type": "document", "content": doc}, ensure_ascii=False
            )
            reply = (
                f"Successfully created text document '{self.title}' which will be referenced in all future "
                f"messages with the unique identifier textdoc_id: '{self._uuid().replace('-', '')[:24]}'"
            )
        else:
            recipient = "canmore.update_textdoc"
            body = json.dumps(
                {"updates": [{"pattern": ".*", "multiple": False, "replacement": doc}]}, ensure_ascii=False
            )
            reply = f"Successfully updated text document with textdoc_id '{self._uuid().replace('-', '')[:24]}'"
        c = self.tool_call(
            u,
            recipient,
            {"content_type": "code", "language": "json", "response_format_name": None, "text": body},
            len(body),
        )
        o = self.tool_output(
            c,
            recipient,
            {"content_type": "text", "parts": [reply]},
            len(reply),
            {"canvas": {"textdoc_id": "x", "textdoc_type": "document", "version": rng.randint(1, 9)}},
        )
        return self.assistant(o, "I've put it in the document. " + self.pool.short(rng, self.topic), main=True)

    def turn_bio(self, tip: str) -> str:
        rng = self.rng
        goal = rng.choice(self.topic["goals"])
        u = self.user(
            tip,
            f"Remember that I want to {goal}."
            if rng.random() < 0.7
            else self.pool.question(rng, self.topic, False, self.verbosity),
        )
        memo = f"User wants to {goal}."
        c = self.tool_call(u, "bio", {"content_type": "text", "parts": [memo]}, len(memo))
        o = self.tool_output(c, "bio", {"content_type": "text", "parts": ["Model set context updated."]}, 30)
        return self.assistant(
            o, "Got it, I'll keep that in mind. " + self.pool.reply(rng, self.topic, self.verbosity), main=True
        )

    def _long(self) -> bool:
        if self.force_long > 0 and self.rng.random() < 0.3:
            self.force_long -= 1
            return True
        return not self.demo and self.target > 60_000 and self.rng.random() < 0.002

    def long_text(self) -> str:
        return self.pool.long_text(self.rng, self.topic)

    # -- a whole conversation -----------------------------------------------

    def conversation(self, target: int, t0: float, index: int) -> tuple[dict, int, bool]:
        """Return (conversation dict, message count, has dialogue) of about target bytes of JSON."""
        rng = self.rng
        self.target = target
        self.era = 0 if t0 < _ERA1_START else (1 if t0 < _ERA2_START else 2)
        self.t = t0
        self.mapping, self.est, self.n_messages, self.main_answers = {}, 600, 0, []
        # The demo sample is small, so it walks through the features instead of leaving them to chance.
        demo_turn = _DEMO_TURNS[index % len(_DEMO_TURNS)] if self.demo else None
        if demo_turn == "foreign":
            self.topic = rng.choice(self.pool.foreign)
        elif index % _RARE_EVERY in _FORCED_LANGUAGES:
            self.topic = self.pool.by_language[_FORCED_LANGUAGES[index % _RARE_EVERY]]
        else:
            self.topic = self.pool.topic(rng)
        self.title = rng.choice(self.words["titles_misc"]) if rng.random() < 0.04 else rng.choice(self.topic["titles"])
        self.model = rng.choice(self.words["models_by_era"][self.era])
        self.request_id = self._request_id()
        self.authors = {}
        self._metadata_templates()
        self.verbosity = 1.0 if self.demo else min(4.0, max(1.0, (target / 16_000) ** 0.3))
        self.p_branch = 0.12 if self.demo else 0.04
        self.force_long = 3 if target > 900_000 else 0
        want = target / self.ratio

        # The root: a literal id in newer exports, otherwise a uuid that may carry the hidden system message.
        if self.era > 0 and rng.random() < 0.75:
            root = self._add(None, None, "client-created-root")
            tip = self.hidden_system(root) if rng.random() < 0.9 else root
        elif rng.random() < 0.5:
            tip = root = self.hidden_system(None)
        else:
            root = self._add(None, None, self._uuid())
            tip = self.hidden_system(root)
        if rng.random() < 0.25:
            tip = self.custom_instructions(tip)

        dialogue = self.demo or not (index % (2 * _RARE_EVERY) == 37 or rng.random() < 0.004)
        if not dialogue:
            # Deliberately no user/assistant exchange: only hidden messages, maybe a memory update.
            if rng.random() < 0.6:
                memo = rng.choice(self.words["memories"])
                c = self.tool_call(tip, "bio", {"content_type": "text", "parts": [memo]}, len(memo))
                tip = self.tool_output(c, "bio", {"content_type": "text", "parts": ["Model set context updated."]}, 30)
            self.title = "New chat"
            main_leaf = tip
        else:
            tip = self.turn_plain(tip, first=True)
            kinds = self._turn_kinds()
            if demo_turn == "search":
                demo_turn = "webrun" if self.era == 2 else "browser"
            if demo_turn in kinds[0]:
                tip = getattr(self, "turn_" + demo_turn)(tip)
            while self.est < want:
                kind = rng.choices(kinds[0], kinds[1])[0]
                tip = getattr(self, "turn_" + kind)(tip)
            main_leaf = tip

        if self.era > 0 and dialogue and self._rare(index, 19, 0.01):
            # Exported while the answer was still streaming.
            leaf = self.mapping[main_leaf]["message"]
            leaf["status"], leaf["end_turn"] = "in_progress", None

        current = main_leaf
        answers = self.main_answers
        if dialogue and len(answers) >= 2 and self._rare(index, 23, 0.05):
            # The user went back up the tree: current_node is a non-leaf on the main branch.
            current = answers[rng.randrange(0, len(answers) - 1)]
        elif dialogue and self._rare(index, 29, 0.05):
            # A newer branch the user abandoned: current_node is an older leaf than the last one written.
            self.t += rng.uniform(600, 86_400)
            if len(answers) >= 2:
                anchor, first = answers[0], False
            else:
                # A later edit of the first question: a sibling of it.
                anchor, first = self.mapping[self.mapping[answers[0]]["parent"]]["parent"], True
            self.assistant(
                self.user(anchor, self.pool.question(rng, self.topic, first, 1.0)),
                self.pool.reply(rng, self.topic, 1.0),
            )
        elif self._rare(index, 7, 0.01):
            current = self._uuid()  # missing from mapping: readers must fall back to a leaf

        mapping = self.mapping
        if len(mapping) > 3 and self._rare(index, 31, 0.05):
            # The root is not always the first key.
            items = list(mapping.items())
            k = rng.randrange(1, len(items))
            mapping = dict(items[1 : k + 1] + items[:1] + items[k + 1 :])

        create_time = None if self._rare(index, 13, 0.003) else round(t0, 6)
        update_time = None if rng.random() < 0.01 else round(self.t + rng.uniform(0, 3600), 6)
        conv = {
            "title": self.title,
            "create_time": create_time,
            "update_time": update_time,
            "mapping": mapping,
            "moderation_results": [],
            "current_node": current,
            "plugin_ids": None,
        }
        cid = self._uuid()
        if self.era > 0:
            conv["conversation_id"] = cid
        conv.update(
            {
                "conversation_template_id": None,
                "gizmo_id": None,
                "is_archived": False,
                "safe_urls": [],
                "default_model_slug": self.model,
            }
        )
        if self.era == 2:
            conv.update(
                {
                    "gizmo_type": None,
                    "is_starred": None,
                    "conversation_origin": None,
                    "voice": None,
                    "async_status": None,
                    "disabled_tool_ids": [],
                    "is_do_not_remember": False,
                    "memory_scope": "global_enabled",
                    "sugar_item_id": None,
                }
            )
        conv["id"] = cid
        return conv, self.n_messages, dialogue

    def _rare(self, index: int, slot: int, p: float) -> bool:
        """A rare feature: chance p, and at least once every _RARE_EVERY conversations so small exports show it."""
        return (not self.demo and index % _RARE_EVERY == slot) or self.rng.random() < p

    def _turn_kinds(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        if self.topic["foreign"]:
            return ("plain", "thinking"), (85, 15 if self.era == 2 else 0)
        if self.era == 0:
            return ("plain", "python", "browser", "image"), (80, 8, 8, 4)
        if self.era == 1:
            return ("plain", "image", "python", "browser", "bio", "canmore"), (72, 7, 8, 5, 4, 4)
        return ("plain", "thinking", "webrun", "python", "image", "canmore", "bio"), (56, 14, 10, 6, 6, 5, 3)


# ---------------------------------------------------------------------------
# Claude.ai conversations: a flat list of messages linked by parent_message_uuid.


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _ClaudeBuilder:
    """Builds one Claude.ai conversation dict at a time, sized to a byte target."""

    def __init__(self, rng: random.Random, pool: _TextPool, *, demo: bool):
        self.rng = rng
        self.pool = pool
        self.demo = demo
        self.account = f"{rng.getrandbits(128):032x}"
        self.ratio = 1.0

    def learn(self, actual: int) -> None:
        """Compare the last conversation's estimated and real JSON size, so later ones land closer."""
        if self.est > 5_000:
            self.ratio = 0.8 * self.ratio + 0.2 * min(3.0, max(0.3, actual / self.est))

    def _uuid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:]}"

    def _block(self, kind: str, **fields) -> dict:
        start = self.t
        self.t += self.rng.uniform(0.5, 20)
        return {"start_timestamp": _iso(start), "stop_timestamp": _iso(self.t), "flags": None, "type": kind, **fields}

    def _start(self) -> str:
        """Move the clock to a new message: its created_at, which its blocks then follow."""
        self.t += self.rng.uniform(3, 120)
        return _iso(self.t)

    def _message(self, sender: str, parent: str, blocks: list[dict], created: str) -> str:
        rng = self.rng
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        text = "\n\n".join(texts)
        r = rng.random()
        if any(b["type"] == "tool_use" for b in blocks):
            # The flat text field renders tool use as a placeholder the blocks don't contain.
            text = "\n```\nThis block is not supported on your current device yet.\n```\n\n" + text
        elif r < 0.03:
            text = ""  # the flat field is sometimes empty while the blocks hold the message
        elif r < 0.05:
            # Or stale: an earlier version of the message.
            text = self.pool.context(rng, self.topic) if sender == "human" else self.pool.short(rng, self.topic)
        uid = self._uuid()
        attachments = []
        if sender == "human" and not self.demo and rng.random() < 0.03:
            doc = "\n\n".join(rng.choices(self.topic["paragraphs"], k=rng.randint(1, 4)))
            attachments.append(
                {"file_name": "notes.txt", "file_size": len(doc.encode()), "file_type": "txt", "extracted_content": doc}
            )
        self.messages.append(
            {
                "uuid": uid,
                "text": text,
                "content": blocks,
                "sender": sender,
                "index": len(self.messages),
                "created_at": created,
                "updated_at": _iso(self.t),
                "truncated": False,
                "attachments": attachments,
                "files": [],
                "parent_message_uuid": parent,
            }
        )
        self.est += (
            330
            + 230 * len(blocks)
            + len(text)
            + sum(len(b.get("text", "")) + len(b.get("thinking", "")) for b in blocks)
        )
        return uid

    def human(self, parent: str, first: bool) -> str:
        rng = self.rng
        created = self._start()
        if not self.demo and self.target > 60_000 and rng.random() < (0.05 if self.target > 900_000 else 0.002):
            q = self.pool.long_text(rng, self.topic)
        else:
            q = self.pool.question(rng, self.topic, first, self.verbosity)
        return self._message("human", parent, [self._block("text", text=q, citations=[])], created)

    def assistant(self, parent: str) -> str:
        rng, topic = self.rng, self.topic
        created = self._start()
        blocks = []
        if rng.random() < 0.25:
            blocks.append(
                self._block(
                    "thinking",
                    thinking=" ".join(rng.sample(topic["sentences"], 3)),
                    summaries=[{"summary": f"Thinking about {rng.choice(topic['things'])}"}],
                    cut_off=False,
                )
            )
        if rng.random() < 0.12:
            query = rng.choice(topic["goals"])
            blocks.append(
                self._block(
                    "tool_use",
                    name="web_search",
                    input={"query": query},
                    message="Searching the web",
                    integration_name=None,
                    context=None,
                    display_content=None,
                )
            )
            blocks.append(
                self._block(
                    "tool_result",
                    name="web_search",
                    is_error=False,
                    message=None,
                    content=[
                        {"type": "text", "text": self.pool.short(rng, topic), "uuid": self._uuid()} for _ in range(3)
                    ],
                )
            )
        blocks.append(self._block("text", text=self.pool.reply(rng, topic, self.verbosity), citations=[]))
        return self._message("assistant", parent, blocks, created)

    def conversation(self, target: int, t0: float, index: int) -> tuple[dict, int, bool]:
        """Return (conversation dict, message count, has dialogue) of about target bytes of JSON."""
        rng = self.rng
        self.target, self.t, self.messages, self.est = target, t0, [], 350
        self.topic = self.pool.topic(rng)
        self.verbosity = 1.0 if self.demo else min(4.0, max(1.0, (target / 16_000) ** 0.3))
        p_branch = 0.12 if self.demo else 0.05
        name = "" if rng.random() < 0.03 else rng.choice(self.topic["titles"])
        dialogue = self.demo or rng.random() >= 0.01
        tip = CLAUDE_ROOT
        while dialogue and (self.est < target / self.ratio or not self.messages):
            if rng.random() < p_branch:
                # An edited question: the earlier version and its answer stay as a side branch.
                self.assistant(self.human(tip, not self.messages))
            h = self.human(tip, not self.messages)
            if rng.random() < p_branch:
                self.assistant(h)  # a regenerated answer
            tip = self.assistant(h)
        conv = {
            "uuid": self._uuid(),
            "name": name,
            "summary": "",
            "created_at": _iso(t0),
            "updated_at": _iso(self.t + rng.uniform(0, 3600)),
            "account": {"uuid": self.account},
            "chat_messages": self.messages,
        }
        return conv, len(self.messages), dialogue
