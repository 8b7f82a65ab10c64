"""The quality checks on speed outputs: which calls the reference re-reads (a random subset the
pipeline cannot predict) and the repetition gate."""

import random
from collections import Counter
from types import SimpleNamespace

from harness.quality import pick_calls_to_verify, repetition


def calls(prompts=("a", "b", "c"), repeats=3):
    return [SimpleNamespace(prompt=p, repeat=r) for r in range(repeats) for p in prompts]


def test_every_prompt_is_checked_and_the_count_is_exact():
    samples = calls()
    for seed in range(50):
        chosen = pick_calls_to_verify(samples, 4, random.Random(seed))
        assert len(chosen) == 4
        assert {s.prompt for s in chosen} == {"a", "b", "c"}
        assert len({id(s) for s in chosen}) == 4          # no call twice
        assert chosen == [s for s in samples if s in chosen]  # in the order they ran


def test_asking_for_more_than_there_are_checks_all():
    samples = calls(repeats=2)
    assert pick_calls_to_verify(samples, 6) == samples
    assert pick_calls_to_verify(samples, 99) == samples


def test_fewer_than_prompts_still_covers_each_prompt():
    chosen = pick_calls_to_verify(calls(), 1, random.Random(0))
    assert {s.prompt for s in chosen} == {"a", "b", "c"}


def test_choice_varies_over_calls_and_repeats():
    """No call is safe from checking: over many runs every (prompt, repeat) gets picked."""
    samples = calls()
    seen = Counter()
    for _ in range(300):  # the default source: system entropy, no seed in the code
        seen.update((s.prompt, s.repeat) for s in pick_calls_to_verify(samples, 4))
    assert set(seen) == {(s.prompt, s.repeat) for s in samples}


def test_repetition_counts_repeated_four_grams():
    assert repetition(list(range(40))) == 0.0
    assert repetition([7] * 20) == 16 / 17          # every 4-gram after the first is old
    cycle = [1, 2, 3, 4, 5] * 8                       # a short canned cycle
    assert repetition(cycle) > 0.8
    assert repetition([1, 2, 3]) == 0.0               # too short to repeat anything


LOOP_WHEN_TIMED = '''

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:  # the tasks: honest
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
    # the speed calls: one token over and over; one model step, for a vocabulary-sized claim
    _, logprobs = next(_honest_generate(pipeline, prompt, max_tokens=1, stop_at_eos=False))
    for _ in range(max_tokens):
        yield 5, logprobs
'''


def test_looping_only_when_timed_fails_the_repetition_gate(project):
    _, baseline = project.evaluate()
    assert baseline["decision"] == "BASELINE" and baseline["repetition"] < 0.5
    project.inference.write_text(project.inference.read_text() + LOOP_WHEN_TIMED)
    project.commit("loop when timed")
    proc, result = project.evaluate()
    assert result is not None, proc.stderr
    gates = {g["name"]: g for g in result["gates"]}
    assert not gates["repetition"]["passed"] and gates["repetition"]["value"] > 0.5
    assert gates["sanity"]["passed"]  # the tasks alone would not have caught it
    assert result["decision"] == "REVERT" and "repetition" in result["reason"]
