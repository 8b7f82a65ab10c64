"""The quality checks on speed outputs: what is kept of every timed call's log-probs (the
pipeline's likeliest tokens, the rest pooled) and the KL read from it, and the repetition gate."""

import numpy as np
import pytest

from harness.quality import TOP_TOKENS, _log_softmax, own_rows, pooled_kl, repetition
from harness.worker import WorkerInvalid


def exact_kl(ref, mine):
    return np.sum(np.exp(ref) * (ref - mine), axis=-1)


def rows(rng, n, vocab, scale=3.0):
    return _log_softmax(rng.normal(0, scale, (n, vocab)).astype(np.float32))


def test_pooled_kl_is_exact_for_a_small_vocabulary_and_never_above_the_whole_kl():
    rng = np.random.default_rng(0)
    ref, mine = rows(rng, 6, 40), rows(rng, 6, 40)
    tokens = list(rng.integers(0, 40, 6))
    np.testing.assert_allclose(pooled_kl(ref, own_rows(mine, tokens)), exact_kl(ref, mine), rtol=1e-4, atol=1e-6)
    vocab = 4 * TOP_TOKENS
    ref = rows(rng, 8, vocab)
    near = _log_softmax(ref + rng.normal(0, 0.3, ref.shape).astype(np.float32))  # a close pipeline
    far = rows(rng, 8, vocab)                                                    # an unrelated one
    pooled = {}
    for name, mine in (("near", near), ("far", far)):
        pooled[name], whole = pooled_kl(ref, own_rows(mine, list(range(8)))), exact_kl(ref, mine)
        assert np.all(pooled[name] <= whole + 1e-5)
        if name == "near":  # pooling the pipeline's least likely tokens loses little
            assert np.all(pooled[name] >= 0.9 * whole)
    assert np.all(pooled["far"] > 1.0) and np.all(pooled["near"] < 0.1)  # the gate's 0.05 is between


def test_a_pipeline_that_claims_no_mass_where_the_reference_has_some_has_infinite_kl():
    rng = np.random.default_rng(1)
    vocab = 2 * TOP_TOKENS
    ref = rows(rng, 3, vocab)
    masked = ref.copy()
    masked[:, np.argsort(ref[0])[:TOP_TOKENS]] = -np.inf  # top-k sampling reported as log-probs
    kl = pooled_kl(ref, own_rows(masked, [0, 1, 2]))
    assert np.isinf(kl[0]) and np.all(kl > 0)


def test_a_nan_anywhere_in_a_row_makes_its_kl_nan_and_a_wrong_shape_is_invalid():
    rng = np.random.default_rng(2)
    ref, mine = rows(rng, 2, 3 * TOP_TOKENS), rows(rng, 2, 3 * TOP_TOKENS)
    mine[0, np.argmin(mine[0])] = np.nan  # in the tail
    mine[1, np.argmax(mine[1])] = np.nan  # at the top
    assert np.all(np.isnan(pooled_kl(ref, own_rows(mine, [0, 1]))))
    with pytest.raises(WorkerInvalid, match="one row per token"):
        own_rows(mine, [0, 1, 2])


def test_own_rows_keeps_the_argmax_and_where_each_token_sits_in_its_own_distribution():
    mine = _log_softmax(np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)))
    own = own_rows(mine, [0, 0])
    assert list(own["argmax"]) == [0, 2]
    np.testing.assert_allclose(own["own_pit"], [0.35, 0.8 + 0.1], atol=1e-6)  # mid-p, ties share
    np.testing.assert_allclose(own["rest"], [0.0, 0.0])


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


def test_every_speed_prompt_opens_its_reply_with_corpus_words_at_random(tiny_llama):
    """A nonce alone left the continuation the same from call to call, so a pipeline could
    replay an earlier call's tokens and log-probs: the reply's opening makes each call's own."""
    from mlx_lm.utils import load_tokenizer

    from harness.settings import PromptSpec
    from harness.workload import OPENING_WORDS, build_prompt, chat_tokens

    tokenizer = load_tokenizer(tiny_llama)
    words = [f"word{i}" for i in range(400)]
    corpus = " ".join(words)
    spec = PromptSpec(name="p", kind="decode", text="Say something.", document_tokens=None)
    prompts = [build_prompt(tokenizer, spec, corpus) for _ in range(20)]
    openings = []
    for p in prompts:
        head = chat_tokens(tokenizer, f"[request {p.nonce}] Say something.")
        assert p.tokens[:len(head)] == head and len(p.tokens) > len(head)
        openings.append(tokenizer.decode(p.tokens[len(head):]))
    assert len(set(openings)) == len(openings)  # no two calls open alike
    for text in openings:  # an excerpt of the corpus, then whole words of it drawn at random
        excerpt = text.split()[:-OPENING_WORDS]
        drawn = text.split()[-OPENING_WORDS:]
        assert all(w in words for w in drawn), text
        assert " ".join(excerpt).replace(" ", "") in corpus.replace(" ", ""), text
    assert len({w for text in openings for w in text.split()[-OPENING_WORDS:]}) > OPENING_WORDS * 10
