"""End-to-end runs of prepare.py in a real git copy of the project, on a tiny model:
the output contract, the ledger, and every kind of bad input."""

import json

import pytest

from conftest import git

from harness import ledger, measure


def _decision_line(proc):
    return next(line for line in proc.stdout.splitlines() if line.startswith("decision:"))


def test_baseline_then_measured_rows_and_json(project):
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr
    assert _decision_line(proc) == "decision: BASELINE"
    for key in ("decision", "reason", "commit", "model", "protocol", "decode_tps", "decode_tps_ci",
                "prefill_tps", "prefill_tps_ci", "ttft_s", "peak_memory_gb", "run_file"):
        assert key in result, key
    low, high = result["decode_tps_ci"]
    assert 0 < low <= result["decode_tps"] <= high
    assert result["prefill_tps"] > 0 and result["ttft_s"] > 0 and result["peak_memory_gb"] > 0
    assert any(line.startswith("decode_tps: ") for line in proc.stdout.splitlines())

    run = json.loads((project.root / result["run_file"]).read_text())
    settings = project.settings()["workload"]["presets"]["quick"]
    workers = [s["worker"] for s in run["samples"]]
    rounds = min(settings["max_repeats"], max(settings["repeats"], measure.RECORD_ROUNDS))  # a record: more rounds
    assert workers.count("challenger") == rounds * len(settings["prompts"])
    assert workers.count("yardstick") == rounds  # once a round, timed like the pipeline
    assert result["yardstick_ratio"] > 0 and result["yardstick_se"] > 0
    assert all(s["n_tokens"] == settings["max_tokens"] for s in run["samples"])
    assert len({s["nonce"] for s in run["samples"]}) == len(run["samples"])  # fresh nonce per call
    assert run["environment"]["mlx"] == "0.32.4"

    proc2, result2 = project.evaluate()
    assert result2["decision"] == "MEASURED"
    rows, problems = ledger.read(project.root / "results.tsv")
    assert problems == [] and [r["decision"] for r in rows] == ["BASELINE", "MEASURED"]
    assert rows[0]["commit"] == result["commit"] and rows[0]["subject"] == "baseline"
    assert project.ledger_lines()[0] == ledger.HEADER.rstrip("\n")


def test_uncommitted_change_is_measured_not_baseline(project):
    project.edit_inference("TOP_K = 0 ", "TOP_K = 0  # tried\n#")
    proc, result = project.evaluate()
    assert result["decision"] == "MEASURED" and result["dirty"] is True


def _expect(project, decision, words, *, commit=True):
    if commit:
        project.commit("experiment")
    before = project.ledger_lines()
    proc, result = project.evaluate()
    assert proc.returncode == 0, proc.stderr
    assert result is not None, proc.stdout + proc.stderr
    assert result["decision"] == decision, result
    assert "\n" not in result["reason"]
    for word in words:
        assert word in result["reason"], result["reason"]
    lines = project.ledger_lines()
    assert lines[: len(before)] == before and len(lines) == len(before) + (2 if not before else 1)
    return result


def test_syntax_error_is_crash(project):
    project.edit_inference("def load(", "def load(:")
    _expect(project, "CRASH", ["importing inference.py", "SyntaxError"])


def test_import_error_is_crash(project):
    project.edit_inference("import mlx.core as mx", "import mlx.core as mx\nimport no_such_module_xyz")
    _expect(project, "CRASH", ["ModuleNotFoundError", "no_such_module_xyz"])


def test_exception_mid_generation_is_crash(project):
    project.edit_inference("        for token, logprobs in steps:\n            yield token, logprobs",
                           "        for i, (token, logprobs) in enumerate(steps):\n"
                           "            if i == 3:\n                raise RuntimeError('boom at token 3')\n"
                           "            yield token, logprobs")
    result = _expect(project, "CRASH", ["generate()", "boom at token 3"])
    assert result.get("decode_tps") is None


