"""The analysis of `benchmarks/token_efficiency.py` (the training runs themselves are the benchmark, not a test)."""

import importlib.util
import os

import pytest


HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "token_efficiency", os.path.join(os.path.dirname(HERE), "benchmarks", "token_efficiency.py")
)
te = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(te)


def _run(arm, seed, points, dynamic=((0.9, 0.5, 1.5),)):
    return {
        "arm": arm,
        "seed": seed,
        "checkpoints": [{"step": 10 * i, "tokens": t, "exact_match": a} for i, (t, a) in enumerate(points)],
        "final_dynamic": [{"threshold": th, "exact_match": em, "tokens_per_forward": tpf} for th, em, tpf in dynamic],
    }


def test_checkpoint_steps_are_log_spaced_and_end_at_max():
    steps = te.checkpoint_steps(3000, 8)
    assert steps[0] == 0 and steps[-1] == 3000 and steps == sorted(set(steps))
    assert len(steps) >= 7  # >= 6 checkpoints after step 0
    gaps = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert max(gaps) / min(gaps) < 1.5  # geometric spacing


def test_tokens_to_reach_interpolates_linearly():
    points = [
        {"tokens": 0, "exact_match": 0.0},
        {"tokens": 100, "exact_match": 0.2},
        {"tokens": 300, "exact_match": 0.6},
    ]
    assert te.tokens_to_reach(points, 0.4) == pytest.approx(200.0)
    assert te.tokens_to_reach(points, 0.2) == pytest.approx(100.0)
    assert te.tokens_to_reach(points, 0.0) == pytest.approx(0.0)
    assert te.tokens_to_reach(points, 0.61) is None
    # A dip after reaching the level does not matter: the first crossing counts.
    points.append({"tokens": 400, "exact_match": 0.1})
    assert te.tokens_to_reach(points, 0.4) == pytest.approx(200.0)


def test_summary_headline_and_level_ratios():
    jobs = [
        _run("OPDLM", 0, [(0, 0.0), (100, 0.5), (200, 1.0)]),
        _run("OPDLM", 1, [(0, 0.0), (100, 0.9), (200, 0.96)]),
        _run("BD3LM-SFT", 0, [(0, 0.0), (400, 0.5), (800, 0.9)]),
        _run("BD3LM-SFT", 1, [(0, 0.0), (400, 0.5), (800, 0.9)]),
    ]
    summary = te.summarize(jobs, teacher_accuracy=1.0, target=0.95, levels=[0.5])
    opdlm, base = summary["arms"]["OPDLM"], summary["arms"]["BD3LM-SFT"]
    # Seed 0 reaches 0.95 at 100 + 0.9 * 100 = 190 tokens, seed 1 at 100 + (0.05 / 0.06) * 100.
    assert opdlm["tokens_to_target"] == pytest.approx([190.0, 100 + 5 / 6 * 100])
    assert base["tokens_to_target"] == [None, None] and base["budget"] == 800
    assert opdlm["table"][1]["mean"] == pytest.approx(0.7) and opdlm["table"][1]["min"] == 0.5
    head = te.headline(summary, 0.95)
    mean_opdlm = (190.0 + 100 + 5 / 6 * 100) / 2
    assert "did not reach" in head and f"> {800 / mean_opdlm:.1f}x" in head
    # 50% of the teacher: OPDLM seeds at 100 and 100 * 0.5 / 0.9 tokens, the baseline at 400 and 400.
    ratio = 400 / ((100 + 100 * 0.5 / 0.9) / 2)
    assert te.level_ratios(summary, [0.5]) == [f"50%: {ratio:.1f}x"]
    # Both reach it: a plain ratio.
    jobs[2] = _run("BD3LM-SFT", 0, [(0, 0.0), (400, 0.5), (800, 1.0)])
    jobs[3] = _run("BD3LM-SFT", 1, [(0, 0.0), (400, 0.5), (800, 1.0)])
    summary = te.summarize(jobs, teacher_accuracy=1.0, target=0.95, levels=[0.5])
    # The baseline reaches 0.95 at 400 + (0.45 / 0.5) * 400 = 760 tokens.
    assert f"= {760 / mean_opdlm:.1f}x" in te.headline(summary, 0.95)
