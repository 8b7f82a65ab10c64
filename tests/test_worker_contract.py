"""The worker's side of generate()'s contract: (token, logprobs) pairs, read inside the timed
window, and the speed calls' log-probs kept for the quality checks.

A stand-in inference.py (no model, a 32-token vocabulary) yields pairs in every accepted form
and every broken one, picked by its MODE knob; the worker runs it unsandboxed, for speed.
"""

import numpy as np
import pytest

from harness import sandbox
from harness.worker import Worker, WorkerCrash, WorkerInvalid

STAND_IN = '''
import mlx.core as mx
import numpy as np

MODE = "pairs"
VOCAB = 32


def load(model_path, draft_model_path=None):
    return None


def logprobs_for(i):
    """Lazy log-probs of step i: a tilted distribution over the vocabulary."""
    return mx.arange(VOCAB, dtype=mx.float32) * (i + 1) / VOCAB - mx.logsumexp(
        mx.arange(VOCAB, dtype=mx.float32) * (i + 1) / VOCAB)


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    for i in range(max_tokens):
        lp = logprobs_for(i)
        if MODE == "bare":
            yield i
        elif MODE == "triple":
            yield i, lp, True
        elif MODE == "row2d":
            yield i, lp[None]
        elif MODE == "numpy":
            yield i, np.asarray(lp)
        elif MODE == "bfloat16":
            yield i, lp.astype(mx.bfloat16)
        elif MODE == "short_row":
            yield i, lp[: VOCAB - (i == 2)]
        elif MODE == "list":
            yield i, lp.tolist()
        elif MODE == "big_token":
            yield VOCAB + i, lp
        else:
            yield i, lp


def score(pipeline, tokens):
    return iter(())
'''


def expected(n):
    """What the stand-in's first n log-probs are, in float32."""
    rows = np.arange(32, dtype=np.float64)[None] * (np.arange(n)[:, None] + 1) / 32
    return (rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))).astype(np.float32)


@pytest.fixture
def start(tmp_path, monkeypatch):
    """start(mode) -> a loaded Worker running the stand-in in that MODE; all closed at the end."""
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    workers = []

    def _start(mode):
        folder = tmp_path / f"w{len(workers)}"
        folder.mkdir()
        (folder / "inference.py").write_text(STAND_IN)
        worker = Worker(folder / "inference.py", tmp_path / f"w{len(workers)}.log")
        workers.append(worker)
        worker.load(tmp_path / "no-model", overrides={"MODE": mode}, timeout_s=60)
        return worker

    yield _start
    for worker in workers:
        worker.close()


@pytest.mark.parametrize("mode", ["pairs", "row2d", "numpy", "bfloat16"])
def test_pairs_in_every_accepted_form(start, mode):
    out = start(mode).generate([1, 2], max_tokens=5, stop_at_eos=False, timeout_s=30)
    assert out["tokens"] == [0, 1, 2, 3, 4] and len(out["times"]) == 5


@pytest.mark.parametrize("mode, words", [
    ("bare", ["(token, logprobs) pairs", "int 0"]),
    ("triple", ["(token, logprobs) pairs", "tuple"]),
    ("list", ["(token, logprobs) pairs", "list"]),
    ("short_row", ["31 log-probabilities", "expected 32"]),
    ("big_token", ["token id 32", "outside the vocabulary [0, 32)"]),
])
def test_anything_but_a_pair_is_invalid_and_names_the_contract(start, mode, words):
    worker = start(mode)
    with pytest.raises(WorkerInvalid) as info:
        worker.generate([1, 2], max_tokens=5, stop_at_eos=False, timeout_s=30)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_kept_logprobs_come_back_once_and_tasks_keep_nothing(start):
    worker = start("pairs")
    for call in range(3):
        worker.generate([1, 2], max_tokens=4 + call, stop_at_eos=False, timeout_s=30, keep=call)
    worker.generate([1, 2], max_tokens=3, stop_at_eos=True, timeout_s=30)  # a task call
    got = worker.timed_logprobs([2, 0], timeout_s=30)
    assert sorted(got) == [0, 2]
    for call, rows in got.items():
        assert rows.dtype == np.float32 and rows.shape == (4 + call, 32)
        np.testing.assert_allclose(rows, expected(4 + call), atol=2e-3)  # float16 in between
    assert worker.timed_logprobs([1], timeout_s=30)[1].shape == (5, 32)
    with pytest.raises(WorkerCrash, match="no log-probs kept"):
        worker.timed_logprobs([0], timeout_s=30)  # taken and freed already
