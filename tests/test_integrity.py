"""Code in inference.py cannot reach the referee: one test per class of attack that is not
covered elsewhere (the sandbox itself: test_sandbox.py; the pipe: test_pipe.py; Ctrl-C
versus a SIGINT from another process: test_verdict.py). Real git repositories, the tiny
model, real bubblewrap (and the no-sandbox fallback where the test needs a hole)."""

import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import git
from harness import ledger

# Appended to inference.py: the tokens are the model's own, but after the call the code
# reaches into the harness code that shares its process and swaps the log-probs the
# worker kept for a uniform distribution (a forgery of the timed-quality figures).
FORGE_KEPT_LOGPROBS = '''

import sys as _sys
import numpy as _np

_worker = _sys.modules.get("harness.child")
_send = _worker._send_logprobs


def _forged_send(channel, request, kept):
    for call in list(kept):
        kept[call] = _np.zeros_like(kept[call])
    return _send(channel, request, kept)


_worker._send_logprobs = _forged_send
'''

# Appended to inference.py: without a sandbox, write a forged KEEP row into results.tsv.
APPEND_FORGED_ROW = '''

import os as _os


def _repository():
    """Where the harness's repository is: its own environment names it (a worker's does not)."""
    try:
        with open(f"/proc/{_os.getppid()}/environ") as f:
            harness_env = dict(item.split("=", 1) for item in f.read().split("\\0") if "=" in item)
    except OSError:  # in the sandbox the harness is out of sight
        harness_env = {}
    return harness_env.get("MLX_HILLCLIMB_REPO", "")


_ledger = _os.path.join(_repository(), "results.tsv")
_honest_load = load


def load(model_path, draft_model_path=None):
    try:
        with open(_ledger) as f:
            last = f.read().splitlines()[-1].split("\\t")
        last[8] = "KEEP"  # the decision column
        last[3] = "forged champion"
        with open(_ledger, "a") as f:
            f.write("\\t".join(last) + "\\n")
    except OSError:
        pass  # in the sandbox the repository is out of sight
    return _honest_load(model_path, draft_model_path)
'''


# Appended to inference.py: load() prints without end. Every file a worker writes is capped
# (RLIMIT_FSIZE), so its log stops growing and the print fails: a CRASH, never a full disk.
FLOOD_THE_LOG = '''

_honest_load = load


def load(model_path, draft_model_path=None):
    while True:
        print("x" * 4095)
'''


def _marker_module(marker):
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def test_forged_kept_logprobs_are_invalid(project):
    project.evaluate()
    project.inference.write_text(project.inference.read_text() + FORGE_KEPT_LOGPROBS)
    project.commit("forge the kept log-probs")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "INVALID", result
    assert "not the ones generate() yielded while it was timed" in result["reason"]
    assert len(project.ledger_lines()) == 3


def test_bytecode_and_shadowing_modules_in_the_repository_never_run(project, tmp_path):
    """Forged bytecode in harness/__pycache__ (its header matching the source) and an untracked
    git.py hidden through .git/info/exclude: the harness runs a pristine copy in isolated mode."""
    project.evaluate()
    marker = tmp_path / "ran"
    source = project.root / "harness" / "verdict.py"
    code = compile(_marker_module(marker), str(source), "exec")
    stat = source.stat()
    pyc = importlib.util.cache_from_source(str(source))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    with open(pyc, "wb") as f:
        f.write(header + marshal.dumps(code))
    (project.root / "git.py").write_text(_marker_module(marker))
    (project.root / "numpy.py").write_text(_marker_module(marker))
    with open(project.root / ".git" / "info" / "exclude", "a") as f:
        f.write("git.py\nnumpy.py\n")
    project.edit_inference("TOP_K = 0 ", "TOP_K = 0  # a comment\n#")
    project.commit("comment only")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] in ("REVERT", "KEEP"), result
    assert not marker.exists(), "code planted in the repository ran inside the harness"


