"""Search without an agent: the space, the memory estimate, the patch, and real searches
on the tiny model with the SQLite default and with two processes sharing a PostgreSQL study."""

import dataclasses
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import git, make_project
from harness import geometry, knobs, ledger, search, search_objective, search_space, search_storage
from harness.settings import PerPreset, SettingsError, load_settings

REPO = Path(__file__).resolve().parent.parent
STATE = optuna.trial.TrialState


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------
def _knobs():
    return knobs.settable((REPO / "inference.py").read_text())


def _settings_with_search(tmp_path, search_section):
    """Settings of the shipped harness.yaml with its `search:` section replaced."""
    raw = yaml.safe_load((REPO / "harness.yaml").read_text())
    raw["search"] = search_section
    path = tmp_path / "harness.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_settings(path)


def _space(tmp_path, knob_specs):
    return search_space.load_space(_settings_with_search(tmp_path, {"knobs": knob_specs}).search, _knobs())


def test_the_shipped_space_is_valid_and_conditional_knobs_come_last():
    space = search_space.load_space(load_settings(REPO / "harness.yaml").search, _knobs())
    names = [k.name for k in space.knobs]
    assert set(names[-3:]) == {"QUANTIZED_KV_START", "MAX_KV_SIZE", "NUM_DRAFT_TOKENS"}
    assert "COMPUTE_DTYPE" in names and space.seed == 0


@pytest.mark.parametrize("knob_specs, words", [
    ({"NOT_A_KNOB": {"choices": [1]}}, "is not a knob of inference.py"),
    ({"TEMP": {"choices": []}}, "non-empty list"),
    ({"TEMP": {"low": 1.0}}, "needs either 'choices'"),
    ({"TEMP": {"low": 1.0, "high": 0.5}}, "must be below high"),
    ({"TEMP": {"low": 0.0, "high": 1.0, "log": True}}, "log range needs low > 0"),
    ({"TEMP": {"choices": [0.1], "low": 0}}, "one or the other"),
    ({"TEMP": {"choices": [[1]]}}, "only null, booleans"),
    ({"TEMP": {"values": [1]}}, "unknown key"),
    ({}, "non-empty mapping"),
])
def test_bad_search_space_is_one_clear_line(tmp_path, knob_specs, words):
    # the schema is checked by load_settings, the knob names by load_space: one line either way
    with pytest.raises(SettingsError) as info:
        _space(tmp_path, knob_specs)
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith("harness.yaml: 'search")


def test_a_missing_search_section_is_one_clear_line(tmp_path):
    with pytest.raises(SettingsError, match=r"^harness.yaml: missing key 'search'"):
        search_space.load_space(_settings_with_search(tmp_path, None).search, _knobs())


def test_suggest_skips_conditional_knobs(tmp_path):
    space = _space(tmp_path, {
        "NUM_DRAFT_TOKENS": {"low": 1, "high": 8}, "QUANTIZED_KV_START": {"choices": [0, 256]},
        "KV_BITS": {"choices": [None, 4]}, "TEMP": {"low": 0.0, "high": 1.0},
        "MAX_KV_SIZE": {"choices": [None, 512]}})
    defaults = _knobs()
    study = optuna.create_study(direction="maximize", sampler=search_space.make_sampler(0, 4))
    for _ in range(12):
        trial = study.ask()
        params = search_space.suggest(trial, space, defaults)
        study.tell(trial, 1.0)
        assert "NUM_DRAFT_TOKENS" not in params  # no draft model
        assert ("QUANTIZED_KV_START" in params) == (params["KV_BITS"] is not None)
        assert ("MAX_KV_SIZE" in params) == (params["KV_BITS"] is None)
        assert isinstance(params["TEMP"], float)
    with_draft = search_space.suggest(study.ask(), space, defaults, draft_model="x")
    assert isinstance(with_draft["NUM_DRAFT_TOKENS"], int)


