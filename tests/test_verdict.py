"""A scripted agent plays the program.md loop through a real git repository, and the
verdict's building blocks are checked on real samples."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import git
from harness import ledger, stats
from harness.bench import Sample
from harness.verdict import comparison, paired_ratios, settled


def _rows(project):
    rows, problems = ledger.read(project.root / "results.tsv")
    assert problems == []
    return rows


def _head(project):
    return git(project.root, "rev-parse", "--short=7", "HEAD")


def test_scripted_agent_loop(project):
    # 1. Baseline.
    proc, result = project.evaluate("--apply")
    assert result["decision"] == "BASELINE", result
    champion = _head(project)

    # 2. Argmax: kept or reverted by the verdict, and --apply follows it.
    project.edit_inference("TEMP = 0.7 ", "TEMP = 0.0 ")
    argmax = project.commit("argmax sampling")
    proc, result = project.evaluate("--apply")
    assert result["decision"] in ("KEEP", "REVERT"), result
    assert result["champion"] == champion and result["speedup"] is not None
    assert "argmax" in result["changes"]
    if result["decision"] == "KEEP":
        assert _head(project) == argmax
        champion = argmax
    else:
        assert _head(project) == champion
    assert _rows(project)[-1]["decision"] == result["decision"]

    # 3. A change that raises in generate: CRASH, and --apply resets the branch.
    project.edit_inference("        for token, logprobs in steps:\n",
                           "        raise RuntimeError('experiment broke generate')\n"
                           "        for token, logprobs in steps:\n")
    project.commit("broken generate")
    proc, result = project.evaluate("--apply")
    assert result["decision"] == "CRASH" and "experiment broke generate" in result["reason"]
    assert _head(project) == champion
    assert "reset" in result["applied"]

    # 4. 4-bit KV cache from position 0: REVERT on a quality gate.
    project.edit_inference("KV_BITS = None ", "KV_BITS = 4 ")
    project.commit("4-bit KV cache")
    proc, result = project.evaluate("--apply")
    assert result["decision"] == "REVERT" and "quality gate failed" in result["reason"], result
    assert result["quality_pass"] is False
    assert "quantized KV" in result["changes"] or "kv" in result["changes"].lower()
    assert _head(project) == champion

    # 5. An edit to a locked file: REJECT, naming it; --apply resets.
    settings = project.settings()
    settings["quality"]["gates"]["kl_mean_max"] = 100.0
    project.write_settings(settings)
    project.commit("loosen a gate")
    proc, result = project.evaluate("--apply")
    assert result["decision"] == "REJECT" and "harness.yaml" in result["reason"], result
    assert _head(project) == champion

    # 6. A comment-only change: REVERT (it cannot beat the noise).
    project.edit_inference("TOP_K = 0 ", "TOP_K = 0  # considered top-k sampling\n#")
    project.commit("comment only")
    proc, result = project.evaluate()
    assert result["decision"] == "REVERT", result
    assert "lines: +0" in result["changes"] or "+0 lines" in result["changes"]

    decisions = [r["decision"] for r in _rows(project)]
    assert decisions[0] == "BASELINE" and decisions[2:] == ["CRASH", "REVERT", "REJECT", "REVERT"]
    log = git(project.root, "log", "--format=%s")
    assert "broken generate" not in log and "loosen a gate" not in log


def test_apply_refuses_on_dirty_tree_and_keeps_work(project):
    project.evaluate()
    project.edit_inference("        for token, logprobs in steps:\n",
                           "        raise RuntimeError('nope')\n        for token, logprobs in steps:\n")
    bad = project.commit("broken")
    (project.root / "harness" / "notes.txt").write_text("untracked")
    project.edit_inference("TOP_P = 0.9 ", "TOP_P = 0.8 ")  # uncommitted work
    proc, result = project.evaluate("--apply")
    assert result["decision"] == "CRASH" and result["dirty"] is True
    assert result["applied"].startswith("--apply refused")
    assert _head(project) == bad and "TOP_P = 0.8" in project.inference.read_text()


HOLD_BACK_HALF = """

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    # Compute the first half of the tokens before yielding any, then burst them: decode
    # tok/s (first to last token) looks far better, the whole call is no faster.
    steps = _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
    held = []
    for pair in steps:
        mx.eval(pair[1])
        held.append(pair)
        if len(held) >= max_tokens // 2:
            break
    yield from held
    yield from steps
