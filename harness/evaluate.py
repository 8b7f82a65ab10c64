"""One evaluation, end to end: settings -> model -> locked files -> change monitor ->
workers (champion, challenger) -> samples -> statistics + quality -> verdict ->
run file + ledger row. Each step is a plain function; prepare.py wires them."""

import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness import bench, code_size, gates, geometry, gitops, ledger, measure, monitor, pace, quality, sandbox, verdict
from harness import settings as settings_mod
from harness.corpus import load_corpus
from harness.environment import environment
from harness.models import model_digest, resolve_model
from harness.report import note, quoted, stage
from harness.ledger import Decision
from harness.tasks import load_tasks
from harness.verdict import pct
from harness.worker import read_log_tail

ROOT = settings_mod.ROOT
# A run's per-pair spread this many times the protocol's usual one says the machine was busy.
BUSY_SPREAD_FACTOR = 2.0


@dataclass
class Context:
    """Everything fixed for one run, resolved before any worker starts."""
    settings: settings_mod.Settings
    quick: bool
    model: str
    model_dir: Path
    draft_dir: Path | None
    tokenizer: object
    corpus_text: str
    corpus_sha256: str
    model_digest: str          # content hash of the model folder (part of the protocol)
    protocol: str
    vocab_size: int | None = None
    root: Path = ROOT

    @property
    def preset(self):
        return self.settings.preset(self.quick)

    @property
    def ledger_path(self):
        return self.root / "results.tsv"

    @property
    def runs_dir(self):
        return self.root / "runs"


def make_context(settings, *, quick, model=None, root=ROOT):
    """Resolve the model and the locked data for `settings` (checked by load_settings).

    Raises ModelError on a model that cannot be found or converted.
    """
    from mlx_lm.utils import load_tokenizer

    try:
        sandbox.setting()
    except ValueError as exc:  # a usage error: prepare.py prints it as one line and exits 2
        raise settings_mod.SettingsError(str(exc)) from None
    name = model or settings.model
    model_dir = resolve_model(name)
    draft = settings.draft_model
    draft_dir = resolve_model(draft) if draft else None
    corpus_text, corpus_sha = load_corpus()
    tasks_sha = settings_mod.digest([(t.id, t.prompt, t.params) for t in load_tasks()])
    digests = {"model": model_digest(model_dir), "draft": model_digest(draft_dir) if draft_dir else None}
    # the model by content, never by how it was named (a red team's `--model path//model`, the
    # same folder spelled anew, began a protocol with no history: KEEP +49.5 % for a no-op)
    protocol = settings_mod.protocol_hash(settings, quick, digests["model"],
                                          {"corpus": corpus_sha, "tasks": tasks_sha, "digests": digests,
                                           "yardstick": verdict.YARDSTICK_METRIC})
    vocab_size = geometry.model_geometry(model_dir).vocab_size or None
    return Context(settings=settings, quick=quick, model=name, model_dir=model_dir,
                   draft_dir=draft_dir, tokenizer=load_tokenizer(model_dir),
                   corpus_text=corpus_text, corpus_sha256=corpus_sha, model_digest=digests["model"],
                   protocol=protocol,
                   vocab_size=vocab_size, root=root)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
@dataclass
class Standing:
    """Where the branch stands before the run: git state, the ledger, baseline and champion."""
    git: dict
    rows: list
    ancestry: list
    baseline: dict | None      # this branch's BASELINE row: the reference for locked files
    champion: dict | None      # the row a new commit must beat
    ledger_fingerprint: tuple  # results.tsv's (size, sha256) before the run: checked before appending


