"""Measuring one run: the workers (champion, challenger, the yardstick), the speed calls
(a sequential A/B when there are two pipelines), then the challenger's quality pass. Plain
data out: the samples and figures evaluate.py judges."""

import dataclasses
import functools
import os
import random
import secrets
import time
import traceback
from pathlib import Path

from harness import bench, quality, verdict
from harness.ledger import Decision
from harness.report import Progress, note, quoted, stage
from harness.worker import Worker, WorkerCrash, WorkerInvalid

YARDSTICK_PIPELINE = Path(__file__).resolve().parent / "yardstick.py"
STAND_IN = "stand-in"  # the yardstick in the other pipeline's place, in a run of one pipeline
# Rounds, at least, of a run of one pipeline (a BASELINE): its yardstick ratio is the record
# the pipeline is held to as the champion, and a few yardstick calls bound it only loosely.
RECORD_ROUNDS = verdict.YARDSTICK_MIN_CALLS


def measure(ctx, inference_paths, *, reference, tasks, overrides=None, log_dir, ab=None):
    """Speed for every worker (interleaved; a sequential A/B when there are two), then
    quality for the challenger.

    Args:
        inference_paths: {"champion": path, "challenger": path} or just the challenger.
        ab: what the A/B knows before it starts: {"earlier": pooled ratios of earlier runs
            of the same code (ledger.earlier_ratios), "fewer_lines": a "simpler" KEEP is
            possible, "record": the champion's yardstick record} (see SequentialRule).
    Returns:
        {"samples", "workers", "quality", "failure", "speed"}; failure is None or
        {"decision": CRASH|INVALID, "reason", "worker", "log_tail"}; speed is
        {"speed_s", "stopped", "load_avg"}.
    """
    workers, out = {}, {"samples": [], "workers": {}, "quality": None, "failure": None, "log_paths": {}, "speed": {}}
    blame = {"stage": None}  # whose failure a crash now is (None: whichever worker died)
    try:
        start_workers(ctx, inference_paths, overrides, log_dir, workers, out, blame, yardstick=not overrides)
        pipelines = {name: workers[name] for name in inference_paths}
        if "yardstick" in workers and len(pipelines) == 1:
            pipelines[STAND_IN] = workers["yardstick"]  # a run of one pipeline looks like an A/B from inside
        compare = "champion" in pipelines
        stage("speed: " + ("champion and challenger alternating, until the interval decides" if compare
                           else "the pipeline, the yardstick standing in for a second" if STAND_IN in pipelines
                           else "the pipeline alone") + (", the yardstick once a round" if "yardstick" in workers else ""))
        out["speed"]["load_avg"] = round(os.getloadavg()[0], 2)
        rule = SequentialRule(ctx, **(ab or {})) if compare else None
        started = time.perf_counter()
        preset = ctx.preset
        if not compare and "yardstick" in workers:  # its figures become a champion's record: not on 3 calls
            preset = dataclasses.replace(preset, repeats=min(preset.max_repeats, max(preset.repeats, RECORD_ROUNDS)))
        keep_rows = {"challenger": functools.partial(quality.own_rows, folder=log_dir)}
        samples = bench.run_workload(pipelines, preset, ctx.tokenizer, ctx.corpus_text,
                                     timeout_s=ctx.settings.timeouts.call_s, progress=Progress("speed", unit="calls"),
                                     more=rule, yardstick=workers.get("yardstick"), keep_rows=keep_rows)
        out["samples"] = [s for s in samples if s.worker != STAND_IN]
        out["speed"]["speed_s"] = round(time.perf_counter() - started, 1)
        out["speed"]["stopped"] = rule.why_stopped(out["samples"]) if rule else None
        for name in ("yardstick", "champion"):  # free their memory before the quality pass
            if name in workers:
                _close(workers.pop(name), out)
        out["quality"] = quality_pass(ctx, workers, out, reference, tasks, log_dir, blame)
    except (WorkerCrash, WorkerInvalid) as exc:
        who = (getattr(exc, "worker", None) or blame["stage"]
               or next((n for n, w in workers.items() if not w.alive()), "challenger"))
        out["failure"] = {"decision": Decision.CRASH if isinstance(exc, WorkerCrash) else Decision.INVALID,
                          "reason": str(exc), "worker": who, "log_tail": getattr(exc, "log_tail", "")}
    except Exception as exc:  # on figures a pipeline returned: the run still ends with its row
        note(quoted("".join(traceback.format_exception(exc))[-4000:]))
        out["failure"] = {"decision": Decision.CRASH, "worker": "challenger", "log_tail": "",
                          "reason": f"harness error while measuring the run: {type(exc).__name__}: "
                                    f"{str(exc)[:200]} (a harness bug: please report it)"}
    finally:
        for worker in list(workers.values()):
            _close(worker, out)
    return out


