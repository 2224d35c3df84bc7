"""The progress protocol: what the terminal bar (and later the notebook widget) is fed."""

import io

import pytest

from apiana_lab.chunking import Chunk
from apiana_lab.progress import Progress, TerminalProgress
from apiana_lab.providers.fake import FakeProvider
from apiana_lab.summarize import ParallelSummarizerTransform


def chunks(n):
    return [
        Chunk(
            id=f"k{i}",
            conversation_id="c",
            title="T",
            date=None,
            index=i,
            first_message=i,
            last_message=i,
            token_count=5,
            text=f"chunk number {i} " + "word " * (i % 7),
        )
        for i in range(n)
    ]


def test_snapshots_cover_counts_rates_batch_size_retries_and_failures():
    provider = FakeProvider(oom_above=4, fail=lambda text: "permanent" if "chunk number 7 " in text else None)
    provider.enqueue_failure("transient")
    seen: list[Progress] = []
    t = ParallelSummarizerTransform(provider, max_workers=1, batch_size=8, sleep=lambda s: None, grow_after=100)
    list(t.run(chunks(24), progress=seen.append))
    first, last = seen[0], seen[-1]
    assert (first.done, first.total, first.eta) == (0, 24, None)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert last.done == last.total == 24 and last.eta == 0
    assert last.failed == 1 and last.retries == 1
    assert {p.batch_size for p in seen} >= {8, 4}  # the shrink after the out-of-memory error shows
    assert last.completion_tokens > 0 and last.completion_tokens_per_s > 0 and last.prompt_tokens_per_s > 0


def test_eta_counts_only_computed_chunks():
    p = Progress(done=60, total=100, reused=40, elapsed=10.0, batch_size=8)
    assert p.eta == 20.0  # 20 computed in 10 s; 40 left at that rate


def test_terminal_bar_shows_the_figures():
    out = io.StringIO()
    bar = TerminalProgress(file=out)
    bar(Progress(total=10, batch_size=16))
    bar(
        Progress(
            done=5, total=10, failed=1, prompt_tokens=500, completion_tokens=100, elapsed=2.0, batch_size=8, retries=3
        )
    )
    bar.close()
    text = out.getvalue()
    assert (
        "5/10" in text and "50.0 out tok/s" in text and "batch 8" in text and "retries 3" in text and "failed 1" in text
    )


def test_snapshots_are_built_by_keyword_with_figures_defaulting_to_zero():
    with pytest.raises(TypeError):
        Progress(5, 10)  # twelve positional figures were too easy to swap
    end = Progress(event="end", finished=True)
    assert (end.done, end.total, end.elapsed, end.error, end.eta) == (0, 0, 0.0, "", None)