def evaluate(ctx, *, inference_path=None, overrides=None, source="agent", apply=False):
    """Evaluate inference.py (or `inference_path`) under `ctx` and decide.

    Search trials (`overrides` set) are measured alone and logged as MEASURED.
    The run file and the ledger row are written before this returns.
    """
    started, stamp = time.perf_counter(), datetime.now(timezone.utc)
    inference_path = Path(inference_path or ctx.root / "inference.py")
    standing = where_we_stand(ctx)
    result = new_result(ctx, standing, source, overrides)
    code = inference_path.read_text(errors="replace")
    changes = change_monitor(ctx, standing, code)
    result["changes"] = changes["vs_baseline"]["summary"]
    result["code_hash"] = code_size.code_hash(code)  # what runs (comments and docstrings never do)
    lines = changes["vs_champion"]["lines"] if changes["vs_champion"] else {"delta": None, "uncounted": ""}
    result["lines_vs_champion"], result["lines_uncounted"] = lines["delta"], lines["uncounted"]
    locked = locked_files_changed(ctx, standing)
    out = {"samples": [], "workers": {}, "quality": None, "logs": {}}
    if locked:
        result.update(decision=Decision.REJECT, reason=locked)
    else:
        compare = _compares(standing, overrides)
        earlier, earlier_runs = ledger.earlier_ratios(standing.rows, protocol=ctx.protocol, champion=result["champion"],
                                                      code_hash=result["code_hash"]) if compare else ({}, 0)
        fewer_lines = (lines["delta"] or 0) < 0 and not lines["uncounted"]
        record = (ledger.yardstick_record(standing.rows, standing.champion,
                                          gitops.ancestry(ctx.root, standing.champion["commit"]))
                  if compare else (None, None))
        out = measure_run(ctx, standing, inference_path, overrides, compare=compare,
                          ab={"earlier": earlier, "fewer_lines": fewer_lines, "record": record})
        record_sandbox(result, out["workers"])
        result.update(out["speed"])
        if out["failure"]:
            record_failure(result, out["failure"])
        else:
            try:
                figures(ctx, result, out, earlier)
                judge(ctx, result, standing, search=bool(overrides))
                pace.check_champion_yardstick(ctx, result, out, record)
                pace.check_champion_pace(ctx, result, standing)
                pace.note_baseline_below_record(ctx, result, standing)
                explain_noise(result, standing, earlier_runs)
            except Exception as exc:  # whatever the workers returned, the run ends with its row
                note(quoted("".join(traceback.format_exception(exc))[-4000:]))
                result.update(decision=Decision.CRASH, reason=f"harness error while judging the run: "
                              f"{type(exc).__name__}: {str(exc)[:200]} (a harness bug: please report it)")
    guard_ledger(ctx, result, standing)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["run_file"] = write_run_file(ctx, result, stamp, out, changes)
    ledger.append(ctx.ledger_path, ledger_row(result, stamp))
    if apply:
        result["applied"] = apply_verdict(ctx, result, standing)
    return result


def where_we_stand(ctx):
    """Read git and the ledger. Everything is per branch: a new branch starts with its own
    BASELINE, whose commit then locks every file but inference.py for the rest of the branch."""
    git_state = gitops.state(ctx.root)
    fingerprint = ledger.fingerprint(ctx.ledger_path)
    rows, problems = ledger.read(ctx.ledger_path)
    for problem in problems:
        note(f"warning: {problem}")
    ancestry = gitops.ancestry(ctx.root)
    branch = git_state["branch"]
    return Standing(git=git_state, rows=rows, ancestry=ancestry,
                    baseline=ledger.branch_baseline(rows, ancestry, branch),
                    champion=ledger.champion_row(rows, ancestry, protocol=ctx.protocol, branch=branch),
                    ledger_fingerprint=fingerprint)


def locked_files_changed(ctx, standing):
    """'' when every file but inference.py is as the harness runs it, else the REJECT reason.

    The harness runs from a copy of the baseline commit's files (HEAD's before there is
    a baseline), so a locked file that differs from that commit, committed or not, would
    not even be what runs.
    """
    code = os.environ.get(settings_mod.CODE_ENV)
    if code and standing.git["commit"] != "none":
        rewritten = [name for name in gitops.changed_locked_files(ctx.root, code)
                     if name.split("/")[0] in settings_mod.HARNESS_CODE]
        if rewritten:
            return (f"harness code differs from {code[:7]}, the first BASELINE in this history, as "
                    f"of which it runs: {', '.join(rewritten)} (only inference.py may change; to "
                    f"adopt new harness code, move results.tsv and results.tsv.sha256 away and "
                    f"begin a new ledger)")
    if standing.baseline:
        changed = gitops.changed_locked_files(ctx.root, standing.baseline["commit"])
        where = f"since the baseline {standing.baseline['commit']}"
    elif standing.git["commit"] != "none":
        changed = gitops.changed_locked_files(ctx.root, "HEAD")
        where = "and not committed (the harness runs as committed: commit them before the baseline)"
    else:
        return ""
    if not changed:
        return ""
    return f"locked files changed {where}: {', '.join(changed)} (only inference.py may change)"