class SequentialRule:
    """When a sequential A/B adds another round: until the speedup's confidence sequence
    settles (verdict.settled) or another round (as long as the average one so far) would
    end past the preset's time budget. bench.run_workload calls it with the samples so
    far; it remembers why it said stop."""

    def __init__(self, ctx, earlier=None, fewer_lines=False, record=None):
        self.metric, self.min_effect = ctx.settings.verdict.primary_metric, ctx.settings.verdict.min_effect
        self.budget_s, self.earlier, self.fewer_lines = ctx.preset.budget_s, earlier, fewer_lines
        self.record = record  # the champion's yardstick record (verdict.champion_pace)
        self.started, self.stopped = time.perf_counter(), None

    def settled(self, samples):
        figures = verdict.comparison(samples, self.metric, min_effect=self.min_effect, earlier=self.earlier,
                                     detectable=False)
        factor = verdict.champion_pace(samples, self.record)[2]
        return verdict.settled(figures, min_effect=self.min_effect, fewer_lines=self.fewer_lines, factor=factor)

    def __call__(self, samples):
        elapsed = time.perf_counter() - self.started
        rounds = 1 + max(s.repeat for s in samples)
        if self.settled(samples):
            self.stopped = "decided"
        elif elapsed + elapsed / rounds > self.budget_s:  # another round would overrun the budget
            self.stopped = "budget"
        return self.stopped is None

    def why_stopped(self, samples):
        """decided | budget | max_repeats (all rounds done; decided if the last one settled it)."""
        if self.stopped is None and self.settled(samples):
            self.stopped = "decided"
        return self.stopped or "max_repeats"


def start_workers(ctx, inference_paths, overrides, log_dir, workers, out, blame, *, yardstick):
    """Start and load one worker per inference file (the search's knobs on the challenger)
    and, with `yardstick`, the yardstick's (harness/yardstick.py: stock mlx-lm at the
    model's own dtype), in a random order.

    Nothing a worker can see tells it its role: its log has a random name, the run's folder
    (both inference files, both logs) and the repository are hidden from it, and every run
    looks alike from inside: the workers load in a random order (the time from its load to
    its first call says nothing), and a run of one pipeline has the yardstick stand in for
    the other (bench.run_workload). A champion that slows down all the same, on any cue,
    shows against the yardstick (pace.check_champion_yardstick).
    """
    order = list(inference_paths) + (["yardstick"] if yardstick else [])
    random.shuffle(order)
    stage(f"loading {', '.join(order)}")
    for name in order:
        blame["stage"] = name
        if name == "yardstick":
            workers[name] = Worker(YARDSTICK_PIPELINE, Path(log_dir) / "yardstick.log", role=name,
                                   hide=[log_dir, ctx.root], expose=[ctx.model_dir])
            workers[name].load(ctx.model_dir, timeout_s=ctx.settings.timeouts.load_s)
            continue
        log = Path(log_dir) / f"worker-{secrets.token_hex(4)}.log"
        out["log_paths"][name] = str(log)
        workers[name] = Worker(inference_paths[name], log, role=name, hide=[log_dir, ctx.root],
                               expose=[ctx.model_dir, ctx.draft_dir])
        out["workers"][name] = dict(workers[name].info)
        workers[name].vocab_size = ctx.vocab_size
        workers[name].load(ctx.model_dir, ctx.draft_dir, overrides if name == "challenger" else None,
                           timeout_s=ctx.settings.timeouts.load_s)
        out["workers"][name] = dict(workers[name].info)
    blame["stage"] = None


def quality_pass(ctx, workers, out, reference, tasks, log_dir, blame):
    """The challenger's quality: the corpus through its score(), the tasks; then the
    reference's side, which teacher-forces every timed call (their own log-probs were taken
    right after each, bench.run_workload)."""
    started = time.perf_counter()
    blame["stage"] = "challenger"
    challenger = workers["challenger"]
    mine = [s for s in out["samples"] if s.worker == "challenger"]
    stage("quality: corpus (perplexity, KL, top-1 against the reference)")
    measured = quality.score_corpus(challenger, ctx, reference)
    stage(f"quality: tasks ({len(tasks)})")
    answers = quality.answer_tasks(challenger, ctx, tasks, progress=Progress("quality: tasks"))
    _close(workers.pop("challenger"), out)
    blame["stage"] = "reference"
    stage("quality: the reference reads the timed calls")
    measured.update(quality.measure_timed_calls(ctx, mine, log_dir))
    per_call = [quality.repetition(s.tokens) for s in mine]
    measured.update(repetition=sum(per_call) / len(per_call), repetition_per_call=per_call,
                    sanity=sum(a["passed"] for a in answers) / len(answers), tasks=answers,
                    quality_s=round(time.perf_counter() - started, 1))
    return measured


def _close(worker, out):
    worker.close()
    out["workers"].setdefault(worker.role, {})["max_rss_bytes"] = worker.max_rss_bytes
