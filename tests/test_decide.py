"""verdict.decide as a table: figures and flags in, decision and reason out."""

import pytest

from harness.bench import Sample
from harness.verdict import comparison, decide, settled

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
    ("simpler, surely no slower", dict(speedup=1.0, speedup_ci=[0.992, 1.008], lines_vs_champion=-12), "KEEP",
     ["simpler", "-12 lines", "surely no slower than -1.0 %"]),
    ("simpler on a noisy interval (a point median is not enough)", dict(
        speedup=0.991, speedup_ci=[0.574, 1.588], lines_vs_champion=-3), "REVERT",
     ["within noise", "not simpler", "reaches below -1.0 %"]),
    ("fewer lines, whole calls may be slower", dict(speedup=1.0, speedup_ci=[0.995, 1.005], end_to_end_ratio=1.0,
     end_to_end_ci=[0.95, 1.05], lines_vs_champion=-5), "REVERT", ["not simpler", "whole calls may be slower"]),
    ("fewer lines, surely slower", dict(speedup=0.95, speedup_ci=[0.93, 0.98], lines_vs_champion=-3),
     "REVERT", ["slower", "not simpler", "reaches below"]),
    ("fewer lines, decode burst but whole calls no slower", dict(speedup=1.5, speedup_ci=[1.3, 1.7],
     end_to_end_ratio=1.0, end_to_end_ci=[0.995, 1.004], lines_vs_champion=-4), "KEEP", ["simpler"]),
    ("slower", dict(speedup=0.9, speedup_ci=[0.85, 0.95]), "REVERT", ["slower: -10.0 %"]),
    ("within noise", dict(speedup=1.01, speedup_ci=[0.97, 1.05]), "REVERT", ["within noise"]),
    ("too few pairs", dict(speedup=1.3, speedup_ci=[None, None], pairs=4), "MEASURED",
     ["too few pairs", "needs 8", "+30.0 %"]),
    ("just enough pairs", dict(speedup=1.3, speedup_ci=[1.2, 1.4], pairs=8), "KEEP", ["faster"]),
    ("no win of that size", dict(speedup=1.0, speedup_ci=[0.99, 1.008]), "REVERT", ["no win of +1.0 %"]),
    ("whole calls unbounded", dict(speedup=1.3, speedup_ci=[1.2, 1.4], end_to_end_ratio=1.3,
     end_to_end_ci=[None, None]), "REVERT", ["whole calls are not surely faster"]),
    ("fewer lines hidden in strings", dict(speedup=1.0, speedup_ci=[0.97, 1.03], lines_vs_champion=-40,
     lines_uncounted="code run from strings (exec)"), "REVERT", ["not simpler", "exec"]),
    ("more lines at equal speed", dict(speedup=1.0, speedup_ci=[0.97, 1.03], lines_vs_champion=5),
     "REVERT", ["within noise"]),
    ("faster per pair, a few calls stalled long", dict(speedup=1.4, speedup_ci=[1.2, 1.48], end_to_end_total=0.34),
     "REVERT", ["summed over every pair give only -66.0 %", "needs +1.0 % or more", "was: faster: +40.0 %"]),
    ("faster per pair, summed whole calls short of the line", dict(speedup=1.4, speedup_ci=[1.2, 1.48],
     end_to_end_total=1.005), "REVERT", ["summed over every pair give only +0.5 %"]),
    ("faster per pair and summed", dict(speedup=1.4, speedup_ci=[1.2, 1.48], end_to_end_total=1.011), "KEEP",
     ["faster"]),
    ("simpler, summed whole calls slower than the floor", dict(speedup=1.0, speedup_ci=[0.992, 1.008],
     lines_vs_champion=-12, end_to_end_total=0.98), "REVERT", ["needs -1.0 % or more", "was: simpler"]),
    ("simpler, summed whole calls within the floor", dict(speedup=1.0, speedup_ci=[0.992, 1.008],
     lines_vs_champion=-12, end_to_end_total=0.995), "KEEP", ["simpler"]),
]


@pytest.mark.parametrize("what, overrides, decision, words", CASES, ids=[c[0] for c in CASES])
def test_decide(what, overrides, decision, words):
    got, reason = decide(**{**BASE, **overrides})
    assert got == decision, reason
    for word in words:
        assert word in reason, reason
    assert "\n" not in reason


SETTLED = [
    # (what, speedup_ci, end_to_end_ci, primary metric, settled?)
    ("too few pairs", [None, None], [None, None], "decode_tps", False),
    ("surely faster, whole calls too", [1.05, 1.2], [1.04, 1.2], "decode_tps", True),
    ("surely faster, whole calls undecided", [1.05, 1.2], [0.99, 1.2], "decode_tps", False),
    ("surely faster, whole calls surely not", [1.05, 1.2], [0.9, 1.0], "decode_tps", True),
    ("prefill surely faster", [1.05, 1.2], [0.99, 1.2], "prefill_tps", True),
    ("surely no win of 1 %", [0.95, 1.005], [0.95, 1.005], "decode_tps", True),
    ("straddles the KEEP line", [0.98, 1.04], [0.98, 1.04], "decode_tps", False),
]
SETTLED_FEWER_LINES = [
    ("surely no slower", [0.995, 1.004], [0.992, 1.01], True),
    ("surely no slower, whole calls unsure", [0.995, 1.004], [0.95, 1.01], False),
    ("no win, but may still prove no slower", [0.97, 1.005], [0.97, 1.005], False),
    ("surely slower than the floor", [0.9, 0.98], [0.9, 0.98], True),
]


