"""Bayesian search over inference.py's knobs, without an agent (Optuna TPE).

    python prepare.py search --trials N [--storage URL] [--study NAME] [--timeout S]
                             [--quick] [--model M]

Every trial is a normal evaluation (harness.evaluate.evaluate) with the knob values
set by name in the worker: inference.py is never edited, and each trial writes its
run file and its results.tsv row (source=search, config=the knobs as JSON).

The objective is quality_adjusted_tps (decode_tps while the quality gates are not in
the result), maximized. A trial that CRASHes, is INVALID/REJECTed or fails a quality
gate is recorded as PRUNED with its reason in the user attr `prune_reason`, and so is
a configuration the memory estimate says cannot fit.

The study lives in an Optuna RDB storage: a SQLite file in the repository by default
(search.db), or a PostgreSQL URL shared by several machines. `--trials N` is the
study's total of trials (warm-started ones aside): rerunning continues an interrupted
study up to N, and several processes on one study stop at N between them.
"""

import ast
import hashlib
import json
import logging
import math
import os
import random
import re
import struct
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness import gitops, ledger
from harness.report import Progress, note
from harness.settings import ROOT, SettingsError, digest, load_settings

# The sampler every search uses (bench/search_efficiency.py imports these).
# multivariate + group: model knobs jointly, conditional knobs included, so
# interactions (dtype x KV bits, ...) are learned. constant_liar: a trial still running
# elsewhere counts as a bad one, so parallel processes do not all propose the same point.
SAMPLER_OPTIONS = {"multivariate": True, "group": True, "constant_liar": True}
DEFAULT_SEED = 0
DEFAULT_STARTUP_TRIALS = 8

DB_NAME = "search.db"
PATCH_NAME = "search-best.patch"
FAILED_DECISIONS = ("CRASH", "INVALID", "REJECT")
MEMORY_HEADROOM = 1.25      # estimated bytes x this must fit the memory budget
HEARTBEAT_S = 30            # a process's trials beat this often ...
GRACE_S = 120               # ... and one silent this long (killed) is marked FAIL
KNOB_KEYS = {"choices", "low", "high", "log", "step"}

# Knobs that only mean something when another setting is on: (why, test on the
# knob values in force and the settings). Skipped knobs keep inference.py's value.
CONDITIONS = {
    "QUANTIZED_KV_START": ("KV_BITS is set", lambda knobs, settings: knobs.get("KV_BITS") is not None),
    # mlx-lm raises "RotatingKVCache Quantization NYI": a window and KV bits never combine
    "MAX_KV_SIZE": ("KV_BITS is not set", lambda knobs, settings: knobs.get("KV_BITS") is None),
    "NUM_DRAFT_TOKENS": ("a draft_model is set", lambda knobs, settings: bool(settings.get("draft_model"))),
}


class SearchError(Exception):
    """A problem the user can fix (storage URL, study mismatch); str(e) is one line."""


class SurplusTrial(Exception):
    """This trial would exceed --trials (another process got there first): not evaluated."""


def _one_line(text, limit=300):
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _NoTraceback(logging.Filter):
    """Keep Optuna's one-line warning for a trial ended by Ctrl-C or turned away as
    surplus, without the traceback: both are expected, and we say what happened."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, SurplusTrial)):
            record.exc_info, record.exc_text = None, None
        return True


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoTraceback) for f in optimize_log.filters):
        optimize_log.addFilter(_NoTraceback())
    return optuna


# ---------------------------------------------------------------------------
# The knobs of inference.py and the search space
# ---------------------------------------------------------------------------
def inference_knobs(text):
    """The knobs of an inference.py source: {NAME: {"line", "start", "end", "value"}}.

    A knob is a module-level `UPPER_CASE = <literal>` on one line. line is 1-based;
    start/end are character offsets of the literal in that line.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    knobs = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()):
            continue
        value = node.value
        if value.lineno != value.end_lineno:
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:
            continue  # computed, not a literal: not a knob the search can set
        raw = lines[value.lineno - 1].encode()
        # ast offsets count UTF-8 bytes; convert them to characters of the line
        start = len(raw[: value.col_offset].decode())
        end = len(raw[: value.end_col_offset].decode())
        knobs[node.targets[0].id] = {"line": value.lineno, "start": start, "end": end, "value": literal}
    return knobs


