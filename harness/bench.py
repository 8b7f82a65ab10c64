"""Speed measurement: run the fixed workload through one or more workers, interleaved.

Every figure comes from the parent's clock: a token's time is when its message
arrived here. decode tok/s = (n - 1) / (t_last - t_first); prefill tok/s =
prompt tokens / time to first token.
"""

import random
import secrets
from dataclasses import dataclass, field, fields

from harness import stats
from harness.worker import WorkerInvalid
from harness.workload import build_prompt

YARDSTICK = "yardstick"  # the name of the yardstick's Samples


@dataclass
class Sample:
    """One measured speed call."""
    worker: str
    prompt: str
    kind: str
    repeat: int
    nonce: str
    prompt_tokens: int
    n_tokens: int
    ttft_s: float
    total_s: float       # request sent -> last token arrived
    decode_s: float
    decode_tps: float
    prefill_tps: float
    peak_memory_bytes: int
    prompt_ids: list
    tokens: list
    call_id: str | None = None  # the id the worker kept this call's log-probs under (see run_workload)
    own: dict | None = field(default=None, repr=False)  # what `keep_rows` made of them (not in to_dict)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "own"}


def time_call(worker, name, prompt, *, max_tokens, timeout_s, repeat=-1, keep=None):
    """One speed call: exactly `max_tokens` tokens, EOS ignored. Returns a Sample.

    `keep` (a call id) has the worker keep the call's log-probs for the quality check.
    Raises WorkerInvalid when the pipeline yields the wrong number of tokens or
    hands them over all at once (the stopwatch would then time nothing).
    """
    result = worker.generate(prompt.tokens, max_tokens=max_tokens, stop_at_eos=False,
                             timeout_s=timeout_s, keep=keep)
    tokens, times = result["tokens"], result["times"]
    if len(tokens) != max_tokens:
        more_or_fewer = "more" if len(tokens) > max_tokens else f"only {len(tokens)}"
        raise WorkerInvalid(f"generate() yielded {more_or_fewer} tokens for prompt "
                            f"'{prompt.name}', expected exactly {max_tokens} (speed calls ignore EOS)")
    decode_s = times[-1] - times[0]
    if decode_s <= 0:
        raise WorkerInvalid("generate() handed over all its tokens at once: yield each token "
                            "as soon as it is produced")
    return Sample(
        worker=name, prompt=prompt.name, kind=prompt.kind, repeat=repeat, nonce=prompt.nonce,
        prompt_tokens=len(prompt.tokens), n_tokens=len(tokens), ttft_s=times[0],
        total_s=times[-1], decode_s=decode_s, decode_tps=(len(tokens) - 1) / decode_s,
        prefill_tps=len(prompt.tokens) / times[0], peak_memory_bytes=result["peak_memory_bytes"],
        prompt_ids=prompt.tokens, tokens=tokens, call_id=keep)


