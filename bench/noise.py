"""Noise: how often does the verdict KEEP a change that is not faster, and how often
does it miss one that is?

On a tiny random-weight model, in a real git copy of the project:
  * null: a challenger that differs from the champion only by a comment, N runs;
  * real: a champion that sleeps a little per token, M runs. The sleep is calibrated
    on a first run of the plain pipeline (per-token time as the harness measures it,
    slowest prompt), so the challenger without it is >= 1/(1 - speedup) faster.
Each run is a normal `python prepare.py`; the branch is reset to the champion (the
baseline commit) after every run. Prints the KEEP counts; targets: null <= 1 of 20,
real >= 9 of 10.

    python bench/noise.py [--null-runs 20] [--real-runs 10] [--speedup 0.12]
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
from tiny_models import build_tiny_model  # noqa: E402

TOKEN_LOOP = "    for token, _logprobs in steps:\n        yield token\n"


def per_token_seconds(project):
    """Decode seconds per token of `project`'s pipeline as the harness measures it (through
    the worker and its pipe, on the workload's prompts): the slowest prompt's median, so a
    sleep of s/(1-s) of it makes every prompt at least 1/(1-s) times slower."""
    proc, result = project.evaluate()
    if result is None:
        raise SystemExit(f"calibration run failed:\n{proc.stdout}\n{proc.stderr}")
    samples = json.loads((project.root / result["run_file"]).read_text())["samples"]
    per_prompt = {}
    for s in samples:
        if s["worker"] == "challenger" and s["repeat"] >= 0:
            per_prompt.setdefault(s["prompt"], []).append(s["decode_s"] / (s["n_tokens"] - 1))
    return max(statistics.median(v) for v in per_prompt.values())


def run_trials(project, base, n, label):
    """Run `n` trials from `base` (the champion): commit the challenger, evaluate, reset.

    After the reset a KEEP's commit is off the branch, so the next trial again faces `base`.
    """
    keeps, rows = 0, []
    for i in range(n):
        git(project.root, "reset", "-q", "--hard", base)
        yield_challenger(project, label, i)
        proc, result = project.evaluate()
        if result is None:
            raise SystemExit(f"run failed:\n{proc.stdout}\n{proc.stderr}")
        keeps += result["decision"] == "KEEP"
        rows.append(result)
        low, high = result["speedup_ci"]
        print(f"{label} {i + 1:2d}/{n}: {result['decision']:7s} speedup {result['speedup']:.3f} "
              f"[{low:.3f}, {high:.3f}]", file=sys.stderr, flush=True)
    return keeps, rows


def yield_challenger(project, label, i):
    """Commit trial i's challenger: a comment (null), or the champion without its sleep (real).

    Both keep the line count, so only speed can earn a KEEP (not "simpler").
    """
    if label == "null":
        project.edit_inference("TOP_K = 0 ", f"TOP_K = 0  # trial {i}: a comment, nothing else\n#")
    else:
        text = project.inference.read_text()
        start = text.index("time.sleep(")
        end = text.index(")", start) + 1
        project.inference.write_text(text[:start] + "time.sleep(0)" + text[end:])
    project.commit(f"{label} trial {i}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--null-runs", type=int, default=20)
    parser.add_argument("--real-runs", type=int, default=10)
    parser.add_argument("--speedup", type=float, default=0.10,
                        help="how much slower the sleeping champion is, as a fraction of a token's time")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", "llama")
        summary = {}

        # Null: the champion is the baseline inference.py itself.
        project = make_project(Path(tmp) / "null", model_dir, max_tokens=args.max_tokens, repeats=args.repeats)
        project.evaluate()
        base = git(project.root, "rev-parse", "HEAD")
        summary["null_keep"], _ = run_trials(project, base, args.null_runs, "null")

        # Real: the baseline sleeps per token, so a challenger without the sleep is faster.
        calibration = make_project(Path(tmp) / "calibration", model_dir, max_tokens=args.max_tokens,
                                   repeats=args.repeats)
        sleep_s = per_token_seconds(calibration) * args.speedup / (1 - args.speedup)
        project = make_project(Path(tmp) / "real", model_dir, max_tokens=args.max_tokens, repeats=args.repeats)
        project.edit_inference(TOKEN_LOOP, "    import time\n    for token, _logprobs in steps:\n"
                               f"        time.sleep({sleep_s:.6f})\n        yield token\n")
        base = project.commit("champion sleeps per token")
        proc, result = project.evaluate()
        assert result["decision"] == "BASELINE", result
        summary["real_keep"], rows = run_trials(project, base, args.real_runs, "real")
        summary["real_speedup_median"] = round(statistics.median(r["speedup"] for r in rows), 3)

    print(f"null_runs: {args.null_runs}")
    print(f"null_keep: {summary['null_keep']}")
    print(f"real_runs: {args.real_runs}")
    print(f"real_speedup_target: {1 / (1 - args.speedup):.3f}")
    print(f"real_speedup_median: {summary['real_speedup_median']}")
    print(f"real_keep: {summary['real_keep']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