@dataclass(frozen=True)
class Knob:
    """One searched knob: either `choices`, or a `low`..`high` range (`log` or `step`)."""
    name: str
    choices: tuple = None
    low: float = None
    high: float = None
    log: bool = False
    step: float = None

    @property
    def is_int(self):
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high)) \
            and (self.step is None or isinstance(self.step, int))

    def distribution(self):
        """The Optuna distribution of this knob."""
        optuna = _optuna()
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.is_int:
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial):
        """Ask `trial` for a value of this knob."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value):
        """Whether `value` is a point of this knob's space (for warm-starting from old rows)."""
        if self.choices is not None:
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.is_int and not isinstance(value, int):
            return False
        return self.low <= value <= self.high


def _same(a, b):
    """Equal as knob values: 0 and 0.0 are, False and 0 or None and 0 are not."""
    return a == b and isinstance(a, bool) == isinstance(b, bool) and (a is None) == (b is None)


def _literal_ok(value):
    return value is None or isinstance(value, (bool, int, float, str))


def load_space(settings, knobs):
    """Validate harness.yaml's `search` section against inference.py's `knobs`.

    Returns {"seed", "startup_trials", "knobs": [Knob, ...]} with unconditional knobs
    first (conditional ones are decided from them). Raises SettingsError (one line).
    """
    where = "harness.yaml: 'search"
    search = settings.get("search")
    if search is None:
        raise SettingsError("harness.yaml: missing key 'search' (the search space): restore it with git")
    if not isinstance(search, dict):
        raise SettingsError(f"{where}' must be a mapping with 'knobs'")
    unknown = set(search) - {"seed", "startup_trials", "knobs"}
    if unknown:
        raise SettingsError(f"{where}' has unknown key(s) {sorted(unknown)}: allowed are seed, startup_trials, knobs")
    seed = search.get("seed", DEFAULT_SEED)
    startup = search.get("startup_trials", DEFAULT_STARTUP_TRIALS)
    for key, value, low in (("seed", seed, 0), ("startup_trials", startup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SettingsError(f"{where}.{key}' must be an integer >= {low}, got {value!r}")
    specs = search.get("knobs")
    if not isinstance(specs, dict) or not specs:
        raise SettingsError(f"{where}.knobs' must be a non-empty mapping of knob name to its values")
    out = []
    for name, spec in specs.items():
        w = f"{where}.knobs.{name}'"
        if name not in knobs:
            raise SettingsError(f"{w} is not a knob of inference.py (a top-level UPPER_CASE = literal line)")
        if not isinstance(spec, dict):
            raise SettingsError(f"{w} must be a mapping: {{choices: [...]}} or {{low: A, high: B}}")
        unknown = set(spec) - KNOB_KEYS
        if unknown:
            raise SettingsError(f"{w} has unknown key(s) {sorted(unknown)}: allowed are {sorted(KNOB_KEYS)}")
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"}:
                raise SettingsError(f"{w} has 'choices' and a range: give one or the other")
            if not isinstance(choices, list) or not choices:
                raise SettingsError(f"{w}.choices must be a non-empty list")
            if not all(_literal_ok(c) for c in choices):
                raise SettingsError(f"{w}.choices may hold only null, booleans, numbers and strings")
            if len({json.dumps(c) for c in choices}) != len(choices):
                raise SettingsError(f"{w}.choices lists a value twice")
            out.append(Knob(name, choices=tuple(choices)))
            continue
        if "low" not in spec or "high" not in spec:
            raise SettingsError(f"{w} needs either 'choices' (a list) or both 'low' and 'high'")
        low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        for key, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingsError(f"{w}.{key} must be a number, got {value!r}")
        if not low < high:
            raise SettingsError(f"{w}: low ({low}) must be below high ({high})")
        if not isinstance(log, bool):
            raise SettingsError(f"{w}.log must be true or false, got {log!r}")
        if log and step is not None:
            raise SettingsError(f"{w}: 'log' and 'step' cannot be combined")
        if log and low <= 0:
            raise SettingsError(f"{w}: a log range needs low > 0, got {low}")
        if step is not None and step <= 0:
            raise SettingsError(f"{w}.step must be positive, got {step}")
        out.append(Knob(name, low=low, high=high, log=log, step=step))
    out.sort(key=lambda k: k.name in CONDITIONS)  # stable: yaml order, conditional knobs last
    return {"seed": seed, "startup_trials": startup, "knobs": out}


def suggest(trial, space, settings, defaults):
    """Ask `trial` for one configuration: {KNOB: value} for the knobs that apply.

    `defaults` are inference.py's own values, which decide conditions on knobs that
    are not searched (e.g. KV_BITS left out of the space).
    """
    params = {}
    for knob in space["knobs"]:
        condition = CONDITIONS.get(knob.name)
        if condition and not condition[1]({**defaults, **params}, settings):
            continue
        params[knob.name] = knob.suggest(trial)
    return params


def make_sampler(seed=DEFAULT_SEED, startup_trials=DEFAULT_STARTUP_TRIALS):
    """The TPE sampler of every search, seeded."""
    optuna = _optuna()
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, **SAMPLER_OPTIONS)


# ---------------------------------------------------------------------------
# Memory: skip what cannot fit
# ---------------------------------------------------------------------------
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "U64": 8,
               "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
COMPUTE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weight_bytes(model_dir, compute_dtype="float32"):
    """Bytes of a model's weights once inference.py casts floating tensors to `compute_dtype`.

    Read from the safetensors headers (no weights are loaded). Packed quantized
    weights keep their size; their scales and every dense tensor take the compute dtype.
    """
    size = COMPUTE_BYTES.get(compute_dtype, 4)
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            total += path.stat().st_size  # unreadable header: count the file as it is
            continue
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(tensor["shape"])
            tag = tensor["dtype"]
            total += count * (size if tag in FLOAT_TAGS else DTYPE_BYTES.get(tag, 4))
    return total


def _model_config(model_dir):
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("text_config", config)


def longest_sequence(settings, quick):
    """Tokens the worker holds at most: the longest speed prompt or scored text, plus generation."""
    preset = settings["workload"]["presets"]["quick" if quick else "full"]
    by_name = {p["name"]: p for p in settings["workload"]["prompts"]}
    prompt = max([by_name[n].get("document_tokens", 0) for n in preset["prompts"]] + [0]) + 256
    scored = (settings.get("quality") or {}).get("kl_tokens", 0) or 0
    return max(prompt, scored) + preset["max_tokens"]


def estimate_memory(model_dir, knobs, settings, *, quick, draft_dir=None):
    """Estimated peak bytes of a worker running inference.py with `knobs` in force.

    weights (at the compute dtype) + KV cache for the longest sequence (at KV_BITS,
    capped by MAX_KV_SIZE) + the largest prefill chunk's activations (logits in
    float32, attention scores, MLP). An estimate to skip the impossible, not a promise.
    """
    dtype = knobs.get("COMPUTE_DTYPE", "float32")
    size = COMPUTE_BYTES.get(dtype, 4)
    weights = weight_bytes(model_dir, dtype) + (weight_bytes(draft_dir, dtype) if draft_dir else 0)
    config = _model_config(model_dir)
    layers = config.get("num_hidden_layers", 0)
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads", heads)
    hidden = config.get("hidden_size", 0)
    head_dim = config.get("head_dim") or (hidden // heads if heads else 0)
    tokens = longest_sequence(settings, quick)
    if knobs.get("MAX_KV_SIZE"):
        tokens = min(tokens, knobs["MAX_KV_SIZE"])
    bits = knobs.get("KV_BITS")
    group = knobs.get("KV_GROUP_SIZE") or 64
    per_value = bits / 8 + 2 * size / group if bits else size  # packed values + scale and bias per group
    kv = 2 * layers * kv_heads * head_dim * tokens * per_value
    step = min(knobs.get("PREFILL_STEP_SIZE") or 2048, longest_sequence(settings, quick))
    vocab = config.get("vocab_size", 0)
    activations = (step * vocab * 4 * 2                      # logits, float32, and their log-softmax
                   + heads * step * tokens * 4                # attention scores of one chunk
                   + step * config.get("intermediate_size", 4 * hidden) * size * 3)
    return {"weights": int(weights), "kv_cache": int(kv), "activations": int(activations),
            "total": int(weights + kv + activations)}


def fits(estimate, budget_bytes):
    """(True, "") when `estimate` (with headroom) fits `budget_bytes`, else (False, reason)."""
    need = estimate["total"] * MEMORY_HEADROOM
    if not budget_bytes or need <= budget_bytes:
        return True, ""
    return False, (f"does not fit in memory: needs ~{need / 1e9:.2f} GB (weights "
                   f"{estimate['weights'] / 1e9:.2f}, KV cache {estimate['kv_cache'] / 1e9:.2f}, "
                   f"activations {estimate['activations'] / 1e9:.2f}, x{MEMORY_HEADROOM} headroom), "
                   f"budget {budget_bytes / 1e9:.2f} GB")


# ---------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------
def default_storage(root=ROOT):
    """The SQLite file in the repository (git-ignored via *.db)."""
    return f"sqlite:///{Path(root) / DB_NAME}"


def shown_url(url):
    """`url` with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url):
    """An Optuna RDB storage for `url` (sqlite:///..., postgresql://...). Raises SearchError."""
    optuna = _optuna()
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise SearchError(f"--storage {url!r} is not a database URL: use sqlite:///path/to/search.db "
                          f"or postgresql://user:password@host:5432/dbname") from None
    backend = parsed.get_backend_name()
    kwargs = {}
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; we ship psycopg2-binary
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}  # fail in seconds, not minutes
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # wait for another local process's write
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            if not folder.is_dir():
                raise SearchError(f"cannot open the study storage {url}: folder {folder} does not exist")
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
        except (IntegrityError, ProgrammingError) as exc:
            # Processes started together on an empty database race to create Optuna's
            # tables; the loser sees "duplicate key" / "already exists". Try again.
            if attempt == 4:
                raise SearchError(f"cannot open the study storage {shown_url(url)}: {_one_line(exc)}") from None
            time.sleep(0.5 + random.random())
        except Exception as exc:  # sqlalchemy and the drivers raise many types
            raise SearchError(f"cannot open the study storage {shown_url(url)}: {_one_line(exc)}") from None


def default_study_name(protocol, inference_sha, settings):
    """search-<protocol>-<inference.py hash>-<space hash>: one study per protocol, pipeline
    version and search space (Optuna refuses to change a knob's choices inside a study)."""
    return f"search-{protocol}-{inference_sha[:8]}-{digest(settings['search'])[:6]}"


def open_study(storage, name, sampler_seed, startup_trials, attrs):
    """Create the study (returns (study, True)) or load it ((study, False)).

    A loaded study must have been made for the same protocol and inference.py;
    otherwise SearchError. The creator uses `sampler_seed` as given; a process joining
    an existing study adds its pid, so parallel processes do not replay one another.
    """
    optuna = _optuna()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=make_sampler(sampler_seed, startup_trials))
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(sampler_seed + os.getpid(), startup_trials))
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SearchError(f"study {name} minimizes: it was not made by this harness; pass --study NEW")
    for key in ("protocol", "inference_sha256"):
        have = study.user_attrs.get(key)
        if have is not None and have != attrs[key]:
            raise SearchError(f"study {name} was made for another {key.replace('_sha256', '.py')} "
                              f"({have[:12]}, here {attrs[key][:12]}): pass --study NEW for a new study")
    return study, False