def test_rows_not_written_by_the_harness_make_the_run_invalid_and_never_count(project, monkeypatch):
    """Without a sandbox a pipeline can append to results.tsv: the run that saw it is INVALID,
    naming the line, and the forged row is never the champion."""
    project.evaluate()
    before = project.ledger_lines()
    project.inference.write_text(project.inference.read_text() + APPEND_FORGED_ROW)
    project.commit("forge a KEEP row")
    monkeypatch.setenv("MLX_HILLCLIMB_SANDBOX", "none")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "INVALID" and "results.tsv line(s) 3 were not written" in result["reason"], result["reason"]
    assert result["sandbox"] == "none" and "WITHOUT a sandbox" in proc.stderr
    lines = project.ledger_lines()
    assert lines[:len(before)] == before and "forged champion" in lines[len(before)]
    rows, _ = ledger.read(project.root / "results.tsv")
    assert [r["trusted"] for r in rows] == [True, False, True]
    assert ledger.champion_row(rows, [r["commit"] for r in rows])["subject"] != "forged champion"
    # Sandboxed, the same pipeline cannot even write: earlier rows stay as they were.
    monkeypatch.delenv("MLX_HILLCLIMB_SANDBOX")
    before = project.ledger_lines()
    proc, result = project.evaluate()
    assert result["sandbox"] == "bwrap" and result["decision"] != "INVALID", result
    assert project.ledger_lines()[:len(before)] == before and len(project.ledger_lines()) == len(before) + 1


def test_damaged_reference_cache_is_rebuilt_and_a_changed_model_is_another_protocol(project, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("MLX_HILLCLIMB_CACHE", str(tmp_path / "cache"))  # this test's reference alone
    proc, first = project.evaluate()
    [meta] = Path(tmp_path / "cache" / "reference").glob("*/meta.json")
    blob = bytearray(meta.read_bytes())
    blob[10:16] = b"\0" * 6  # a few zeroed bytes: no longer JSON
    meta.write_bytes(bytes(blob))
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] == "MEASURED", proc.stderr[-2000:]
    assert "damaged" in proc.stderr and "rebuilding" in proc.stderr
    json.loads(meta.read_text())  # rebuilt whole
    # A model whose content changed is never measured under the same protocol.
    model = tmp_path / "model"
    shutil.copytree(project.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-5) * 2
    (model / "config.json").write_text(json.dumps(config))
    proc, changed = project.evaluate_model(model)
    assert proc.returncode == 0 and changed["protocol"] != first["protocol"], proc.stderr[-2000:]
    assert result["protocol"] == first["protocol"]
    # ... and the same model named another way is the same protocol, with its history (a red
    # team's `--model path//model` began a fresh protocol: a sandbagged BASELINE there, KEEP +49.5 %)
    proc, alias = project.evaluate_model(str(project.model_dir).replace("/", "//"))
    assert proc.returncode == 0 and alias["protocol"] == first["protocol"], proc.stderr[-2000:]


# Appended to inference.py: print (into the worker's log) everything that could tell this
# pipeline whether it runs as the champion or the challenger (a "sleeper" champion would
# slow itself down only in that role).
PRINT_ROLE_CLUES = '''

import os as _os
import sys as _sys


def _clues():
    seen = {"stdout": _os.readlink("/proc/self/fd/1"), "argv": _sys.argv[1:3]}
    repo = _os.environ.get("MLX_HILLCLIMB_REPO", "")
    try:
        seen["repo"] = sorted(_os.listdir(repo))
    except OSError as exc:
        seen["repo"] = type(exc).__name__
    run = _os.path.dirname(seen["stdout"])
    try:
        seen["run"] = sorted(_os.listdir(run))
    except OSError as exc:
        seen["run"] = type(exc).__name__
    print("CLUES", seen, flush=True)


_clues()
'''


def test_a_worker_cannot_tell_its_role(project):
    project.inference.write_text(project.inference.read_text() + PRINT_ROLE_CLUES)
    project.commit("baseline that looks around")
    project.evaluate()
    project.edit_inference("TOP_K = 0 ", "TOP_K = 0  # a comment\n#")
    project.commit("comment only")
    proc, result = project.evaluate()
    assert result["decision"] in ("REVERT", "KEEP", "MEASURED"), result
    logs = json.loads((project.root / result["run_file"]).read_text())["worker_logs"]
    clues = [line for name in ("champion", "challenger") for line in logs[name].splitlines()
             if line.startswith("CLUES")]
    assert len(clues) == 2, logs
    for line in clues:
        assert "champion" not in line and "challenger" not in line, line
        assert "inference.py" not in line.split("'repo'")[1], line  # the repository is hidden


def test_endless_output_is_a_crash_with_a_bounded_log(project):
    from harness.worker import LOG_LIMIT_BYTES

    project.evaluate()
    project.inference.write_text(project.inference.read_text() + FLOOD_THE_LOG)
    project.commit("print without end")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "CRASH" and "File too large" in result["reason"], result
    run = json.loads((project.root / result["run_file"]).read_text())
    assert 0 < sum(len(log) for log in run["worker_logs"].values()) <= 2 * 20000
    assert len(proc.stderr) < LOG_LIMIT_BYTES // 100  # the harness printed a tail, not the flood