def test_knob_spaces_become_optuna_distributions(tmp_path):
    space = _space(tmp_path, {"TOP_K": {"low": 0, "high": 50, "step": 10}, "TEMP": {"low": 0.1, "high": 1.0,
                                                                                    "log": True},
                              "KV_BITS": {"choices": [None, 4, 8]}})
    specs = {spec.name: spec for spec in space.knobs}
    dist = optuna.distributions
    assert search_space.distribution(specs["TOP_K"]) == dist.IntDistribution(0, 50, step=10)
    assert search_space.distribution(specs["TEMP"]) == dist.FloatDistribution(0.1, 1.0, log=True)
    assert search_space.distribution(specs["KV_BITS"]) == dist.CategoricalDistribution([None, 4, 8])
    assert search_space.contains(specs["TOP_K"], 20) and not search_space.contains(specs["TOP_K"], 2.5)
    assert not search_space.contains(specs["TOP_K"], True) and not search_space.contains(specs["TEMP"], 2.0)
    assert search_space.contains(specs["KV_BITS"], 4.0) and not search_space.contains(specs["KV_BITS"], 0)


# ---------------------------------------------------------------------------
# Model geometry and memory
# ---------------------------------------------------------------------------
def test_geometry_is_read_once_per_config_version(tmp_path):
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "hidden_size": 256, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = geometry.model_geometry(tmp_path)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.hidden_size,
            shape.intermediate_size, shape.vocab_size) == (4, 8, 2, 32, 256, 1024, 1000)
    assert shape.kv_bytes_per_position(2) == 2 * 4 * 2 * 32 * 2
    assert geometry.model_geometry(str(tmp_path)) is shape  # cached
    # a multimodal config: the text model's keys win; a rewritten config is read again
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 5, "text_config": {**config, "head_dim": 64}}))
    again = geometry.model_geometry(tmp_path)
    assert again.head_dim == 64 and again.vocab_size == 1000
    empty = geometry.model_geometry(tmp_path / "missing")
    assert empty.layers == 0 and empty.kv_bytes_per_position(4) == 0


def test_memory_estimate_and_prune_reason(tiny_llama):
    settings = load_settings(REPO / "harness.yaml")
    estimate = search_objective.estimate_memory
    f32 = estimate(tiny_llama, {"COMPUTE_DTYPE": "float32"}, settings, quick=True)
    f16 = estimate(tiny_llama, {"COMPUTE_DTYPE": "float16"}, settings, quick=True)
    kv4 = estimate(tiny_llama, {"COMPUTE_DTYPE": "float32", "KV_BITS": 4}, settings, quick=True)
    on_disk = sum(p.stat().st_size for p in Path(tiny_llama).glob("*.safetensors"))
    assert abs(f32["weights"] - on_disk) < 0.01 * on_disk  # float32 weights: the file's size
    assert geometry.weight_bytes(tiny_llama, "float32") == f32["weights"]
    # The roofline's bytes per token: a smaller report (quantized weights) stands, a bigger
    # one than the folder's weights in float32 does not (a hung, never-evaluated array).
    assert geometry.bytes_per_token(tiny_llama, {"weight_bytes": 1000}, []) == 1000
    assert geometry.bytes_per_token(tiny_llama, {"weight_bytes": 2 ** 52}, []) == f32["weights"]
    assert f16["weights"] < 0.55 * f32["weights"] and kv4["kv_cache"] < 0.2 * f32["kv_cache"]
    assert search_objective.fits(f32, 64 * 2**30) == (True, "")
    ok, reason = search_objective.fits(f32, f32["total"])  # no room for the headroom
    assert not ok and reason.startswith("does not fit in memory: needs ~") and "budget" in reason


def test_memory_estimate_counts_the_scored_corpus(tiny_llama):
    # The scored corpus (quality.corpus_tokens) is held in one sequence like a prompt: when it
    # is longer than every speed prompt, the KV cache must grow with it. (The estimate once
    # read a key that no longer existed, quality.kl_tokens, and counted the corpus as 0 tokens.)
    settings = load_settings(REPO / "harness.yaml")
    quick = settings.preset(quick=True)
    longest_prompt = max(p.document_tokens or 0 for p in quick.prompts) + search_objective.PROMPT_OVERHEAD

    def with_corpus(tokens):
        quality = dataclasses.replace(settings.quality, corpus_tokens=PerPreset(full=tokens, quick=tokens))
        return dataclasses.replace(settings, quality=quality)

    small, large = with_corpus(longest_prompt + 1_000), with_corpus(longest_prompt + 9_000)
    assert search_objective.longest_sequence(large, True) == longest_prompt + 9_000 + quick.max_tokens
    knob_values = {"COMPUTE_DTYPE": "float32"}
    a = search_objective.estimate_memory(tiny_llama, knob_values, small, quick=True)
    b = search_objective.estimate_memory(tiny_llama, knob_values, large, quick=True)
    assert b["kv_cache"] > 5 * a["kv_cache"] and b["total"] > a["total"]