def counted_trials(study):
    """Trials that count toward --trials: finished or running, warm-started ones aside.

    FAIL trials (interrupted, a harness error, surplus) do not count: they are redone.
    """
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("warm_start")]


# ---------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------
def objective_value(result):
    """(value, metric): quality_adjusted_tps when the result has it, else decode_tps."""
    if result.get("quality_adjusted_tps") is not None:
        return float(result["quality_adjusted_tps"]), "quality_adjusted_tps"
    return float(result["decode_tps"]), "decode_tps"


def gate_failure(result):
    """Why a result cannot count as a good configuration (one line), or None when it can."""
    decision = result.get("decision")
    if decision in FAILED_DECISIONS:
        return f"{decision}: {result.get('reason') or 'no reason given'}"
    if result.get("quality_pass") is False:
        failed = [g.get("name", "?") for g in result.get("gates") or [] if not g.get("passed")]
        return "quality gates failed: " + (", ".join(failed) or result.get("reason") or "quality_pass is false")
    if result.get("decode_tps") is None:
        return f"{decision}: no decode speed was measured"
    return None


def _float(cell):
    try:
        return float(cell) if cell not in ("", None) else None
    except ValueError:
        return None


def warm_start_trials(rows, space, *, protocol, commit):
    """Completed Optuna trials for earlier search rows of this protocol and commit.

    Only rows of a clean inference.py at `commit` are used (other rows tuned another
    pipeline). CRASH/INVALID/REJECT rows and failed quality gates become PRUNED
    trials with their reason; configs outside the current space are skipped.
    Returns (trials, skipped_count).
    """
    optuna = _optuna()
    knobs = {k.name: k for k in space["knobs"]}
    trials, skipped = [], 0
    for row in rows:
        if (row.get("source") != "search" or row.get("protocol") != protocol
                or row.get("commit") != commit or row.get("dirty") == "true"):
            continue
        try:
            config = json.loads(row.get("config") or "")
        except ValueError:
            config = None
        if not isinstance(config, dict) or not config \
                or not all(k in knobs and knobs[k].contains(v) for k, v in config.items()):
            skipped += 1
            continue
        attrs = {"warm_start": True, "ledger_line": row["line"], "run_file": row.get("run_file", ""),
                 "decision": row.get("decision", "")}
        for key in ("decode_tps", "quality_score"):
            if _float(row.get(key)) is not None:
                attrs[key] = _float(row.get(key))
        distributions = {k: knobs[k].distribution() for k in config}
        value = _float(row.get("quality_adjusted_tps"))
        metric = "quality_adjusted_tps"
        if value is None:
            value, metric = _float(row.get("decode_tps")), "decode_tps"
        failure = None
        if row.get("decision") in FAILED_DECISIONS:
            failure = f"{row['decision']}: {row.get('reason', '')}"
        elif row.get("quality_pass") == "false":
            failure = "quality gates failed (from results.tsv)"
        elif value is None:
            failure = f"{row.get('decision')}: no decode speed in results.tsv"
        if failure:
            attrs["prune_reason"] = failure
            trials.append(optuna.trial.create_trial(params=config, distributions=distributions,
                                                    state=optuna.trial.TrialState.PRUNED,
                                                    user_attrs=attrs))
        else:
            attrs["objective_metric"] = metric
            trials.append(optuna.trial.create_trial(params=config, distributions=distributions,
                                                    value=value, user_attrs=attrs))
    return trials, skipped


