"""Which speed calls the reference re-reads: a random subset the pipeline cannot predict."""

import random
from collections import Counter
from types import SimpleNamespace

from harness.quality import pick_calls_to_verify


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
