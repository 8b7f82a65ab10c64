"""Bayesian search over inference.py's knobs, without an agent (Optuna TPE).

    python prepare.py search --trials N [--storage URL] [--study NAME] [--timeout S]
                             [--quick] [--model M] [--json]

Every trial is a normal evaluation (harness.evaluate.evaluate) with the knob values
set by name in the worker: inference.py is never edited, and each trial writes its
run file and its results.tsv row (source=search, config=the knobs as JSON).

The objective is quality_adjusted_tps (decode_tps while the quality gates are not in
the result), maximized. A trial that CRASHes, is INVALID/REJECTed or fails a quality
gate is recorded as PRUNED with its reason in the user attr `prune_reason`, and so is
a configuration the memory estimate says cannot fit.

The study lives in an Optuna RDB storage: a SQLite file in the repository by default
(search.db), or a PostgreSQL URL shared by several machines. `--trials N` is the
study's total of trials (warm-started ones aside): rerunning continues an interrupted
study up to N, and several processes on one study stop at N between them.

This module is the command; the parts live below it: search_space (knobs -> Optuna,
warm start), search_storage (storage and study), search_objective (memory, one trial).
"""

import argparse
import hashlib
import json
import sys

from harness import gitops, knobs, ledger
from harness.report import Progress, note
from harness.search_objective import make_objective
from harness.search_space import SearchError, SurplusTrial, load_space, optuna_module, warm_start_trials
from harness.search_storage import (DB_NAME, counted_trials, default_storage, default_study_name,
                                    open_storage, open_study, shown_url)
from harness.settings import ROOT, load_settings

PATCH_NAME = "search-best.patch"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(sub):
    """Add the `search` subcommand to argparse subparsers `sub`."""
    p = sub.add_parser("search", help="Bayesian search (Optuna TPE) over inference.py's knobs")
    p.add_argument("--trials", type=_positive_int, required=True,
                   help="trials the study holds in total (warm-started ones aside), across all processes")
    p.add_argument("--storage", help=f"Optuna storage URL (default: sqlite:///{DB_NAME} in the repository); "
                                     f"a postgresql:// URL lets several machines share one study")
    p.add_argument("--study", help="study name (default: search-<protocol>-<inference.py hash>-<space hash>)")
    p.add_argument("--timeout", type=_positive_float, help="start no new trial after this many seconds")
    p.add_argument("--quick", action="store_true", help="small workload for smoke runs")
    p.add_argument("--model", help="offline name, local mlx-lm directory or Hugging Face repo id")
    p.add_argument("--json", action="store_true",
                   help="also print the result as one JSON object, the last line of stdout")
    p.set_defaults(func=run)


def run(args):
    """`python prepare.py search`: run or continue a study, then print and patch the best. Exit status."""
    try:
        return _search(args)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _search(args):
    from harness import evaluate

    settings = load_settings()
    text = (ROOT / "inference.py").read_text()
    try:
        defaults = knobs.settable(text)
    except SyntaxError as exc:
        raise SearchError(f"inference.py does not parse ({exc.msg}, line {exc.lineno}): fix it first") from None
    space = load_space(settings.search, defaults)
    storage_url = args.storage or default_storage(ROOT)
    storage = open_storage(storage_url)

    note(f"resolving model {args.model or settings.model} ...")
    ctx = evaluate.make_context(settings, quick=args.quick, model=args.model)
    git_state = gitops.state(ROOT)
    inference_sha = hashlib.sha256(text.encode()).hexdigest()
    name = args.study or default_study_name(ctx.protocol, inference_sha, settings.as_dict()["search"])
    attrs = {"protocol": ctx.protocol, "inference_sha256": inference_sha, "model": ctx.model,
             "preset": ctx.preset.name, "commit": git_state["commit"], "dirty": git_state["dirty"]}
    study, created = open_study(storage, name, space.seed, space.startup_trials, attrs)
    if created:
        _warm_start(study, ctx, space, git_state)
    optuna_module().storages.fail_stale_trials(study)  # trials of a killed process no longer count

    note(f"search: study {name} in {shown_url(storage_url)}: "
         f"{len(counted_trials(study))}/{args.trials} trials done or running")
    if len(counted_trials(study)) < args.trials:
        objective = make_objective(ctx, space, defaults, _memory_budget(), args.trials)
        try:
            _optimize(study, objective, args)
        except KeyboardInterrupt:
            note(f"interrupted: study {name} keeps its finished trials in {shown_url(storage_url)}; "
                 f"run the same command again to continue")
            return 130
    result = study_result(study, name, storage_url)
    result["patch"] = write_patch(ctx.root, text, result["best"])
    _say_what_next(result, args)
    print(result_block(result))
    if args.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    return 0


def _memory_budget():
    from harness.profile import static_facts

    return static_facts()["memory_budget_bytes"]