def make_objective(ctx, space, defaults, budget_bytes, n_trials):
    """The Optuna objective: one normal evaluation per trial, gates and memory enforced."""
    optuna = _optuna()
    from harness import evaluate

    def objective(trial):
        ahead = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.set_user_attr("fail_reason", f"surplus: the study already had {n_trials} trials")
            raise SurplusTrial(f"the study already has {n_trials} trials")
        params = suggest(trial, space, ctx.settings, defaults)
        if not params:
            trial.set_user_attr("prune_reason", "no knob of the space applies")
            raise optuna.TrialPruned("no knob of the space applies")
        estimate = estimate_memory(ctx.model_dir, {**defaults, **params}, ctx.settings,
                                   quick=ctx.quick, draft_dir=ctx.draft_dir)
        trial.set_user_attr("memory_estimate_gb", round(estimate["total"] / 1e9, 3))
        ok, why = fits(estimate, budget_bytes)
        if not ok:
            trial.set_user_attr("prune_reason", why)
            raise optuna.TrialPruned(why)
        note(f"search: trial {trial.number}: {json.dumps(params, sort_keys=True)}")
        result = evaluate.evaluate(ctx, overrides=params, source="search")
        for key in ("decision", "decode_tps", "prefill_tps", "quality_score", "quality_adjusted_tps",
                    "quality_pass", "run_file"):
            if result.get(key) is not None:
                trial.set_user_attr(key, result[key])
        failure = gate_failure(result)
        if failure:
            trial.set_user_attr("prune_reason", failure)
            raise optuna.TrialPruned(failure)
        value, metric = objective_value(result)
        trial.set_user_attr("objective_metric", metric)
        return value

    return objective