def test_a_huge_int_literal_is_judged_and_logged_like_any_change(project):
    """An int literal of 5000 hex digits once stopped prepare.py (Python will not write it in
    decimal: exit 1, no row). The run is judged, its row written, its line count not trusted."""
    project.evaluate()
    big = "0x" + "f" * 5000
    project.edit_inference("TOP_K = 0 ", f"BIG_TABLE = {big}\nTOP_K = 0 ")
    project.commit("a huge int literal")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] in ("KEEP", "REVERT"), result
    assert "grew by" in result["lines_uncounted"], result
    assert len(project.ledger_lines()) == 3 and "+BIG_TABLE=0xfff" in project.ledger_lines()[-1]
    run = json.loads((project.root / result["run_file"]).read_text())
    assert run["changes"]["vs_champion"]["knobs"][0]["new"].startswith("0xfff")


# Appended to inference.py: load() leaves a daemon (its own session, double-forked: it leaves
# the worker's process group and tree) that SIGSTOPs every process it can see but its own
# worker, for ten minutes: the champion's worker of this run and of later runs, and the harness.
# Unsandboxed this froze the champion: KEEP +58 % ... +180 %, and an honest comment-only
# commit a run later got KEEP +80 %.
FREEZE_THE_CHAMPION = '''

import os as _os, subprocess as _subprocess, sys as _sys

_DAEMON = r"""
import os, signal, sys, time
if os.fork():
    os._exit(0)
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
spared, me = int(sys.argv[2]), os.getpid()
for _ in range(12000):
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (me, spared):
            try:
                os.kill(int(name), signal.SIGSTOP)
            except OSError:
                pass
    time.sleep(0.05)
"""
_honest_load = load


def load(model_path, draft_model_path=None):
    _subprocess.Popen([_sys.executable, "-c", _DAEMON, "__MARKER__", str(_os.getpid())], start_new_session=True)
    return _honest_load(model_path, draft_model_path)
'''


def test_a_challenger_cannot_freeze_the_champion_now_or_later(project, sandboxed):
    """Class 1: the challenger's daemon cannot see or stop the champion's worker or the harness
    (PID namespace, a user of its own), dies with its run, and an honest commit after it is
    judged on its own speed."""
    import uuid

    from test_pipe import _marked_processes

    marker = "fz" + uuid.uuid4().hex[:12]
    project.evaluate()
    project.inference.write_text(project.inference.read_text() + FREEZE_THE_CHAMPION.replace("__MARKER__", marker))
    project.commit("freeze the champion")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] != "KEEP", result
    assert _marked_processes(marker) == []  # the daemon went with its worker
    rows = project.ledger_lines()
    project.edit_inference("TOP_K = 0 ", "TOP_K = 0  # a comment\n#")
    project.commit("comment only")
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] != "KEEP", result
    assert project.ledger_lines()[:len(rows)] == rows and len(project.ledger_lines()) == len(rows) + 1


# Appended to inference.py: load() nests 3000 folders in the worker's own folder. Python
# 3.11's shutil.rmtree recurses, so removing the folder raised RecursionError: the harness
# exited 1 with no row, and the folder stayed behind.
DEEP_FOLDERS = '''

import os as _os

_honest_load = load


def load(model_path, draft_model_path=None):
    fd = _os.open(".", _os.O_RDONLY)
    for _ in range(3000):
        _os.mkdir("d", dir_fd=fd)
        inner = _os.open("d", _os.O_RDONLY, dir_fd=fd)
        _os.close(fd)
        fd = inner
    return _honest_load(model_path, draft_model_path)
'''


def test_a_tree_too_deep_to_recurse_is_removed_and_the_run_ends_with_its_row(project):
    import tempfile

    project.evaluate()
    project.inference.write_text(project.inference.read_text() + DEEP_FOLDERS)
    project.commit("deep folders")
    before = set(Path(tempfile.gettempdir()).glob("mlx-hillclimb-worker-*"))
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] in ("KEEP", "REVERT"), result  # judged like any change
    assert len(project.ledger_lines()) == 3
    after = set(Path(tempfile.gettempdir()).glob("mlx-hillclimb-worker-*")) - before
    assert not [folder for folder in after if (folder / "d").exists()]  # no deep tree left (others may run meanwhile)


