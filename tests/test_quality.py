"""The quality checks on speed outputs: every timed call's rows kept on disk and compared
whole with the reference's, the reply's random opening, and the repetition gate."""

import numpy as np
import pytest

from harness.quality import _compare_positions, _log_softmax, own_rows, repetition
from harness.worker import WorkerInvalid


def exact_kl(ref, mine):
    return np.sum(np.exp(ref) * (ref - mine), axis=-1)


def rows(rng, n, vocab, scale=3.0):
    return _log_softmax(rng.normal(0, scale, (n, vocab)).astype(np.float32))


def entropy(probs):
    return -np.sum(probs * np.log(np.maximum(probs, 1e-300)), axis=-1)


def compared(ref, mine, folder, tokens=None):
    tokens = list(range(len(ref))) if tokens is None else tokens
    out = {k: [] for k in ("kl", "top1", "own_pit", "ref_pit", "own_pit_var", "ref_pit_var", "own_pit_drawn",
                           "ref_pit_drawn", "ref_nll", "ref_entropy")}
    _compare_positions(ref, own_rows(mine, tokens, folder), tokens, out)
    return out


def test_every_timed_call_s_rows_are_kept_whole_on_disk_and_compared_whole(tmp_path):
    rng = np.random.default_rng(0)
    ref = rows(rng, 8, 4096)
    near = _log_softmax(ref + rng.normal(0, 0.3, ref.shape).astype(np.float32))
    out = compared(ref, near, tmp_path)
    assert len(list(tmp_path.glob("timed-rows-*.npy"))) == 1  # in the run's folder, not in memory
    np.testing.assert_allclose(out["kl"], exact_kl(ref, near), rtol=0.02, atol=2e-3)  # float16 on disk
    assert list(out["top1"]) == list(np.argmax(ref, -1) == np.argmax(near, -1))


def test_a_flat_tail_over_tokens_the_pipeline_never_computed_shows_its_whole_kl(tmp_path):
    """Red team 7's pipeline computed a third of the vocabulary and spread a flat 5 % over the
    rest: a KL over its 1024 likeliest tokens with the rest pooled showed a tenth of the true
    one. The rows are compared whole."""
    rng = np.random.default_rng(3)
    vocab, n = 8192, 16
    ref = rows(rng, n, vocab, scale=4.0)
    computed = np.arange(vocab) < vocab // 3
    short = _log_softmax(np.where(computed, ref, -np.inf)) + np.log(0.95)
    mine = np.where(computed, short, np.log(0.05 / np.sum(~computed))).astype(np.float32)
    np.testing.assert_allclose(compared(ref, mine, tmp_path)["kl"], exact_kl(ref, mine), rtol=0.02)
    assert np.mean(exact_kl(ref, mine)) > 1.0


def test_no_mass_where_the_reference_has_some_fails_and_nan_stays_nan(tmp_path):
    rng = np.random.default_rng(1)
    ref = rows(rng, 3, 512)
    masked = ref.copy()
    masked[:, np.argsort(ref[0])[:256]] = -np.inf  # top-k sampling reported as log-probs
    assert compared(ref, masked, tmp_path)["kl"][0] > 10  # far past any gate (1 nat at the 99th percentile)
    padded = np.concatenate([ref, np.full((3, 4), -200.0, dtype=np.float32)], axis=1)  # exp() underflows to 0
    mine = padded.copy()
    mine[:, -4:] = -1e9  # padding the pipeline masks, where the reference has nothing either
    np.testing.assert_allclose(compared(padded, mine, tmp_path)["kl"], 0.0, atol=2e-3)
    broken = ref.copy()
    broken[1, 7] = np.nan
    assert np.isnan(compared(ref, broken, tmp_path)["kl"][1])
    with pytest.raises(WorkerInvalid, match="one row per token"):
        own_rows(ref, [0, 1], tmp_path)


def test_own_rows_keeps_the_argmax_and_where_each_token_sits_in_its_own_distribution(tmp_path):
    mine = _log_softmax(np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)))
    own = own_rows(mine, [0, 0], tmp_path)
    assert list(own["argmax"]) == [0, 2]
    np.testing.assert_allclose(own["own_pit"], [0.35, 0.8 + 0.1], atol=1e-6)  # mid-p, ties share


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


def test_every_prefill_call_reads_a_document_of_its_own(tiny_llama):
    """With one document for every call, a pipeline reused an earlier call's cache for it
    (computed after another nonce): each call now gets a window of the corpus at random."""
    from mlx_lm.utils import load_tokenizer

    from harness.workload import document

    tokenizer = load_tokenizer(tiny_llama)
    corpus = " ".join(f"word{i}" for i in range(4000))
    documents = [document(tokenizer, corpus, 16) for _ in range(10)]
    assert len(set(documents)) >= len(documents) - 1  # one pair at one place: ~1 run in 250; more: ~1e-5
    assert all(d.replace(" ", "") in corpus.replace(" ", "") for d in documents)
    short = document(tokenizer, "tiny corpus", 16)  # shorter than asked: the corpus repeated
    assert len(short.replace(" ", "")) > len("tinycorpus")