"""


def test_holding_tokens_back_is_not_kept(project):
    project.evaluate()
    project.inference.write_text(project.inference.read_text() + HOLD_BACK_HALF)
    project.commit("hold back half the tokens")
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["speedup"] > 1.2, result  # it does look faster between first and last token
    # not kept: either the whole-call guard says so, or the noise already hides the "win"
    assert result["decision"] == "REVERT", result
    assert "whole calls" in result["reason"] or "within noise" in result["reason"], result


def test_uncommitted_locked_file_is_rejected(project):
    project.evaluate()
    (project.root / "harness" / "stats.py").write_text("# tampered\n")
    proc, result = project.evaluate()
    assert result["decision"] == "REJECT" and "harness/stats.py" in result["reason"]


def _sample(worker, prompt, repeat, tps, kind="decode"):
    return Sample(worker=worker, prompt=prompt, kind=kind, repeat=repeat, nonce="x", prompt_tokens=10,
                  n_tokens=9, ttft_s=0.1, total_s=0.1 + 8 / tps, decode_s=8 / tps, decode_tps=tps,
                  prefill_tps=100.0, peak_memory_bytes=1, prompt_ids=[], tokens=[])


def test_a_decode_win_diluted_in_whole_calls_is_kept_within_the_full_presets_pairs():
    """Where a prompt token costs what a generated one does (CPUs), a +10 % decode win shortens
    whole calls by less than half as much: the whole-call guard confirms that within the 30
    pairs the full preset's budget gives there; with pairs counted up to x1.5 it could not."""
    samples = []
    for r in range(10):
        for i, p in enumerate("abc"):
            jitter = 1 + 0.01 * (-1) ** (r + i)
            for worker, tps, ttft in (("champion", 100 * jitter, 0.09 * (1 + 0.02 * (-1) ** r)),
                                      ("challenger", 110 / jitter, 0.09)):
                samples.append(Sample(worker=worker, prompt=p, kind="decode", repeat=r, nonce="x", prompt_tokens=10,
                                      n_tokens=9, ttft_s=ttft, total_s=ttft + 8 / tps, decode_s=8 / tps,
                                      decode_tps=tps, prefill_tps=100.0, peak_memory_bytes=1, prompt_ids=[], tokens=[]))
    figures = comparison(samples, "decode_tps", min_effect=0.01)
    assert figures["pairs"] == 30 and figures["speedup_ci"][0] > 1.01
    assert 1.03 < figures["end_to_end_ratio"] < 1.06 and figures["end_to_end_ci"][0] > 1.01
    assert settled(figures, min_effect=0.01)
    assert stats.ratio_with_sequence(paired_ratios(samples, "end_to_end"))[1] < 1.01  # capped at x1.5


def test_paired_ratios_pair_by_repeat_and_prompt():
    samples = [_sample("champion", "a", 0, 100), _sample("challenger", "a", 0, 110),
               _sample("challenger", "b", 0, 50), _sample("champion", "b", 0, 40),
               _sample("champion", "a", -1, 1), _sample("challenger", "a", -1, 1000)]  # warm-up ignored
    assert sorted(round(r, 3) for r in paired_ratios(samples, "decode_tps")) == [1.1, 1.25]
    e2e = paired_ratios(samples, "end_to_end")
    assert all(r > 1 for r in e2e)