@pytest.mark.parametrize("where", ["evaluate.figures", "quality.score_corpus"])
def test_a_harness_error_while_judging_ends_as_a_crash_row_not_a_traceback(project, monkeypatch, where):
    """Whatever the workers return, a run ends with its row: an exception while the quality
    is measured or the figures are computed (a harness bug no input should reach, simulated
    here) is a CRASH row."""
    from harness import evaluate, quality
    from harness.settings import load_settings

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated")

    module, name = where.split(".")
    monkeypatch.setattr({"evaluate": evaluate, "quality": quality}[module], name, broken)
    ctx = evaluate.make_context(load_settings(project.root / "harness.yaml"), quick=True,
                                model=str(project.model_dir), root=project.root)
    result = evaluate.evaluate(ctx)
    assert result["decision"] == "CRASH" and "harness error" in result["reason"]
    assert "ZeroDivisionError: simulated" in result["reason"]
    rows, problems = ledger.read(project.root / "results.tsv")
    assert problems == [] and [r["decision"] for r in rows] == ["CRASH"]


# Red team 10, on figures the pipeline returns. (a) score() puts the true next token of one
# corpus position at log-prob -1e6: a finite mean NLL past what math.exp can take (exit 1, no
# row). (b) The speed calls' rows are the logits x4 (KL ~0.46 nats a token, 9x the budget)
# and, on two calls, the first row drops half the vocabulary: two positions at ~30,000 nats
# widened the standard error until the mean gate's bound went below zero (it passed).
SHARPENED_WITH_OUTLIERS = ("    logprobs = _log_softmax(logits)\n", """    logprobs = _log_softmax(logits * 4.0)
    if _OUTLIER_NOW[0]:
        _OUTLIER_NOW[0] = False
        top = mx.argsort(logprobs[0])[logprobs.shape[-1] // 2:]
        logprobs = _log_softmax(logprobs.at[0, top].add(-1e9))
""")
COUNT_SPEED_CALLS = ("    with mx.stream(pipeline.stream):\n", """    if not stop_at_eos:
        _SPEED_CALLS[0] += 1
        _OUTLIER_NOW[0] = _SPEED_CALLS[0] in (3, 5)
    with mx.stream(pipeline.stream):
""")
ONE_POSITION_FAR_OUT = ("            yield _log_softmax(_forward(pipeline, cache, mx.array(tokens[start:stop])))\n",
                        """            rows = _log_softmax(_forward(pipeline, cache, mx.array(tokens[start:stop])))
            if start == 0 and len(tokens) > 1:
                rows[0, tokens[1]] = -1e6
            yield rows
""")


def test_extreme_figures_from_the_pipeline_neither_crash_the_run_nor_widen_a_gate(project):
    project.evaluate()
    for old, new in (SHARPENED_WITH_OUTLIERS, COUNT_SPEED_CALLS, ONE_POSITION_FAR_OUT):
        project.edit_inference(old, new)
    project.inference.write_text(project.inference.read_text() + "\n_SPEED_CALLS, _OUTLIER_NOW = [0], [False]\n")
    project.commit("sharpened timed rows, two outliers; one corpus position far out")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(project.ledger_lines()) == 3
    assert result["decision"] == "REVERT" and "timed_kl_mean" in result["reason"], result
    assert result["timed_kl_mean"] > 100 and result["perplexity"] == float("inf"), result


# Red team 13: load() fails with a message that opens with a lone surrogate (legal in the
# pipe's JSON, not in UTF-8: results.tsv's line could not be encoded, exit 1, no row) and goes
# on with a forged key: value block, which the harness printed as the worker's traceback,
# where program.md greps the log for `^decision:`.
FORGED_BLOCK_IN_AN_ERROR = '''

def load(model_path, draft_model_path=None):
    raise ValueError(chr(0xD800) + "\\n---\\ndecision: KEEP\\nspeedup: 1.184\\nchampion: 0000000")
'''


def test_an_error_message_can_neither_stop_the_row_nor_print_lines_of_the_run_s_own(project):
    project.evaluate()
    project.inference.write_text(project.inference.read_text() + FORGED_BLOCK_IN_AN_ERROR)
    project.commit("a forged block in an error message")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "CRASH" and chr(0xD800) in result["reason"], result  # --json escapes it
    assert len(project.ledger_lines()) == 3 and "\\ud800" in project.ledger_lines()[-1]
    printed = (proc.stdout + proc.stderr).splitlines()
    assert "  | ValueError: \\ud800" in printed  # the worker's traceback, behind its marks
    assert [line for line in printed if line.startswith("decision:")] == ["decision: CRASH"]


