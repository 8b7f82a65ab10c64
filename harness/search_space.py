"""The search space: harness.yaml's searched knobs as Optuna distributions, the conditions
between knobs, the sampler, and warm starts from earlier search rows of results.tsv.

The lowest of the search modules (search_space <- search_storage <- search_objective <-
search): it imports none of them. harness.settings checks the `search:` section's schema;
here we only check that each searched knob is a knob of inference.py.
"""

import json
import logging
import warnings
from dataclasses import dataclass

from harness import ledger
from harness.knobs import is_number, same
from harness.settings import SettingsError

# The sampler every search uses (bench/search_efficiency.py imports these).
# multivariate + group: model knobs jointly, conditional knobs included, so
# interactions (dtype x KV bits, ...) are learned. constant_liar: a trial still running
# elsewhere counts as a bad one, so parallel processes do not all propose the same point.
SAMPLER_OPTIONS = {"multivariate": True, "group": True, "constant_liar": True}

# Knobs that only mean something when another setting is on: (why, test on the knob
# values in force and harness.yaml's draft_model). Skipped knobs keep inference.py's value.
CONDITIONS = {
    "QUANTIZED_KV_START": ("KV_BITS is set", lambda knobs, draft_model: knobs.get("KV_BITS") is not None),
    # mlx-lm raises "RotatingKVCache Quantization NYI": a window and KV bits never combine
    "MAX_KV_SIZE": ("KV_BITS is not set", lambda knobs, draft_model: knobs.get("KV_BITS") is None),
    "NUM_DRAFT_TOKENS": ("a draft_model is set", lambda knobs, draft_model: bool(draft_model)),
}


class SearchError(Exception):
    """A problem the user can fix (storage URL, study mismatch); str(e) is one line."""


class SurplusTrial(Exception):
    """This trial would exceed --trials (another process got there first): not evaluated."""


class _NoTraceback(logging.Filter):
    """Keep Optuna's one-line warning for a trial ended by Ctrl-C or turned away as
    surplus, without the traceback: both are expected, and we say what happened."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, SurplusTrial)):
            record.exc_info, record.exc_text = None, None
        return True


def optuna_module():
    """optuna, imported on first use (it is slow to import) with its chatter turned down."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoTraceback) for f in optimize_log.filters):
        optimize_log.addFilter(_NoTraceback())
    return optuna


# ---------------------------------------------------------------------------
# One knob's space (a settings.KnobSpace)
# ---------------------------------------------------------------------------
def is_int(spec):
    """True when the range of KnobSpace `spec` holds integers only (int low, high and step)."""
    return spec.choices is None and all(isinstance(v, int) for v in (spec.low, spec.high)) \
        and (spec.step is None or isinstance(spec.step, int))


def distribution(spec):
    """The Optuna distribution of KnobSpace `spec`."""
    optuna = optuna_module()
    if spec.choices is not None:
        return optuna.distributions.CategoricalDistribution(list(spec.choices))
    if is_int(spec):
        return optuna.distributions.IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step or 1)
    return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def suggest_value(trial, spec):
    """Ask `trial` for a value of KnobSpace `spec`."""
    if spec.choices is not None:
        return trial.suggest_categorical(spec.name, list(spec.choices))
    if is_int(spec):
        return trial.suggest_int(spec.name, spec.low, spec.high, log=spec.log, step=spec.step or 1)
    return trial.suggest_float(spec.name, spec.low, spec.high, log=spec.log, step=spec.step)


def contains(spec, value):
    """Whether `value` is a point of KnobSpace `spec` (for warm-starting from old rows)."""
    if spec.choices is not None:
        return any(same(value, c) for c in spec.choices)
    if not is_number(value) or (is_int(spec) and not isinstance(value, int)):
        return False
    return spec.low <= value <= spec.high


# ---------------------------------------------------------------------------
# The whole space
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    """What a search proposes from: the sampler's seed and startup trials, and the
    KnobSpaces with unconditional knobs first (conditional ones are decided from them)."""
    seed: int
    startup_trials: int
    knobs: tuple


