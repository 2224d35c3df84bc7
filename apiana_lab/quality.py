"""A model-free quality profile of one summary: its length, how much it copies, loops, echoes, cuts and language.

Every measure comes from three things a run already has: the summary, its chunk's text and the
finish reason. Nothing loads a model except the language detector (py3langid, whose small model
ships inside its wheel and loads once, on first use). The flags' thresholds were chosen on the
labelled set in tests/data/quality_labels.jsonl; `python -m apiana_lab.bench.quality_labels`
prints each flag's precision and recall on it.

Tokens are a cheap regex split: runs of letters and digits (with inner apostrophes, so "I'm" and
"j'ai" stay whole), and each character of a script written without spaces (Chinese, Japanese
kana, Thai, Lao, Khmer, Myanmar) as a token of its own, so n-grams there are character n-grams.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import threading
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import compress, repeat
from pathlib import Path

from .chunking import SPEAKER_LABELS

FLAGS = ("empty", "loop", "echo", "truncated", "wrong_language", "not_first_person")

# Scripts written without spaces between words: each character is a token.
_UNSPACED = (
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
)
_WORD = rf"[^\W{_UNSPACED}]+(?:'[^\W{_UNSPACED}]+)*"
_TOKEN = re.compile(rf"[{_UNSPACED}]|{_WORD}")
_UNSPACED_CHAR = re.compile(rf"[{_UNSPACED}]")
_PLAIN_TOKEN = re.compile(r"\w+(?:'\w+)*")

# Role labels a transcript is written with: the chunker's own ("User", "Assistant", "Code output",
# "Tool call (bio)", ...) and those of other exports and chat formats. "Other" is left out: a memory
# may well open a line with "Other:".
_ROLES = sorted(
    {"User", "Assistant", "ChatGPT", "Human", "Claude", "AI", "System", *SPEAKER_LABELS.values()} - {"Other"},
    key=len,
    reverse=True,
)
_ROLE = "|".join(re.escape(r) for r in _ROLES)
_RECIPIENT = r"(?: \([^)\n]{1,40}\))?"
# A label anywhere, as the transcript writes it ("User:", "**Assistant:**", "Tool call (bio):").
_ROLE_MARKER = re.compile(rf"(?<![\w'])(?:\*\*)?(?:{_ROLE}){_RECIPIENT}(?:\*\*)?\s?:(?!//)")
# A line laid out as a turn of a transcript: opened by a role label, in any case, also as the small
# model writes them ("The user:", "The user's response:", "I:"); or a copy of the prompt's header,
# `Conversation "title" (date):`, even garbled ('<<Conversation "title">>', '"title" (2025-03-19)').
_TURN_OPEN = (
    rf"^[ \t>*_#<-]*(?:(?:the\s+)?(?:{_ROLE}|I|Me)(?:'s\s+\w+)?{_RECIPIENT}(?:\*\*)?\s?:"
    r"|conversation\s*[:\"“«(](?=[^\n]{0,160}?[:>)]\**[ \t]*$)"  # ends as a header: 'Conversation "x" was ...' is prose
    r"|[\"“«][^\"”»\n]{1,200}[\"”»]\s*\(\d{4}-\d\d-\d\d)"
)
_TURN_LABEL = re.compile(_TURN_OPEN, re.MULTILINE | re.IGNORECASE)
_TURN_LINE = re.compile(_TURN_OPEN + ".*$", re.MULTILINE | re.IGNORECASE)
_CONTINUED = re.compile(r"^\(continued\) ", re.MULTILINE)
# A chunk's tool traffic, code and hidden messages, up to the next dialogue turn: not its language.
_NON_DIALOGUE = re.compile(
    rf"^(?:{'|'.join(re.escape(v) for v in sorted(SPEAKER_LABELS.values(), key=len, reverse=True))}){_RECIPIENT}:"
    r".*?(?=\n\n(?:User|Assistant):|\Z)",
    re.MULTILINE | re.DOTALL,
)
_QUOTED = re.compile(r'"[^"\n]*"?|“[^”\n]*”?|«[^»\n]*»?|「[^」\n]*」?|„[^“\n]*“?')
_SENTENCE = re.compile(r"[.!?…]+\s+|[。！？]+|\n+")  # the marks go: sentences are compared without them
# Sentence marks become line breaks, other punctuation goes (for comparing sentences).
_SENTENCE_CUTS = str.maketrans(
    {**dict.fromkeys(".!?…。！？", "\n"), **dict.fromkeys(",;:、，\"'‘’“”«»「」()[]{}*_#~`-—")}
)
_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_URL = re.compile(r"\bhttps?://\S+")

_SENTENCE_END = frozenset(".!?…。！？")
# Closers and decorations that may follow a sentence's last mark: quotes, brackets, markdown, emoji.
_TRAILING = "\"'”’»)]}」』*_~` \t\r\n"

# The languages a summary's language is judged among. Restricting the detector keeps it from
# answering a rare neighbour of a common language (Galician for Portuguese, Norwegian Nynorsk...).
LANGUAGES = (
    "ar", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hu", "id", "it", "ja",
    "ko", "nl", "no", "pl", "pt", "ro", "ru", "sv", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip

# First-person words (singular and plural: "we discussed" is a memory too), by language. Where a
# language drops its pronouns ("he sugerido", "ho suggerito"), the first-person auxiliary counts.
FIRST_PERSON: dict[str, frozenset[str]] = {
    "en": frozenset("i me my mine myself i'm i've i'd i'll we us our ours ourselves we're we've we'd we'll".split()),
    "fr": frozenset("je moi me mon ma mes moi-même nous notre nos".split()),
    "de": frozenset(
        "ich mich mir mein meine meinen meinem meiner meines wir uns unser unsere unseren unserem unserer".split()
    ),
    "es": frozenset(
        "yo me mi mis mí mío mía míos mías conmigo nosotros nosotras nos nuestro nuestra nuestros nuestras he".split()
    ),
    "it": frozenset("io mi me mio mia miei mie ho noi ci nostro nostra nostri nostre abbiamo".split()),
    "pt": frozenset("eu me mim meu minha meus minhas comigo nós nos nosso nossa nossos nossas".split()),
    "nl": frozenset("ik mij me mijn m'n wij we ons onze".split()),
}
# Elided forms: French "j'ai", "m'a"; Italian "m'ha".
_ELIDED = {"fr": ("j'", "m'"), "it": ("m'",)}
# Spanish, Portuguese and Italian drop their pronouns ("le sugerí", "ajudei", "abbiamo deciso"):
# first-person verb endings count there, minus the common words that share them.
_VERB_ENDINGS = {
    "es": (
        ("é", "í", "amos", "emos", "imos"),
        frozenset("qué porqué café bebé josé puré comité sí así aquí allí ahí extremos supremos primos".split()),
    ),
    "pt": (("ei", "amos", "emos", "imos"), frozenset("lei rei primos".split())),
    "it": (("iamo",), frozenset()),
}
_ACCENTED = re.compile("[áéíóúâêôãõàèìòù]")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Where each flag starts; the defaults were chosen on tests/data/quality_labels.jsonl."""

    # On the tuning records, beyond the chunk's own repeats: loops repeat 25-96% of their 4-grams,
    # summaries without one at most 20%. A loop cycling short lines ("Bien,", "Poules.") repeats few
    # n-grams but half its lines, where summaries without a loop repeat at most 16% of their
    # sentences; and none of those repeats a span longer than 16 words.
    loop_repeated_share: float = 0.22  # share of word 4-grams (character 8-grams) repeating an earlier one
    loop_repeated_sentences: float = 0.2  # or share of sentences and lines repeating an earlier one
    loop_repeated_span: int = 20  # or a span of this many words (twice as many characters) occurring twice
    # Every labelled echo (tuning records) has a line opening with a role label or a copied header;
    # no summary without one has any.
    echo_turn_lines: int = 1  # lines opening with a role label ("User:", "The user:", the prompt's header)
    echo_role_markers: int = 2  # or role labels anywhere ("Human: ... AI: ..." on one line)
    # The shortest labelled chunks are 10 words, and the detector gave their language 0.85 and 0.97.
    # A chunk that is mostly SQL got 0.49 for English: left unjudged. Fewer words than this (a copied
    # prompt line) do not decide a summary's language.
    language_min_tokens: int = 10  # both texts at least this long before their languages are compared
    language_min_confidence: float = 0.8  # the detector's probability for each text's language
    # A chunk that mixes languages ("これは何ですか？ I'm trying to find duplicate rows.") gives its
    # second one a few percent; a summary in any language the chunk gives this much is not wrong.
    language_source_share: float = 0.01
    # Third-person summaries (tuning records) have no first-person word at all; first-person ones at
    # least 1.4 per 100 words, counting each sentence once.
    first_person_min_rate: float = 0.01  # first-person words per token of the summary's own narration
    first_person_min_tokens: int = 8  # a shorter narration (each sentence once) is not judged for voice


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True, slots=True)
class QualityProfile:
    """Measures of one summary against its chunk, and the flags they raise.

    Plain fields, so a later scorer (a judge model, say) adds its own next to these and
    `summarize_profiles` takes its numbers' medians and its flags' shares without being told.
    """

    tokens: int  # summary length in regex tokens (words; characters of unspaced scripts)
    source_tokens: int
    compression: float  # summary tokens / chunk tokens (Newsroom reports the inverse)
    coverage: float  # share of summary tokens inside fragments copied from the chunk (Grusky et al., 2018)
    density: float  # mean length of the copied fragment each summary token belongs to
    longest_copied: int  # longest span copied verbatim from the chunk, in tokens
    repeated_ngrams: float  # share of the summary's n-grams repeating an earlier one (beyond the chunk's own repeats)
    repeated_sentences: float  # the same for its sentences and lines
    longest_repeat: int  # longest span that occurs twice in the summary, in tokens
    role_markers: int  # role labels ("User:", "Assistant:", the chunk's own) anywhere in the summary
    turn_lines: int  # lines that open with a role label, as turns of a transcript do
    ends_mid_sentence: bool
    finish_reason: str | None
    language: str | None  # the summary's, when long and clear enough to tell
    source_language: str | None
    first_person: int  # first-person words, in the summary's language
    voice: str  # "first", "other", or "unknown": a language whose pronouns FIRST_PERSON lacks, or too little narration
    flags: frozenset[str] = field(default_factory=frozenset)

    def to_dict(self) -> dict:
        """A JSON-ready dict; flags as a sorted list."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["flags"] = sorted(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> QualityProfile:
        """The profile `to_dict` wrote; keys this version does not know (a newer scorer's) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["flags"] = frozenset(d.get("flags", ()))
        return cls(**kwargs)


def tokenize(text: str) -> list[str]:
    """Lower-cased regex tokens: words, and single characters of scripts without spaces."""
    text = text.replace("\u2019", "'").lower()
    # Most text has no unspaced script: the plain word pattern is faster on it and splits it the same way.
    return (_TOKEN if _UNSPACED_CHAR.search(text) else _PLAIN_TOKEN).findall(text)


def fragments(summary: list[str], source: list[str]) -> list[int]:
    """Lengths of the extractive fragments of `summary` in `source` (Grusky et al., 2018, greedy).

    From each position, the longest run of tokens also found in the source, in order, is a fragment;
    the walk then skips past it, or one token on when there is none. This takes the true longest
    match at each position (the paper's pseudo-code can skip a candidate that starts inside another).
    Runs of two or more start where the source has the same two tokens, so only those places are tried.
    """
    n, m = len(summary), len(source)
    vocabulary = set(source)
    wanted = set(zip(summary, summary[1:]))
    # The scan of the (long) source runs in C: only its places holding a wanted pair reach Python.
    hits = compress(range(m), map(wanted.__contains__, zip(source, source[1:])))
    starts: dict[tuple[str, str], list[int]] = {}
    for j in hits:
        starts.setdefault((source[j], source[j + 1]), []).append(j)
    out, i = [], 0
    while i < n:
        candidates = starts.get((summary[i], summary[i + 1])) if i + 1 < n else None
        if candidates:
            best = 2
            for j in candidates:
                k = 2
                while i + k < n and j + k < m and summary[i + k] == source[j + k]:
                    k += 1
                if k > best:
                    best = k
            out.append(best)
            i += best
        elif summary[i] in vocabulary:
            out.append(1)
            i += 1
        else:
            i += 1
    return out


def coverage_density(summary: list[str], source: list[str]) -> tuple[float, float, int]:
    """Coverage, density and the longest fragment of `summary` against `source`."""
    if not summary:
        return 0.0, 0.0, 0
    frags = fragments(summary, source)
    n = len(summary)
    return sum(frags) / n, sum(f * f for f in frags) / n, max(frags, default=0)


def repetition(tokens: list[str], source: list[str] = (), n: int | None = None) -> tuple[float, int]:
    """The share of n-grams that repeat an earlier one, and the longest span occurring twice (in tokens).

    An n-gram counts as repeated only beyond the times the source holds it: a summary that copies
    a chunk's own repetitions is not looping. n defaults to 4 for words and 8 for the characters of
    Chinese, Japanese or Thai text.
    """
    n = n or _ngram_size(tokens)
    # One character per distinct token: n-grams become slices of a string, hashed and compared in C.
    ids: dict[str, int] = {}
    text = "".join(chr(ids.setdefault(t, len(ids) + 1)) for t in tokens)
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    repeats = len(set(grams)) < len(grams)
    share = 0.0
    if repeats:
        other = "".join(map(chr, map(ids.get, source, repeat(0))))  # 0: a token the summary lacks
        share = _excess_share(grams, [other[i : i + n] for i in range(len(other) - n + 1)])
    # "Some k-gram occurs twice" holds for every k below the longest repeat and none above: search
    # for it, starting on the right side of n.
    lo, hi = (n, len(tokens) - 1) if repeats else (0, n - 1)  # the answer lies in [lo, hi]
    while lo < hi:
        k = (lo + hi + 1) // 2
        if _repeats(text, k):
            lo = k
        else:
            hi = k - 1
    return share, lo


def repeated_sentences(summary: str, source: str = "") -> float:
    """The share of the summary's sentences and lines that repeat an earlier one (beyond the source's own repeats).

    Catches loops that cycle short lines ("Bien,", "Poules.") or whole sentences with little
    change between them, where few word n-grams repeat.
    """
    sentences = _sentences(summary)
    if len(set(sentences)) == len(sentences):
        return 0.0
    return _excess_share(sentences, _sentences(source))


def ends_mid_sentence(text: str) -> bool:
    """True when the text's last sentence has no closing mark (emoji, quotes and markdown after one are fine)."""
    stripped = text.rstrip(_TRAILING)
    while stripped and unicodedata.category(stripped[-1]) in ("So", "Sk", "Mn", "Cf"):
        stripped = stripped[:-1].rstrip(_TRAILING)  # "Good luck! 🚀", variation selectors, zero-width joiners
    if not stripped:
        return False
    if text.rstrip().endswith("```"):
        return False  # a closed code block
    return stripped[-1] not in _SENTENCE_END


def profile(
    summary: str, source: str, finish_reason: str | None = None, *, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> QualityProfile:
    """The quality profile of `summary`, written from the chunk text `source`."""
    th = thresholds
    tokens = tokenize(summary)
    source_tokens = tokenize(source)
    coverage, density, longest_copied = coverage_density(tokens, source_tokens)
    n = _ngram_size(tokens)
    repeated, longest_repeat = repetition(tokens, source_tokens, n)
    sentences_repeated = repeated_sentences(summary, source)
    scale = 2 if n > 4 else 1  # spans of characters, not words
    role_markers = len(_ROLE_MARKER.findall(summary))
    turn_lines = len(_TURN_LINE.findall(summary))
    mid = ends_mid_sentence(summary)

    # The summary's own words: transcript turns and quotations speak in someone else's voice. A
    # summary that is nothing but turns gets its language from what the turns say, labels left out.
    narration = _narration(summary) if turn_lines or '"' in summary or "\u201c" in summary else summary
    narration_tokens = tokenize(narration) if narration is not summary else tokens
    if len(narration_tokens) >= th.language_min_tokens:
        language = detect_language(narration, th.language_min_confidence)
    elif len(tokens) >= th.language_min_tokens:
        language = detect_language(_TURN_LABEL.sub(" ", summary), th.language_min_confidence)
    else:
        language = None
    source_language, source_languages = None, frozenset()
    if len(source_tokens) >= th.language_min_tokens:
        ranked = _rank(_prose(source[: 8 * _DETECT_BYTES]))  # a prefix long enough to hold a code block whole
        if ranked[0][1] >= th.language_min_confidence:
            source_language = ranked[0][0]
            source_languages = frozenset(lang for lang, p in ranked if p >= th.language_source_share)
    voice_tokens = tokenize(_unique_sentences(narration)) if narration_tokens else []
    first = _first_person(voice_tokens, language)
    if language not in FIRST_PERSON or len(voice_tokens) < th.first_person_min_tokens:
        voice = "unknown"
    else:
        voice = "first" if first >= th.first_person_min_rate * len(voice_tokens) else "other"

    flags = set()
    if not tokens:
        flags.add("empty")
    else:
        if (
            repeated >= th.loop_repeated_share
            or sentences_repeated >= th.loop_repeated_sentences
            or longest_repeat >= th.loop_repeated_span * scale
        ):
            flags.add("loop")
        if turn_lines >= th.echo_turn_lines or role_markers >= th.echo_role_markers:
            flags.add("echo")
        if finish_reason == "length" and mid:
            flags.add("truncated")
        if language and source_language and language not in source_languages:
            flags.add("wrong_language")
        if voice == "other":
            flags.add("not_first_person")
    return QualityProfile(
        tokens=len(tokens),
        source_tokens=len(source_tokens),
        compression=len(tokens) / len(source_tokens) if source_tokens else 0.0,
        coverage=coverage,
        density=density,
        longest_copied=longest_copied,
        repeated_ngrams=repeated,
        repeated_sentences=sentences_repeated,
        longest_repeat=longest_repeat,
        role_markers=role_markers,
        turn_lines=turn_lines,
        ends_mid_sentence=mid,
        finish_reason=finish_reason,
        language=language,
        source_language=source_language,
        first_person=first,
        voice=voice,
        flags=frozenset(flags),
    )


def summarize_profiles(profiles: Iterable[QualityProfile | Mapping]) -> dict:
    """Count and share of each flag, the share with any flag, and the median of every numeric measure.

    One pass that keeps only the numbers, 8 bytes each: a run's profiles (dicts of 2 KB each) can
    stream through from the store without being held.
    """
    n = flagged = 0
    seen: Counter[str] = Counter()
    numeric: dict[str, array] = {}
    for p in profiles:
        row = p.to_dict() if isinstance(p, QualityProfile) else p
        n += 1
        flags = row.get("flags", ())
        flagged += bool(flags)
        seen.update(set(flags))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = numeric.get(key)
                if values is None:
                    values = numeric[key] = array("q" if isinstance(value, int) else "d")
                elif values.typecode == "q" and isinstance(value, float):
                    values = numeric[key] = array("d", values)
                values.append(value)
    names = list(FLAGS) + sorted(set(seen) - set(FLAGS))  # a later scorer's flags come after, by name
    return {
        "count": n,
        "flagged": flagged,
        "flagged_share": flagged / n if n else 0.0,
        "flags": {name: {"count": seen[name], "share": seen[name] / n if n else 0.0} for name in names},
        "medians": {key: statistics.median(values) for key, values in numeric.items()},
    }


# --- language -------------------------------------------------------------------------------------

# py3langid walks the text byte by byte in Python: a bounded sample keeps a 1,000-word chunk cheap,
# and a few hundred bytes are plenty to tell one of LANGUAGES from the others.
_DETECT_BYTES = 200
_detector = None
_detector_lock = threading.Lock()


def detect_language(text: str, min_confidence: float = DEFAULT_THRESHOLDS.language_min_confidence) -> str | None:
    """The ISO 639-1 code of `text`'s language among LANGUAGES, or None when the detector is unsure."""
    language, confidence = _rank(text)[0]
    return language if confidence >= min_confidence else None


def _rank(text: str) -> list[tuple[str, float]]:
    """LANGUAGES with the detector's probability for each (summing to 1), most likely first."""
    sample = text.encode("utf-8")[:_DETECT_BYTES].decode("utf-8", "ignore")
    return _get_detector().rank(sample)


def _get_detector():
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                _detector = _load_detector()
    return _detector


def _load_detector():
    """py3langid's identifier over LANGUAGES, from its bundled model, in half the memory its own loader takes.

    Its loader holds the model's 39 MB state table twice while it copies it into an `array`, and
    `set_languages` keeps all 140 languages' 28 MB of weights for a later reset: 102 MB at the
    peak, 79 MB kept, in a job that otherwise stays under 100 MB. Here the table stays in the
    array numpy read (a memoryview indexes as fast as an `array`) and only LANGUAGES' weights are
    kept: 51 MB at the peak and kept. The ranks are the same (tests/test_quality.py checks them
    against py3langid's own loader).
    """
    # Imported here: numpy and the model's load are paid by the first profile, not by `import apiana_lab`.
    import lzma
    import shutil
    import tempfile

    import numpy as np
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    # As py3langid does: the uncompressed model goes to a temporary file, never whole into memory.
    with tempfile.TemporaryFile(suffix=".npz") as tmp:
        with lzma.open(MODEL_DIR / MODEL_FILE) as src:
            shutil.copyfileobj(src, tmp, length=1 << 20)
        tmp.seek(0)
        with np.load(tmp, allow_pickle=False) as model:
            classes = model["classes"].tolist()
            keep = [i for i, c in enumerate(classes) if c in LANGUAGES]
            weights = model["ptc"][:, keep]  # a copy: the 97 languages' table goes at once
            return LanguageIdentifier(
                weights,
                model["pc"][keep],
                [classes[i] for i in keep],
                memoryview(model["nextmove"]),
                model["out_feat"].tolist(),
                norm_probs=True,
                tk_row=memoryview(model["nextmove_row"]),
            )


def _prose(source: str) -> str:
    """The chunk's dialogue without the English role labels, tool traffic, code and links that pull it to English."""
    text = _NON_DIALOGUE.sub(" ", source)
    text = _CODE_BLOCK.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _CONTINUED.sub("", text)
    return _TURN_LABEL.sub(" ", text)


def _narration(summary: str) -> str:
    """The summary without its transcript-like lines and quotations: what it says in its own voice."""
    return _QUOTED.sub(" ", _TURN_LINE.sub(" ", summary))


def _unique_sentences(text: str) -> str:
    """Each sentence once, so a looping sentence counts once when the voice is weighed."""
    return "\n".join(dict.fromkeys(s for s in _SENTENCE.split(text) if s.strip()))


# --- helpers --------------------------------------------------------------------------------------


def _ngram_size(tokens: list[str]) -> int:
    """4 for words; 8 for character tokens, about as many words in Chinese or Japanese."""
    head = tokens[:200]
    unspaced = len(_UNSPACED_CHAR.findall("".join(t for t in head if len(t) == 1)))
    return 8 if unspaced * 2 > len(head) else 4


def _excess_share(items: list, source_items: list) -> float:
    """The share of `items` that repeat an earlier item more times than `source_items` holds it (at least once)."""
    counts = Counter(items)
    repeated = {item for item, c in counts.items() if c > 1}
    if not repeated:
        return 0.0
    in_source = Counter(compress(source_items, map(repeated.__contains__, source_items)))
    return sum(counts[item] - max(1, in_source[item]) for item in repeated if counts[item] > in_source[item]) / len(
        items
    )


def _sentences(text: str) -> list[str]:
    """Sentences and lines, normalised: case and punctuation do not tell two apart."""
    # One str.translate cuts at every mark and drops the rest: a regex pass costs 20 times as much.
    return [part for part in map(str.strip, text.lower().translate(_SENTENCE_CUTS).split("\n")) if part]


def _repeats(text: str, k: int) -> bool:
    """Whether some k characters of `text` occur twice."""
    count = len(text) - k + 1
    return k > 0 and count > 1 and len({text[i : i + k] for i in range(count)}) < count


def _first_person(tokens: list[str], language: str | None) -> int:
    words = FIRST_PERSON.get(language or "")
    if words is None:
        return 0
    elided = _ELIDED.get(language, ())
    endings, exceptions = _VERB_ENDINGS.get(language, ((), frozenset()))
    return sum(
        1
        for t in tokens
        if t in words
        or (elided and t.startswith(elided))
        or (
            endings
            and len(t) > 2
            and t.endswith(endings)
            and t not in exceptions
            # "-imos" after an accent is an adjective ("últimos", "próximos"), not a verb ("vivimos")
            and not (t.endswith("imos") and _ACCENTED.search(t))
        )
    )


# --- agreement with human labels -----------------------------------------------------------------


def load_labels(path: str | Path) -> list[dict]:
    """The labelled records: chunk, summary, finish_reason and `labels` (the flags a reader gave it)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        unknown = set(r["labels"]) - set(FLAGS)
        if unknown:
            raise ValueError(
                f"{path}: record {r['id']} has unknown labels {sorted(unknown)}; known: {', '.join(FLAGS)}"
            )
    return records


def score_flags(records: list[dict], thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict:
    """Each flag's true/false positives and negatives, precision and recall, over `records`; and the misses by id."""
    predicted = [profile(r["summary"], r["chunk"], r["finish_reason"], thresholds=thresholds).flags for r in records]
    scores, misses = {}, {}
    for flag in FLAGS:
        tp = fp = fn = 0
        for r, flags in zip(records, predicted):
            truth, said = flag in r["labels"], flag in flags
            tp += truth and said
            fp += said and not truth
            fn += truth and not said
            if truth != said:
                misses.setdefault(flag, []).append({"id": r["id"], "missed" if truth else "false_alarm": True})
        scores[flag] = {
            "positives": tp + fn,
            "flagged": tp + fp,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None,  # None: never raised, so nothing to be right about
            "recall": tp / (tp + fn) if tp + fn else None,
        }
    return {"records": len(records), "flags": scores, "misses": misses}