# ---------------------------------------------------------------------------
# The patch
# ---------------------------------------------------------------------------
def literal(value):
    """`value` as Python source, strings in double quotes like inference.py's."""
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def patched_source(text, params):
    """inference.py's source with each knob in `params` set to its value, comments kept.

    Only the literal changes; the spaces before an inline comment shrink or grow so the
    comment stays in its column where it can.
    """
    knobs = inference_knobs(text)
    lines = text.splitlines(keepends=True)
    for name, value in params.items():
        if name not in knobs:
            raise SearchError(f"inference.py has no knob {name}: cannot write the patch")
        knob = knobs[name]
        line = lines[knob["line"] - 1]
        old, new = line[knob["start"]:knob["end"]], literal(value)
        if knob["value"] == value and type(knob["value"]) is type(value):
            continue
        rest = line[knob["end"]:]
        pad = re.match(r"( +)#", rest)
        if pad:
            width = len(pad.group(1))
            keep = max(width - (len(new) - len(old)), min(width, 2))
            rest = " " * keep + rest[width:]
        lines[knob["line"] - 1] = line[:knob["start"]] + new + rest
    return "".join(lines)


def make_patch(text, params, path="inference.py"):
    """A unified diff (for `git apply`) setting `params` in inference.py; "" when nothing changes."""
    import difflib

    new = patched_source(text, params)
    if new == text:
        return ""
    diff = difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                fromfile=f"a/{path}", tofile=f"b/{path}")
    return "".join(diff)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(sub):
    """Add the `search` subcommand to argparse subparsers `sub`."""
    p = sub.add_parser("search", help="Bayesian search (Optuna TPE) over inference.py's knobs")
    p.add_argument("--trials", type=_positive_int, required=True,
                   help="trials the study holds in total (warm-started ones aside), across all processes")
    p.add_argument("--storage", help=f"Optuna storage URL (default: sqlite:///{DB_NAME} in the repository); "
                                     f"a postgresql:// URL lets several machines share one study")
    p.add_argument("--study", help="study name (default: search-<protocol>-<inference.py hash>-<space hash>)")
    p.add_argument("--timeout", type=_positive_float, help="start no new trial after this many seconds")
    p.add_argument("--quick", action="store_true", help="small workload for smoke runs")
    p.add_argument("--model", help="offline name, local mlx-lm directory or Hugging Face repo id")
    p.set_defaults(func=run)