def test_argmax_tokens_mixed_with_random_ones_fail_the_tail_test_though_their_mean_passes():
    """Red team 8 reported honest rows but mixed argmax tokens with uniformly random ones (a
    third): each token's mean place stayed under 1/2, so the mean test passed on word salad.
    Drawn from the distribution, 1 % of tokens land beyond 0.99; sharper sampling, fewer."""
    from harness import gates
    from harness.quality import pit_null_variance, token_pit

    rng, draw = np.random.default_rng(5), np.random.default_rng(6)
    alpha = 0.01 / 13
    n, vocab = 400, 2000
    probs = np.exp(rows(rng, n, vocab, scale=2.5).astype(np.float64))
    probs /= probs.sum(axis=-1, keepdims=True)
    argmax = list(np.argmax(probs, axis=-1))
    salad = [int(rng.integers(vocab)) if i % 3 == 2 else t for i, t in enumerate(argmax)]
    assert gates._pit_gate("mean", token_pit(probs, salad), pit_null_variance(probs), 0.0, alpha)["passed"]
    flat = entropy(probs)
    assert not gates._tail_gate("tail", 0, token_pit(probs, salad, draw=draw), alpha, flatness=flat)["passed"]
    assert gates._tail_gate("tail", 0, token_pit(probs, argmax, draw=draw), alpha, flatness=flat)["passed"]
    # Unlikely but not absurd tokens instead (each at 0.9-0.98 of its distribution), as many
    # as keep the mean under 1/2: past the far tail, but not past the tests nearer in.
    places = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    ranked = np.argsort(-probs, axis=-1)

    def at_place(i, low, high):  # a token of row i whose place lies in [low, high)
        return int(ranked[i][np.searchsorted(places[i], low + (high - low) * rng.random())])

    unlikely = [at_place(i, 0.9, 0.98) if i % 5 < 2 else t for i, t in enumerate(argmax)]
    assert gates._pit_gate("mean", token_pit(probs, unlikely), pit_null_variance(probs), 0.0, alpha)["passed"]
    assert not gates._tail_gate("tail", 0, token_pit(probs, unlikely, draw=draw), alpha, flatness=flat)["passed"]
    # Red team 9: honest draws, but every 8th token just inside the far tail (0.975-0.987 of
    # its distribution), on the quick preset's 256 tokens: a whole-range DKW bound passed it.
    shaped = [at_place(i, 0.975, 0.987) if i % 8 == 7 else int(draw.choice(vocab, p=probs[i]))
              for i in range(256)]
    assert not gates._tail_gate("tail", 0, token_pit(probs[:256], shaped, draw=draw), alpha, flatness=flat[:256])["passed"]
    # Honest draws at temperature 1 (the hardest case: sharper ones sit lower): false alarms
    # stay near the gate's alpha.
    fails = 0
    for _ in range(300):
        drawn = [int(draw.choice(vocab, p=p)) for p in probs[:100]]
        fails += not gates._tail_gate("tail", 0, token_pit(probs[:100], drawn, draw=draw), alpha,
                                      flatness=flat[:100])["passed"]
    assert fails <= 2


def test_tokens_the_reference_finds_absurd_fail_the_continuation_tail_though_each_sits_mid_row():
    """Red team 11: on timed calls, greedy tokens, but where the top token has less than half
    the mass, most of the time a token the reference gives < 1e-4, with its own reported row
    lifted to put it mid-distribution: every other gate passed (timed KL 0.007, continuation
    mean 0.47) on word salad. Honest draws from a pipeline near the reference pass."""
    from harness import gates
    from harness.quality import pit_null_variance, token_pit

    rng, draw = np.random.default_rng(11), np.random.default_rng(12)
    alpha, factor = 0.01 / 13, 2.0
    n, vocab = 300, 2000
    ref = rows(rng, n, vocab, scale=2.5)
    p_ref = np.exp(ref.astype(np.float64))
    tokens, mine = list(np.argmax(ref, axis=-1)), ref.copy()
    for i in np.flatnonzero((p_ref.max(axis=-1) < 0.5) & (rng.random(n) < 0.3)):  # random rows are flat: 0.3
        tokens[i] = int(rng.choice(np.flatnonzero(p_ref[i] < 1e-4)))
        mine[i, tokens[i]] = np.sort(ref[i])[::-1][np.searchsorted(np.cumsum(np.sort(p_ref[i])[::-1]), 0.5)]
    mine = _log_softmax(mine)
    assert np.mean(exact_kl(ref, mine)) < 0.05
    salad = token_pit(p_ref, tokens, draw=draw)
    assert gates._pit_gate("continuation", token_pit(p_ref, tokens), pit_null_variance(p_ref), 0.0, alpha)["passed"]
    assert not gates._tail_gate("continuation_tail", 0, salad, alpha, flatness=entropy(p_ref), factor=factor)["passed"]
    # Honest: drawn at temperature 1 from rows near the reference's (KL ~0.02 nats a token).
    fails = 0
    for _ in range(300):
        near = np.exp(_log_softmax(ref[:100] + draw.normal(0, 0.2, (100, vocab)).astype(np.float32)).astype(np.float64))
        drawn = [int(draw.choice(vocab, p=q / q.sum())) for q in near]
        fails += not gates._tail_gate("continuation_tail", 0, token_pit(p_ref[:100], drawn, draw=draw), alpha,
                                      flatness=entropy(p_ref[:100]), factor=factor)["passed"]
    assert fails <= 2


