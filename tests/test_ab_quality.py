"""The A/B check's quality verdict: tolerances that account for how many chunks are compared."""

import pytest

from apiana_lab.experiments import ab


def side(n, flagged, *, compression=0.1, text="a summary", role_markers=(1,)):
    """n rows whose first `flagged` carry a loop flag; every profile with the given compression and role labels."""
    return [
        {
            "chunk_id": f"k{i}",
            "summary": f"{text} {i}",
            "completion_tokens": 50,
            "finish_reason": "stop",
            "quality": {
                "flags": ["loop"] if i < flagged else [],
                "compression": compression,
                "coverage": 0.3,
                "density": 1.5,
                "role_markers": role_markers[i % len(role_markers)],
                "repeated_ngrams": 0.2,
            },
        }
        for i in range(n)
    ]


def judge(old, new):
    _, summary = ab.compare(old, new)
    return ab.verdict(summary, migration=True)


def failed(verdict):
    return {c.name for c in verdict.failed}


def test_one_more_flagged_summary_among_8_is_noise():
    verdict = judge(side(8, 2), side(8, 3, text="other words"))
    assert verdict.go, str(verdict)
    flags = verdict.summary["quality"]["flags"]
    assert flags["any"]["difference"] == pytest.approx(1 / 8) and flags["any"]["lower_bound"] < 0


def test_the_same_rise_in_flags_among_500_chunks_is_not():
    """12% more flagged: noise at 8 chunks, a real regression at 500."""
    verdict = judge(side(500, 100), side(500, 162, text="other words"))
    assert not verdict.go
    assert "flagged share (any flag), new - old (95% lower bound)" in failed(verdict)
    assert "flag loop: share, new - old (95% lower bound)" in failed(verdict)
    assert verdict.summary["quality"]["flags"]["any"]["lower_bound"] > 0.05


def test_in_a_migration_sameness_is_shown_but_does_not_decide():
    verdict = judge(side(12, 6), side(12, 6, text="entirely different words"))
    assert verdict.go and verdict.summary["mode"] == "migration"
    exact = next(c for c in verdict.checks if c.name == "exact-match rate")
    assert (exact.value, exact.passed, exact.decisive) == (0.0, False, False)
    assert "info exact-match rate" in str(verdict)


def test_the_same_setup_is_still_judged_by_sameness():
    _, summary = ab.compare(side(12, 6), side(12, 6, text="entirely different words"))
    verdict = ab.verdict(summary)
    assert not verdict.go and "exact-match rate" in failed(verdict)


def test_summaries_cut_to_a_third_of_their_length_fail_on_compression():
    verdict = judge(side(6, 0, compression=0.12), side(6, 0, compression=0.04))
    assert failed(verdict) == {"compression, new / old (90% interval)"}
    assert verdict.summary["quality"]["measures"]["compression"]["ratio"] == pytest.approx(1 / 3)


def test_a_ratio_that_wobbles_around_one_is_not_a_change():
    old = side(6, 0)
    new = side(6, 0)
    for i, row in enumerate(new):  # halved on some chunks, doubled on others
        row["quality"] = {**row["quality"], "compression": 0.05 if i % 2 else 0.2}
    assert judge(old, new).go


def test_a_migration_with_no_profiles_cannot_pass():
    old, new = side(4, 0), side(4, 0)
    for row in old + new:
        del row["quality"]
    verdict = judge(old, new)
    assert not verdict.go and "chunks with a quality profile on both sides" in failed(verdict)


def test_more_transcript_echo_fails_even_when_every_summary_is_already_flagged():
    """Near the ceiling (the bundled model echoes almost everywhere) the flags cannot rise; the echo's amount can."""
    old = side(16, 16, role_markers=(1, 2, 2, 3))
    new = side(16, 16, text="other words", role_markers=(3, 3, 4, 5))
    verdict = judge(old, new)
    assert failed(verdict) == {"echo: role labels per summary, new - old (95% lower bound)"}
    assert verdict.summary["quality"]["flags"]["any"]["difference"] == 0
    assert verdict.summary["quality"]["intensities"]["role_markers"]["difference"] == pytest.approx(1.75)
