"""Power: how often does the A/B KEEP a change that is not faster, how often does it KEEP
one that is +5 % or +10 % faster, and how long does it take to decide?

Three challengers, measured in one run of this script, their runs interleaved (null 1,
+10 % 1, +5 % 1, null 2, ...) so that a change in the machine's load hits all alike. Each
has its own real git copy of the project, whose BASELINE run makes its champion:
  * null: a challenger that differs from the champion only by a no-op statement;
  * +10 % and +5 %: a champion that sleeps a fraction of each token's time, against a
    challenger without the sleep.
The "sleep" (a spin: see SLEEPY_LOOP) follows the machine's speed (a fraction of the time
the last token took) and is taken with no computation in flight, so a fraction f should make the
challenger about 1 + f faster; how much faster it truly is, is measured, not assumed: next
to each figure the bench prints the TRUE effect, the median of every pair's ratio of the
primary metric (decode tok/s) over all pairs of all that challenger's runs. The bench also
prints, per target, the fraction that would have hit it
(linear in the measured effect, from 30 pairs on): pass it back with --sleep-10/--sleep-5.
Each challenger sets `_BENCH_TRIAL = i` (one statement, no speed effect): the harness
pools the pairs of earlier runs of the same code (same syntax tree: comments do not count)
against the same champion, and the trials must be independent.

Figures per challenger: runs, KEEPs, KEEP rate and its target, true effect, median and
largest speed_s (seconds the speed phase took; before the harness reported it, the sum of
the timed calls), median pairs, why the A/B stopped (counts of "stopped"), median
pair_spread and min_detectable_effect where the harness reports them, and the champions'
champion_yardstick_pace (smallest, median, largest) and how many runs its check made
INVALID: every
champion here is honest, so those are that check's false alarms; end_to_end_total (the
whole calls' summed times, smallest and median) and how many runs its line made REVERT
(total_reverts: on an honest faster challenger, that line's false alarms).

Workloads:
  * default: the tiny random-weight llama model (tests/tiny_models.py) in the quick preset
    as the test suite shapes it (tests/conftest.py make_project), made a sequential A/B
    like the full preset: its repeats, max_repeats and budget_s are copied into quick,
    and max_tokens is 128. Targets: null KEEP <= 1/20, +10 % KEEP >= 19/20, +5 % >= 8/10.
  * --offline: the offline model (smollm2-135m-instruct, as `prepare.py` resolves it) with
    harness.yaml as it is, full preset, the real quality gates. Defaults to 5 null and 5
    +10 % runs. Targets: +10 % KEEP >= 4/5, null <= 1/5, every run's speed_s within the
    preset's budget_s. Hours on a 2-core CPU (a BASELINE run per challenger, then ~10-20 min a run).
Each run is a normal `python prepare.py --json`; each project is reset to its champion (the
baseline commit) before every run. --save writes every trial (result fields and pair ratios)
after every run, so a killed bench keeps its data.

    python bench/power.py [--null-runs 20] [--runs-10 20] [--runs-5 10] [--offline]
                          [--sleep-10 0.10] [--sleep-5 0.05] [--max-tokens N] [--repeats N]
                          [--set KEY=VALUE ...] [--harness PATH=VALUE ...]
                          [--save trials.json]
"""

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

_COMPILE_ENV = os.environ.get("MLX_DISABLE_COMPILE")  # conftest sets it to 1 on import
from conftest import PROJECT_FILES, REPO, Project, git, make_project  # noqa: E402  (the test suite's builder)
from harness.bench import Sample  # noqa: E402
from harness.verdict import paired_ratios  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