def test_yardstick_ratio_is_the_workers_pace_over_the_yardsticks_with_the_yardsticks_spread():
    import math

    from harness.verdict import yardstick_ratio

    stick = [_sample("yardstick", "a", r, 50 * (1 + 0.01 * (-1) ** r)) for r in range(10)]
    mine = [_sample("challenger", p, r, {"a": 100, "b": 80}[p]) for r in range(10) for p in "ab"]
    log_ratio, se = yardstick_ratio(stick + mine, "challenger", "decode_tps")
    assert log_ratio == pytest.approx((math.log(100 / 50) + math.log(80 / 50)) / 2, abs=0.001)
    assert 0.002 < se < 0.01  # the yardstick's own spread (1 %), over 20 calls and 10 yardstick calls
    # a worker that varies its speed wildly does not widen the se (the yardstick's spread is used)
    wild = [_sample("champion", p, r, 100 * (0.5 if r % 2 else 1.5)) for r in range(10) for p in "ab"]
    assert yardstick_ratio(stick + wild, "champion", "decode_tps")[1] == pytest.approx(se)
    # one call stalled 100x counts as /1.5 at most (as in the speedup): a pipeline cannot bank a
    # low record cheaply, and a champion slowing a third of its calls twice over shows
    planted = [s if (s.repeat, s.prompt) != (4, "a") else _sample("challenger", "a", 4, 1.0) for s in mine]
    assert yardstick_ratio(stick + planted, "challenger", "decode_tps")[0] == pytest.approx(log_ratio - math.log(1.5) / 20)
    slowed = [_sample("champion", s.prompt, s.repeat, s.decode_tps / (2 if s.repeat % 3 == 0 else 1)) for s in mine]
    assert yardstick_ratio(stick + slowed, "champion", "decode_tps")[0] == pytest.approx(log_ratio - math.log(1.5) * 8 / 20)
    # too few yardstick calls, no calls of that worker, warm-ups: nothing
    assert yardstick_ratio(stick[:1] + mine, "challenger", "decode_tps") == (None, None)
    assert yardstick_ratio(stick + mine, "champion", "decode_tps") == (None, None)
    warm = [_sample("yardstick", "a", -1, 1.0) for _ in range(5)]
    assert yardstick_ratio(stick + warm + mine, "challenger", "decode_tps")[0] == pytest.approx(log_ratio)


def _descendants(pid):
    """PIDs of every live descendant of `pid` (from /proc), with their command lines."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append((int(entry), cmdline))
    found, todo = [], [pid]
    while todo:
        for child, cmdline in children.get(todo.pop(), []):
            found.append((child, cmdline))
            todo.append(child)
    return found


def _worker_pids(proc):
    """PIDs of the worker processes a prepare.py run started (sandboxed or not)."""
    return [pid for pid, cmdline in _descendants(proc.pid) if "harness.child" in cmdline]


def _start_hanging_run(project, **popen):
    proc = subprocess.Popen([sys.executable, "prepare.py", "--quick", "--model", str(project.model_dir)],
                            cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    deadline = time.time() + 120
    while time.time() < deadline and not _worker_pids(proc):
        time.sleep(0.2)
    assert _worker_pids(proc), "the worker never started"
    time.sleep(4)  # past loading: the worker is now asleep inside generate()
    return proc


def _in_a_terminal():
    """Popen arguments that give the run a pseudo-terminal as its controlling terminal,
    and the terminal's master end (writing Ctrl-C there is a real terminal interrupt)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    return master, {"stdin": slave, "start_new_session": True,
                    "preexec_fn": lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)}


