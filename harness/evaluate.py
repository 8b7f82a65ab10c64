"""One evaluation, end to end: settings -> model -> workers -> samples -> statistics
-> decision -> run file + ledger row. Each step is a plain function; prepare.py wires them."""

import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import bench, gitops, ledger, settings as settings_mod
from harness.corpus import load_corpus
from harness.environment import environment
from harness.models import resolve_model
from harness.report import Progress, note
from harness.worker import Worker, WorkerCrash, WorkerInvalid

ROOT = settings_mod.ROOT
GOOD_DECISIONS = ("BASELINE", "MEASURED", "KEEP")


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
    root: Path = ROOT
    extra: dict = field(default_factory=dict)

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
    """Resolve the model and the locked data. Raises ModelError/SettingsError on bad input."""
    from mlx_lm.utils import load_tokenizer

    name = model or settings["model"]
    model_dir = resolve_model(name)
    draft = settings.get("draft_model")
    draft_dir = resolve_model(draft) if draft else None
    corpus_text, corpus_sha = load_corpus()
    protocol = settings_mod.protocol_hash(settings, quick, name,
                                          {"corpus": corpus_sha, "draft": draft})
    return Context(settings=settings, quick=quick, model=name, model_dir=model_dir,
                   draft_dir=draft_dir, tokenizer=load_tokenizer(model_dir),
                   corpus_text=corpus_text, corpus_sha256=corpus_sha, protocol=protocol, root=root)


def start_worker(ctx, name, inference_path, log_dir, overrides=None):
    """Start a worker for `inference_path` and load the model into it."""
    worker = Worker(inference_path, Path(log_dir) / f"{name}.log")
    worker.load(ctx.model_dir, ctx.draft_dir, overrides, timeout_s=ctx.settings["timeouts"]["load_s"])
    return worker


def measure_speed(ctx, inference_paths, *, overrides=None, log_dir):
    """Run the speed workload on one worker per inference.py, interleaved.

    Returns {"samples": [...], "workers": {name: info}, "failure": None or a dict
    with decision (CRASH/INVALID), reason, worker and log_tail}.
    """
    workers, out = {}, {"samples": [], "workers": {}, "failure": None}
    progress = Progress("measuring")
    current = None
    try:
        for name, path in inference_paths.items():
            current = name
            workers[name] = start_worker(ctx, name, path, log_dir, overrides)
            out["workers"][name] = dict(workers[name].info)
        current = None
        samples = bench.run_workload(workers, ctx.preset, ctx.tokenizer, ctx.corpus_text,
                                     timeout_s=ctx.settings["timeouts"]["call_s"],
                                     progress=progress)
        out["samples"] = samples
    except (WorkerCrash, WorkerInvalid) as exc:
        who = current or _failing_worker(workers)
        out["failure"] = {"decision": "CRASH" if isinstance(exc, WorkerCrash) else "INVALID",
                          "reason": str(exc), "worker": who,
                          "log_tail": getattr(exc, "log_tail", "")}
    finally:
        for name, worker in workers.items():
            worker.close()
            out["workers"].setdefault(name, {})["max_rss_bytes"] = worker.max_rss_bytes
    return out


def _failing_worker(workers):
    dead = [name for name, w in workers.items() if not w.alive()]
    return dead[0] if dead else None


def prior_good_rows(ctx):
    """Earlier BASELINE/MEASURED/KEEP rows of this protocol on the current branch's history."""
    rows, problems = ledger.read(ctx.ledger_path)
    for problem in problems:
        note(f"warning: {problem}")
    history = set(gitops.ancestry(ctx.root))
    return [r for r in rows if r["protocol"] == ctx.protocol and r["decision"] in GOOD_DECISIONS
            and r["commit"] in history and r["dirty"] != "true"]


def evaluate(ctx, *, inference_path=None, overrides=None, source="agent"):
    """Evaluate inference.py (or `inference_path`) under `ctx`; returns the result dict.

    The run file and the ledger row are written before this returns.
    """
    started = time.perf_counter()
    git_state = gitops.state(ctx.root)
    inference_path = Path(inference_path or ctx.root / "inference.py")
    result = {
        "decision": None, "reason": "", "commit": git_state["commit"],
        "subject": git_state["subject"], "branch": git_state["branch"],
        "dirty": git_state["dirty"], "model": ctx.model, "protocol": ctx.protocol,
        "preset": ctx.preset["name"], "source": source, "config": overrides or None,
    }
    stamp = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        speed = measure_speed(ctx, {"challenger": inference_path}, overrides=overrides, log_dir=tmp)
        logs = {p.stem: p.read_text(errors="replace")[-20000:] for p in Path(tmp).glob("*.log")}

    samples = speed["samples"]
    if speed["failure"]:
        failure = speed["failure"]
        result.update(decision=failure["decision"], reason=failure["reason"])
        if failure["log_tail"]:
            note(f"last lines of the {failure['worker']} worker's output:\n{failure['log_tail']}")
    else:
        summary = bench.summarize(samples)
        result.update({k: v for k, v in summary.items() if k != "samples"})
        rss = speed["workers"]["challenger"].get("max_rss_bytes")
        result["max_rss_gb"] = rss / 1e9 if rss else None
        if overrides:
            result.update(decision="MEASURED", reason="search trial: knobs overridden in the worker")
        elif result["dirty"]:
            result.update(decision="MEASURED", reason="inference.py has uncommitted changes: "
                          "commit it for a run that can become the baseline")
        elif prior_good_rows(ctx):
            result.update(decision="MEASURED", reason="measured; verdicts against a champion come with KEEP/REVERT")
        else:
            result.update(decision="BASELINE", reason="first good run of this protocol on this branch")
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["run_file"] = write_run_file(ctx, result, stamp, samples, speed["workers"], logs)
    ledger.append(ctx.ledger_path, ledger_row(result, stamp))
    return result


def write_run_file(ctx, result, stamp, samples, workers, logs):
    """Write every raw sample, the settings and the environment to runs/<time>-<commit>.json."""
    ctx.runs_dir.mkdir(exist_ok=True)
    path = ctx.runs_dir / f"{stamp.strftime('%Y%m%d-%H%M%S')}-{result['commit']}.json"
    n = 1
    while path.exists():  # two runs in one second: never overwrite
        path = path.with_name(f"{path.stem.split('.')[0]}.{n}.json")
        n += 1
    payload = {
        "result": result, "timestamp": stamp.isoformat(timespec="seconds"),
        "settings": ctx.settings, "settings_hash": settings_mod.digest(ctx.settings),
        "corpus_sha256": ctx.corpus_sha256, "model_dir": str(ctx.model_dir),
        "environment": environment(), "workers": workers,
        "samples": [s.to_dict() for s in samples], "worker_logs": logs,
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    return str(path.relative_to(ctx.root))


def ledger_row(result, stamp):
    """The results.tsv row for `result`."""
    ci = result.get("decode_tps_ci") or [None, None]
    speedup_ci = result.get("speedup_ci") or [None, None]
    row = {k: result.get(k) for k in ledger.COLUMNS if k in result}
    row.update(timestamp=stamp.isoformat(timespec="seconds"), decode_tps_lo=ci[0],
               decode_tps_hi=ci[1], speedup_lo=speedup_ci[0], speedup_hi=speedup_ci[1],
               config=json.dumps(result["config"], sort_keys=True) if result.get("config") else None)
    return row
