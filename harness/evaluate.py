"""One evaluation, end to end: settings -> model -> locked files -> change monitor ->
workers (champion, challenger) -> samples -> statistics + quality -> verdict ->
run file + ledger row. Each step is a plain function; prepare.py wires them."""

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness import bench, gitops, history, ledger, monitor, quality, stats
from harness import settings as settings_mod
from harness.corpus import load_corpus
from harness.environment import environment
from harness.models import resolve_model
from harness.report import Progress, note
from harness.tasks import load_tasks
from harness.worker import Worker, WorkerCrash, WorkerInvalid

ROOT = settings_mod.ROOT


@dataclass
class Context:
    """Everything fixed for one run, resolved before any worker starts."""
    settings: dict
    quick: bool
    model: str
    model_dir: Path
    draft_dir: Path | None
    tokenizer: object
    corpus_text: str
    corpus_sha256: str
    protocol: str
    vocab_size: int | None = None
    root: Path = ROOT

    @property
    def preset(self):
        return settings_mod.preset(self.settings, self.quick)

    @property
    def ledger_path(self):
        return self.root / "results.tsv"

    @property
    def runs_dir(self):
        return self.root / "runs"


def make_context(settings, *, quick, model=None, root=ROOT):
    """Check the settings, resolve the model and the locked data.

    Raises ModelError/SettingsError on bad input.
    """
    from mlx_lm.utils import load_tokenizer

    quality.check_settings(settings)
    verdict = settings.get("verdict")
    if not isinstance(verdict, dict) or verdict.get("primary_metric") not in ("decode_tps", "prefill_tps") \
            or not isinstance(verdict.get("min_effect"), (int, float)) or verdict["min_effect"] < 0:
        raise settings_mod.SettingsError("harness.yaml: 'verdict' needs primary_metric "
                                         "(decode_tps or prefill_tps) and min_effect (>= 0)")
    name = model or settings["model"]
    model_dir = resolve_model(name)
    draft = settings.get("draft_model")
    draft_dir = resolve_model(draft) if draft else None
    corpus_text, corpus_sha = load_corpus()
    tasks_sha = settings_mod.digest([(t.id, t.prompt, t.params) for t in load_tasks()])
    protocol = settings_mod.protocol_hash(settings, quick, name,
                                          {"corpus": corpus_sha, "tasks": tasks_sha, "draft": draft})
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return Context(settings=settings, quick=quick, model=name, model_dir=model_dir,
                   draft_dir=draft_dir, tokenizer=load_tokenizer(model_dir),
                   corpus_text=corpus_text, corpus_sha256=corpus_sha, protocol=protocol,
                   vocab_size=vocab_size, root=root)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
def measure(ctx, inference_paths, *, reference, tasks, overrides=None, log_dir):
    """Speed for every worker (interleaved), then quality for the challenger.

    Args:
        inference_paths: {"champion": path, "challenger": path} or just the challenger.
    Returns:
        {"samples", "workers", "quality", "failure"}; failure is None or
        {"decision": CRASH|INVALID, "reason", "worker", "log_tail"}.
    """
    timeouts = ctx.settings["timeouts"]
    workers, out = {}, {"samples": [], "workers": {}, "quality": None, "failure": None}
    stage = None
    try:
        for name, path in inference_paths.items():
            stage = name
            workers[name] = Worker(path, Path(log_dir) / f"{name}.log")
            workers[name].vocab_size = ctx.vocab_size
            workers[name].load(ctx.model_dir, ctx.draft_dir, overrides if name == "challenger" else None,
                               timeout_s=timeouts["load_s"])
            out["workers"][name] = dict(workers[name].info)
        stage = None
        out["samples"] = bench.run_workload(workers, ctx.preset, ctx.tokenizer, ctx.corpus_text,
                                            timeout_s=timeouts["call_s"], progress=Progress("speed"))
        if "champion" in workers:
            _close(workers.pop("champion"), out)  # free its memory before the quality pass
        stage = "challenger"
        quality_started = time.perf_counter()
        challenger = workers["challenger"]
        measured = quality.score_corpus(challenger, ctx, reference)
        answers = quality.answer_tasks(challenger, ctx, tasks, progress=Progress("tasks"))
        _close(workers.pop("challenger"), out)
        stage = "reference"
        mine = [s for s in out["samples"] if s.worker == "challenger"]
        measured.update(quality.verify_continuations(ctx, mine, log_dir))
        measured["repetition"] = sum(quality.repetition(s.tokens) for s in mine) / len(mine)
        measured["sanity"] = sum(a["passed"] for a in answers) / len(answers)
        measured["tasks"] = answers
        measured["quality_s"] = round(time.perf_counter() - quality_started, 1)
        out["quality"] = measured
    except (WorkerCrash, WorkerInvalid) as exc:
        who = stage or next((n for n, w in workers.items() if not w.alive()), "challenger")
        out["failure"] = {"decision": "CRASH" if isinstance(exc, WorkerCrash) else "INVALID",
                          "reason": str(exc), "worker": who, "log_tail": getattr(exc, "log_tail", "")}
    finally:
        for worker in list(workers.values()):
            _close(worker, out)
    return out