def _warm_start(study, ctx, space, git_state):
    """Add the earlier search rows of results.tsv that fit this new study as finished trials."""
    if git_state["dirty"]:
        note("search: inference.py has uncommitted changes: no warm start from results.tsv")
        return
    rows, problems = ledger.read(ctx.ledger_path)
    for problem in problems:
        note(f"warning: {problem}")
    trials, skipped = warm_start_trials(rows, space, protocol=ctx.protocol, commit=git_state["commit"])
    study.set_user_attr("warm_started", len(trials))
    if trials:
        study.add_trials(trials)
        note(f"search: warm-started from {len(trials)} earlier search row(s) of results.tsv"
             + (f" ({skipped} outside the space skipped)" if skipped else ""))


def _optimize(study, objective, args):
    """Run trials until the study holds args.trials counted ones (or --timeout)."""
    optuna = optuna_module()
    state = optuna.trial.TrialState
    progress = Progress("search")

    def report(study_, trial):
        if trial.state == state.COMPLETE:
            what = f"{trial.user_attrs.get('objective_metric', 'value')} {trial.value:.4g}"
        elif trial.state == state.PRUNED:
            what = f"pruned: {trial.user_attrs.get('prune_reason', '')}"
        else:
            what = f"failed: {trial.user_attrs.get('fail_reason', 'interrupted or harness error')}"
        note(f"search: trial {trial.number} {what}")
        progress(min(len(counted_trials(study_)), args.trials), args.trials, f"trial {trial.number}")

    warm = len([t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("warm_start")])
    stop = optuna.study.MaxTrialsCallback(args.trials + warm,
                                          states=(state.COMPLETE, state.PRUNED, state.RUNNING))
    study.optimize(objective, n_trials=args.trials - len(counted_trials(study)), timeout=args.timeout,
                   callbacks=[stop, report], catch=(SurplusTrial,), gc_after_trial=False)


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------
def study_result(study, name, storage_url):
    """The study's outcome as plain data (the --json object, less "patch"):

    study, storage (password hidden), trials (this study's own finished ones),
    counts {complete, pruned, failed, warm_started} (complete/pruned/failed count this
    study's own trials; failed ones do not count toward --trials), and best: the
    completed trial with the highest value, warm-started ones included, as {number,
    value, objective_metric, config, decode_tps, quality_score, run_file}, or None.
    """
    state = optuna_module().trial.TrialState
    trials = study.get_trials(deepcopy=False)
    own = [t for t in trials if not t.user_attrs.get("warm_start")]
    counts = {"complete": len([t for t in own if t.state == state.COMPLETE]),
              "pruned": len([t for t in own if t.state == state.PRUNED]),
              "failed": len([t for t in own if t.state == state.FAIL]),
              "warm_started": len(trials) - len(own)}
    complete = [t for t in trials if t.state == state.COMPLETE]
    best = None
    if complete:
        trial = max(complete, key=lambda t: t.value)
        attrs = trial.user_attrs
        best = {"number": trial.number, "value": trial.value,
                "objective_metric": attrs.get("objective_metric"), "config": dict(trial.params),
                "decode_tps": attrs.get("decode_tps"), "quality_score": attrs.get("quality_score"),
                "run_file": attrs.get("run_file") or None}
    return {"study": name, "storage": shown_url(storage_url),
            "trials": counts["complete"] + counts["pruned"], "counts": counts, "best": best}


def write_patch(root, text, best):
    """Write the best configuration as search-best.patch in `root`; its name, or None when
    there is no best trial or it is inference.py as it is (a stale patch is removed)."""
    path = root / PATCH_NAME
    patch = knobs.make_patch(text, best["config"]) if best else ""
    if patch:
        path.write_text(patch)
        return PATCH_NAME
    if path.exists():
        path.unlink()  # a stale patch from an earlier study would mislead
    return None


def _say_what_next(result, args):
    if result["best"] is None:
        note("search: no trial completed: see prune_reason of each trial, and the runs/ files")
    elif result["patch"]:
        confirm = "python prepare.py" + (" --quick" if args.quick else "") + \
            (f" --model {args.model}" if args.model else "")
        note(f"search: apply the best configuration with `git apply {PATCH_NAME}`, "
             f"then confirm it with a normal run: `{confirm}`")
    else:
        note("search: the best configuration is inference.py's current one: no patch written")


def result_block(result):
    """The print-ready `key: value` block of a study_result (with "patch")."""
    def shown(value):
        return "-" if value is None else value

    counts, best = result["counts"], result["best"]
    lines = ["---", f"study: {result['study']}", f"storage: {result['storage']}",
             f"trials: {result['trials']}"] + [f"{key}: {value}" for key, value in counts.items()]
    if best is None:
        return "\n".join(lines + ["best_trial: -", "best_value: -", "best_config: -", "patch: -"])
    lines += [f"best_trial: {best['number']}",
              f"objective: {shown(best['objective_metric'])}",
              f"best_value: {best['value']:.6g}",
              f"best_decode_tps: {shown(best['decode_tps'])}",
              f"best_quality_score: {shown(best['quality_score'])}",
              f"best_run_file: {shown(best['run_file'])}",
              f"best_config: {json.dumps(best['config'], sort_keys=True)}",
              f"patch: {shown(result['patch'])}"]
    return "\n".join(lines)
