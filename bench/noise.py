"""Noise: how often does the verdict KEEP a change that is not faster, and how often
does it miss one that is?

On a tiny random-weight model, in a real git copy of the project:
  * null: a challenger that differs from the champion only by a comment, N runs;
  * real: a champion that sleeps a little per token, M runs, against a challenger
    without the sleep.
The champion sleeps a fraction of the time its last token took, so the sleep follows the
machine's speed. The decode loop computes the next token while the loop sleeps, so how much slower
that makes the champion is measured, not assumed: the bench prints the median ratio over
all pairs of all real trials, the challenger's true speedup, which must be at least
1.111 (10 % less time per token) for the real trials to count. Measured here: a sleep of
1/9 of a token's time (1.111 if nothing overlapped) gave 1.094, and 0.15 gave 1.133.
Each run is a normal `python prepare.py`; the branch is reset to the champion (the
baseline commit) after every run. Targets: null <= 1 of 20 KEEPs, real >= 9 of 10.

    python bench/noise.py [--null-runs 20] [--real-runs 10] [--sleep-fraction 0.15] [--save pairs.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from conftest import git, make_project  # noqa: E402  (the test suite's project builder)
from harness.bench import Sample  # noqa: E402
from harness.verdict import paired_ratios  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

TOKEN_LOOP = "        for token, logprobs in steps:\n            yield token, logprobs\n"
SLEEPY_LOOP = """        import time
        last = time.perf_counter()
        for token, logprobs in steps:
            time.sleep((time.perf_counter() - last) * SLEEP_FRACTION)
            last = time.perf_counter()
            yield token, logprobs
"""
TARGET_SPEEDUP = 1.111  # the real challenger must be at least this much faster (10 % less time)


def trial(project, base, label, i):
    """Reset to `base` (the champion), commit trial i's challenger, evaluate it.

    The challenger is a comment (null) or the champion without its sleep (real); both
    keep the line count, so only speed can earn a KEEP (not "simpler").
    Returns (result, the decode tok/s ratio of every pair).
    """
    git(project.root, "reset", "-q", "--hard", base)
    if label == "null":
        project.edit_inference("TOP_K = 0 ", f"TOP_K = 0  # trial {i}: a comment, nothing else\n#")
    else:
        text = project.inference.read_text()
        start = text.index("SLEEP_FRACTION = ")
        project.inference.write_text(text[:start] + "SLEEP_FRACTION = 0.0" + text[text.index("\n", start):])
    project.commit(f"{label} trial {i}")
    proc, result = project.evaluate()
    if result is None:
        raise SystemExit(f"run failed:\n{proc.stdout}\n{proc.stderr}")
    run = json.loads((project.root / result["run_file"]).read_text())
    ratios = paired_ratios([Sample(**s) for s in run["samples"]], "decode_tps")
    low, high = result["speedup_ci"]
    print(f"{label} {i + 1:2d}: {result['decision']:7s} speedup {result['speedup']:.3f} [{low:.3f}, {high:.3f}]",
          file=sys.stderr, flush=True)
    return result, ratios


def champion_project(root, model_dir, args, sleep_fraction=None):
    """A project whose baseline run (the champion) is done; with `sleep_fraction`, the
    champion sleeps that fraction of each token's time. Returns (project, champion commit)."""
    project = make_project(root, model_dir, max_tokens=args.max_tokens, repeats=args.repeats)
    if sleep_fraction is not None:
        project.edit_inference(TOKEN_LOOP, SLEEPY_LOOP)
        project.edit_inference("NUM_DRAFT_TOKENS = 3 ", f"SLEEP_FRACTION = {sleep_fraction:.4f}\nNUM_DRAFT_TOKENS = 3 ")
        project.commit("champion sleeps per token")
    proc, result = project.evaluate()
    if result is None or result["decision"] != "BASELINE":
        raise SystemExit(f"champion's baseline run failed:\n{proc.stdout}\n{proc.stderr}")
    return project, git(project.root, "rev-parse", "HEAD")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--null-runs", type=int, default=20)
    parser.add_argument("--real-runs", type=int, default=10)
    parser.add_argument("--sleep-fraction", type=float, default=0.15,
                        help="the champion sleeps this fraction of each token's time")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--save", type=Path, help="write every trial's decision and pair ratios here (JSON)")
    args = parser.parse_args()
    trials = {"null": [], "real": []}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", "llama")
        if args.null_runs:
            project, base = champion_project(Path(tmp) / "null", model_dir, args)
            trials["null"] = [trial(project, base, "null", i) for i in range(args.null_runs)]
        if args.real_runs:
            project, base = champion_project(Path(tmp) / "real", model_dir, args, args.sleep_fraction)
            trials["real"] = [trial(project, base, "real", i) for i in range(args.real_runs)]

    keeps = {label: sum(r["decision"] == "KEEP" for r, _ in runs) for label, runs in trials.items()}
    summary = {"null_runs": args.null_runs, "null_keep": keeps["null"],
               "real_runs": args.real_runs, "real_keep": keeps["real"],
               "real_speedup_target": TARGET_SPEEDUP}
    if trials["real"]:
        summary["real_sleep_fraction"] = args.sleep_fraction
        summary["real_speedup_median"] = round(statistics.median(r["speedup"] for r, _ in trials["real"]), 3)
        summary["real_speedup_all_pairs"] = round(statistics.median(x for _, ratios in trials["real"] for x in ratios), 3)
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.save:
        args.save.write_text(json.dumps({label: [{"decision": r["decision"], "speedup": r["speedup"],
                                                  "speedup_ci": r["speedup_ci"], "ratios": ratios}
                                                 for r, ratios in runs] for label, runs in trials.items()}))


if __name__ == "__main__":
    main()