def test_gates_and_objective_follow_the_quality_keys():
    gate_failure, objective_value = search_objective.gate_failure, search_objective.objective_value
    assert gate_failure({"decision": "MEASURED", "decode_tps": 10.0}) is None
    assert objective_value({"decode_tps": 10.0}) == (10.0, "decode_tps")
    assert objective_value({"decode_tps": 10.0, "quality_adjusted_tps": 9.5}) == \
        (9.5, "quality_adjusted_tps")
    crash = gate_failure({"decision": "CRASH", "reason": "boom"})
    assert crash == "CRASH: boom"
    failed = gate_failure({"decision": "MEASURED", "decode_tps": 10.0, "quality_pass": False,
                           "gates": [{"name": "kl_mean", "passed": False},
                                     {"name": "perplexity", "passed": True}]})
    assert failed == "quality gates failed: kl_mean"


def test_warm_start_rows_become_trials():
    space = search_space.load_space(load_settings(REPO / "harness.yaml").search, _knobs())
    base = {c: "" for c in ledger.COLUMNS}
    rows = [
        {**base, "line": 2, "source": "search", "protocol": "p", "commit": "abc", "decision": "MEASURED",
         "decode_tps": "100", "config": json.dumps({"TEMP": 0.0, "KV_BITS": None})},
        {**base, "line": 3, "source": "search", "protocol": "p", "commit": "abc", "decision": "CRASH",
         "reason": "boom", "config": json.dumps({"TEMP": 0.7, "KV_BITS": 4})},
        {**base, "line": 4, "source": "search", "protocol": "p", "commit": "abc", "decision": "MEASURED",
         "decode_tps": "90", "quality_adjusted_tps": "80", "quality_pass": "true",
         "config": json.dumps({"TEMP": 0.0})},
        {**base, "line": 5, "source": "search", "protocol": "p", "commit": "abc", "decision": "MEASURED",
         "decode_tps": "90", "config": json.dumps({"TEMP": 0.33})},            # outside the space
        {**base, "line": 6, "source": "agent", "protocol": "p", "commit": "abc", "decision": "KEEP",
         "decode_tps": "120"},                                                 # not a search row
        {**base, "line": 7, "source": "search", "protocol": "q", "commit": "abc", "decision": "MEASURED",
         "decode_tps": "120", "config": json.dumps({"TEMP": 0.0})},            # another protocol
    ]
    trials, skipped = search_space.warm_start_trials(rows, space, protocol="p", commit="abc")
    assert skipped == 1 and [t.user_attrs["ledger_line"] for t in trials] == [2, 3, 4]
    assert [t.state for t in trials] == [STATE.COMPLETE, STATE.PRUNED, STATE.COMPLETE]
    assert trials[0].value == 100.0 and trials[2].value == 80.0  # quality-adjusted when present
    assert trials[1].user_attrs["prune_reason"] == "CRASH: boom"
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    assert study.best_trial.params == {"TEMP": 0.0, "KV_BITS": None}


def test_a_trial_past_the_total_is_turned_away_before_it_evaluates():
    study = optuna.create_study(direction="maximize")
    warm = optuna.trial.create_trial(params={}, distributions={}, value=1.0, user_attrs={"warm_start": True})
    study.add_trial(warm)  # warm-started trials do not count toward --trials
    study.tell(study.ask(), 2.0)
    running = study.ask()  # another process's trial, still running: it counts
    objective = search_objective.make_objective(None, None, {}, None, n_trials=2)
    surplus = study.ask()
    with pytest.raises(search_space.SurplusTrial):
        objective(surplus)  # nothing is touched before the check: no ctx needed
    assert surplus.user_attrs["fail_reason"].startswith("surplus")
    study.tell(surplus, state=STATE.FAIL)  # as study.optimize records it: not counted
    study.tell(running, state=STATE.FAIL)  # an interrupted trial does not count either: it is redone
    assert len(search_storage.counted_trials(study)) == 1


