"""Speed measurement: run the fixed workload through one or more workers, interleaved.

Every figure comes from the parent's clock: a token's time is when its message
arrived here. decode tok/s = (n - 1) / (t_last - t_first); prefill tok/s =
prompt tokens / time to first token.
"""

from dataclasses import asdict, dataclass

from harness import stats
from harness.worker import WorkerInvalid
from harness.workload import build_prompt


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
    call_id: str | None = None  # set when the worker kept this call's log-probs (see run_workload)

    def to_dict(self):
        return asdict(self)


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


def run_workload(workers, preset, tokenizer, corpus_text, *, timeout_s, progress=None):
    """Warm up, then measure every prompt `repeats` times on each worker, interleaved.

    While one worker is timed, every other one is stopped (Worker.pause), so an idle
    worker cannot compete for the CPU or the memory bus; all are running again on return,
    whether it returns or raises.

    The challenger's measured calls keep their log-probs in its worker (call id
    "<prompt>:<repeat>"), so quality can be checked on exactly what was timed.

    Args:
        workers: {name: Worker}; with two, calls alternate A B, B A, ... so drift
            and order effects fall on both alike.
        preset: the workload preset (a settings.Preset).
        progress: optional callable(done, total, label) for a progress bar.

    Returns:
        A list of Samples (warm-up calls are not included).
    """
    names = list(workers)
    specs = preset.prompts
    total = len(specs) * len(names) * (preset.warmup + preset.repeats)
    done = 0

    def call(name, spec, repeat):
        nonlocal done
        prompt = build_prompt(tokenizer, spec, corpus_text)
        for other in names:
            if other != name:
                workers[other].pause()
        workers[name].resume()
        keep = f"{spec.name}:{repeat}" if name == "challenger" and repeat >= 0 else None
        sample = time_call(workers[name], name, prompt, max_tokens=preset.max_tokens,
                           timeout_s=timeout_s, repeat=repeat, keep=keep)
        done += 1
        if progress:
            progress(done, total, f"{name} {spec.name}")
        return sample

    samples = []
    try:
        for _ in range(preset.warmup):
            for spec in specs:
                for name in names:
                    call(name, spec, -1)
        for repeat in range(preset.repeats):
            for i, spec in enumerate(specs):
                order = names if (repeat + i) % 2 == 0 else names[::-1]
                for name in order:
                    samples.append(call(name, spec, repeat))
    finally:
        for worker in workers.values():
            worker.resume()  # a dead one was killed already; resume() is then a no-op
    return samples


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