OFFLINE_MODEL = "smollm2-135m-instruct"
# The decode loop of inference.py queues step n+1 before it hands over token n, so a sleep
# there would overlap the next token's computation and slow nothing. The sleepy loop waits
# for token n, spins with nothing in flight (SLEEP_FRACTION of the time the token took),
# then queues the next step: the spin adds to every token's time. It spins rather than
# sleeps: on a busy machine a sleep's wake-up waits for a core, which slowed a sleeping
# champion against the yardstick by 29 % (an honest champion INVALID), where a slower
# pipeline's extra work is slowed like the yardstick's. Champion and challenger both run
# it; the challenger's SLEEP_FRACTION is 0.
TOKEN_LOOP = """    for n in range(max_tokens):
        if n + 1 < max_tokens:  # no step is queued past the last token
            if history is not None:
                history = mx.concatenate([history, y])
            next_y, next_logprobs = _step(pipeline, cache, y, history)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
"""
SLEEPY_LOOP = """    import time
    last = time.perf_counter()
    for n in range(max_tokens):
        token = y.item()
        until = time.perf_counter() + (time.perf_counter() - last) * SLEEP_FRACTION
        while time.perf_counter() < until:
            pass  # spin: work, as a slower pipeline's is (a sleep's wake-up lags on a busy machine)
        last = time.perf_counter()
        if n + 1 < max_tokens:  # no step is queued past the last token
            if history is not None:
                history = mx.concatenate([history, y])
            next_y, next_logprobs = _step(pipeline, cache, y, history)
            mx.async_eval(next_y, next_logprobs)
        yield token, logprobs
"""
# label -> (name in the tables, intended true effect or None for null)
GROUPS = {"null": ("null", None), "fast10": ("+10 %", 1.10), "fast5": ("+5 %", 1.05)}
# mode -> label -> (comparison, KEEP rate, as written in the acceptance)
TARGETS = {"tiny": {"null": ("<=", 1, 20), "fast10": (">=", 19, 20), "fast5": (">=", 8, 10)},
           "offline": {"null": ("<=", 1, 5), "fast10": (">=", 4, 5)}}
DEFAULT_RUNS = {"tiny": {"null": 20, "fast10": 20, "fast5": 10},
                "offline": {"null": 5, "fast10": 5, "fast5": 0}}
SEQUENTIAL_KEYS = ("repeats", "max_repeats", "budget_s")  # copied from full into quick (tiny)
RESULT_FIELDS = ("decision", "reason", "speedup", "speedup_ci", "pairs", "pooled_pairs", "speed_s", "stopped",
                 "pair_spread", "min_detectable_effect", "rounds", "elapsed_s", "end_to_end_ratio",
                 "primary_metric", "budget_s", "run_file", "champion_yardstick_pace",
                 "yardstick_ratio", "end_to_end_total")
MAX_FAILURES = 3  # runs without a result before the bench gives up


def say(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Projects
# ---------------------------------------------------------------------------
def plain_project(root):
    """A copy of the project with harness.yaml as it is (make_project shrinks the quick
    workload and relaxes the gates for a random model): for the offline model."""
    root = Path(root)
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "bench@example.com")
    git(root, "config", "user.name", "Bench")
    project = Project(root, OFFLINE_MODEL)
    project.commit("baseline")
    return project


def parse_value(text):
    return yaml.safe_load(text)


def shape_workload(project, mode, args):
    """Set the measured preset's keys (tiny: the sequential keys of full, max_tokens, and
    --repeats; both: --set); commit when anything changed. Returns the preset as set."""
    settings = project.settings()
    presets = settings["workload"]["presets"]
    preset = presets[preset_name(mode)]
    changes = {}
    if mode == "tiny":
        changes.update({k: presets["full"][k] for k in SEQUENTIAL_KEYS if k in presets["full"]})
        changes["max_tokens"] = args.max_tokens or 128
    elif args.max_tokens:
        changes["max_tokens"] = args.max_tokens
    if args.repeats:
        changes["repeats"] = args.repeats
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key.strip()] = parse_value(value)
    if "repeats" in changes and "max_repeats" in preset and "max_repeats" not in changes:
        changes["max_repeats"] = max(preset["max_repeats"], changes["repeats"])
    changed = any(preset.get(k) != v for k, v in changes.items())
    preset.update(changes)
    for item in args.harness:  # any other harness.yaml key, by its dotted path
        path, _, value = item.partition("=")
        *parents, leaf = path.strip().split(".")
        node = settings
        for key in parents:
            node = node[key]
        changed |= node.get(leaf) != parse_value(value)
        node[leaf] = parse_value(value)
    if changed:
        project.write_settings(settings)
        project.commit("bench workload")
    return dict(preset)


