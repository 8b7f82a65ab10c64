"""The morning read on a real ledger: a night of experiments with the tiny model in a real
git repository (a quick-start baseline on main, then a branch with its BASELINE, a KEEP, a
REVERT and a CRASH, each failure reset with --apply), read by `log`, `log --summary`,
`report` and `analyze`."""

import json
import re

import pytest
from conftest import git, make_project

# The branch's baseline sleeps per token, so dropping the sleep is a KEEP beyond any noise.
# Appended as a wrapper, so the test does not depend on how inference.py's loop is written.
SLEEPING = """

import time as _time

_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    for item in _generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos):
        _time.sleep(0.02)
        yield item
"""
BROKEN_LOAD = """

def load(model_path, draft_model_path=None):
    raise RuntimeError("typo")
"""


def _decision(proc, result):
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    return result["decision"]


@pytest.fixture(scope="module")
def night(tmp_path_factory, tiny_llama):
    """The project after the night, and {name: (commit, decision, stderr)} of its runs."""
    project = make_project(tmp_path_factory.mktemp("night") / "project", tiny_llama)
    runs = {}

    def run(name, *args):
        commit = git(project.root, "rev-parse", "--short=7", "HEAD")  # before --apply resets it
        proc, result = project.evaluate(*args)
        runs[name] = (commit, _decision(proc, result), proc.stderr)

    # main's pipeline sleeps already: a branch's KEEPs are held to the record of the code it
    # descends from, so a branch that started slower than main would win none by the sleep
    original = project.inference.read_text()
    project.inference.write_text(original + SLEEPING)
    project.commit("sleeps per token")
    run("quick start")  # the README's quick start, on main
    git(project.root, "checkout", "-qb", "hillclimb/test")
    project.inference.write_text(original + SLEEPING + "\n# where this branch starts\n")
    project.commit("baseline that sleeps per token")
    run("baseline")
    project.inference.write_text(original)
    project.commit("drop the per-token sleep")
    run("keep", "--apply")
    project.inference.write_text(original + SLEEPING.replace("0.02", "0.05"))
    project.commit("sleep 50 ms per token")
    run("revert", "--apply")
    project.inference.write_text(original + BROKEN_LOAD)
    project.commit("typo in load")
    run("crash", "--apply")
    return project, runs


def test_the_night_went_as_planned(night):
    project, runs = night
    assert {name: decision for name, (_, decision, _) in runs.items()} == {
        "quick start": "BASELINE", "baseline": "BASELINE", "keep": "KEEP", "revert": "REVERT", "crash": "CRASH"}
    # --apply reset the branch to the champion after the REVERT and the CRASH
    assert git(project.root, "rev-parse", "--short=7", "HEAD") == runs["keep"][0]
    # progress on a stderr that is not a terminal: timestamped stage and progress lines
    stderr = runs["keep"][2]
    assert re.search(r"^\[\d\d:\d\d:\d\d\] stage: speed: champion and challenger alternating, until the "
                     r"interval decides, the yardstick once a round$", stderr, re.M)
    assert re.search(r"^\[\d\d:\d\d:\d\d\] speed \d+/\d+ calls \(", stderr, re.M)
    assert re.search(r"^\[\d\d:\d\d:\d\d\] stage: quality: tasks", stderr, re.M)
    assert "\r" not in stderr


def test_log_shows_the_branchs_experiments_after_resets(night):
    project, runs = night
    proc = project.run("log")
    assert proc.returncode == 0, proc.stderr
    mine, others = proc.stdout.split("other branches")
    for name in ("baseline", "keep", "revert", "crash"):
        assert runs[name][0] in mine, name
    assert next(line for line in mine.splitlines() if runs["revert"][0] in line).startswith("x")
    assert next(line for line in mine.splitlines() if runs["keep"][0] in line).startswith("*")
    assert runs["quick start"][0] in others and " main " in others


def test_log_summary_tables(night):
    project, runs = night
    proc = project.run("log", "--summary")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "# Morning summary: branch hillclimb/test" in text
    assert "runs: 4 (BASELINE 1, KEEP 1, REVERT 1, CRASH 1)" in text
    table = text.split("## Baseline vs champion")[1].split("## Experiments")[0]
    assert f"baseline {runs['baseline'][0]}" in table and f"champion {runs['keep'][0]}" in table
    for label in ("decode tok/s", "prefill tok/s", "time to first token", "peak memory", "perplexity",
                  "KL mean", "sanity"):
        assert label in table, label
    assert "chained speedup: +" in table and "1 KEEP(s)" in table
    experiments = text.split("## Experiments")[1]
    for subject, decision in (("baseline that sleeps", "BASELINE"), ("drop the per-token sleep", "KEEP"),
                              ("sleep 50 ms per token", "REVERT"), ("typo in load", "CRASH")):
        line = next(line for line in experiments.splitlines() if subject in line)
        assert decision in line, line
    keep_line = next(line for line in experiments.splitlines() if "drop the per-token" in line)
    assert re.search(r"\+\d+\.\d % \[\+\d+\.\d, \+\d+\.\d\]", keep_line)  # speedup with its interval
    assert re.search(r"\s-6\s", keep_line)  # lines against the baseline: the wrapper's six deleted

    data = json.loads(project.run("log", "--summary", "--json").stdout)
    assert data["counts"] == {"BASELINE": 1, "KEEP": 1, "REVERT": 1, "CRASH": 1}
    assert [e["decision"] for e in data["experiments"]] == ["BASELINE", "KEEP", "REVERT", "CRASH"]
    keep = data["experiments"][1]
    assert data["chained_speedup"] == pytest.approx(keep["speedup"]) and keep["speedup"] > 1.01
    assert data["champion"]["commit"] == runs["keep"][0] and data["run_hours"] > 0


def test_report_is_one_self_contained_page(night, tmp_path):
    project, runs = night
    out = tmp_path / "report.html"
    proc = project.run("report", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out}"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing to fetch: every src is embedded, no link, stylesheet or script elsewhere
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert len(sources) == 3  # speedups, progress, speed vs quality
    for name in ("baseline", "keep", "revert", "crash"):
        assert runs[name][0] in page
    assert "chained speedup" in page and 'class="badge REVERT"' in page
    experiments = page.split("<h2>Experiments")[1].split("<h2>Paired speedups")[0]
    assert "typo in load" in experiments and runs["quick start"][0] not in experiments


def test_analyze_never_recommends_the_revert(night, tmp_path):
    project, runs = night
    proc = project.run("analyze", "results.tsv", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    recommended = [row for group in data["protocols"] for row in group["frontier"] + list(group["best"].values())
                   if row]
    assert recommended and all(row["decision"] in ("BASELINE", "KEEP") for row in recommended)
    assert runs["revert"][0] not in {row["commit"] for row in recommended}