def test_search_efficiency_bench_meets_its_acceptance():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "search_efficiency.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "acceptance: pass" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# Real searches
# ---------------------------------------------------------------------------
def _block(stdout):
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def _search_rows(project):
    rows, problems = ledger.read(project.root / "results.tsv")
    assert problems == []
    return [r for r in rows if r["source"] == "search"]


def _one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_search_sqlite_resume_warm_start_and_patch(project):
    model = str(project.model_dir)
    proc = project.run("search", "--trials", "3", "--quick", "--model", model)
    assert proc.returncode == 0, proc.stderr
    out = _block(proc.stdout)
    assert out["trials"] == "3" and out["warm_started"] == "0" and out["patch"] == search.PATCH_NAME
    storage = f"sqlite:///{project.root / 'search.db'}"
    study = optuna.load_study(study_name=out["study"], storage=storage)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state in (STATE.COMPLETE, STATE.PRUNED) for t in trials)
    rows = _search_rows(project)
    assert len(rows) == 3 and all(r["decision"] == "MEASURED" for r in rows)
    assert Counter(r["run_file"] for r in rows) == Counter(t.user_attrs["run_file"] for t in trials)
    for row, trial in zip(rows, trials):
        assert json.loads(row["config"]) == trial.params  # the row records the knobs it ran with
    assert out["study"].startswith("search-" + rows[0]["protocol"])

    # Rerunning is resuming: the study already holds 3 trials, so nothing more runs.
    again = project.run("search", "--trials", "3", "--quick", "--model", model)
    assert again.returncode == 0 and _block(again.stdout)["trials"] == "3"
    assert len(_search_rows(project)) == 3

    # A new study starts warm from the earlier rows of this protocol and commit.
    fresh = project.run("search", "--trials", "1", "--quick", "--model", model, "--study", "fresh", "--json")
    assert fresh.returncode == 0, fresh.stderr
    assert _block(fresh.stdout)["warm_started"] == "3" and _block(fresh.stdout)["trials"] == "1"
    warm = optuna.load_study(study_name="fresh", storage=storage).get_trials()
    assert sum(bool(t.user_attrs.get("warm_start")) for t in warm) == 3 and len(warm) == 4
    assert len(_search_rows(project)) == 4
    _check_json(fresh.stdout, warm)

    # The patch applies, touches only knob lines, and the patched file runs normally.
    patch = (project.root / search.PATCH_NAME).read_text()
    git(project.root, "apply", search.PATCH_NAME)
    changed = [line for line in git(project.root, "diff", "-U0", "inference.py").splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed and all(re.match(r"^[+-][A-Z_]+ = ", line) for line in changed), patch
    best = json.loads(_block(fresh.stdout)["best_config"])
    for name, value in best.items():
        assert f"\n{name} = {knobs.literal(value)} " in project.inference.read_text()
    proc, result = project.evaluate()
    assert proc.returncode == 0 and result["decision"] == "MEASURED" and result["decode_tps"] > 0


def _last_json(stdout):
    """The --json object: the last line of stdout, after the key: value block."""
    lines = stdout.strip().splitlines()
    assert lines[0] == "---" and lines[-1].startswith("{"), stdout
    return json.loads(lines[-1])


def _check_json(stdout, trials):
    """The --json object agrees with the block and with the study's `trials`."""
    out, block = _last_json(stdout), _block(stdout)
    assert set(out) == {"study", "storage", "trials", "counts", "best", "patch"}
    assert out["study"] == block["study"] and out["trials"] == int(block["trials"])
    own = [t for t in trials if not t.user_attrs.get("warm_start")]
    assert out["counts"] == {"complete": sum(t.state == STATE.COMPLETE for t in own),
                             "pruned": sum(t.state == STATE.PRUNED for t in own),
                             "failed": sum(t.state == STATE.FAIL for t in own),
                             "warm_started": len(trials) - len(own)}
    best = max((t for t in trials if t.state == STATE.COMPLETE), key=lambda t: t.value)
    assert out["best"] == {"number": best.number, "value": best.value,
                           "objective_metric": best.user_attrs["objective_metric"], "config": best.params,
                           "decode_tps": best.user_attrs["decode_tps"],
                           "quality_score": best.user_attrs.get("quality_score"),
                           "run_file": best.user_attrs["run_file"]}
    assert out["best"]["config"] == json.loads(block["best_config"]) and out["best"]["run_file"].startswith("runs/")
    assert out["patch"] == (search.PATCH_NAME if block["patch"] != "-" else None)


def test_crashing_configuration_is_pruned_with_its_reason(project):
    settings = project.settings()
    settings["search"]["knobs"] = {"COMPUTE_DTYPE": {"choices": ["no_such_dtype"]}}
    project.write_settings(settings)
    project.commit("a space whose only point crashes")
    proc = project.run("search", "--trials", "1", "--quick", "--model", str(project.model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    out = _block(proc.stdout)
    assert out["pruned"] == "1" and out["best_trial"] == "-" and out["patch"] == "-"
    assert _last_json(proc.stdout) == {"study": out["study"], "storage": out["storage"], "trials": 1,
                                       "counts": {"complete": 0, "pruned": 1, "failed": 0, "warm_started": 0},
                                       "best": None, "patch": None}
    trial = optuna.load_study(study_name=out["study"],
                              storage=f"sqlite:///{project.root / 'search.db'}").get_trials()[0]
    assert trial.state == STATE.PRUNED and trial.user_attrs["prune_reason"].startswith("CRASH: ")
    assert "no_such_dtype" in trial.user_attrs["prune_reason"]
    [row] = _search_rows(project)
    assert row["decision"] == "CRASH" and json.loads(row["config"]) == {"COMPUTE_DTYPE": "no_such_dtype"}
    assert not (project.root / search.PATCH_NAME).exists()


def test_storage_errors_are_one_line(project):
    bad = project.run("search", "--trials", "1", "--storage", "not a url")
    assert "is not a database URL" in _one_error_line(bad)
    port = _free_port()
    down = project.run("search", "--trials", "1", "--storage", f"postgresql://me:secret@127.0.0.1:{port}/x")
    line = _one_error_line(down)
    assert "cannot open the study storage" in line and "secret" not in line


# ---------------------------------------------------------------------------
# Two processes, one PostgreSQL study
# ---------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_binary(name):
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))
    return versions[-1] if versions else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (run as the postgres user when we are root)."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    missing = "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql"
    if not (initdb and pg_ctl):
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    as_postgres = []
    folder = tempfile.mkdtemp(prefix="harness-pg-")
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    data, log = f"{folder}/data", f"{folder}/server.log"
    try:
        subprocess.run(as_postgres + [initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(as_postgres + [pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "-o",
                                      f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
                                      "start"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        details = Path(log).read_text() if Path(log).exists() else getattr(exc, "stderr", b"")
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc}: {details}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_postgres + [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_share_one_postgres_study(tmp_path, tiny_llama, postgres_url):
    # Two checkouts, as on two machines: each its own results.tsv, one study between them.
    machines = [make_project(tmp_path / name, tiny_llama) for name in ("a", "b")]
    n = 4
    command = [sys.executable, "prepare.py", "search", "--trials", str(n), "--quick",
               "--model", str(tiny_llama), "--storage", postgres_url]
    procs = [subprocess.Popen(command, cwd=m.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, stdin=subprocess.DEVNULL) for m in machines]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    names = {_block(out)["study"] for out, _ in outputs}
    assert len(names) == 1  # same protocol and inference.py: the same default study

    storage = postgres_url.replace("postgresql://", "postgresql+psycopg2://")
    trials = optuna.load_study(study_name=names.pop(), storage=storage).get_trials()
    done = [t for t in trials if t.state in (STATE.COMPLETE, STATE.PRUNED)]
    assert len(done) == n, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (STATE.RUNNING, STATE.WAITING)]
    # a FAIL is only ever a surplus trial that was turned away before it evaluated anything
    assert all(t.user_attrs.get("fail_reason", "").startswith("surplus") and not t.params
               for t in trials if t.state == STATE.FAIL)
    per_machine = [_search_rows(m) for m in machines]
    assert all(per_machine), "both processes must have run trials"
    rows = per_machine[0] + per_machine[1]
    assert len(rows) == n  # none lost, none run twice
    assert Counter(r["run_file"] for r in rows) == Counter(t.user_attrs["run_file"] for t in done)
    assert sorted(json.dumps(json.loads(r["config"]), sort_keys=True) for r in rows) == \
        sorted(json.dumps(t.params, sort_keys=True) for t in done)