@pytest.mark.parametrize("what, ci, whole, expected", SETTLED_FEWER_LINES, ids=[c[0] for c in SETTLED_FEWER_LINES])
def test_settled_with_fewer_lines(what, ci, whole, expected):
    figures = {"speedup_ci": ci, "end_to_end_ci": whole, "primary_metric": "decode_tps"}
    assert settled(figures, min_effect=0.01, fewer_lines=True) is expected


@pytest.mark.parametrize("what, ci, whole, metric, expected", SETTLED, ids=[c[0] for c in SETTLED])
def test_settled(what, ci, whole, metric, expected):
    figures = {"speedup_ci": ci, "end_to_end_ci": whole, "primary_metric": metric}
    assert settled(figures, min_effect=0.01) is expected


def test_a_slower_champion_discounts_the_lower_end_before_the_ab_settles():
    """verdict.champion_pace's factor: the A/B goes on while the lower end times it does not
    clear the KEEP line (a champion slower than when it won gives no win by that)."""
    figures = {"speedup_ci": [1.05, 1.2], "end_to_end_ci": [1.05, 1.2], "primary_metric": "decode_tps"}
    assert settled(figures, min_effect=0.01, factor=0.97)
    assert not settled(figures, min_effect=0.01, factor=0.95)
    # whole calls are discounted too (the pace is taken on whole calls)
    figures["end_to_end_ci"] = [1.03, 1.1]
    assert settled(figures, min_effect=0.01) and not settled(figures, min_effect=0.01, factor=0.97)
    below = {"speedup_ci": [0.95, 1.005], "end_to_end_ci": [0.95, 1.005], "primary_metric": "decode_tps"}
    assert settled(below, min_effect=0.01, factor=0.5)  # no win either way: decided


def _sample(worker, prompt, repeat, seconds, stall=0.0):
    """A call of 11 tokens, `stall` seconds spent before its first one."""
    return Sample(worker=worker, prompt=prompt, kind="decode", repeat=repeat, nonce="n", prompt_tokens=4, n_tokens=11,
                  ttft_s=0.1 + stall, total_s=0.1 + stall + seconds, decode_s=seconds, decode_tps=10 / seconds, prefill_tps=40.0,
                  peak_memory_bytes=None, prompt_ids=[], tokens=[])


def test_summed_whole_calls_count_a_few_long_stalls_whole():
    """end_to_end_total: the whole calls' times summed over every pair, uncapped, so 2 calls
    in 20 that stall 5 s cost their 10 s there, where each capped pair counts -10 % at most."""
    samples = []
    for repeat in range(10):
        for prompt in ("a", "b"):
            stall = 5.0 if (repeat, prompt) in ((3, "a"), (7, "b")) else 0.0
            samples += [_sample("champion", prompt, repeat, 0.3), _sample("challenger", prompt, repeat, 0.2, stall)]
    samples.append(_sample("challenger", "a", 10, 0.2))  # a call without its pair counts in neither sum
    samples.append(_sample("challenger", "a", -1, 9.0))  # nor does a warm-up call
    figures = comparison(samples, "decode_tps", min_effect=0.01)
    assert figures["end_to_end_total"] == pytest.approx((20 * 0.4) / (20 * 0.3 + 10.0))
    assert figures["end_to_end_ci"][0] > 1.01 and figures["speedup_ci"][0] > 1.01  # the capped pairs see a win
    decision, reason = decide(**{**BASE, **{k: figures[k] for k in (
        "speedup", "speedup_ci", "end_to_end_ratio", "end_to_end_ci", "end_to_end_total")}})
    assert decision == "REVERT" and "summed over every pair" in reason, reason


def test_comparison_pools_earlier_pairs_in_front():
    samples = []
    for repeat in range(3):
        for prompt in ("a", "b"):
            samples += [_sample("champion", prompt, repeat, 1.4), _sample("challenger", prompt, repeat, 1.0)]
    alone = comparison(samples, "decode_tps", min_effect=0.01)
    assert alone["pairs"] == 6 and alone["speedup_ci"] == [None, None] and alone["pooled_pairs"] == 0
    earlier = {"decode_tps": [1.4] * 4, "end_to_end": [1.36] * 4}
    pooled = comparison(samples, "decode_tps", min_effect=0.01, earlier=earlier)
    assert pooled["pairs"] == 10 and pooled["pooled_pairs"] == 4
    assert pooled["ratios"]["decode_tps"][:4] == [1.4] * 4
    assert pooled["speedup_ci"][0] > 1.01 and settled(pooled, min_effect=0.01)
    assert pooled["speedup"] == pytest.approx(1.4)
    # these pairs decided with room to spare: a smaller speedup would have been kept too
    assert 1.01 < pooled["min_detectable_effect"] < pooled["speedup"]