def new_result(ctx, standing, source, overrides):
    """The result dict of a run before anything is measured."""
    git_state = standing.git
    return {"decision": None, "reason": "", "commit": git_state["commit"], "subject": git_state["subject"],
            "branch": git_state["branch"], "dirty": git_state["dirty"], "model": ctx.model,
            "protocol": ctx.protocol, "preset": ctx.preset.name, "source": source,
            "config": overrides or None,
            "champion": standing.champion["commit"] if standing.champion else None}


def _compares(standing, overrides):
    """Whether the run measures the champion side by side (not for search trials or the champion itself)."""
    champion = standing.champion
    return bool(champion and not overrides
                and (standing.git["dirty"] or champion["commit"] != standing.git["commit"]))


def change_monitor(ctx, standing, source_now):
    """Print the change monitor (stderr) and return {"vs_baseline", "vs_champion"}."""
    def source_at(row):
        try:
            return gitops.file_at(ctx.root, row["commit"], "inference.py") if row else None
        except Exception:  # the commit may be gone (e.g. garbage-collected): compare with nothing
            return None

    base_src, champ_src = source_at(standing.baseline), source_at(standing.champion)
    vs_baseline = monitor.compare(base_src or source_now, source_now)
    vs_champion = monitor.compare(champ_src, source_now) if champ_src else None
    note(monitor.format_report(vs_baseline, vs_champion if champ_src != base_src else None))
    return {"vs_baseline": vs_baseline, "vs_champion": vs_champion}


def measure_run(ctx, standing, inference_path, overrides, *, compare, ab=None):
    """The reference, then the workers (the champion's inference.py from git when `compare`),
    all in a temporary folder. Returns measure.measure()'s dict plus the workers' log tails."""
    tasks = quality.selected_tasks(ctx.settings, ctx.quick)
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        stage("reference: float32 figures for this model (cached after the first run)")
        reference = quality.load_reference(ctx, tasks, tmp)
        # Each worker loads its own copy, in its own folder: nothing it does to the file
        # or the folder reaches the repository or the other worker.
        sources = {"challenger": inference_path.read_bytes()}
        if compare:
            sources = {"champion": gitops.file_at(ctx.root, standing.champion["commit"], "inference.py").encode(),
                       **sources}
        paths = {}
        for name, source in sources.items():
            paths[name] = Path(tmp) / name / "inference.py"
            paths[name].parent.mkdir()
            paths[name].write_bytes(source)
        out = measure.measure(ctx, paths, reference=reference, tasks=tasks, overrides=overrides, log_dir=tmp,
                      ab=ab)
        names = {Path(p).name: name for name, p in out["log_paths"].items()}
        out["logs"] = {names.get(p.name, p.stem): read_log_tail(p) for p in Path(tmp).glob("*.log")}
    out["reference"] = reference
    return out


def judge(ctx, result, standing, *, search):
    """Set the decision and its reason from the figures (verdict.decide, a pure function)."""
    result["decision"], result["reason"] = verdict.decide(
        gate_reason=gates.failed_gate_reason(result["gates"]),
        has_champion=standing.champion is not None, dirty=standing.git["dirty"], search=search,
        min_effect=ctx.settings.verdict.min_effect,
        **{k: result.get(k) for k in ("speedup", "speedup_ci", "pairs", "primary_metric", "end_to_end_ratio",
                                      "end_to_end_ci", "lines_vs_champion", "lines_uncounted", "end_to_end_total")
           if k in result})


def explain_noise(result, standing, earlier_runs):
    """Add to the reason what the noise was: pooled earlier runs, and a busy machine (this
    run's per-pair spread far above the usual one of this protocol's earlier comparisons)."""
    if result.get("speedup") is None:
        return
    if result.get("stopped") in ("budget", "max_repeats") and result["decision"] == Decision.REVERT \
            and "within noise" in result["reason"]:
        needed = result.get("min_detectable_effect")
        result["reason"] += (f"; undecided after {result['pairs']} pairs ("
                             + ("time budget spent" if result["stopped"] == "budget" else "all rounds done")
                             + (f"; these pairs could only have kept {pct(needed)} or more" if needed else "") + ")")
    if earlier_runs:
        result["reason"] += (f"; pooled with {earlier_runs} earlier run(s) of the same code against this champion "
                             f"({result['pooled_pairs']} of the {result['pairs']} pairs)")
    usual = ledger.usual_spread(standing.rows, protocol=result["protocol"])
    spread = result.get("pair_spread")
    if spread and usual and spread > BUSY_SPREAD_FACTOR * usual:
        result["reason"] += (f"; the machine was busy: per-pair spread {spread:.3f} vs usual {usual:.3f} "
                             f"(load average {result.get('load_avg')})")