def test_unlikely_tokens_only_where_the_reference_is_flat_fail_the_tail_of_the_flatter_half():
    """Red team 12: honest rows, argmax tokens where the reference is peaked and, where it is
    flat (top token under 0.35), the token at 0.89 or 0.945 of it, 30 % of all tokens: word
    salad within every allowance of the whole. Draws are uniform at every position, flat or
    not, so the flatter half of the positions shows it. Honest draws pass."""
    from harness import gates
    from harness.quality import token_pit

    rng, draw = np.random.default_rng(21), np.random.default_rng(22)
    alpha, n, vocab = 0.01 / 13, 300, 2000
    sharpness = rng.uniform(0.5, 6.0, (n, 1))  # rows from flat to peaked
    probs = np.exp(_log_softmax((rng.normal(0, 1, (n, vocab)) * sharpness).astype(np.float32)).astype(np.float64))
    probs /= probs.sum(axis=-1, keepdims=True)
    ranked = np.argsort(-probs, axis=-1)
    places = np.cumsum(np.take_along_axis(probs, ranked, axis=-1), axis=-1)
    tokens, taken = list(ranked[:, 0]), 0
    for i in range(n):
        if probs[i, ranked[i, 0]] < 0.35 and taken < 0.3 * (i + 1):
            place = 0.945 if taken % 5 in (1, 3) else 0.89  # just inside the places tested
            tokens[i] = int(ranked[i][np.searchsorted(places[i], place)])
            taken += 1
    assert taken >= 0.25 * n
    flat = entropy(probs)
    gate = gates._tail_gate("tail", 0, token_pit(probs, tokens, draw=draw), alpha, flatness=flat)
    assert not gate["passed"] and "flatter half" in gate["test"], gate
    fails = 0
    for _ in range(200):
        drawn = [int(draw.choice(vocab, p=p)) for p in probs]
        fails += not gates._tail_gate("tail", 0, token_pit(probs, drawn, draw=draw), alpha, flatness=flat)["passed"]
    assert fails <= 2


def test_a_few_huge_values_raise_a_mean_gate_s_figure_and_cannot_widen_its_interval():
    """Red team 10: two timed positions at ~30,000 nats widened the standard error until a KL
    of 0.46 a token passed. Red team 14: with each value capped in the mean too, 4 of 96
    corpus positions at ~1000 nats showed kl_mean 41 as a pass. The spread is of capped
    values; the mean, as shown, is the values' own."""
    from harness import gates

    rng, alpha = np.random.default_rng(14), 0.01 / 13
    honest = np.abs(rng.normal(0, 0.01, 96))
    assert gates._mean_gate("kl_mean", 0, honest, 0.05, alpha, cap=gates.POSITION_CAP_NATS)["passed"]
    spiked = honest.copy()
    spiked[[11, 35, 59, 83]] = 1000.0
    gate = gates._mean_gate("kl_mean", float(np.mean(spiked)), spiked, 0.05, alpha, cap=gates.POSITION_CAP_NATS)
    assert not gate["passed"] and gate["bound"] > 40, gate
    widened = np.full(300, 0.46)
    widened[[3, 5]] = 30_000.0
    assert not gates._mean_gate("timed_kl_mean", 0, widened, 0.05, alpha, cap=gates.POSITION_CAP_NATS)["passed"]
    assert gates._mean_gate("timed_kl_mean", 0, widened, 0.05, alpha)["passed"]  # uncapped spread: it widens
    assert not gates._mean_gate("kl_mean", 0, [0.0, float("nan")], 0.05, alpha, cap=1.0)["passed"]


def test_rows_topped_at_a_large_power_of_two_are_renormalized_all_the_same():
    """Red team 15's score() rows topped at 2^20 plus an offset: top + log-sum rounded back to
    top in float32, the rows kept ~0.25 nats of extra mass, and a KL of 0.24 showed as -0.0006."""
    rng = np.random.default_rng(15)
    honest = rows(rng, 6, 4096)
    forged = honest - honest.max(axis=-1, keepdims=True) + np.float32(2.0 ** 20) + np.float32(0.06)
    fixed = _log_softmax(forged)
    mass = np.log(np.sum(np.exp(fixed.astype(np.float64)), axis=-1))
    np.testing.assert_allclose(mass, 0.0, atol=1e-5)
    np.testing.assert_allclose(fixed, honest, atol=0.13)  # float32 spacing at 2^20: 0.125