def _close(worker, out):
    worker.close()
    name = Path(worker.log_path).stem
    out["workers"].setdefault(name, {})["max_rss_bytes"] = worker.max_rss_bytes


def paired_ratios(samples, metric):
    """Challenger / champion ratios of `metric`, one per (repeat, prompt) pair.

    For prefill_tps only prefill-kind prompts count (all, if the workload has none).
    """
    by_key = {}
    for s in samples:
        if s.repeat >= 0:
            by_key.setdefault((s.repeat, s.prompt), {})[s.worker] = s
    pairs = [p for p in by_key.values() if "champion" in p and "challenger" in p]
    if metric == "prefill_tps":
        pairs = [p for p in pairs if p["challenger"].kind == "prefill"] or pairs
    if metric == "end_to_end":  # champion time / challenger time on decode-heavy prompts
        pairs = [p for p in pairs if p["challenger"].kind == "decode"] or pairs
        return [p["champion"].total_s / p["challenger"].total_s for p in pairs]
    if metric == "ttft_share":  # how much more of each call is spent before the first token
        return [(p["challenger"].ttft_s / p["challenger"].total_s) / (p["champion"].ttft_s / p["champion"].total_s)
                for p in pairs]
    return [getattr(p["challenger"], metric) / getattr(p["champion"], metric) for p in pairs]


def _pct(x):
    return f"{(x - 1) * 100:+.1f} %"


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def evaluate(ctx, *, inference_path=None, overrides=None, source="agent", apply=False):
    """Evaluate inference.py (or `inference_path`) under `ctx` and decide.

    Search trials (`overrides` set) are measured alone and logged as MEASURED.
    The run file and the ledger row are written before this returns.
    """
    started = time.perf_counter()
    stamp = datetime.now(timezone.utc)
    git_state = gitops.state(ctx.root)
    inference_path = Path(inference_path or ctx.root / "inference.py")
    result = {
        "decision": None, "reason": "", "commit": git_state["commit"],
        "subject": git_state["subject"], "branch": git_state["branch"],
        "dirty": git_state["dirty"], "model": ctx.model, "protocol": ctx.protocol,
        "preset": ctx.preset["name"], "source": source, "config": overrides or None,
    }
    rows, problems = ledger.read(ctx.ledger_path)
    for problem in problems:
        note(f"warning: {problem}")
    ancestry = gitops.ancestry(ctx.root)
    baseline = _branch_baseline(rows, ancestry, git_state["branch"])
    # Everything is per branch: a new branch starts with its own BASELINE, whose commit
    # then locks every file but inference.py for the rest of the branch.
    champion = history.champion_row(rows, ancestry, protocol=ctx.protocol, branch=git_state["branch"])
    result["champion"] = champion["commit"] if champion else None

    # Locked files: anything but inference.py that differs from this branch's baseline.
    locked = gitops.changed_locked_files(ctx.root, baseline["commit"]) if baseline else []
    source_now = inference_path.read_text(errors="replace")
    result["changes"], changes = _change_monitor(ctx, baseline, champion, source_now)
    samples, workers, logs, measured = [], {}, {}, None

    if locked:
        result.update(decision="REJECT", reason=f"locked files changed since the baseline "
                      f"{baseline['commit']}: {', '.join(locked)} (only inference.py may change)")
    else:
        paths = {"challenger": inference_path}
        compare = champion and not overrides and (git_state["dirty"] or champion["commit"] != git_state["commit"])
        tasks = quality.selected_tasks(ctx.settings, ctx.quick)
        with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
            reference = quality.load_reference(ctx, tasks, tmp)
            if compare:
                champion_file = Path(tmp) / "champion" / "inference.py"
                champion_file.parent.mkdir()
                champion_file.write_text(gitops.file_at(ctx.root, champion["commit"], "inference.py"))
                paths = {"champion": champion_file, "challenger": inference_path}
            out = measure(ctx, paths, reference=reference, tasks=tasks, overrides=overrides, log_dir=tmp)
            logs = {p.stem: p.read_text(errors="replace")[-20000:] for p in Path(tmp).glob("*.log")}
        samples, workers, measured = out["samples"], out["workers"], out["quality"]
        if out["failure"]:
            failure = out["failure"]
            who = "" if failure["worker"] == "challenger" else f"{failure['worker']}: "
            result.update(decision=failure["decision"], reason=who + failure["reason"])
            if failure["log_tail"]:
                note(f"last lines of the {failure['worker']} worker's output:\n{failure['log_tail']}")
        else:
            _figures(ctx, result, samples, workers, measured, reference)
            vs_champion = changes["vs_champion"]
            result["lines_vs_champion"] = vs_champion["lines"]["delta"] if vs_champion else None
            _decide(ctx, result, git_state, champion, overrides)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["run_file"] = write_run_file(ctx, result, stamp, samples, workers, logs, measured, changes)
    ledger.append(ctx.ledger_path, ledger_row(result, stamp))
    if apply:
        result["applied"] = apply_verdict(ctx, result, rows, ancestry)
    return result