def run(args):
    """`python prepare.py search`: run or continue a study, then print and patch the best. Exit status."""
    try:
        return _search(args)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _search(args):
    from harness import evaluate
    from harness.profile import static_facts

    settings = load_settings()
    inference_path = ROOT / "inference.py"
    text = inference_path.read_text()
    try:
        defaults = {name: k["value"] for name, k in inference_knobs(text).items()}
    except SyntaxError as exc:
        raise SearchError(f"inference.py does not parse ({exc.msg}, line {exc.lineno}): fix it first") from None
    space = load_space(settings, defaults)
    storage_url = args.storage or default_storage(ROOT)
    storage = open_storage(storage_url)

    note(f"resolving model {args.model or settings['model']} ...")
    ctx = evaluate.make_context(settings, quick=args.quick, model=args.model)
    git_state = gitops.state(ROOT)
    inference_sha = hashlib.sha256(text.encode()).hexdigest()
    name = args.study or default_study_name(ctx.protocol, inference_sha, settings)
    attrs = {"protocol": ctx.protocol, "inference_sha256": inference_sha, "model": ctx.model,
             "preset": ctx.preset["name"], "commit": git_state["commit"], "dirty": git_state["dirty"]}
    study, created = open_study(storage, name, space["seed"], space["startup_trials"], attrs)
    optuna = _optuna()

    if created:
        if git_state["dirty"]:
            note("search: inference.py has uncommitted changes: no warm start from results.tsv")
        else:
            rows, problems = ledger.read(ctx.ledger_path)
            for problem in problems:
                note(f"warning: {problem}")
            trials, skipped = warm_start_trials(rows, space, protocol=ctx.protocol,
                                                commit=git_state["commit"])
            study.set_user_attr("warm_started", len(trials))
            if trials:
                study.add_trials(trials)
                note(f"search: warm-started from {len(trials)} earlier search row(s) of results.tsv"
                     + (f" ({skipped} outside the space skipped)" if skipped else ""))
    optuna.storages.fail_stale_trials(study)  # trials of a killed process no longer count

    budget = static_facts()["memory_budget_bytes"]
    warm = len([t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("warm_start")])
    remaining = args.trials - len(counted_trials(study))
    note(f"search: study {name} in {shown_url(storage_url)}: "
         f"{len(counted_trials(study))}/{args.trials} trials done or running")
    if remaining > 0:
        progress = Progress("search")

        def report(study_, trial):
            done = len(counted_trials(study_))
            if trial.state == optuna.trial.TrialState.COMPLETE:
                what = f"{trial.user_attrs.get('objective_metric', 'value')} {trial.value:.4g}"
            elif trial.state == optuna.trial.TrialState.PRUNED:
                what = f"pruned: {trial.user_attrs.get('prune_reason', '')}"
            else:
                what = f"failed: {trial.user_attrs.get('fail_reason', 'interrupted or harness error')}"
            note(f"search: trial {trial.number} {what}")
            progress(min(done, args.trials), args.trials, f"trial {trial.number}")

        objective = make_objective(ctx, space, defaults, budget, args.trials)
        stop = optuna.study.MaxTrialsCallback(
            args.trials + warm,
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                    optuna.trial.TrialState.RUNNING))
        try:
            study.optimize(objective, n_trials=remaining, timeout=args.timeout,
                           callbacks=[stop, report], catch=(SurplusTrial,), gc_after_trial=False)
        except KeyboardInterrupt:
            note(f"interrupted: study {name} keeps its finished trials in {shown_url(storage_url)}; "
                 f"run the same command again to continue")
            return 130
    print(summary(study, name, storage_url, ctx, text, args))
    return 0


