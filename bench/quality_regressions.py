"""Quality gates on the real offline model: known regressions must fail, honest pipelines pass.

Each variant is the baseline inference.py with one change, run through the same
measurement as `python prepare.py` (speed workload, corpus scoring, tasks, continuation
check) with no champion, so only the gates decide. Prints one row per variant with its
figures, the gates it failed, and how long the quality part took.

    python bench/quality_regressions.py [--full] [--model smollm2-135m-instruct] [--only NAME ...]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import evaluate, gates, measure, quality  # noqa: E402
from harness.settings import load_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_false_alarms import BASE, DAMAGE, HONEST  # noqa: E402  (one set of variant sources)

def variant(name):
    """The source of inference.py for one variant (shared with bench/quality_false_alarms.py)."""
    if name == "baseline":
        return BASE
    return {**HONEST, **DAMAGE}[name]()


VARIANTS = ["baseline", "argmax", "kv4_from_0", "temp_2", "noisy_logits", "fixed_token", "loop_when_timed",
            "canned_when_timed"]
EXPECT_PASS = {"baseline", "argmax"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full preset (default: quick)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--only", nargs="*", default=VARIANTS)
    args = parser.parse_args()

    settings = load_settings()
    ctx = evaluate.make_context(settings, quick=not args.full, model=args.model)
    tasks = quality.selected_tasks(settings, ctx.quick)
    ok = True
    print(f"model: {ctx.model}  preset: {ctx.preset.name}")
    print(f"{'variant':18s} {'ppl':>8s} {'kl_mean':>9s} {'kl_p99':>8s} {'top1':>6s} {'sanity':>6s} "
          f"{'cont_nll':>8s} {'ref_ent':>7s} {'repeat':>6s} {'quality_s':>9s}  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        reference = quality.load_reference(ctx, tasks, tmp)
        print(f"reference ready in {time.perf_counter() - t:.1f} s (sanity {reference['sanity']:.2f})",
              file=sys.stderr)
        for name in args.only:
            path = Path(tmp) / name / "inference.py"
            path.parent.mkdir()
            path.write_text(variant(name))
            out = measure.measure(ctx, {"challenger": path}, reference=reference, tasks=tasks,
                                   log_dir=path.parent)
            if out["failure"]:
                print(f"{name:18s} {out['failure']['decision']}: {out['failure']['reason']}")
                ok &= name not in EXPECT_PASS
                continue
            m = out["quality"]
            gate_list = gates.gates(settings, m, reference)
            failed = [g["name"] for g in gate_list if not g["passed"]]
            print(f"{name:18s} {m['perplexity']:8.3f} {m['kl_mean']:9.2e} {m['kl_p99']:8.3f} "
                  f"{m['top1_agreement']:6.3f} {m['sanity']:6.2f} {m['continuation_nll']:8.3f} "
                  f"{m['reference_entropy']:7.3f} {m['repetition']:6.3f} {m['quality_s']:9.1f}  "
                  f"{'PASS' if not failed else 'FAIL ' + ','.join(failed)}", flush=True)
            ok &= (not failed) == (name in EXPECT_PASS)
    print(f"all_as_expected: {str(ok).lower()}")


if __name__ == "__main__":
    main()
