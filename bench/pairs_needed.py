"""How many pairs does the sequential A/B need to KEEP a true decode win, by cap?

A simulation on the verdict's own statistics (harness.stats): each pair's log decode ratio
is normal around log(1 + effect), each pair's whole-call log ratio normal around `share` of
that (on a CPU a prompt token costs about what a generated one does, so whole calls move by
less than the decode win). The A/B looks every `--per-round` pairs from stats.MIN_PAIRS on,
and KEEPs once both intervals' lower ends clear 1 + min_effect (harness/verdict.py's rule).
Prints, per decode cap and whole-call cap, the median and 80th percentile of the pairs
needed. Defaults are the spreads measured on the offline model's full preset on a 2-core
CPU (decode sd 0.012, whole-call sd 0.020, whole calls moving 0.45 of the decode win).

    python bench/pairs_needed.py [--effect 0.10] [--share 0.45] [--reps 20]
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import stats  # noqa: E402
from harness.verdict import WHOLE_CALL_CAP  # noqa: E402


def pairs_to_keep(rng, args, decode_cap, whole_cap):
    """The pairs one simulated A/B took to KEEP (None: not within --max-pairs)."""
    decode = rng.normal(math.log(1 + args.effect), args.decode_sd, args.max_pairs)
    whole = rng.normal(args.share * math.log(1 + args.effect), args.whole_sd, args.max_pairs)
    line = 1 + args.min_effect
    for n in range(stats.MIN_PAIRS + (-stats.MIN_PAIRS) % args.per_round, args.max_pairs + 1, args.per_round):
        if math.exp(stats.capped_log_sequence(decode[:n], cap=decode_cap)[0]) <= line:
            continue
        if math.exp(stats.capped_log_sequence(whole[:n], cap=whole_cap)[0]) > line:
            return n
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--effect", type=float, default=0.10, help="true decode win (0.10: +10 %%)")
    parser.add_argument("--share", type=float, default=0.45, help="whole-call win as a share of the decode win")
    parser.add_argument("--decode-sd", type=float, default=0.012)
    parser.add_argument("--whole-sd", type=float, default=0.020)
    parser.add_argument("--min-effect", type=float, default=0.01)
    parser.add_argument("--per-round", type=int, default=3, help="pairs per round (the full preset's prompts)")
    parser.add_argument("--max-pairs", type=int, default=90)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"true decode win +{args.effect:.1%}, whole calls +{args.share * args.effect:.1%}; "
          f"{args.reps} simulated A/Bs per row", file=sys.stderr)
    print("decode_cap\twhole_cap\tmedian_pairs\tp80_pairs\tnot_kept")
    for decode_cap, whole_cap in ((stats.RATIO_CAP, stats.RATIO_CAP), (stats.RATIO_CAP, WHOLE_CALL_CAP)):
        runs = [pairs_to_keep(rng, args, decode_cap, whole_cap) for _ in range(args.reps)]
        kept = sorted(n for n in runs if n is not None)
        ranked = kept + [math.inf] * (len(runs) - len(kept))
        print(f"{decode_cap}\t{whole_cap}\t{ranked[len(ranked) // 2]}\t{ranked[int(len(ranked) * 0.8)]}\t"
              f"{len(runs) - len(kept)}")


if __name__ == "__main__":
    main()
