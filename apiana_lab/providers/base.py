"""The one small interface every backend implements."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from apiana_lab.errors import ConfigError, ProviderError

# A prompt is plain text (sent as one user message) or a chat: [{"role", "content"}, ...].
Prompt = str | Sequence[dict]


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """Typed, bounded generation options; a misspelt option is an error, not a no-op."""

    max_tokens: int = 300
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # always generate max_tokens: benchmarks that need a fixed output length
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens (vLLM's and transformers' meaning); 1 is off

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise ConfigError(f"temperature must be between 0 and 2, not {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not 0.0 < float(self.repetition_penalty) <= 2.0:
            raise ConfigError(f"repetition_penalty must be in (0, 2], not {self.repetition_penalty!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationOptions:
        """Build from keyword arguments, naming the closest valid option for a typo."""
        known = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown generation option {name!r}.{hint} Valid options: {', '.join(known)}.")
        return cls(**kwargs)

    def replace(self, **changes) -> GenerationOptions:
        return GenerationOptions.from_kwargs(**{**asdict(self), **changes})

    def digest(self) -> str:
        """Stable hash, part of the key under which summaries are stored."""
        fields_ = asdict(self)
        if fields_["repetition_penalty"] == 1.0:  # added later: at its default, stores made before still match
            del fields_["repetition_penalty"]
        return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(slots=True)
class Completion:
    """What a provider gives back for one prompt."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_tokens reached)
    meta: dict = field(default_factory=dict)


def as_text(prompt: Prompt) -> str:
    """A chat as one plain text (each message's content, blank-line separated), for a backend that takes text."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in as_messages(prompt))


@dataclass(frozen=True, slots=True)
class EngineOption:
    """One constructor argument a backend offers as an engine flag (`--flag-name`), with its type and help.

    `type` is int, float, str or bool; a bool option is a switch (`--load-in-8bit`).
    """

    name: str
    type: type = str
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def as_messages(prompt: Prompt) -> list[dict]:
    """Every prompt as a chat, so each backend applies the model's own chat template."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"A chat prompt is a list of {{'role', 'content'}} dicts; got {m!r}")
    return messages