def _branch_baseline(rows, ancestry, branch):
    """This branch's BASELINE row (newest), whatever its protocol: the reference for locked files."""
    history_set = set(ancestry)
    for row in reversed(rows):
        if row["decision"] == "BASELINE" and row["commit"] in history_set and row["branch"] == branch:
            return row
    return None


def _change_monitor(ctx, baseline, champion, source_now):
    """Print the change monitor (stderr) and return (one-line summary, full data)."""
    def source_at(row):
        try:
            return gitops.file_at(ctx.root, row["commit"], "inference.py") if row else None
        except Exception:  # the commit may be gone (e.g. garbage-collected): compare with nothing
            return None

    base_src, champ_src = source_at(baseline), source_at(champion)
    vs_baseline = monitor.compare(base_src or source_now, source_now)
    vs_champion = monitor.compare(champ_src, source_now) if champ_src else None
    note(monitor.format_report(vs_baseline, vs_champion if champ_src != base_src else None))
    return vs_baseline["summary"], {"vs_baseline": vs_baseline, "vs_champion": vs_champion}


def _figures(ctx, result, samples, workers, measured, reference):
    """Fill speed, ratio and quality figures into `result`."""
    mine = [s for s in samples if s.worker == "challenger"]
    result.update({k: v for k, v in bench.summarize(mine).items() if k != "samples"})
    rss = workers.get("challenger", {}).get("max_rss_bytes")
    result["max_rss_gb"] = rss / 1e9 if rss else None
    result["bytes_per_token"] = bytes_per_token(ctx, workers.get("challenger", {}), mine)
    bandwidth = _bandwidth_gbs()
    if result["bytes_per_token"] and bandwidth:
        result["roofline_fraction"] = result["decode_tps"] * result["bytes_per_token"] / (bandwidth * 1e9)
    theirs = [s for s in samples if s.worker == "champion"]
    if theirs:
        metric = ctx.settings["verdict"]["primary_metric"]
        result["speedup"], low, high = stats.conservative_median_ci(paired_ratios(samples, metric))
        result["speedup_ci"] = [low, high]
        result["prefill_ratio"] = stats.median_ci(paired_ratios(samples, "prefill_tps"))[0]
        result["end_to_end_ratio"] = stats.median_ci(paired_ratios(samples, "end_to_end"))[0]
        result["ttft_share_ratio"] = stats.median_ci(paired_ratios(samples, "ttft_share"))[0]
        champ_peak = bench.summarize(theirs)["peak_memory_gb"]
        if champ_peak and result.get("peak_memory_gb"):
            result["memory_ratio"] = result["peak_memory_gb"] / champ_peak
    gate_list = quality.gates(ctx.settings, measured, reference)
    score = quality.quality_score(measured["kl_mean"])
    result.update({
        "perplexity": measured["perplexity"], "perplexity_se": measured["perplexity_se"],
        "kl_mean": measured["kl_mean"], "kl_p99": measured["kl_p99"],
        "top1_agreement": measured["top1_agreement"], "sanity": measured["sanity"],
        "reference_sanity": reference["sanity"],
        "continuation_nll": measured["continuation_nll"], "repetition": measured["repetition"],
        "quality_score": score, "quality_adjusted_tps": (result["decode_tps"] or 0) * score,
        "quality_pass": all(g["passed"] for g in gate_list), "gates": gate_list,
        "quality_s": measured["quality_s"],
    })


