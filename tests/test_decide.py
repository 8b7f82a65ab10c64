"""verdict.decide as a table: figures and flags in, decision and reason out."""

import pytest

from harness.verdict import decide

BASE = dict(gate_reason="", has_champion=True, dirty=False, search=False, min_effect=0.01,
            end_to_end_ratio=1.05, end_to_end_ci=[1.02, 1.08], lines_vs_champion=0)
# (the whole-call interval must also clear 1 + min_effect for a decode KEEP)

CASES = [
    # (what, overrides of BASE, decision, words in the reason)
    ("search trial", dict(search=True, speedup=None), "MEASURED", ["search trial", "quality gates pass"]),
    ("search trial, gate failed", dict(search=True, gate_reason="quality gate failed: kl_mean"),
     "MEASURED", ["kl_mean"]),
    ("dirty tree", dict(dirty=True, speedup=1.2, speedup_ci=[1.1, 1.3]), "MEASURED",
     ["uncommitted", "+20.0 %"]),
    ("gate failed", dict(gate_reason="quality gate failed: top1", speedup=1.5, speedup_ci=[1.4, 1.6]),
     "REVERT", ["top1"]),
    ("gate failed, no champion", dict(has_champion=False, gate_reason="quality gate failed: top1"),
     "MEASURED", ["not a baseline"]),
    ("first good run", dict(has_champion=False), "BASELINE", ["first good run"]),
    ("HEAD is the champion", dict(speedup=None), "MEASURED", ["champion itself"]),
    ("faster", dict(speedup=1.10, speedup_ci=[1.05, 1.15]), "KEEP", ["faster", "+10.0 %"]),
    ("faster but not beyond min_effect", dict(speedup=1.02, speedup_ci=[1.005, 1.04]), "REVERT",
     ["within noise", "needs > +1.0 %"]),
    ("tokens held back", dict(speedup=1.5, speedup_ci=[1.3, 1.7], end_to_end_ratio=0.98, end_to_end_ci=[0.9, 1.05]),
     "REVERT", ["whole calls are not surely faster"]),
    ("whole calls barely faster", dict(speedup=1.5, speedup_ci=[1.3, 1.7], end_to_end_ratio=1.02,
     end_to_end_ci=[1.005, 1.04]), "REVERT", ["whole calls"]),
    ("prefill win, whole decode calls unchanged", dict(primary_metric="prefill_tps", speedup=1.2,
     speedup_ci=[1.1, 1.3], end_to_end_ratio=1.0, end_to_end_ci=[0.97, 1.03]), "KEEP", ["faster"]),
    ("simpler at equal speed", dict(speedup=0.995, speedup_ci=[0.95, 1.04], lines_vs_champion=-12), "KEEP",
     ["simpler", "-12 lines"]),
    ("fewer lines, median too slow", dict(speedup=0.986, speedup_ci=[0.96, 1.128], lines_vs_champion=-12),
     "REVERT", ["within noise", "not simpler", "-1.4 %", "below -1.0 %"]),
    ("fewer lines, surely slower", dict(speedup=0.95, speedup_ci=[0.93, 0.98], lines_vs_champion=-3),
     "REVERT", ["slower", "not simpler", "wholly below 1"]),
    ("slower", dict(speedup=0.9, speedup_ci=[0.85, 0.95]), "REVERT", ["slower: -10.0 %"]),
    ("within noise", dict(speedup=1.01, speedup_ci=[0.97, 1.05]), "REVERT", ["within noise"]),
    ("too few pairs", dict(speedup=1.3, speedup_ci=[1.2, 1.4], pairs=4), "MEASURED", ["too few pairs", "needs 6"]),
    ("just enough pairs", dict(speedup=1.3, speedup_ci=[1.2, 1.4], pairs=6), "KEEP", ["faster"]),
    ("more lines at equal speed", dict(speedup=1.0, speedup_ci=[0.97, 1.03], lines_vs_champion=5),
     "REVERT", ["within noise"]),
]


@pytest.mark.parametrize("what, overrides, decision, words", CASES, ids=[c[0] for c in CASES])
def test_decide(what, overrides, decision, words):
    got, reason = decide(**{**BASE, **overrides})
    assert got == decision, reason
    for word in words:
        assert word in reason, reason
    assert "\n" not in reason