def preset_name(mode):
    return "quick" if mode == "tiny" else "full"


def prepare_args(mode, model_dir):
    if mode == "tiny":
        return ["--quick", "--model", str(model_dir)]
    return ["--model", OFFLINE_MODEL]


def evaluate(project, mode, model_dir, timeout):
    """`python prepare.py --json ...` in the project: (result dict or None, why not)."""
    try:
        proc = project.run("--json", *prepare_args(mode, model_dir), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"prepare.py ran past {timeout} s"
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        return json.loads(lines[-1]), ""
    return None, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def champion_project(root, mode, model_dir, args, sleep_fraction=None):
    """A project whose BASELINE run (the champion) is done; with `sleep_fraction`, the
    champion sleeps that fraction of each token's time. Returns (project, commit, preset, result)."""
    project = make_project(root, model_dir) if mode == "tiny" else plain_project(root)
    preset = shape_workload(project, mode, args)
    if sleep_fraction is not None:
        project.edit_inference(TOKEN_LOOP, SLEEPY_LOOP)
        project.edit_inference("NUM_DRAFT_TOKENS = 3 ", f"SLEEP_FRACTION = {sleep_fraction:.4f}\nNUM_DRAFT_TOKENS = 3 ")
        project.commit("champion sleeps per token")
    result, why = evaluate(project, mode, model_dir, args.run_timeout)
    if result is None or result.get("decision") != "BASELINE":
        raise SystemExit(f"the champion's baseline run in {root} failed: "
                         f"{why or (result.get('decision'), result.get('reason'))}")
    return project, git(project.root, "rev-parse", "HEAD"), preset, result


# ---------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------
SAMPLE_FIELDS = {f.name for f in dataclasses.fields(Sample)}


def run_ratios(project, result):
    """Every pair's ratio of the primary metric in this run alone (never pooled pairs)."""
    path = project.root / result["run_file"] if result.get("run_file") else None
    if path is None or not path.exists():
        return [], None
    run = json.loads(path.read_text())
    samples = [Sample(**{k: v for k, v in s.items() if k in SAMPLE_FIELDS}) for s in run.get("samples", [])]
    metric = result.get("primary_metric") or (run.get("result") or {}).get("primary_metric") or "decode_tps"
    speed_s = None
    if samples:  # before the harness reported speed_s: the timed calls' own time
        speed_s = round(sum(s.total_s for s in samples), 1)
    return paired_ratios(samples, metric), speed_s


def trial(project, base, label, i, mode, model_dir, args):
    """Reset to `base` (the champion), commit trial i's challenger, evaluate it.

    The challenger is the champion plus one statement `_BENCH_TRIAL = i` (null), or that
    and no sleep. The statement makes each trial's syntax tree its own: the harness pools
    the pairs of earlier runs of the same code (its code_hash ignores comments), and the
    trials must be independent. One more line never wins a KEEP ("simpler" needs fewer),
    so only speed can. Returns the trial's record.
    """
    git(project.root, "reset", "-q", "--hard", base)
    mark = f"_BENCH_TRIAL = {i}  # no speed effect; a syntax tree of its own, so no run pools another's pairs\n"
    if label == "null":
        project.edit_inference("TOP_K = 0 ", mark + "TOP_K = 0 ")
    else:
        text = project.inference.read_text()
        start = text.index("SLEEP_FRACTION = ")
        project.inference.write_text(text[:start] + mark + "SLEEP_FRACTION = 0.0" + text[text.index("\n", start):])
    project.commit(f"{label} trial {i}")
    started = time.perf_counter()
    result, why = evaluate(project, mode, model_dir, args.run_timeout)
    record = {"label": label, "i": i, "wall_s": round(time.perf_counter() - started, 1)}
    if result is None:
        record.update(decision=None, failure=why, ratios=[])
        say(f"{GROUPS[label][0]:>6} {i + 1:2d}: FAILED {why.strip().splitlines()[0] if why.strip() else ''}")
        return record
    record.update({k: result.get(k) for k in RESULT_FIELDS})
    ratios, samples_s = run_ratios(project, result)
    record["ratios"] = ratios
    if record["speed_s"] is None:
        record["speed_s"], record["speed_s_from"] = samples_s, "samples"
    low, high = record["speedup_ci"] or (None, None)
    interval = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "[no interval]"
    speedup = f"{record['speedup']:.3f}" if record["speedup"] is not None else "-"
    speed_s = f"{record['speed_s']:.0f}" if record["speed_s"] is not None else "-"
    pooled = f" (pooled {record['pooled_pairs']})" if record.get("pooled_pairs") else ""
    say(f"{GROUPS[label][0]:>6} {i + 1:2d}: {record['decision']:7s} speedup {speedup} {interval} "
        f"pairs {record['pairs']}{pooled} speed_s {speed_s} stopped {record['stopped'] or '-'} "
        f"(run {record['wall_s']:.0f} s)")
    if record["decision"] not in ("KEEP", "REVERT"):
        say(f"        {record['decision']}: {record['reason']}")
    return record


def schedule(runs):
    """Interleave the groups: (label, i) for i = 0, 1, ... over every label that still has runs."""
    order = []
    for i in range(max(runs.values(), default=0)):
        order += [(label, i) for label in GROUPS if i < runs[label]]
    return order


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def median(values, digits=3):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def summarize(mode, runs, trials, sleep, budget):
    """The figures of every group, as `key: value` pairs (in print order)."""
    summary = {"mode": mode}
    if budget is not None:
        summary["budget_s"] = budget
    for label, (name, effect) in GROUPS.items():
        if not runs[label]:
            continue
        done = [t for t in trials if t["label"] == label and t["decision"] is not None]
        keeps = sum(t["decision"] == "KEEP" for t in done)
        prefix = f"{label}_"
        fig = {"runs": len(done), "failed": sum(t["label"] == label and t["decision"] is None for t in trials),
               "keep": keeps, "keep_rate": round(keeps / len(done), 3) if done else None}
        target = TARGETS[mode].get(label)
        if target:
            op, k, n = target
            fig["keep_target"] = f"{op} {k}/{n}"
            if done:
                fig["keep_ok"] = (keeps / len(done) <= k / n) if op == "<=" else (keeps / len(done) >= k / n)
        all_pairs = [x for t in done for x in t["ratios"]]
        fig["true_effect"] = median(all_pairs, 4)
        fig["true_effect_pairs"] = len(all_pairs)
        if effect is not None:
            fig["intended_effect"] = effect
            fig["sleep_fraction"] = sleep[label]
            true = fig["true_effect"]
            if true is not None and true > 1.005 and len(all_pairs) >= 30:  # the fraction that would have hit it
                fig["suggested_sleep_fraction"] = round(sleep[label] * (effect - 1) / (true - 1), 4)
        fig["median_speedup"] = median(t["speedup"] for t in done)
        fig["median_speed_s"] = median((t["speed_s"] for t in done), 1)
        fig["max_speed_s"] = max((t["speed_s"] for t in done if t["speed_s"] is not None), default=None)
        keep_runs = [t for t in done if t["decision"] == "KEEP"]
        if keep_runs:
            fig["median_speed_s_keep"] = median((t["speed_s"] for t in keep_runs), 1)
        fig["median_pairs"] = median(t["pairs"] for t in done)
        fig["median_elapsed_s"] = median((t["elapsed_s"] for t in done), 1)
        stopped = {}
        for t in done:
            stopped[t["stopped"] or "?"] = stopped.get(t["stopped"] or "?", 0) + 1
        if any(key != "?" for key in stopped):
            fig["stopped"] = ",".join(f"{k}:{v}" for k, v in sorted(stopped.items()))
        for key in ("pair_spread", "min_detectable_effect"):
            value = median(t.get(key) for t in done)
            if value is not None:
                fig[f"median_{key}"] = value
        if budget is not None:
            within = sum(t["speed_s"] is not None and t["speed_s"] <= budget for t in done)
            fig["within_budget"] = f"{within}/{len(done)}"
        paces = [t.get("champion_yardstick_pace") for t in done if t.get("champion_yardstick_pace") is not None]
        if paces:  # an honest champion's pace over the yardstick against its own BASELINE: that check's false alarms
            fig["yardstick_pace_min"], fig["yardstick_pace_median"] = round(min(paces), 3), median(paces)
            fig["yardstick_pace_max"] = round(max(paces), 3)
            fig["yardstick_invalid"] = sum(t["decision"] == "INVALID" and "relative to the yardstick" in (t["reason"] or "")
                                           for t in done)
        totals = [t.get("end_to_end_total") for t in done if t.get("end_to_end_total") is not None]
        if totals:  # the whole calls' summed times; REVERTs by their line (verdict.total_time_ratio)
            fig["end_to_end_total_min"], fig["end_to_end_total_median"] = round(min(totals), 3), median(totals)
            fig["total_reverts"] = sum("summed over every pair" in (t["reason"] or "") for t in done)
        if any(t.get("pooled_pairs") for t in done):
            fig["runs_with_pooled_pairs"] = sum(bool(t.get("pooled_pairs")) for t in done)
        summary.update({prefix + k: v for k, v in fig.items()})
    if mode == "offline" and budget is not None:
        done = [t for t in trials if t["decision"] is not None]
        summary["budget_ok"] = all(t["speed_s"] is not None and t["speed_s"] <= budget for t in done)
    return summary


def table(summary):
    """A short table for people (stderr)."""
    rows = [f"{'challenger':10s} {'runs':>4s} {'KEEP':>4s} {'rate':>5s} {'target':>8s} {'ok':>3s} "
            f"{'true effect':>11s} {'speed_s med/max':>15s} {'pairs':>5s}"]
    for label, (name, _) in GROUPS.items():
        if f"{label}_runs" not in summary:
            continue
        get = lambda key: summary.get(f"{label}_{key}")  # noqa: E731
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        ok = {True: "yes", False: "NO", None: "-"}[get("keep_ok")]
        rows.append(f"{name:10s} {get('runs'):4d} {get('keep'):4d} {fmt(get('keep_rate'), '5.2f')} "
                    f"{get('keep_target') or '-':>8s} {ok:>3s} {fmt(get('true_effect'), '11.3f')} "
                    f"{fmt(get('median_speed_s'), '.0f') + '/' + fmt(get('max_speed_s'), '.0f'):>15s} "
                    f"{fmt(get('median_pairs'), '5.0f')}")
    if "budget_s" in summary:
        rows.append(f"budget_s {summary['budget_s']}" +
                    (f": every run within it: {summary['budget_ok']}" if "budget_ok" in summary else ""))
    return "\n".join(rows)


def save(path, payload):
    """Write `payload` as JSON to `path` atomically (a killed bench leaves the last whole file)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--null-runs", type=int, help="comment-only challengers (default 20; --offline 5)")
    parser.add_argument("--runs-10", type=int, help="challengers truly +10 %% faster (default 20; --offline 5)")
    parser.add_argument("--runs-5", type=int, help="challengers truly +5 %% faster (default 10; --offline 0)")
    parser.add_argument("--offline", action="store_true",
                        help=f"the offline model {OFFLINE_MODEL}, full preset, harness.yaml as it is")
    parser.add_argument("--sleep-10", type=float, default=0.10,
                        help="the +10 %% champion sleeps this fraction of each token's time")
    parser.add_argument("--sleep-5", type=float, default=0.05,
                        help="the +5 %% champion sleeps this fraction of each token's time")
    parser.add_argument("--max-tokens", type=int, help="tokens per speed call (default: 128 tiny, the preset's offline)")
    parser.add_argument("--repeats", type=int, help="rounds before the A/B first looks (default: the full preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a key of the measured preset, e.g. --set budget_s=300 --set max_repeats=20")
    parser.add_argument("--harness", action="append", default=[], metavar="PATH=VALUE",
                        help="set any harness.yaml key by its dotted path, e.g. --harness "
                             "'quality.tasks.full=[capital_france]' (fewer tasks: shorter runs, same A/B)")
    parser.add_argument("--run-timeout", type=int, help="seconds one prepare.py run may take (default 1800; offline 7200)")
    parser.add_argument("--save", type=Path, help="write every trial (result fields, pair ratios) here as JSON, after every run")
    args = parser.parse_args()
    mode = "offline" if args.offline else "tiny"
    given = {"null": args.null_runs, "fast10": args.runs_10, "fast5": args.runs_5}
    runs = {label: DEFAULT_RUNS[mode][label] if n is None else n for label, n in given.items()}
    sleep = {"fast10": args.sleep_10, "fast5": args.sleep_5}
    args.run_timeout = args.run_timeout or (1800 if mode == "tiny" else 7200)
    if mode == "offline":  # measure as a real run does: mlx compiles (the test suite turns that off)
        if _COMPILE_ENV is None:
            os.environ.pop("MLX_DISABLE_COMPILE", None)
        else:
            os.environ["MLX_DISABLE_COMPILE"] = _COMPILE_ENV

    started = time.perf_counter()
    payload = {"mode": mode, "runs": runs, "sleep_fraction": sleep, "args": vars(args), "baselines": {},
               "trials": [], "summary": None}
    with tempfile.TemporaryDirectory(prefix="power-") as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", "llama") if mode == "tiny" else None
        projects, preset = {}, None
        for label in (label for label in GROUPS if runs[label]):
            say(f"baseline run of the {GROUPS[label][0]} champion ({mode}) ...")
            project, base, preset, result = champion_project(tmp / label, mode, model_dir, args, sleep.get(label))
            projects[label] = (project, base)
            payload["baselines"][label] = {k: result.get(k) for k in RESULT_FIELDS}
            payload["preset"] = preset
            say(f"  BASELINE in {result.get('elapsed_s')} s, preset {preset_name(mode)}: "
                + ", ".join(f"{k}={v}" for k, v in preset.items() if k != "prompts"))
        budget = None
        if preset is not None:
            budget = preset.get("budget_s")
        failures = 0
        for label, i in schedule(runs):
            project, base = projects[label]
            record = trial(project, base, label, i, mode, model_dir, args)
            record["sleep_fraction"] = sleep.get(label)
            payload["trials"].append(record)
            payload["summary"] = summarize(mode, runs, payload["trials"], sleep, budget)
            payload["elapsed_s"] = round(time.perf_counter() - started, 1)
            save(args.save, payload)
            failures += record["decision"] is None
            if failures >= MAX_FAILURES:
                raise SystemExit(f"{failures} runs gave no result; the last:\n{record['failure']}")

    summary = summarize(mode, runs, payload["trials"], sleep, budget)
    summary["bench_elapsed_s"] = round(time.perf_counter() - started, 1)
    payload["summary"], payload["elapsed_s"] = summary, summary["bench_elapsed_s"]
    save(args.save, payload)
    say("\n" + table(summary))
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