def test_worker_killed_is_crash(project):
    project.edit_inference("        for token, logprobs in steps:\n            yield token, logprobs",
                           "        import os, signal\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                           "        for token, logprobs in steps:\n            yield token, logprobs")
    _expect(project, "CRASH", ["exited", "SIGKILL"])


def test_hang_past_timeout_is_crash(tmp_path, tiny_llama):
    from conftest import make_project

    project = make_project(tmp_path / "p", tiny_llama, call_s=3)
    project.edit_inference("        for token, logprobs in steps:\n            yield token, logprobs",
                           "        import time\n        time.sleep(3600)\n"
                           "        for token, logprobs in steps:\n            yield token, logprobs")
    _expect(project, "CRASH", ["timeout", "3 s"])


def test_too_few_tokens_is_invalid(project):
    project.edit_inference("_decode(pipeline, cache, prompt, max_tokens=max_tokens)",
                           "_decode(pipeline, cache, prompt, max_tokens=max_tokens - 1)")
    _expect(project, "INVALID", ["only", "expected exactly"])


def test_too_many_tokens_is_invalid(project):
    project.edit_inference("_decode(pipeline, cache, prompt, max_tokens=max_tokens)",
                           "_decode(pipeline, cache, prompt, max_tokens=max_tokens + 5)")
    _expect(project, "INVALID", ["more", "expected exactly"])


def test_non_integer_tokens_are_invalid(project):
    project.edit_inference("            yield token, logprobs\n", "            yield float(token), logprobs\n")
    _expect(project, "INVALID", ["non-integer"])


def test_unknown_model_is_usage_error(project):
    project.evaluate()
    before = project.ledger_lines()
    proc = project.run("--quick", "--model", "no-such-model-anywhere")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "smollm2-135m-instruct" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert project.ledger_lines() == before


@pytest.mark.parametrize("breakage, words", [
    ("delete_key", ["missing key", "timeouts"]),
    ("bad_yaml", ["not valid YAML"]),
    ("bad_type", ["max_tokens", "integer"]),
    ("unknown_prompt", ["unknown prompt"]),
    ("bad_corpus_tokens", ["corpus_tokens.quick", "at least 2"]),
])
def test_bad_settings_are_usage_errors(project, breakage, words):
    project.evaluate()
    before = project.ledger_lines()
    path = project.root / "harness.yaml"
    settings = project.settings()
    if breakage == "delete_key":
        del settings["timeouts"]
        project.write_settings(settings)
    elif breakage == "bad_yaml":
        path.write_text(path.read_text() + "\n  - : : [unclosed\n")
    elif breakage == "bad_type":
        settings["workload"]["presets"]["quick"]["max_tokens"] = "many"
        project.write_settings(settings)
    elif breakage == "bad_corpus_tokens":
        settings["quality"]["corpus_tokens"]["quick"] = 1
        project.write_settings(settings)
    else:
        settings["workload"]["presets"]["quick"]["prompts"].append("nope")
        project.write_settings(settings)
    # The harness runs its settings as committed (the baseline's on a branch that has one):
    # commit the broken file on a new branch, where it is what runs.
    git(project.root, "checkout", "-qb", "new-settings")
    project.commit("broken settings")
    proc = project.run("--quick", "--model", str(project.model_dir))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: harness.yaml") or last.startswith("error: ") and "YAML" in last
    for word in words:
        assert word in last, last
    assert "Traceback" not in proc.stderr
    assert project.ledger_lines() == before


def test_out_of_vocabulary_tokens_are_invalid(project):
    project.edit_inference("            yield token, logprobs\n", "            yield token + 10**6, logprobs\n")
    _expect(project, "INVALID", ["outside the vocabulary"])


def test_tokens_handed_over_at_once_are_invalid(project):
    # Buffering every token and releasing them together would make decode look infinitely fast.
    project.edit_inference("        for token, logprobs in steps:\n            yield token, logprobs\n"
                           "            if stop_at_eos and token in eos:\n                return\n",
                           "        held = list(steps)\n        yield from held\n")
    project.commit("buffer every token")
    proc, result = project.evaluate()
    # Either the stopwatch sees (almost) no decode time at all, or the burst is visible as a
    # time to first token that swallows the whole call.
    if result["decision"] != "INVALID":
        assert result["decision"] == "BASELINE"
        run = __import__("json").loads((project.root / result["run_file"]).read_text())
        assert all(s["ttft_s"] > 0.9 * s["total_s"] for s in run["samples"] if s["worker"] == "challenger")