def test_ledger_survives_sigkilled_worker_and_ctrl_c(project):
    project.evaluate()
    project.edit_inference("        for token, logprobs in steps:\n",
                           "        import time\n        time.sleep(600)\n        for token, logprobs in steps:\n")
    project.commit("hang")

    # The worker is killed from outside mid-run: a CRASH row, the harness carries on.
    before = project.ledger_lines()
    proc = _start_hanging_run(project)
    for pid in _worker_pids(proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # killing the sandbox's outer process already took its inner ones with it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "decision: CRASH" in out and "SIGKILL" in out
    assert project.ledger_lines()[:len(before)] == before and len(project.ledger_lines()) == len(before) + 1

    # A SIGINT sent by another process is not an interrupt; Ctrl-C in the terminal is:
    # no row, the ledger as it was, no worker left behind.
    before = project.ledger_lines()
    master, popen = _in_a_terminal()
    proc = _start_hanging_run(project, **popen)
    os.close(popen["stdin"])
    workers = _worker_pids(proc)
    for pid, cmdline in _descendants(proc.pid):
        if "prepare.py" in cmdline:
            os.kill(pid, signal.SIGINT)
    time.sleep(2)
    assert proc.poll() is None, "a SIGINT from another process stopped the run"
    os.write(master, b"\x03")
    out, err = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 130, err
    assert "ignored a SIGINT sent by process" in err
    assert "results.tsv is intact" in err
    assert project.ledger_lines() == before
    deadline = time.time() + 5  # a sandbox's processes die with it, within moments
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(workers), _alive(workers)


def _alive(pids):
    """The pids still running, with their state and command line (zombies are dead)."""
    found = []
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
        if state != "Z":
            found.append((pid, state, cmdline))
    return found


def test_malformed_ledger_line_is_reported_and_kept(project):
    project.evaluate()
    path = project.root / "results.tsv"
    path.write_text(path.read_text() + "2026-01-01\tabc1234\tmain\n")  # hand-edited, fields missing
    bad = path.read_text()
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] == "MEASURED"
    assert "results.tsv line 3 has 3 fields" in proc.stderr
    assert path.read_text().startswith(bad) and len(project.ledger_lines()) == 4


def test_each_branch_starts_with_its_own_baseline(project):
    proc, result = project.evaluate()
    assert result["decision"] == "BASELINE" and result["branch"] == "main"
    git(project.root, "checkout", "-q", "-b", "hillclimb/exp")
    proc, result = project.evaluate()
    assert result["decision"] == "BASELINE" and result["branch"] == "hillclimb/exp"
    assert result["bytes_per_token"] > 0 and result["roofline_fraction"] > 0
    # From here on the branch's baseline locks every other file.
    settings = project.settings()
    settings["workload"]["presets"]["quick"]["max_tokens"] = 4
    project.write_settings(settings)
    project.commit("fewer tokens, please")
    proc, result = project.evaluate()
    assert result["decision"] == "REJECT" and "harness.yaml" in result["reason"]


def test_a_wide_pace_bound_forgives_no_more_than_two_percent_beyond_the_pace():
    """champion_pace's factor: 3 % of slowdown forgiven, plus the bound's width up to 2 %. On a
    busy machine (yardstick calls spread +-15 %) a champion 9 % slower than its record has an
    upper bound above 0.97, yet its pace still discounts the win; idle, an honest champion
    3.5 % under its record is not discounted."""
    import dataclasses
    import math

    from harness.verdict import champion_pace

    def call(worker, r, seconds):
        return dataclasses.replace(_sample(worker, "a", r, 100), ttft_s=0.01, total_s=seconds)

    def run(pace, spread, calls=12):
        stick = [call("yardstick", r, 2.0 * (1 + spread * (-1) ** r)) for r in range(calls)]
        return stick + [call("champion", r, 1.0 / pace) for r in range(calls)]

    record = (math.log(2.0), 0.05)  # the champion's whole calls were twice as fast as the yardstick's
    pace, high, factor = champion_pace(run(0.91, 0.15), record)
    assert high > 0.97 and factor < 0.97
    assert factor == pytest.approx(pace * 1.02 / 0.97)
    pace, high, factor = champion_pace(run(0.965, 0.005), (record[0], 0.005))
    assert 0.95 < pace < 0.97 and factor == 1.0
    assert champion_pace(run(0.5, 0.005, calls=4), record)[2] == 0.0  # too few yardstick calls