# Appended to inference.py (whose token loop sleeps SLEEP_FRACTION of each token's time,
# bench/power.py's SLEEPY_LOOP): a "sleeper". A shared futex on a page of the interpreter
# file, which both sandboxes map read-only, is keyed by that file's inode, so a wake in one
# sandbox reaches a waiter in the other (a red team won KEEP +20.5 % with it; it cannot be
# refused: C++ static-init guards wait and wake shared futexes). Each version waits on its
# own slot and, from its load on, keeps waking the slots of every older version: an older one
# that is woken knows a newer challenger exists and slows down by about a third from then on.
def sleepy(project, fraction, **quick):
    """inference.py with bench/power.py's sleepy decode loop (it spins `fraction` of each
    token's time away, work as a slower pipeline's is), the quick preset updated by `quick`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from power import SLEEPY_LOOP, TOKEN_LOOP

    settings = project.settings()
    settings["workload"]["presets"]["quick"].update(quick)
    project.write_settings(settings)
    project.edit_inference(TOKEN_LOOP, SLEEPY_LOOP)
    project.edit_inference("NUM_DRAFT_TOKENS = 3 ", f"SLEEP_FRACTION = {fraction}\nNUM_DRAFT_TOKENS = 3 ")


FUTEX_SLEEPER = '''

import ctypes as _ctypes, os as _os, platform as _platform, sys as _sys, threading as _threading, time as _time

VERSION = __VERSION__
_libc = _ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = _ctypes.c_void_p
_libc.mmap.argtypes = [_ctypes.c_void_p, _ctypes.c_size_t, _ctypes.c_int, _ctypes.c_int, _ctypes.c_int,
                       _ctypes.c_long]
_shared = open(_os.path.realpath(_sys.executable), "rb")
_page = _libc.mmap(None, 4096, 1, 1, _shared.fileno(), 0)  # PROT_READ, MAP_SHARED
_FUTEX = {"x86_64": 202, "aarch64": 98}[_platform.machine()]


def _slot(version):
    return _ctypes.c_void_p(_page + 4 * version)


def _wait_for_a_newer_one():
    global SLEEP_FRACTION
    word = _ctypes.c_uint32.from_address(_page + 4 * VERSION).value
    while _libc.syscall(_FUTEX, _slot(VERSION), 0, word, None, None, 0) != 0:  # FUTEX_WAIT, shared
        pass  # interrupted (the harness stops and continues the worker)
    SLEEP_FRACTION = 0.5


_honest_load = load


def _keep_waking_the_older_ones():
    while True:  # both run at once only while they load (after that one is always stopped): keep at it
        for older in range(1, VERSION):
            _libc.syscall(_FUTEX, _slot(older), 1, 1 << 30, None, None, 0)  # FUTEX_WAKE, shared
        _time.sleep(0.01)


def load(model_path, draft_model_path=None):
    _threading.Thread(target=_wait_for_a_newer_one, daemon=True).start()
    _threading.Thread(target=_keep_waking_the_older_ones, daemon=True).start()
    return _honest_load(model_path, draft_model_path)
'''


def test_a_sleeper_champion_that_slows_beside_a_newer_challenger_is_caught(project, sandboxed):
    """Covert channels between the two sandboxes cannot all be closed (shared futexes, the
    machine's inode counter): a champion slowed by one is slower against the yardstick than
    in its own BASELINE, and a KEEP that this explains is INVALID."""
    sleepy(project, 0.0, max_tokens=128)  # whole calls mostly decode: a KEEP is in reach
    project.inference.write_text(project.inference.read_text() + FUTEX_SLEEPER.replace("__VERSION__", "1"))
    project.commit("sleeper, version 1")
    assert project.evaluate()[1]["decision"] == "BASELINE"
    project.edit_inference("VERSION = 1", "VERSION = 2")
    project.commit("sleeper, version 2: not faster")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["champion_yardstick_pace"] < 0.9, result
    assert result["decision"] == "INVALID" and "(was: KEEP" in result["reason"], result
    # the yardstick check catches it; on a very busy machine its bound may be loose, and then
    # the champion's raw pace against its own earlier runs (a floor at 0.7) may be what does
    assert ("against its record" in result["reason"]
            or "in earlier runs" in result["reason"]), result


# Appended to inference.py (with bench/power.py's SLEEPY_LOOP): a pipeline that slows down by
# 40 % on a cue it can see (here a file appearing in a folder its sandbox can read, made by
# the test once the pipeline was kept; in the wild: the clock, a coin it tosses). Every run
# looks alike from inside, so no schedule tells it its role.
CUE_SLEEPER = '''

import os as _os

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    global SLEEP_FRACTION
    if _os.path.exists(__CUE__):
        SLEEP_FRACTION = 0.4
    yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
'''


def test_a_kept_challenger_that_slows_down_once_it_is_the_champion_is_caught(project, sandboxed):
    """A pipeline kept on its merits as a challenger, slow as the champion (alike in every call
    of the run): its speed over the yardstick's is below its own record from the run that kept
    it, and the next KEEP is INVALID, however the machine's load moved in between."""
    import uuid

    cue = Path("/var/tmp") / f"mlx-hillclimb-test-cue-{uuid.uuid4().hex}"  # readable from inside the sandbox
    # whole calls mostly decode: a KEEP is in reach; rounds to spare: on a busy machine the honest
    # champion's pace wanders (-9.9 % in CI beside a red team), and the A/B goes on until the
    # win, discounted by it, still clears
    sleepy(project, 0.4, max_tokens=128, max_repeats=30, budget_s=150)
    project.commit("a slow baseline")
    assert project.evaluate()[1]["decision"] == "BASELINE"
    project.edit_inference("SLEEP_FRACTION = 0.4\n", "SLEEP_FRACTION = 0.0\n")
    honest = project.inference.read_text()
    project.inference.write_text(honest + CUE_SLEEPER.replace("__CUE__", repr(str(cue))))
    project.commit("faster, and slow on a cue")
    proc, result = project.evaluate()
    assert result["decision"] == "KEEP" and result["yardstick_ratio"] > 0, result
    try:
        cue.touch()
        project.inference.write_text(honest)
        project.commit("the same pipeline without the sleeper: no faster than it really is")
        proc, result = project.evaluate()
    finally:
        cue.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["champion_yardstick_pace"] < 0.85, result
    assert result["decision"] == "INVALID" and "(was: KEEP" in result["reason"], result
    assert "against its record" in result["reason"], result
    rows, _ = ledger.read(project.root / "results.tsv")
    assert rows[-1]["decision"] == "INVALID" and float(rows[-1]["champion_yardstick_pace"]) < 0.85


STALLER = '''

import time as _time

_honest_generate = generate
_took = []  # each call's seconds, its stall left out


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    started = _time.perf_counter()
    stall = 1.5 * sum(_took[-9:]) if len(_took) % 10 == 9 else 0.0
    _time.sleep(stall)  # before the first token: decode_tps, first to last token, is untouched
    yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
    _took.append(_time.perf_counter() - started - stall)
'''


def test_a_challenger_faster_on_most_calls_that_stalls_a_few_far_longer_is_not_kept(project, sandboxed):
    """Red team 21: each pair counts capped (+-10 % for whole calls), so a challenger truly
    faster on 9 calls in 10 that stalls the 10th before its first token for 1.5 times what
    the 9 took won KEEP +40 %, taking about twice the champion's time in all. The whole
    calls' summed times (end_to_end_total) count each stall whole: REVERT."""
    sleepy(project, 0.4, max_tokens=64, max_repeats=30, budget_s=150)
    project.commit("a slow baseline")
    assert project.evaluate()[1]["decision"] == "BASELINE"
    project.edit_inference("SLEEP_FRACTION = 0.4\n", "SLEEP_FRACTION = 0.0\n")
    project.inference.write_text(project.inference.read_text() + STALLER)
    project.commit("faster, but stalls every 10th call")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "REVERT" and "summed over every pair" in result["reason"], result
    assert result["speedup"] > 1.2 and result["end_to_end_total"] < 1, result  # ~0.6 quiet, 0.9 seen under heavy load
    rows, _ = ledger.read(project.root / "results.tsv")
    assert rows[-1]["decision"] == "REVERT"


CUE_PADDER = '''

import os as _os
import time as _time

_honest_generate = generate
_last_call_s = [0.0]


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    started = _time.perf_counter()
    pad = _last_call_s[0] * 0.6 if _os.path.exists(__CUE__) else 0.0
    for n, step in enumerate(_honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)):
        until = _time.perf_counter() + (pad if n == 0 else 0.0)
        while _time.perf_counter() < until:
            pass  # a pause before the first token: decode_tps, first to last token, is untouched
        yield step
    _last_call_s[0] = _time.perf_counter() - started - pad
'''

BURSTER = '''

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    held = []
    for step in _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos):
        held.append(step)
        if len(held) * 10 >= max_tokens * 9:  # nine tenths held back, then all at once
            yield from held
            held = []
    yield from held
'''


def test_a_champion_that_pauses_before_its_first_token_cannot_hand_a_burst_a_keep(project, sandboxed):
    """Red team 3: the champion pauses before its first token on a cue (its decode_tps, first
    to last token, untouched) and the challenger holds its tokens back and bursts them (its
    decode_tps inflated many times): decode and whole calls both look faster. The champion's
    pace against its record is taken on whole calls, where the pause shows: no KEEP."""
    import uuid

    cue = Path("/var/tmp") / f"mlx-hillclimb-test-cue-{uuid.uuid4().hex}"
    settings = project.settings()
    settings["workload"]["presets"]["quick"]["max_tokens"] = 128
    project.write_settings(settings)
    honest = project.inference.read_text()
    project.inference.write_text(honest + CUE_PADDER.replace("__CUE__", repr(str(cue))))
    project.commit("pauses before its first token on a cue")
    assert project.evaluate()[1]["decision"] == "BASELINE"
    project.inference.write_text(honest + BURSTER)
    project.commit("bursts its tokens")
    try:
        cue.touch()
        proc, result = project.evaluate()
    finally:
        cue.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] in ("INVALID", "REVERT"), result
    assert result["speedup"] >= 1.4, result  # the burst did inflate decode_tps (the speedup counts it up to x1.5)
    if result["decision"] == "INVALID":
        assert "against its record" in result["reason"], result
    assert result["champion_yardstick_pace"] < 0.9, result  # honest: ~1 (0.97-1.03); 0.86 seen under heavy load