def guard_ledger(ctx, result, standing):
    """A ledger that changed during the run makes the run INVALID: only the harness writes it."""
    foreign = ledger.changed_since(ctx.ledger_path, standing.ledger_fingerprint)
    if foreign:
        result.update(decision=Decision.INVALID, reason=f"results.tsv changed during the run: {foreign} "
                      f"(those rows are never taken as champion; was: {result['decision']})")


def record_sandbox(result, workers):
    """The sandbox the pipeline ran in, in the result; a loud warning when there was none."""
    info = workers.get("challenger", {})
    result["sandbox"] = info.get("sandbox")
    if result["sandbox"] == "none":
        note(f"warning: pipeline code ran WITHOUT a sandbox ({info.get('sandbox_why') or 'no sandbox'}): it could "
             f"reach the harness; on Linux install bubblewrap (apt-get install bubblewrap)")


def record_failure(result, failure):
    """A CRASH or INVALID: the decision, and the worker's last lines for people."""
    who = "" if failure["worker"] == "challenger" else f"{failure['worker']}: "
    result.update(decision=failure["decision"], reason=who + failure["reason"])
    if failure["log_tail"]:
        note(f"last lines of the {failure['worker']} worker's output:\n{quoted(failure['log_tail'])}")


def figures(ctx, result, out, earlier=None):
    """Fill speed, ratio and quality figures into `result` (`earlier`: pooled ratios)."""
    samples, workers, measured, reference = out["samples"], out["workers"], out["quality"], out["reference"]
    mine = [s for s in samples if s.worker == "challenger"]
    result.update({k: v for k, v in bench.speed_figures(mine).items() if k != "samples"})
    rss = workers.get("challenger", {}).get("max_rss_bytes")
    result["max_rss_gb"] = rss / 1e9 if rss else None
    # The worker reports its MLX peak itself, so it could under-report: never below what
    # the harness saw it hold (its peak resident memory).
    if result["max_rss_gb"]:
        result["peak_memory_gb"] = max(result["peak_memory_gb"] or 0, result["max_rss_gb"])
    result["bytes_per_token"] = geometry.bytes_per_token(ctx.model_dir, workers.get("challenger", {}), mine)
    bandwidth = _bandwidth_gbs()
    if result["bytes_per_token"] and bandwidth:
        result["roofline_fraction"] = result["decode_tps"] * result["bytes_per_token"] / (bandwidth * 1e9)
    log_ratio, result["yardstick_se"] = verdict.yardstick_ratio(samples, "challenger")
    result["yardstick_ratio"] = math.exp(log_ratio) if log_ratio is not None else None
    theirs = [s for s in samples if s.worker == "champion"]
    if theirs:
        result.update(verdict.comparison(samples, ctx.settings.verdict.primary_metric,
                                         min_effect=ctx.settings.verdict.min_effect, earlier=earlier))
        champ = bench.speed_figures(theirs)
        result["champion_speed"] = champ[ctx.settings.verdict.primary_metric]
        champ_peak = champ["peak_memory_gb"]
        champ_rss = workers.get("champion", {}).get("max_rss_bytes")
        champ_peak = max(champ_peak or 0, (champ_rss or 0) / 1e9) or None
        if champ_peak and result.get("peak_memory_gb"):
            result["memory_ratio"] = result["peak_memory_gb"] / champ_peak
    gate_list = gates.gates(ctx.settings, measured, reference)
    # The worse of the corpus's KL (through score) and the timed calls' (through generate):
    # a pipeline that is careful only where it is scored gets no credit for it.
    score = gates.quality_score(max(measured["kl_mean"], measured.get("timed_kl_mean") or 0))
    result.update({k: measured[k] for k in (
        "perplexity", "perplexity_se", "kl_mean", "kl_p99", "top1_agreement", "timed_kl_mean", "timed_kl_p99",
        "timed_top1", "self_consistency", "self_consistency_tail", "continuation_fit", "continuation_tail",
        "continuation_nll", "reference_entropy", "sanity",
        "repetition",
        "quality_s")})
    result.update({
        "reference_sanity": reference["sanity"],
        "quality_score": score, "quality_adjusted_tps": (result["decode_tps"] or 0) * score,
        "quality_pass": all(g["passed"] for g in gate_list), "gates": gate_list,
    })