def load_space(search_settings, knob_names):
    """The Space of harness.yaml's `search` section (a settings.SearchSettings, or None).

    `knob_names`: the knobs of inference.py that the search can set. Raises
    SettingsError (one line) when the section is missing or names another knob.
    """
    if search_settings is None:
        raise SettingsError("harness.yaml: missing key 'search' (the search space): restore it with git")
    for spec in search_settings.knobs:
        if spec.name not in knob_names:
            raise SettingsError(f"harness.yaml: 'search.knobs.{spec.name}' is not a knob of inference.py "
                                f"(a top-level UPPER_CASE = literal line)")
    ordered = sorted(search_settings.knobs, key=lambda k: k.name in CONDITIONS)  # stable: yaml order
    return Space(seed=search_settings.seed, startup_trials=search_settings.startup_trials,
                 knobs=tuple(ordered))


def suggest(trial, space, defaults, *, draft_model=None):
    """Ask `trial` for one configuration: {KNOB: value} for the knobs that apply.

    `defaults` are inference.py's own values, which decide conditions on knobs that
    are not searched (e.g. KV_BITS left out of the space); `draft_model` is harness.yaml's.
    """
    params = {}
    for spec in space.knobs:
        condition = CONDITIONS.get(spec.name)
        if condition and not condition[1]({**defaults, **params}, draft_model):
            continue
        params[spec.name] = suggest_value(trial, spec)
    return params


def make_sampler(seed, startup_trials):
    """The TPE sampler of every search, seeded."""
    optuna = optuna_module()
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, **SAMPLER_OPTIONS)


# ---------------------------------------------------------------------------
# Warm start
# ---------------------------------------------------------------------------
def _float(cell):
    try:
        return float(cell) if cell not in ("", None) else None
    except ValueError:
        return None


def _row_config(row, specs):
    """The knobs a results.tsv row ran with, or None when they are not a point of `specs`."""
    try:
        config = json.loads(row.get("config") or "")
    except ValueError:
        return None
    if not isinstance(config, dict) or not config \
            or not all(k in specs and contains(specs[k], v) for k, v in config.items()):
        return None
    return config


def _row_trial(row, config, specs):
    """The finished Optuna trial of a search row: COMPLETE with its value, or PRUNED."""
    optuna = optuna_module()
    attrs = {"warm_start": True, "ledger_line": row["line"], "run_file": row.get("run_file", ""),
             "decision": row.get("decision", "")}
    for key in ("decode_tps", "quality_score"):
        if _float(row.get(key)) is not None:
            attrs[key] = _float(row.get(key))
    distributions = {k: distribution(specs[k]) for k in config}
    value, metric = _float(row.get("quality_adjusted_tps")), "quality_adjusted_tps"
    if value is None:
        value, metric = _float(row.get("decode_tps")), "decode_tps"
    failure = None
    if row.get("decision") in ledger.FAILED:
        failure = f"{row['decision']}: {row.get('reason', '')}"
    elif row.get("quality_pass") == "false":
        failure = "quality gates failed (from results.tsv)"
    elif value is None:
        failure = f"{row.get('decision')}: no decode speed in results.tsv"
    if failure:
        attrs["prune_reason"] = failure
        return optuna.trial.create_trial(params=config, distributions=distributions,
                                         state=optuna.trial.TrialState.PRUNED, user_attrs=attrs)
    attrs["objective_metric"] = metric
    return optuna.trial.create_trial(params=config, distributions=distributions, value=value,
                                     user_attrs=attrs)


def warm_start_trials(rows, space, *, protocol, commit):
    """Completed Optuna trials for earlier search rows of this protocol and commit.

    Only rows of a clean inference.py at `commit` are used (other rows tuned another
    pipeline). CRASH/INVALID/REJECT rows and failed quality gates become PRUNED
    trials with their reason; configs outside the current space are skipped.
    Returns (trials, skipped_count).
    """
    specs = {spec.name: spec for spec in space.knobs}
    trials, skipped = [], 0
    for row in rows:
        if (row.get("source") != "search" or row.get("protocol") != protocol
                or row.get("commit") != commit or row.get("dirty") == "true"):
            continue
        config = _row_config(row, specs)
        if config is None:
            skipped += 1
            continue
        trials.append(_row_trial(row, config, specs))
    return trials, skipped