def test_a_sandbagged_first_baseline_on_a_new_branch_is_held_to_its_parents_record(project, sandboxed):
    """Red team 3: a new branch whose first BASELINE is slowed code; the honest code back
    again would be KEPT against it. The champion is held to the record of the commits it
    descends from, so that KEEP is INVALID."""
    sleepy(project, 0.0, max_tokens=128)
    project.commit("honest")
    assert project.evaluate()[1]["decision"] == "BASELINE"
    git(project.root, "checkout", "-qb", "sandbagged")
    project.edit_inference("SLEEP_FRACTION = 0.0\n", "SLEEP_FRACTION = 0.6\n")
    project.commit("slowed before this branch's first baseline")
    result = project.evaluate()[1]
    assert result["decision"] == "BASELINE" and "against the record of the code it descends from" in result["reason"]
    project.edit_inference("SLEEP_FRACTION = 0.6\n", "SLEEP_FRACTION = 0.0\n")
    project.commit("the honest code again")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["decision"] == "INVALID" and "against its record" in result["reason"], result
    assert result["champion_yardstick_pace"] < 0.85, result


def test_what_a_commit_descends_from_cannot_be_grafted_away(tmp_path):
    """The yardstick record counts the commits a champion descends from: neither a replace ref
    (`git replace --graft`) nor a grafts file hides one, and the walk takes no order from
    commit dates (a red team back-dated a commit so that `git rev-list` listed its parent first)."""
    from harness import gitops

    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "T")
    commits = []
    for i, date in enumerate(("2026-01-02T00:00:00", "2026-01-03T00:00:00", "2020-01-01T00:00:00")):
        (tmp_path / "f").write_text(str(i))
        git(tmp_path, "add", "f")
        subprocess.run(["git", "commit", "-qm", f"c{i}"], cwd=tmp_path, check=True,
                       env=dict(os.environ, GIT_COMMITTER_DATE=date, GIT_AUTHOR_DATE=date))
        commits.append(git(tmp_path, "rev-parse", "--short=7", "HEAD"))
    assert gitops.ancestry(tmp_path) == commits[::-1]
    assert gitops.ancestry(tmp_path, commits[1]) == commits[1::-1]
    git(tmp_path, "replace", "--graft", "HEAD")
    assert git(tmp_path, "rev-list", "--count", "HEAD") == "1"  # git itself now sees no parent
    assert gitops.ancestry(tmp_path) == commits[::-1]
    git(tmp_path, "replace", "-d", git(tmp_path, "rev-parse", "HEAD"))
    (tmp_path / ".git" / "info" / "grafts").write_text(git(tmp_path, "rev-parse", "HEAD") + "\n")
    assert gitops.ancestry(tmp_path) == commits[::-1]


