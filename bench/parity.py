"""Parity: does the harness's stopwatch cost the pipeline anything?

Measures, side by side and alternately in one run, decode tok/s of
  (a) the baseline inference.py (its own decode loop) in a harness worker, run as a speed
      call: every pair's log-probs read before its token is sent and kept for the quality
      checks, timed by the parent as tokens arrive;
  (b) mlx-lm's own stream_generate in this process, on the same model and settings
      (float32 compute, TEMP/TOP_P as in inference.py, EOS ignored), timed the same way.
Prints the median of the per-pair ratios (a / b); the target is >= 0.97.

    python bench/parity.py [--model smollm2-135m-instruct] [--tokens 64] [--pairs 6]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from mlx_lm import load, stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

import inference  # noqa: E402
from harness.models import resolve_model  # noqa: E402
from harness.settings import ROOT  # noqa: E402
from harness.worker import Worker  # noqa: E402
from harness.workload import chat_tokens  # noqa: E402

PROMPT = "Explain how transformer neural networks work, covering attention, layers and tokens."


def decode_tps(times):
    return (len(times) - 1) / (times[-1] - times[0])


def time_stream_generate(model, tokenizer, prompt, n):
    """mlx-lm's stream_generate, EOS ignored, each token timestamped as it is yielded."""
    sampler = make_sampler(temp=inference.TEMP, top_p=inference.TOP_P, top_k=inference.TOP_K,
                           min_p=inference.MIN_P)
    times, start = [], time.perf_counter()
    for response in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=n, sampler=sampler,
                                    prefill_step_size=inference.PREFILL_STEP_SIZE):
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    model, tokenizer = load(str(model_dir))
    dtype = getattr(mx, inference.COMPUTE_DTYPE)
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    tokenizer.eos_token_ids = set()  # speed calls ignore EOS: stream_generate must not stop early
    prompt = chat_tokens(tokenizer, PROMPT)

    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(ROOT / "inference.py", Path(tmp) / "worker.log", expose=[model_dir])
        worker.load(model_dir, timeout_s=600)
        harness_tps, mlx_tps = [], []
        try:
            for i in range(args.pairs + 1):  # the first pair warms both up and is dropped
                order = ("harness", "mlx") if i % 2 == 0 else ("mlx", "harness")
                for who in order:
                    if who == "harness":
                        out = worker.generate(prompt, max_tokens=args.tokens, stop_at_eos=False,
                                              timeout_s=600, keep=i)
                        assert len(out["tokens"]) == args.tokens
                        kept = worker.timed_logprobs([i], timeout_s=600)[i]  # untimed, as in a run
                        assert kept.shape[0] == args.tokens, kept.shape
                        tps = decode_tps(out["times"])
                        if i:
                            harness_tps.append(tps)
                    else:
                        times = time_stream_generate(model, tokenizer, prompt, args.tokens)
                        assert len(times) == args.tokens, len(times)
                        tps = decode_tps(times)
                        if i:
                            mlx_tps.append(tps)
                    print(f"pair {i} {who:8s} {tps:8.2f} tok/s", file=sys.stderr, flush=True)
        finally:
            worker.close()
    ratios = [h / m for h, m in zip(harness_tps, mlx_tps)]
    print(f"model: {args.model}")
    print(f"tokens_per_call: {args.tokens}")
    print(f"pairs: {len(ratios)}")
    print(f"harness_decode_tps_median: {statistics.median(harness_tps):.3f}")
    print(f"stream_generate_decode_tps_median: {statistics.median(mlx_tps):.3f}")
    print(f"parity_ratio_median: {statistics.median(ratios):.4f}")
    print(f"parity_ratios: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