def _bandwidth_gbs():
    """Measured memory bandwidth from the hardware profile (cached; measured once per machine)."""
    from harness.profile import load_profile

    try:
        return load_profile().get("bandwidth_gbs")
    except Exception as exc:  # the roofline is a hint: never let it sink a run
        note(f"warning: no bandwidth figure for the roofline ({exc})")
        return None


def apply_verdict(ctx, result, standing):
    """--apply: after REVERT/CRASH/INVALID/REJECT, reset the branch to the champion.

    Only on a clean tree whose HEAD is the commit just measured. Returns a one-line
    account of what happened (also printed on stderr).
    """
    def say(text):
        note(text)
        return text

    if result["decision"] not in ledger.RESETTABLE:
        return say(f"--apply: nothing to do after {result['decision']}")
    rows, ancestry, branch = standing.rows, standing.ancestry, result["branch"]
    champion = ledger.champion_row(rows, ancestry, protocol=ctx.protocol, branch=branch) \
        or ledger.champion_row(rows, ancestry, branch=branch)
    state = gitops.state(ctx.root)
    if champion is None:
        return say("--apply refused: no champion on this branch to reset to")
    if not gitops.is_clean(ctx.root):
        return say("--apply refused: uncommitted changes in tracked files (commit or stash them, then reset by hand)")
    if state["commit"] != result["commit"]:
        return say(f"--apply refused: HEAD moved during the run ({result['commit']} -> {state['commit']})")
    if champion["commit"] == state["commit"]:
        return say("--apply refused: HEAD is the champion itself")
    gitops.reset_hard(ctx.root, champion["commit"])
    return say(f"--apply: reset {state['branch'] or 'HEAD'} to the champion {champion['commit']}")


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------
def write_run_file(ctx, result, stamp, out, changes):
    """Write every raw sample, the settings and the environment to runs/<time>-<commit>.json."""
    ctx.runs_dir.mkdir(exist_ok=True)
    payload = {
        "result": result, "timestamp": stamp.isoformat(timespec="seconds"),
        "settings": ctx.settings.as_dict(), "settings_hash": settings_mod.digest(ctx.settings.as_dict()),
        "corpus_sha256": ctx.corpus_sha256, "model_dir": str(ctx.model_dir),
        "environment": environment(), "workers": out["workers"], "changes": changes,
        "quality": out["quality"], "samples": [s.to_dict() for s in out["samples"]],
        "worker_logs": out["logs"],
    }
    base = f"{stamp.strftime('%Y%m%d-%H%M%S')}-{result['commit']}"
    for n in range(1000):  # two runs in one second (search workers): never overwrite
        path = ctx.runs_dir / (f"{base}.json" if n == 0 else f"{base}.{n}.json")
        try:
            with open(path, "x") as f:
                f.write(json.dumps(payload, indent=1, default=str))
            return str(path.relative_to(ctx.root))
        except FileExistsError:
            continue
    raise RuntimeError(f"could not find a free run-file name for {base} in {ctx.runs_dir}")


def ledger_row(result, stamp):
    """The results.tsv row for `result`."""
    ci = result.get("decode_tps_ci") or [None, None]
    speedup_ci = result.get("speedup_ci") or [None, None]
    row = {k: result.get(k) for k in ledger.COLUMNS if k in result}
    ratios = result.get("ratios")
    row["ratios"] = json.dumps({k: [round(x, 5) for x in v] for k, v in ratios.items()}) if ratios else None
    row.update(timestamp=stamp.isoformat(timespec="seconds"), decode_tps_lo=ci[0],
               decode_tps_hi=ci[1], speedup_lo=speedup_ci[0], speedup_hi=speedup_ci[1],
               config=json.dumps(result["config"], sort_keys=True) if result.get("config") else None)
    return row