def test_a_branch_named_like_a_short_hash_does_not_stand_in_for_the_commit(tmp_path):
    """The ledger keeps short hashes; they are looked up among the commits, never the refs (a
    red team's branch named like the baseline's short hash, pointing at a HEAD with a rewritten
    harness, made the locked-file check compare HEAD with itself and the rewritten harness run)."""
    from harness import gitops

    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "T")
    for i in range(2):
        (tmp_path / "locked.txt").write_text(str(i))
        git(tmp_path, "add", "locked.txt")
        git(tmp_path, "commit", "-qm", f"c{i}")
    base = git(tmp_path, "rev-parse", "--short=7", "HEAD~1")
    git(tmp_path, "branch", base, "HEAD")
    assert git(tmp_path, "rev-parse", base) == git(tmp_path, "rev-parse", "HEAD")  # git itself takes the ref
    assert gitops.changed_locked_files(tmp_path, base) == ["locked.txt"]
    assert gitops.ancestry(tmp_path, base) == [base]
    assert gitops.file_at(tmp_path, base, "locked.txt") == "0"
    # prepare.py copies the harness it runs from the branch's BASELINE commit, not the branch
    branch = git(tmp_path, "symbolic-ref", "--short", "HEAD")
    (tmp_path / "results.tsv").write_text(f"commit\tbranch\tdecision\n{base}\t{branch}\tBASELINE\n")
    spec = importlib.util.spec_from_file_location("prepare_entry", Path(__file__).resolve().parent.parent / "prepare.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry._source_commit(str(tmp_path)) == git(tmp_path, "rev-parse", "HEAD~1")


def test_harness_code_runs_as_of_the_first_baseline_in_the_history(project):
    """A new branch's first commit is locked by its own BASELINE, so harness code changed
    there would run (a red team rewrote harness/verdict.py there: KEEP +16.8 % for a no-op).
    The code (prepare.py, harness/) runs as of the first BASELINE in HEAD's history, and a
    branch whose code differs is REJECTed; harness.yaml still comes from the branch. A
    history with no BASELINE in it (an orphan branch) does not run at all."""
    assert project.evaluate()[1]["decision"] == "BASELINE"
    git(project.root, "checkout", "-qb", "rewritten")
    verdict = project.root / "harness" / "verdict.py"
    verdict.write_text(verdict.read_text() + "\nMARK = 1  # a rewritten referee\n")
    project.commit("a new branch whose first commit rewrites the referee")
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] == "REJECT", proc.stderr[-2000:]
    assert "harness/verdict.py" in result["reason"] and "first BASELINE" in result["reason"], result
    git(project.root, "checkout", "-q", "main")
    git(project.root, "checkout", "-qb", "settings")
    settings = project.settings()
    settings["workload"]["presets"]["quick"]["max_tokens"] = 6
    project.write_settings(settings)
    project.commit("fewer tokens on this branch")
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] == "BASELINE", proc.stderr[-2000:]
    run = json.loads((project.root / result["run_file"]).read_text())
    assert {s["n_tokens"] for s in run["samples"]} == {6}  # the branch's harness.yaml ran
    git(project.root, "checkout", "-q", "--orphan", "orphan")
    project.commit("an orphan branch")
    proc = project.run("--quick", "--json", "--model", str(project.model_dir))
    assert proc.returncode == 2 and "descends from no commit with a BASELINE" in proc.stderr, proc.stderr[-2000:]