class LLMProvider:
    """A language model backend.

    The design's interface is all a backend must write: `invoke(prompt) -> str` and, when it
    batches natively, `batch_invoke(prompts) -> list[str]`. `supports_batch` is true exactly
    when a class overrides `batch_invoke` (or the richer `complete_batch`). Backends that know
    their token counts and why generation stopped implement `complete` (and `complete_batch`)
    instead; the string API is then built on top.

    A backend declares what the rest of the package reads about it, as class attributes:
    `engine_options` (its engine flags), `requires` (the modules it imports when built),
    `extra` (the pip extra that brings them), `loads_weights` (builds the model in the process
    that constructs it, so a Ray driver must not), `dtypes` (weight types it accepts, empty when
    it has no choice) and `benchmark_options` (engine options that make repeated runs over the
    same prompts comparable).
    It registers under a name in the entry-point group `apiana_lab.backends`.
    """

    name: ClassVar[str] = "base"
    supports_batch: ClassVar[bool] = False
    supports_stream: ClassVar[bool] = False  # has `stream`: requests in, completions out as each finishes
    engine_options: ClassVar[tuple[EngineOption, ...]] = ()
    loads_weights: ClassVar[bool] = False
    extra: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()  # top-level modules it imports when built; missing ones name `extra`
    dtypes: ClassVar[tuple[str, ...]] = ()
    benchmark_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "supports_batch" not in cls.__dict__:
            cls.supports_batch = (
                cls.batch_invoke is not LLMProvider.batch_invoke or cls.complete_batch is not LLMProvider.complete_batch
            )
        if cls.invoke is LLMProvider.invoke and cls.complete is LLMProvider.complete:
            cls.__abstract_reason__ = f"{cls.__name__} implements neither invoke nor complete"

    def __init__(self, model: str = "", options: GenerationOptions | None = None):
        if getattr(type(self), "__abstract_reason__", None) and "__abstract_reason__" in type(self).__dict__:
            raise TypeError(f"Can't build {type(self).__name__}: {type(self).__abstract_reason__}")
        self.model = model
        self.options = options or GenerationOptions()

    def complete(self, prompt: Prompt, options: GenerationOptions | None = None) -> Completion:
        """Generate for one prompt. By default through `invoke`, with token counts estimated (marked so)."""
        text = self.invoke(as_text(prompt))
        return self._estimated(prompt, text)

    def _estimated(self, prompt: Prompt, text: str) -> Completion:
        counted = self.count_tokens(prompt)
        return Completion(
            text=text,
            prompt_tokens=counted if counted is not None else _estimate_tokens(as_text(prompt)),
            completion_tokens=_estimate_tokens(text),
            finish_reason="unknown",
            meta={"tokens_estimated": True},
        )

    @classmethod
    def engine_option_names(cls) -> set[str]:
        """Constructor arguments a user may set (CLI engine flags, `--engine-arg`), beyond model and options."""
        params = inspect.signature(cls.__init__).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {p.name for p in params if p.kind in named and p.name not in ("self", "model", "options")}

    def complete_batch(self, prompts: Sequence[Prompt], options: GenerationOptions | None = None) -> list[Completion]:
        """Generate for many prompts, results in input order: through `batch_invoke` when the backend
        overrides it, else one after another."""
        if type(self).batch_invoke is not LLMProvider.batch_invoke:
            texts = self.batch_invoke([as_text(p) for p in prompts])
            return [self._estimated(p, t) for p, t in zip(prompts, texts, strict=True)]
        return [self.complete(p, options) for p in prompts]

    def invoke(self, prompt: Prompt) -> str:
        """The generated text for one prompt."""
        return self.complete(prompt).text

    def batch_invoke(self, prompts: Sequence[Prompt]) -> list[str]:
        """The generated texts for many prompts, in input order."""
        return [c.text for c in self.complete_batch(prompts)]

    def stream(
        self,
        requests: Iterable[tuple[str, Prompt] | None],
        options: GenerationOptions | None = None,
        *,
        window: int | None = None,
    ) -> Iterator[tuple[str, Completion | ProviderError]]:
        """Yield `(key, completion)` as each request finishes, keeping up to `window` requests in flight.

        Only for providers with `supports_stream`. The provider pulls the next `(key, prompt)`
        from `requests` whenever fewer than `window` are in flight (default: `default_window`).
        An item `None` means "nothing to send right now": the provider steps what is in flight
        (or waits briefly when nothing is) and asks again later, so a caller can hold retries
        back during a backoff. Once `requests` is exhausted, the stream ends when the last
        request in flight finishes.

        A request that fails on its own (longer than the context, invalid) comes out as
        `(key, error)` with a PermanentProviderError and the stream goes on. A failure of the
        whole engine raises a ProviderError out of the generator; the requests then in flight
        are lost and the caller resubmits them. Closing the generator aborts what is in flight.
        """
        raise NotImplementedError(f"{type(self).__name__} has no streaming path; check supports_stream first")

    @property
    def default_window(self) -> int:
        """Requests in flight that keep this backend busy.

        The `--batch-size` default (and `--max-workers` without batching).
        """
        return 16

    def reset_caches(self) -> None:
        """Forget cached work (prompt prefixes), so a configuration measured after another does not reuse it."""

    def engine_metrics(self) -> dict[str, float]:
        """Live engine figures (KV-cache use, running and waiting requests, preemptions); {} when not measured."""
        return {}

    def count_tokens(self, prompt: Prompt) -> int | None:
        """Prompt length in tokens after the chat template, when the backend can tell cheaply."""
        return None

    @property
    def max_context(self) -> int | None:
        """Longest prompt plus completion the backend accepts, when known."""
        return None

    @property
    def replicas(self) -> int:
        """How many independent copies of the model serve requests (one per GPU)."""
        return 1

    def rows_at_once(self, batch_size: int, workers: int, prompt_tokens: int, max_tokens: int) -> int:
        """How many prompts of about this length run at once when `workers` threads each send
        batches of `batch_size`: all of them, unless the backend splits or serializes them."""
        return batch_size * workers

    def close(self) -> None:
        """Release the model and its memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _estimate_tokens(text: str) -> int:
    """About four characters a token: for backends that do not say how many they used."""
    return max(1, math.ceil(len(text) / 4)) if text else 0
