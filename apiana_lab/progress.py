"""One progress protocol for long runs: the terminal bar, the notebook widget and the memory monitor read it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """A snapshot of a summarization run, sent after every finished batch (built by keyword; figures default to 0)."""

    done: int = 0  # chunks finished (summarized, reused or failed)
    total: int = 0
    failed: int = 0
    reused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed: float = 0.0  # seconds since summarization started
    batch_size: int = 0  # current, after any out-of-memory shrinking (for a streaming backend: the in-flight window)
    retries: int = 0
    event: str = ""  # set when something worth a mark on a timeline happened: "start", "batch size 16 -> 8 (...)"
    finished: bool = False  # the last snapshot of a run
    error: str = ""  # on the last snapshot: why the run stopped early, "" when it ran to the end
    flagged: int = 0  # summaries so far whose quality profile carries a flag (apiana_lab.quality)

    @property
    def flagged_share(self) -> float:
        """Flagged summaries among those finished (reused ones included)."""
        summarized = self.done - self.failed
        return self.flagged / summarized if summarized > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the rate of chunks computed so far (reused ones are free)."""
        computed = self.done - self.reused
        if computed <= 0 or self.elapsed <= 0:
            return None
        return (self.total - self.done) * self.elapsed / computed


ProgressCallback = Callable[[Progress], None]


def fan_out(*callbacks: ProgressCallback | None) -> ProgressCallback:
    """One callback that feeds every given one (None entries are dropped)."""
    live = [c for c in callbacks if c is not None]

    def feed(p: Progress) -> None:
        for c in live:
            c(p)

    return feed


class TerminalProgress:
    """A tqdm bar on stderr: chunks done/total, tokens/s, ETA, batch size, retries, failures."""

    def __init__(self, desc: str = "summarizing", file=None, disable: bool = False):
        self.desc = desc
        self.file = file or sys.stderr
        self.disable = disable
        self.bar = None

    def __call__(self, p: Progress) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=p.total, desc=self.desc, unit="chunk", file=self.file, disable=self.disable, dynamic_ncols=True
            )
        self.bar.n = p.done
        self.bar.set_postfix_str(
            f"{p.completion_tokens_per_s:.1f} out tok/s, {p.prompt_tokens_per_s:.0f} in tok/s, "
            f"batch {p.batch_size}, retries {p.retries}, failed {p.failed}, flagged {p.flagged_share:.0%}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
