"""Sandbox cost: what does running the workers in the sandbox cost a whole run?

Runs `python prepare.py --quick --json` in a scratch copy of the project on the offline
model (harness.yaml as it is), alternately without the sandbox (MLX_HILLCLIMB_SANDBOX=none)
and with it, `--runs` times each. The first run is the BASELINE; every later one re-runs
that champion (a run of one pipeline beside the yardstick: the same work each time). Prints
each run's elapsed_s and speed_s and, per pair, with / without; the target is "nothing
measurable": the median ratio of elapsed_s within the machine's run-to-run spread.

    python bench/sandbox_cost.py [--runs 2] [--tiny]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from power import OFFLINE_MODEL, plain_project  # noqa: E402  (the project copy the power bench uses)


def run(project, model, sandbox):
    """One quick run; returns its result dict (exits on a run without one)."""
    env = dict(os.environ)
    env.pop("MLX_HILLCLIMB_SANDBOX", None)
    if not sandbox:
        env["MLX_HILLCLIMB_SANDBOX"] = "none"
    proc = subprocess.run([sys.executable, "prepare.py", "--quick", "--json", "--model", model],
                          cwd=project.root, env=env, capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"prepare.py gave no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs with and without the sandbox, each (default 2)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight model instead of the offline one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandbox-cost-") as tmp:
        if args.tiny:
            from conftest import make_project
            from tiny_models import build_tiny_model
            model = str(build_tiny_model(Path(tmp) / "model", "llama"))
            project = make_project(Path(tmp) / "project", model)
        else:
            model, project = OFFLINE_MODEL, plain_project(Path(tmp) / "project")
        print("BASELINE run (not counted) ...", file=sys.stderr, flush=True)
        run(project, model, sandbox=True)
        pairs = []
        for i in range(args.runs):
            pair = {}
            for sandbox in ((False, True) if i % 2 == 0 else (True, False)):  # alternate who goes first
                result = run(project, model, sandbox)
                pair[sandbox] = result
                print(f"run {i + 1} sandbox {result.get('sandbox')}: elapsed_s {result['elapsed_s']} "
                      f"speed_s {result.get('speed_s')} decision {result['decision']}", file=sys.stderr, flush=True)
            pairs.append(pair[True]["elapsed_s"] / pair[False]["elapsed_s"])
        print(f"model: {model}")
        print(f"runs_each: {args.runs}")
        print(f"elapsed_ratio_sandbox_over_none: {', '.join(f'{r:.3f}' for r in pairs)}")
        print(f"elapsed_ratio_median: {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