def bytes_per_token(ctx, info, samples):
    """Bytes read per decoded token: every weight once, plus the KV cache at the calls'
    mean context length (keys and values, all layers, in the activations' dtype)."""
    if not info.get("weight_bytes"):
        return None
    config = json.loads((Path(ctx.model_dir) / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    heads = config.get("num_attention_heads")
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if not (heads and layers and hidden) or not samples:
        return info["weight_bytes"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    per_position = 2 * layers * kv_heads * head_dim * info.get("float_itemsize", 4)
    context = sum(s.prompt_tokens + s.n_tokens / 2 for s in samples) / len(samples)
    return int(info["weight_bytes"] + per_position * context)


def _bandwidth_gbs():
    """Measured memory bandwidth from the hardware profile (cached; measured once per machine)."""
    from harness.profile import load_profile

    try:
        return load_profile().get("bandwidth_gbs")
    except Exception as exc:  # the roofline is a hint: never let it sink a run
        note(f"warning: no bandwidth figure for the roofline ({exc})")
        return None


def _decide(ctx, result, git_state, champion, overrides):
    """Set decision and reason for a run that measured cleanly."""
    gate_reason = quality.failed_gate_reason(result["gates"])
    speed = ""
    if result.get("speedup") is not None:
        low, high = result["speedup_ci"]
        speed = f"{_pct(result['speedup'])} [{_pct(low)}, {_pct(high)}]"
    if overrides:
        result.update(decision="MEASURED", reason="search trial: " + (gate_reason or "quality gates pass"))
    elif git_state["dirty"]:
        result.update(decision="MEASURED", reason="inference.py has uncommitted changes: commit it for a verdict"
                      + (f" (speedup {speed})" if speed else "") + (f"; {gate_reason}" if gate_reason else ""))
    elif gate_reason:
        result.update(decision="REVERT" if champion else "MEASURED",
                      reason=gate_reason + ("" if champion else " (not a baseline: fix inference.py)"))
    elif champion is None:
        result.update(decision="BASELINE", reason="first good run of this protocol on this branch")
    elif result.get("speedup") is None:
        result.update(decision="MEASURED", reason="HEAD is the champion itself: commit a change to compare")
    else:
        need = 1 + ctx.settings["verdict"]["min_effect"]
        low = result["speedup_ci"][0]
        if low > need and result["end_to_end_ratio"] < 1 and result["ttft_share_ratio"] > 2:
            # Real decode gains shorten whole calls too; a pipeline that holds tokens
            # back and releases them in a burst only looks fast between first and last.
            result.update(decision="REVERT", reason=f"decode looks {speed} faster but whole calls are "
                          f"slower ({_pct(result['end_to_end_ratio'])}): tokens seem to be held back")
        elif low > need:
            result.update(decision="KEEP", reason=f"faster: {speed} beats the noise (needs > {_pct(need)})")
        elif (result["lines_vs_champion"] or 0) < 0 and result["speedup_ci"][1] > 1 \
                and result["speedup"] >= 1 - ctx.settings["verdict"]["min_effect"]:
            # Simplicity wins: fewer lines at a speed the noise can't tell from the champion's.
            result.update(decision="KEEP", reason=f"simpler: {result['lines_vs_champion']} lines "
                          f"at equal speed ({speed})")
        elif result["speedup"] < 1 and result["speedup_ci"][1] < 1:
            result.update(decision="REVERT", reason=f"slower: {speed}")
        else:
            result.update(decision="REVERT", reason=f"within noise: {speed} (needs > {_pct(need)})")


def apply_verdict(ctx, result, rows, ancestry):
    """--apply: after REVERT/CRASH/INVALID/REJECT, reset the branch to the champion.

    Only on a clean tree whose HEAD is the commit just measured. Returns a one-line
    account of what happened (also printed on stderr).
    """
    def say(text):
        note(text)
        return text

    if result["decision"] not in ("REVERT", "CRASH", "INVALID", "REJECT"):
        return say(f"--apply: nothing to do after {result['decision']}")
    champion = history.champion_row(rows, ancestry, protocol=ctx.protocol, branch=result["branch"]) \
        or history.champion_row(rows, ancestry, branch=result["branch"])
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
def write_run_file(ctx, result, stamp, samples, workers, logs, measured, changes):
    """Write every raw sample, the settings and the environment to runs/<time>-<commit>.json."""
    ctx.runs_dir.mkdir(exist_ok=True)
    payload = {
        "result": result, "timestamp": stamp.isoformat(timespec="seconds"),
        "settings": ctx.settings, "settings_hash": settings_mod.digest(ctx.settings),
        "corpus_sha256": ctx.corpus_sha256, "model_dir": str(ctx.model_dir),
        "environment": environment(), "workers": workers, "changes": changes,
        "quality": measured, "samples": [s.to_dict() for s in samples], "worker_logs": logs,
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
    row.update(timestamp=stamp.isoformat(timespec="seconds"), decode_tps_lo=ci[0],
               decode_tps_hi=ci[1], speedup_lo=speedup_ci[0], speedup_hi=speedup_ci[1],
               config=json.dumps(result["config"], sort_keys=True) if result.get("config") else None)
    return row