def run_workload(workers, preset, tokenizer, corpus_text, *, timeout_s, progress=None, more=None, yardstick=None,
                 keep_rows=None):
    """Warm up, then measure every prompt on each worker in rounds, interleaved.

    While one worker is timed, every other one is stopped (Worker.pause), so an idle one
    cannot compete for the CPU or the memory bus; all run again on return or raise.

    No request tells a worker its role or whether the call counts: every call, warm-ups
    included, keeps its log-probs under a fresh random id (Sample.call_id), and who goes
    first is drawn at random. Right after each measured call, untimed, the parent takes
    its rows from every worker alike (checked against the digests sent with its tokens)
    and hands the rows of a worker named in `keep_rows` to keep_rows[name](rows, tokens),
    whose result becomes Sample.own: every timed call is quality-checked, none is left to
    chance. A warm-up's rows are released.

    Args:
        workers: {name: Worker}; with two, calls alternate A B, B A, ... so drift
            and order effects fall on both alike.
        preset: a settings.Preset: `repeats` rounds, then one more at a time while
            `more(samples so far)` says so, up to `max_repeats` (more=None: `repeats` only).
        progress: optional callable(done, total, label) for a progress bar.
        yardstick: optional Worker of harness/yardstick.py: one call a round on the first
            prompt, after its other calls (Samples of worker "yardstick": verdict.yardstick_ratio).
        keep_rows: optional {worker name: callable(rows, tokens)} -> what to keep of its
            measured calls' log-prob rows (quality.own_rows); other workers' are dropped.
    Returns:
        A list of Samples (warm-up calls are not included).
    """
    names, flip = list(workers), secrets.randbelow(2)
    everyone = {**workers, **({YARDSTICK: yardstick} if yardstick else {})}
    most = preset.max_repeats if more else preset.repeats
    warm_up = [_round_calls(names, preset.prompts, None, yardstick) for _ in range(preset.warmup)]
    total, done = sum(map(len, warm_up)) + most * len(_round_calls(names, preset.prompts, 0, yardstick)), 0

    def call(name, spec, repeat):
        nonlocal done
        prompt = build_prompt(tokenizer, spec, corpus_text)
        for other in everyone.values():
            if other is not everyone[name]:
                other.pause()
        everyone[name].resume()
        keep = secrets.token_hex(8) if name in workers else None  # the yardstick keeps nothing
        sample = time_call(everyone[name], name, prompt, max_tokens=preset.max_tokens,
                           timeout_s=timeout_s, repeat=repeat, keep=keep)
        if keep:  # both workers alike: no request differs by role
            _settle_rows(everyone[name], name, sample, keep_rows or {}, timeout_s)
        done += 1
        if progress:
            progress(done, total, ("warm-up" if repeat < 0 else f"round {repeat + 1}") + f": {name} {spec.name}")
        return sample

    samples = []
    try:
        for name, spec in (c for calls in warm_up for c in calls):
            call(name, spec, -1)
        for repeat in range(most):
            if repeat >= preset.repeats and not more(samples):
                break
            samples += [call(name, spec, repeat)
                        for name, spec in _round_calls(names, preset.prompts, repeat + flip, yardstick)]
    finally:
        for worker in everyone.values():
            worker.resume()  # a dead one was killed already; resume() is then a no-op
    return samples


def _settle_rows(worker, name, sample, keep_rows, timeout_s):
    """After a call: a warm-up's kept rows are released; a measured call's are taken now,
    untimed (checked against its digests), and handed to keep_rows[name] when it is named."""
    if sample.repeat < 0:
        worker.release([sample.call_id])
        return
    rows = worker.timed_logprobs([sample.call_id], timeout_s=timeout_s)[sample.call_id]
    if name in keep_rows:
        sample.own = keep_rows[name](rows, sample.tokens)


def _round_calls(names, specs, parity, yardstick):
    """One round's calls in order, as (name, spec): each prompt on every worker, in an order
    that alternates with `parity` from prompt to prompt (None: drawn at random), and the
    yardstick's after the first prompt's."""
    calls = []
    for i, spec in enumerate(specs):
        if parity is None:
            order = random.sample(names, len(names))
        else:
            order = names if (parity + i) % 2 == 0 else names[::-1]
        calls += [(name, spec) for name in order]
        if yardstick and i == 0:
            calls.append((YARDSTICK, spec))
    return calls


def speed_figures(samples):
    """Medians with 95% bootstrap intervals for one worker's samples."""
    decode = stats.median_ci([s.decode_tps for s in samples])
    prefill_samples = [s for s in samples if s.kind == "prefill"] or samples
    prefill = stats.median_ci([s.prefill_tps for s in prefill_samples])
    ttft = stats.median_ci([s.ttft_s for s in samples])
    peaks = [s.peak_memory_bytes for s in samples if s.peak_memory_bytes is not None]
    return {
        "decode_tps": decode[0], "decode_tps_ci": [decode[1], decode[2]],
        "prefill_tps": prefill[0], "prefill_tps_ci": [prefill[1], prefill[2]],
        "ttft_s": ttft[0], "ttft_s_ci": [ttft[1], ttft[2]],
        "peak_memory_gb": max(peaks) / 1e9 if peaks else None,
        "samples": len(samples),
    }