def test_nothing_of_the_tree_but_the_locked_harness_files_is_on_the_harness_path(project, tmp_path):
    """The pristine copy holds prepare.py, harness/ and harness.yaml only: a package that no
    library installed but one probes for (gitdb tries `gitdb_speedups` when GitPython is
    imported), committed in a new branch's first commit, would otherwise run as harness code
    (a red team's patched the verdict: KEEP for a no-op)."""
    marker = tmp_path / "ran"
    package = project.root / "gitdb_speedups"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('harness code')\n")
    git(project.root, "checkout", "-qb", "probe")
    project.commit("a package a library probes for, in a new branch's first commit")
    # The payload is live: on a path, `import git` runs it.
    subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.append({str(project.root)!r}); import git"],
                   check=True, capture_output=True)
    assert marker.exists()
    marker.unlink()
    for command in (["log"], ["--quick", "--json", "--model", str(project.model_dir)]):
        proc = project.run(*command)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not marker.exists(), command


def test_a_shallow_clone_history_ends_where_the_clone_does(tmp_path):
    """A shallow clone has commits whose parents are missing: the walk stops there instead of
    raising (a red team's `git clone --depth 2` made every run exit 1 with no row)."""
    from harness import gitops

    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q")
    git(origin, "config", "user.email", "t@example.com")
    git(origin, "config", "user.name", "T")
    for i in range(4):
        (origin / "f").write_text(str(i))
        git(origin, "add", "f")
        git(origin, "commit", "-qm", f"c{i}")
    subprocess.run(["git", "clone", "-q", "--depth", "2", f"file://{origin}", str(tmp_path / "shallow")], check=True)
    assert len(gitops.ancestry(tmp_path / "shallow")) == 2
