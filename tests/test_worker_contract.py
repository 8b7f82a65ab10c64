"""The worker's side of generate()'s contract: (token, logprobs) pairs, read inside the timed
window, and the speed calls' log-probs kept for the quality checks (taken after every call);
and output without end, which must end as a CRASH with a bounded log.

A stand-in inference.py (no model, a 32-token vocabulary) yields pairs in every accepted form
and every broken one, picked by its MODE knob; the worker runs it unsandboxed, for speed.
"""

import os
import secrets

import numpy as np
import pytest

import types

from conftest import require_bwrap
from harness import bench, memory, sandbox, worker as worker_module
from harness.pipe import KEPT_CALLS
from harness.worker import Worker, WorkerCrash, WorkerInvalid, read_log_tail

STAND_IN = '''
import os
import signal
import time

import mlx.core as mx
import numpy as np

MODE = "pairs"
VOCAB = 32


def load(model_path, draft_model_path=None):
    if MODE == "read_self":  # compiled, then removed before any of it ran: nothing to read back
        import linecache
        assert "inference.py" not in os.listdir(os.path.dirname(__file__)), "the file is still there"
        assert linecache.getline(__file__, 2) == "", "linecache still has the source"
        try:
            __spec__.loader.get_source("inference")
        except ImportError:
            pass
        else:
            raise AssertionError("the loader still finds the source")
        open(__file__).read()
    if MODE == "raise_in_load":
        raise RuntimeError("raised in load")
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
        elif MODE == "flood":  # prints without end (print goes to the log)
            while True:
                print("x" * 4095)
        elif MODE == "announce_more" and i == 0:  # the kept rows' header will promise endless rows
            import sys
            child = sys.modules["harness.child"]

            def endless(channel, request, kept):
                channel.send({"call": request["calls"][0], "rows": 10 ** 12})
                while True:
                    channel.send_block(np.zeros((1000, VOCAB), np.float32))
            child._send_logprobs = endless
            yield i, lp
        elif MODE == "ballast":  # holds 300 MB while timed, then resets the peaks it keeps itself
            ballast = np.ones(300_000_000 // 8)
            for j in range(max_tokens):
                time.sleep(0.1)
                yield j, logprobs_for(j)
            del ballast
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM and ru_maxrss
                f.write("5")
            return
        elif MODE == "ballast_first" and i == 0:  # holds 300 MB only before its first token
            ballast = np.ones(300_000_000 // 8)
            time.sleep(0.3)
            del ballast
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            yield i, lp
        elif MODE == "flood_killed":  # the same, with SIGXFSZ back to its default (kill)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            while True:
                os.write(2, b"x" * 65536)
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
    """start(mode) -> a loaded Worker running the stand-in in that MODE; all closed at the end.
    Unsandboxed, unless start(mode, sandboxed=True) (bubblewrap: skipped where it cannot start)."""
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    workers = []

    def _start(mode, sandboxed=False):
        if sandboxed:
            monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
            require_bwrap()
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


@pytest.mark.parametrize("sandboxed", [False, True], ids=["no-sandbox", "bwrap"])
def test_a_pipeline_finds_no_source_to_read_and_tracebacks_keep_their_lines(start, sandboxed):
    """The worker compiles inference.py and removes it before any of it runs: what the code
    does not say (whitespace lines, layout) cannot be read back through open(__file__) and
    run uncounted (a red team's "simpler"). Tracebacks still name the file and the line."""
    with pytest.raises(WorkerCrash) as info:
        start("read_self", sandboxed)
    assert "load() raised FileNotFoundError" in str(info.value), info.value.log_tail
    with pytest.raises(WorkerCrash) as info:
        start("raise_in_load", sandboxed)
    line = STAND_IN.splitlines().index('        raise RuntimeError("raised in load")') + 1
    assert f'inference.py", line {line}, in load' in info.value.log_tail, info.value.log_tail


def test_import_leaves_no_source_behind(tmp_path, monkeypatch):
    """harness.child._import_inference in this process: the file is gone, linecache holds
    none of it (a warning shown while compiling would have cached every line), __file__ and
    tracebacks still name it."""
    import linecache
    import sys
    import traceback

    from harness import child

    path = tmp_path / "inference.py"
    path.write_text("import linecache\n\t \t  \n\ndef load(model_path, draft_model_path=None):\n"
                    "    raise RuntimeError('boom')\n\n\ndef generate(*args, **kwargs):\n    pass\n\n\n"
                    "def score(*args):\n    pass\n\n\nSEEN = linecache.getline(__file__, 2)\n")
    assert linecache.getline(str(path), 2) == "\t \t  \n"  # as if a warning had been shown
    monkeypatch.setitem(sys.modules, "inference", None)
    module = child._import_inference(str(path))
    assert not path.exists() and module.SEEN == "" and module.__file__ == str(path)
    with pytest.raises(ImportError):
        module.__spec__.loader.get_source("inference")
    with pytest.raises(RuntimeError) as info:
        module.load("no-model")
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (last.filename, last.lineno, last.name) == (str(path), 5, "load")
    broken = tmp_path / "broken.py"
    broken.write_text("def load(:\n")
    with pytest.raises(SyntaxError) as info:
        child._import_inference(str(broken))
    assert info.value.lineno == 1 and not broken.exists()


def test_kept_logprobs_come_back_once_and_tasks_keep_nothing(start):
    worker = start("pairs")
    for call in range(KEPT_CALLS + 1):
        worker.generate([1, 2], max_tokens=4 + call, stop_at_eos=False, timeout_s=30, keep=call)
    worker.generate([1, 2], max_tokens=3, stop_at_eos=True, timeout_s=30)  # a task call
    calls = list(range(KEPT_CALLS + 1))
    assert worker.kept_calls() == calls  # the task call kept nothing
    got = worker.timed_logprobs(calls[::-1], timeout_s=30)
    assert sorted(got) == calls
    for call, rows in got.items():
        assert rows.dtype == np.float32 and rows.shape == (4 + call, 32)
        np.testing.assert_allclose(rows, expected(4 + call), atol=2e-3)  # float16 in between
    assert worker.kept_calls() == []
    with pytest.raises(ValueError, match=r"calls \[0\] are not kept"):
        worker.timed_logprobs([0], timeout_s=30)  # taken and freed already: the harness's bug
    assert worker.alive()  # refused before anything was sent


def test_released_calls_are_freed_on_both_sides(start):
    """Every speed call carries a keep id; the parent releases the ones it will never ask
    for (after they ran), and the worker frees them with the next request. Past KEPT_CALLS
    + 1 unreleased calls both sides drop the oldest alike (a memory safety net)."""
    worker = start("pairs")
    ids = [secrets.token_hex(8) for _ in range(KEPT_CALLS + 4)]
    for i, call in enumerate(ids):
        worker.generate([1, 2], max_tokens=3 + i % 3, stop_at_eos=False, timeout_s=30, keep=call)
        worker.generate([1, 2], max_tokens=2, stop_at_eos=True, timeout_s=30)  # task calls keep nothing
    newest = ids[-(KEPT_CALLS + 1):]
    assert worker.kept_calls() == newest  # the safety net dropped the oldest three
    worker.release(newest[:1])
    kept = newest[1:]
    assert worker.kept_calls() == kept
    with pytest.raises(ValueError, match="not kept"):
        worker.timed_logprobs([newest[0], kept[0]], timeout_s=30)
    with pytest.raises(ValueError, match="named twice"):
        worker.timed_logprobs([kept[0], kept[0]], timeout_s=30)
    assert worker.alive() and worker.kept_calls() == kept
    # The kept rows are the ones each call yielded: the digests of the same calls match.
    got = worker.timed_logprobs(kept[::2], timeout_s=30)
    for call in kept[::2]:
        n = 3 + ids.index(call) % 3
        np.testing.assert_allclose(got[call], expected(n), atol=1e-6)
    assert worker.kept_calls() == kept[1::2]
    # The worker itself freed the released rows: asked past the parent's check, it has none.
    worker.generate([1, 2], max_tokens=2, stop_at_eos=True, timeout_s=30)  # carries the releases
    worker._digests[newest[0]] = []
    with pytest.raises(WorkerCrash, match="no log-probs kept"):
        worker.timed_logprobs([newest[0]], timeout_s=30)


def test_every_measured_call_is_taken_for_the_check_and_warm_ups_are_released(start, monkeypatch):
    """The rows of every measured speed call, of both workers alike, are taken right after
    it (checked against its digests), and the challenger's handed to keep_rows; none is left
    to chance, and no worker is left holding rows when the workload ends."""
    workers = {"champion": start("pairs"), "challenger": start("pairs")}
    monkeypatch.setattr(bench, "build_prompt", lambda tokenizer, spec, corpus: types.SimpleNamespace(
        tokens=[1, 2, 3], name=spec.name, kind="decode", nonce="n"))
    preset = types.SimpleNamespace(prompts=[types.SimpleNamespace(name="p"), types.SimpleNamespace(name="q")],
                                   warmup=1, repeats=3, max_tokens=5)
    handed = []

    def keep_rows(rows, tokens):
        handed.append((rows, tokens))
        return len(handed)

    samples = bench.run_workload(workers, preset, None, "", timeout_s=30, keep_rows={"challenger": keep_rows})
    assert len(samples) == 2 * 2 * 3 and len(handed) == 2 * 3  # workers x prompts x rounds; warm-ups not
    mine = [s for s in samples if s.worker == "challenger"]
    assert sorted(s.own for s in mine) == list(range(1, len(handed) + 1))
    assert all(s.own is None for s in samples if s.worker == "champion")
    for rows, tokens in handed:
        np.testing.assert_allclose(rows, expected(5), atol=1e-6)
        assert tokens == list(range(5))
    for worker in workers.values():
        assert worker.kept_calls() == []  # the warm-ups' released, the others' taken
        assert worker.alive()
    assert "own" not in samples[0].to_dict()


@pytest.mark.parametrize("sandboxed", [False, True], ids=["no-sandbox", "bwrap"])
@pytest.mark.parametrize("mode, words", [
    ("flood", "raised OSError: [Errno 27] File too large"),  # Python ignores SIGXFSZ: writes fail
    ("flood_killed", "killed by signal SIGXFSZ"),
])
def test_endless_output_is_a_crash_and_the_log_stays_bounded(start, monkeypatch, mode, words, sandboxed):
    monkeypatch.setattr(worker_module, "LOG_LIMIT_BYTES", 1 << 20)
    worker = start(mode, sandboxed)
    with pytest.raises(WorkerCrash) as info:
        worker.generate([1, 2], max_tokens=5, stop_at_eos=False, timeout_s=60)
    assert words in str(info.value) and "\n" not in str(info.value)
    if mode == "flood_killed":  # the log tail explains a crash the pipeline did not report
        assert info.value.log_tail.endswith("x" * 100) and len(info.value.log_tail) <= 20000
    assert 0 < os.path.getsize(worker.log_path) <= 1 << 20
    assert not worker.alive()


def test_kept_rows_come_only_as_many_as_the_call_had_tokens(start):
    """A worker that announces more rows than its call yielded tokens is cut off at the
    header: the harness would otherwise read blocks without end (a MemoryError, no row)."""
    worker = start("announce_more")
    worker.generate([1, 2], max_tokens=3, stop_at_eos=False, timeout_s=30, keep="a")
    with pytest.raises(WorkerInvalid, match="header with 3 rows"):
        worker.timed_logprobs(["a"], timeout_s=30)
    assert not worker.alive()


@pytest.mark.skipif(not memory.HAS_PROC, reason="Linux: the parent reads the worker's memory in /proc")
@pytest.mark.parametrize("sandboxed", [False, True], ids=["no-sandbox", "bwrap"])
@pytest.mark.parametrize("mode", ["ballast", "ballast_first"])
def test_memory_seen_by_the_parent_cannot_be_reset_by_the_worker(start, sandboxed, mode):
    """Held while tokens come, or only before the first one: the parent sees it either way."""
    worker = start(mode, sandboxed)
    worker.generate([1, 2], max_tokens=4, stop_at_eos=False, timeout_s=60)
    worker.close()
    assert worker.max_rss_bytes > 250_000_000  # the 300 MB it held while timed


def test_a_worker_is_not_told_where_the_repository_is(monkeypatch):
    monkeypatch.setenv("MLX_HILLCLIMB_REPO", "/somewhere/repo")
    monkeypatch.setenv("OLDPWD", "/somewhere/run")
    env = worker_module.worker_env()
    assert not {"MLX_HILLCLIMB_REPO", "PWD", "OLDPWD"} & set(env) and env["PYTHONUNBUFFERED"] == "1"


def test_read_log_tail_reads_only_the_end(tmp_path):
    path = tmp_path / "w.log"
    path.write_bytes(b"a" * 50_000 + "\u00e9".encode() + b"z" * 19_999)  # the cut splits the two-byte e-acute
    tail = read_log_tail(path)
    assert tail == "\ufffd" + "z" * 19_999
    assert read_log_tail(path, limit=3) == "zzz"
    path.write_bytes(b"short\n")
    assert read_log_tail(path) == "short\n"
    with pytest.raises(OSError):
        read_log_tail(tmp_path / "missing.log")


def test_remove_folder_changes_nothing_above_the_folder(tmp_path):
    """A folder already gone, or one the pipeline made read-only inside: removed, and the
    permissions of the folders above it stay as they were (the temp folder once became 0700)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    parent.chmod(0o755)
    folder = parent / "worker"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "file").write_text("x")
    (folder / "locked").chmod(0o500)
    worker_module.remove_folder(folder)
    assert not folder.exists() and (parent.stat().st_mode & 0o777) == 0o755
    worker_module.remove_folder(folder)  # gone already: nothing to do, nothing changed
    assert (parent.stat().st_mode & 0o777) == 0o755


def test_the_worker_runs_the_utf8_text_the_harness_read_whatever_coding_it_declares(tmp_path, monkeypatch):
    """The harness judges inference.py as UTF-8 text; compiled from bytes, a
    `# -*- coding: utf-7 -*-` line would make `# +AAo-...` (a comment in UTF-8) a line of code
    (a red team hid a whole pipeline there: "simpler" KEEP, code_hash of another program)."""
    from harness import child

    path = tmp_path / "inference.py"
    path.write_text("# -*- coding: utf-7 -*-\nHIDDEN = False\n# +AAo-HIDDEN = True\n"
                    "def load(*a): pass\ndef generate(*a): pass\ndef score(*a): pass\n")
    from_bytes = {}
    exec(compile(path.read_bytes(), "inference.py", "exec"), from_bytes)
    assert from_bytes["HIDDEN"] is True  # the trick is live where bytes are compiled
    monkeypatch.setitem(__import__("sys").modules, "inference", None)
    assert child._import_inference(str(path)).HIDDEN is False


def test_a_worker_that_cannot_start_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Red team 11 filled the disk: a worker whose inference.py could not be written left its
    folder behind. Whatever fails before the worker runs, its folder goes with it."""
    made, real = [], worker_module.tempfile.mkdtemp
    monkeypatch.setattr(worker_module.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    with pytest.raises(FileNotFoundError):
        Worker(tmp_path / "missing.py", tmp_path / "w.log")
    assert len(made) == 1 and not os.path.exists(made[0])
