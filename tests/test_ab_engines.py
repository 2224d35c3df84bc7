"""The A/B check's quality verdicts on real engines and the bundled model: the migration passes, two breakages fail.

The design's migration (sequential transformers in float32 -> parallel vLLM at its default dtype)
must be GO although hardly a summary matches word for word; a cut max_length and a prompt that
asks for a transcript must be NO-GO, each naming the measure that failed.
"""

from pathlib import Path

import pytest

from apiana_lab.experiments import ab

pytestmark = [pytest.mark.vllm, pytest.mark.transformers, pytest.mark.slow]

SAMPLE = str(Path("apiana_lab/data/sample_export.json").resolve())
# A prompt that asks for the transcript instead of a memory (system message and user template).
TRANSCRIPT_SYSTEM = "Rewrite the conversation below as a transcript, word for word."
TRANSCRIPT_TEMPLATE = (
    'Conversation "{title}" ({conversation_date}):\n\n{formatted_messages}\n\n---\n'
    "Write this conversation out again as a transcript, word for word: every turn on its own line, "
    "starting with 'User:' or 'Assistant:'."
)


@pytest.fixture(scope="module")
def chunks():
    """Every chunk of the sample at 300 tokens (27): short, so both sides run in seconds."""
    from apiana_lab.experiments.measure import sample_chunks

    return sample_chunks([SAMPLE], 27, 300)


@pytest.fixture(scope="module")
def vllm_engine():
    from apiana_lab.experiments.compare import backend_options
    from apiana_lab.providers.registry import get_provider

    with get_provider("vllm", **backend_options("vllm", "auto", {})) as provider:
        yield provider


def failed(verdict):
    return {c.name for c in verdict.failed}


def test_the_designs_migration_is_go(chunks, vllm_engine):
    from apiana_lab.providers.registry import get_provider

    with get_provider("transformers", dtype="float32") as transformers:
        result = ab.migrate(chunks[:6], transformers, vllm_engine, max_length=48)
    verdict = result["verdict"]
    assert verdict.go, str(verdict)
    assert verdict.summary["mode"] == "migration" and verdict.summary["quality"]["chunks"] == 6
    # Sameness is on the page but decides nothing here.
    assert not any(c.decisive for c in verdict.checks if c.name.startswith(("exact-match", "similarity")))


def test_a_cut_max_length_is_no_go(chunks, vllm_engine):
    result = ab.run_ab(chunks[:6], vllm_engine, max_length=48, new_max_length=8)
    verdict = result["verdict"]
    assert not verdict.go and verdict.summary["mode"] == "migration"
    assert "compression, new / old (90% interval)" in failed(verdict)
    assert "compression, new / old" in str(ab.ABCheckFailed(verdict))  # the error a notebook raises names it


def test_a_prompt_that_asks_for_a_transcript_is_no_go(chunks, vllm_engine):
    """The bundled model echoes the transcript already; asked to, it echoes more turns, and the echo bound sees it."""
    from apiana_lab.experiments.measure import measure
    from apiana_lab.summarize import ParallelSummarizerTransform

    base = ParallelSummarizerTransform(vllm_engine, max_length=96)
    transcript = ParallelSummarizerTransform(
        vllm_engine, max_length=96, system_prompt=TRANSCRIPT_SYSTEM, user_template=TRANSCRIPT_TEMPLATE
    )
    old = ab.profiled_rows(measure(base, chunks)[1], chunks)
    new = ab.profiled_rows(measure(transcript, chunks)[1], chunks)
    _, summary = ab.compare(old, new)
    verdict = ab.verdict(summary, migration=True)
    assert not verdict.go, str(verdict)
    assert "echo: role labels per summary, new - old (95% lower bound)" in failed(verdict)
