"""How many trials does the search's TPE need to get near the optimum?

    python bench/search_efficiency.py [--seeds 5] [--noise 0.0] [--within 0.03]

A synthetic quality-adjusted tok/s over a grid of knob values shaped like
inference.py's (dtype, KV bits, prefill step, KV window, top-k; the window only
without KV bits, as in the real space), with interactions
of the kind the real pipeline shows on a CPU: float32 is fastest, quantized KV only
pays with float32 activations, 4-bit KV and a short window cost quality, the prefill
step has a sweet spot. The optimum is known by enumerating the grid.

For each seed, TPE (harness.search_space's sampler and suggest, unchanged) proposes
configurations until one is within `--within` of the optimum; the trial count is
recorded. With --noise, each observation is multiplied by a random factor (timing
noise), while "within 3%" is still judged on the true value. Acceptance: the median
is at most 25% of the grid. Random search's expected count is printed beside it.
"""

import argparse
import itertools
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from harness import knobs, search_space  # noqa: E402
from harness.settings import ROOT, KnobSpace, SearchSettings, load_settings  # noqa: E402

SPACE = {
    "COMPUTE_DTYPE": {"choices": ["float32", "float16", "bfloat16"]},
    "KV_BITS": {"choices": [None, 4, 8]},
    "PREFILL_STEP_SIZE": {"choices": [128, 256, 512, 1024, 2048, 4096]},
    "MAX_KV_SIZE": {"choices": [None, 512, 2048]},
    "TOP_K": {"choices": [0, 20, 50]},
}
ACCEPT_FRACTION = 0.25


def objective(c):
    """Synthetic quality-adjusted tok/s of configuration `c` (a dict of the SPACE's knobs)."""
    fp32 = c["COMPUTE_DTYPE"] == "float32"
    speed = 100.0 * {"float32": 1.0, "float16": 0.45, "bfloat16": 0.35}[c["COMPUTE_DTYPE"]]
    speed *= {None: 1.0, 8: 1.10 if fp32 else 0.90, 4: 1.18 if fp32 else 0.85}[c["KV_BITS"]]
    speed *= 1.0 - 0.04 * (math.log2(c["PREFILL_STEP_SIZE"]) - 10) ** 2  # best at 1024
    speed *= {None: 1.0, 2048: 1.03, 512: 1.08}[c.get("MAX_KV_SIZE")]
    speed *= {0: 1.0, 20: 0.97, 50: 0.98}[c["TOP_K"]]
    quality = {None: 1.0, 8: 0.995, 4: 0.93 if fp32 else 0.90}[c["KV_BITS"]]
    quality *= {None: 1.0, 2048: 1.0, 512: 0.88}[c.get("MAX_KV_SIZE")]  # the window cuts the long prompt
    quality *= 0.99 if c["COMPUTE_DTYPE"] == "bfloat16" else 1.0
    return speed * quality


def grid():
    """Every configuration of SPACE that the search can propose: as in harness.search_space,
    MAX_KV_SIZE only exists without KV_BITS (mlx-lm cannot quantize a rotating cache)."""
    names = list(SPACE)
    configs = []
    for values in itertools.product(*(SPACE[n]["choices"] for n in names)):
        config = dict(zip(names, values))
        if config["KV_BITS"] is not None:
            if config["MAX_KV_SIZE"] is not None:
                continue  # the same configuration as with MAX_KV_SIZE absent
            del config["MAX_KV_SIZE"]
        configs.append(config)
    return configs


def trials_to_reach(seed, target, *, noise, startup_trials, limit):
    """Trials TPE needs until a proposal's true value is >= target (limit + 1 if never)."""
    defaults = knobs.settable((ROOT / "inference.py").read_text())
    specs = tuple(KnobSpace(name, choices=tuple(spec["choices"])) for name, spec in SPACE.items())
    space = search_space.load_space(SearchSettings(seed=seed, startup_trials=startup_trials, knobs=specs),
                                    defaults)
    study = optuna.create_study(direction="maximize",
                                sampler=search_space.make_sampler(seed, startup_trials))
    rng = random.Random(seed)
    for n in range(1, limit + 1):
        trial = study.ask()
        config = search_space.suggest(trial, space, defaults)
        true = objective(config)
        study.tell(trial, true * (1 + rng.uniform(-noise, noise)))
        if true >= target:
            return n
    return limit + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.0, help="relative timing noise, e.g. 0.1 = +-10%%")
    parser.add_argument("--within", type=float, default=0.03, help="distance to the optimum that counts")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    configs = grid()
    values = [objective(c) for c in configs]
    best = max(values)
    target = (1 - args.within) * best
    good = sum(v >= target for v in values)
    startup = load_settings().search.startup_trials
    counts = [trials_to_reach(seed, target, noise=args.noise, startup_trials=startup, limit=len(configs))
              for seed in range(args.seeds)]
    median = statistics.median(counts)
    random_expected = (len(configs) + 1) / (good + 1)  # draws without replacement until a hit
    print("---")
    print(f"grid_size: {len(configs)}")
    print(f"optimum: {best:.4g} ({configs[values.index(best)]})")
    print(f"within: {args.within:g} ({good} configurations reach {target:.4g})")
    print(f"noise: {args.noise:g}")
    print(f"sampler: TPE {search_space.SAMPLER_OPTIONS}, startup_trials {startup}")
    print(f"trials_per_seed: {counts}")
    print(f"median_trials: {median:g}")
    print(f"fraction_of_grid: {median / len(configs):.3f}")
    print(f"random_search_expected_trials: {random_expected:.1f}")
    ok = median <= ACCEPT_FRACTION * len(configs)
    print(f"acceptance: {'pass' if ok else 'FAIL'} (median <= {ACCEPT_FRACTION:.0%} of the grid)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