def summary(study, name, storage_url, ctx, text, args):
    """Print-ready `key: value` block for the study; writes search-best.patch as a side effect."""
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    state = optuna.trial.TrialState
    own = [t for t in trials if not t.user_attrs.get("warm_start")]
    lines = ["---", f"study: {name}", f"storage: {shown_url(storage_url)}",
             f"trials: {len([t for t in own if t.state in (state.COMPLETE, state.PRUNED)])}",
             f"complete: {len([t for t in own if t.state == state.COMPLETE])}",
             f"pruned: {len([t for t in own if t.state == state.PRUNED])}",
             f"failed: {len([t for t in own if t.state == state.FAIL])}",
             f"warm_started: {len(trials) - len(own)}"]
    complete = [t for t in trials if t.state == state.COMPLETE]
    patch_path = ctx.root / PATCH_NAME
    if not complete:
        lines += ["best_trial: -", "best_value: -", "best_config: -", "patch: -"]
        note("search: no trial completed: see prune_reason of each trial, and the runs/ files")
        return "\n".join(lines)
    best = max(complete, key=lambda t: t.value)
    attrs = best.user_attrs
    patch = make_patch(text, best.params)
    if patch:
        patch_path.write_text(patch)
    elif patch_path.exists():
        patch_path.unlink()  # a stale patch from an earlier study would mislead
    lines += [f"best_trial: {best.number}",
              f"objective: {attrs.get('objective_metric', '-')}",
              f"best_value: {best.value:.6g}",
              f"best_decode_tps: {attrs.get('decode_tps', '-')}",
              f"best_quality_score: {attrs.get('quality_score', '-')}",
              f"best_run_file: {attrs.get('run_file', '-')}",
              f"best_config: {json.dumps(best.params, sort_keys=True)}",
              f"patch: {PATCH_NAME if patch else '-'}"]
    if patch:
        confirm = "python prepare.py" + (" --quick" if args.quick else "") + \
            (f" --model {args.model}" if args.model else "")
        note(f"search: apply the best configuration with `git apply {PATCH_NAME}`, "
             f"then confirm it with a normal run: `{confirm}`")
    else:
        note("search: the best configuration is inference.py's current one: no patch written")
    return "\n".join(lines)
