"""Locked settings: harness.yaml validated once, completely, into read-only dataclasses.

    settings = load_settings()          # SettingsError: one line naming the key to fix
    settings.timeouts.call_s            # every other module reads typed fields, never the YAML
    settings.preset(quick=True)         # the workload preset with its prompts
    settings.quality.corpus_tokens["quick"]

No other module validates harness.yaml. `protocol_hash` hashes what shapes a measurement.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

# The harness's own code and locked files: during a run, a fresh copy of them as committed
# (prepare.py makes it), so nothing in the working tree can change the referee.
HARNESS_HOME = Path(__file__).resolve().parent.parent
# The repository being climbed: git, inference.py, results.tsv, runs/. prepare.py's pristine
# copy is told where it is; otherwise it is the folder the harness lives in.
REPO_ENV = "MLX_HILLCLIMB_REPO"
# The commit prepare.py copied the harness code (prepare.py, harness/) from: the first
# BASELINE in HEAD's history. Empty or unset: the code is as of the commit the run locks.
CODE_ENV = "MLX_HILLCLIMB_HARNESS_COMMIT"
HARNESS_CODE = ("prepare.py", "harness")
ROOT = Path(os.environ.get(REPO_ENV) or HARNESS_HOME).resolve()
SETTINGS_PATH = HARNESS_HOME / "harness.yaml"
PROMPT_KINDS = ("decode", "prefill")
PRESET_NAMES = ("full", "quick")
PRIMARY_METRICS = ("decode_tps", "prefill_tps")
GATE_KEYS = ("false_alarm_rate", "perplexity_increase_pct", "kl_mean_max", "kl_p99_max", "top1_agreement_min",
             "sanity_tolerance", "sanity_floor", "continuation_margin", "continuation_tail_factor",
             "self_consistency_margin", "repetition_max")
KNOB_SPEC_KEYS = {"choices", "low", "high", "log", "step"}


class SettingsError(Exception):
    """harness.yaml is missing, malformed or incomplete; str(e) is one line saying what to fix."""


# ---------------------------------------------------------------------------
# The typed settings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Timeouts:
    load_s: float          # import inference.py and load the model(s)
    call_s: float          # one generate or score call, end to end


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the speed workload, as harness.yaml states it."""
    name: str
    kind: str              # decode | prefill
    text: str
    document_tokens: int | None = None   # prefill prompts: corpus tokens put in {document}


@dataclass(frozen=True)
class Preset:
    """A workload preset with its prompts resolved, in order."""
    name: str              # full | quick
    max_tokens: int
    warmup: int
    repeats: int           # rounds measured before the A/B first looks (a run of one pipeline: measure.RECORD_ROUNDS at least)
    max_repeats: int       # rounds an A/B may grow to while its interval is undecided
    budget_s: float        # no new A/B round starts after this many seconds of speed calls
    prompts: tuple


@dataclass(frozen=True)
class PerPreset:
    """One value per preset: `per_preset["quick"]`."""
    full: object
    quick: object

    def __getitem__(self, name):
        if name not in PRESET_NAMES:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class Gates:
    false_alarm_rate: float        # shared by all gates: an honest run fails any of them this rarely
    perplexity_increase_pct: float
    kl_mean_max: float
    kl_p99_max: float
    top1_agreement_min: float
    sanity_tolerance: float
    sanity_floor: float
    continuation_margin: float     # PIT units: see harness/gates.py
    continuation_tail_factor: float  # x (1 - u): see harness/gates.py
    self_consistency_margin: float  # PIT units
    repetition_max: float


@dataclass(frozen=True)
class QualitySettings:
    corpus_tokens: PerPreset       # int per preset
    tasks: PerPreset               # tuple of task ids per preset
    max_tokens: MappingProxyType   # task kind -> answer cap
    gates: Gates


@dataclass(frozen=True)
class VerdictSettings:
    primary_metric: str            # decode_tps | prefill_tps
    min_effect: float


@dataclass(frozen=True)
class KnobSpace:
    """One searched knob: either `choices`, or a `low`..`high` range (`log` or `step`)."""
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class SearchSettings:
    seed: int
    startup_trials: int
    knobs: tuple                   # KnobSpace, in harness.yaml's order


@dataclass(frozen=True)
class Settings:
    """Everything harness.yaml says, checked."""
    model: str
    draft_model: str | None
    timeouts: Timeouts
    quality: QualitySettings
    verdict: VerdictSettings
    prompts: tuple                 # every PromptSpec, in harness.yaml's order
    presets: PerPreset             # Preset per preset name
    search: SearchSettings | None  # None when harness.yaml has no `search:`
    source: str                    # canonical JSON of the YAML: hashed, and kept in run files

    def preset(self, quick):
        """The workload preset in use."""
        return self.presets["quick" if quick else "full"]

    def as_dict(self):
        """A fresh plain copy of harness.yaml's content."""
        return json.loads(self.source)


# ---------------------------------------------------------------------------
# Checking values: each raises SettingsError naming the key
# ---------------------------------------------------------------------------
def _fail(key, what):
    raise SettingsError(f"harness.yaml: '{key}' {what}")


def _get(mapping, key, where=""):
    if not isinstance(mapping, dict) or key not in mapping:
        raise SettingsError(f"harness.yaml: missing key '{where}{key}'")
    return mapping[key]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(mapping, key, where="", *, least=None):
    value = _get(mapping, key, where)
    wording = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
        least, f"an integer of at least {least}")
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        _fail(where + key, f"must be {wording}, got {value!r}")
    return value


def _number(mapping, key, where="", *, positive=False, least=None):
    value = _get(mapping, key, where)
    if not _is_number(value):
        _fail(where + key, f"must be a number, got {value!r}")
    if positive and value <= 0:
        _fail(where + key, f"must be positive, got {value!r}")
    if least is not None and value < least:
        _fail(where + key, f"must be at least {least}, got {value!r}")
    return value


def _typed(mapping, key, kind, where=""):
    value = _get(mapping, key, where)
    if not isinstance(value, kind):
        _fail(where + key, f"must be a {kind.__name__}, got {value!r}")
    return value


def _per_preset(mapping, key, read, where):
    """A {full: ..., quick: ...} mapping, each value read by `read(mapping, name, where)`."""
    inner = _typed(mapping, key, dict, where)
    return PerPreset(**{name: read(inner, name, f"{where}{key}.") for name in PRESET_NAMES})


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------
def _prompts(workload):
    prompts, names = [], set()
    for i, entry in enumerate(_typed(workload, "prompts", list, "workload.")):
        where = f"workload.prompts[{i}]."
        name = _typed(entry, "name", str, where)
        kind = _typed(entry, "kind", str, where)
        text = _typed(entry, "text", str, where)
        if kind not in PROMPT_KINDS:
            _fail(where + "kind", f"must be one of {PROMPT_KINDS}, got {kind!r}")
        document_tokens = None
        if kind == "prefill":
            document_tokens = _int(entry, "document_tokens", where, least=1)
            if "{document}" not in text:
                _fail(where + "text", "of a prefill prompt needs a {document} slot")
        if name in names:
            raise SettingsError(f"harness.yaml: prompt name '{name}' appears twice")
        names.add(name)
        prompts.append(PromptSpec(name, kind, text, document_tokens))
    return tuple(prompts)


def _presets(workload, prompts):
    by_name = {p.name: p for p in prompts}
    raw = _typed(workload, "presets", dict, "workload.")

    def one(mapping, name, where):
        entry = _typed(mapping, name, dict)
        where = f"{where}{name}."
        chosen = _typed(entry, "prompts", list, where)
        if not chosen:
            _fail(where + "prompts", "is empty")
        for prompt in chosen:
            if prompt not in by_name:
                _fail(where + "prompts", f"names unknown prompt '{prompt}'")
        repeats = _int(entry, "repeats", where, least=1)
        return Preset(name=name, max_tokens=_int(entry, "max_tokens", where, least=2),
                      warmup=_int(entry, "warmup", where, least=0), repeats=repeats,
                      max_repeats=_int(entry, "max_repeats", where, least=repeats),
                      budget_s=_number(entry, "budget_s", where, positive=True),
                      prompts=tuple(by_name[p] for p in chosen))

    return PerPreset(**{name: one(raw, name, "workload.presets.") for name in PRESET_NAMES})


def _task_lists(quality, caps):
    from harness.tasks import load_tasks

    known = {t.id: t for t in load_tasks()}

    def one(mapping, name, where):
        ids = _get(mapping, name, where)
        if not isinstance(ids, list) or not ids:
            _fail(where + name, "must be a non-empty list of task ids")
        for task_id in ids:
            if task_id not in known:
                _fail(where + name, f"names unknown task '{task_id}'")
            if known[task_id].kind not in caps:
                _fail("quality.max_tokens", f"has no cap for kind '{known[task_id].kind}'")
        return tuple(ids)

    return _per_preset(quality, "tasks", one, "quality.")


def _quality(raw):
    q = _typed(raw, "quality", dict)
    caps = _typed(q, "max_tokens", dict, "quality.")
    for kind in caps:
        _int(caps, kind, "quality.max_tokens.", least=1)
    gates = _typed(q, "gates", dict, "quality.")
    return QualitySettings(
        corpus_tokens=_per_preset(q, "corpus_tokens", lambda m, k, w: _int(m, k, w, least=2), "quality."),
        tasks=_task_lists(q, caps),
        max_tokens=MappingProxyType(dict(caps)),
        gates=_gates(gates))


def _gates(gates):
    values = {key: _number(gates, key, "quality.gates.") for key in GATE_KEYS}
    if not 0 < values["false_alarm_rate"] < 0.5:
        _fail("quality.gates.false_alarm_rate", f"must be between 0 and 0.5, got {values['false_alarm_rate']!r}")
    return Gates(**values)


def _verdict(raw):
    v = _typed(raw, "verdict", dict)
    metric = _get(v, "primary_metric", "verdict.")
    if metric not in PRIMARY_METRICS:
        _fail("verdict.primary_metric", f"must be one of {PRIMARY_METRICS}, got {metric!r}")
    return VerdictSettings(primary_metric=metric,
                           min_effect=_number(v, "min_effect", "verdict.", least=0))


def _knob_choices(name, spec, where):
    choices = spec["choices"]
    if set(spec) != {"choices"}:
        raise SettingsError(f"{where} has 'choices' and a range: give one or the other")
    if not isinstance(choices, list) or not choices:
        raise SettingsError(f"{where}.choices must be a non-empty list")
    if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
        raise SettingsError(f"{where}.choices may hold only null, booleans, numbers and strings")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise SettingsError(f"{where}.choices lists a value twice")
    return KnobSpace(name, choices=tuple(choices))


def _knob_range(name, spec, where):
    if "low" not in spec or "high" not in spec:
        raise SettingsError(f"{where} needs either 'choices' (a list) or both 'low' and 'high'")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for key, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _is_number(value):
            raise SettingsError(f"{where}.{key} must be a number, got {value!r}")
    if not low < high:
        raise SettingsError(f"{where}: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise SettingsError(f"{where}.log must be true or false, got {log!r}")
    if log and step is not None:
        raise SettingsError(f"{where}: 'log' and 'step' cannot be combined")
    if log and low <= 0:
        raise SettingsError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise SettingsError(f"{where}.step must be positive, got {step}")
    return KnobSpace(name, low=low, high=high, log=log, step=step)


def _search(raw):
    """The search space's schema; whether each knob exists in inference.py is the search's check."""
    if raw.get("search") is None:
        return None
    where = "harness.yaml: 'search"
    search = raw["search"]
    if not isinstance(search, dict):
        raise SettingsError(f"{where}' must be a mapping with 'knobs'")
    unknown = set(search) - {"seed", "startup_trials", "knobs"}
    if unknown:
        raise SettingsError(f"{where}' has unknown key(s) {sorted(unknown)}: allowed are seed, startup_trials, knobs")
    numbers = {"seed": search.get("seed", 0), "startup_trials": search.get("startup_trials", 8)}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingsError(f"{where}.{key}' must be an integer >= 0, got {value!r}")
    specs = search.get("knobs")
    if not isinstance(specs, dict) or not specs:
        raise SettingsError(f"{where}.knobs' must be a non-empty mapping of knob name to its values")
    knobs = []
    for name, spec in specs.items():
        w = f"{where}.knobs.{name}'"
        if not isinstance(spec, dict):
            raise SettingsError(f"{w} must be a mapping: {{choices: [...]}} or {{low: A, high: B}}")
        unknown = set(spec) - KNOB_SPEC_KEYS
        if unknown:
            raise SettingsError(f"{w} has unknown key(s) {sorted(unknown)}: allowed are {sorted(KNOB_SPEC_KEYS)}")
        knobs.append(_knob_choices(name, spec, w) if "choices" in spec else _knob_range(name, spec, w))
    return SearchSettings(knobs=tuple(knobs), **numbers)


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path} not found: run from the repository root or restore it with git")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SettingsError(f"harness.yaml is not valid YAML{where}: restore it with git") from None
    if not isinstance(raw, dict):
        raise SettingsError("harness.yaml must be a mapping of keys to values")
    return raw


def load_settings(path=SETTINGS_PATH):
    """Read harness.yaml and check every key the harness uses; return Settings."""
    raw = _read_yaml(path)
    draft = raw.get("draft_model")
    if draft is not None and not isinstance(draft, str):
        raise SettingsError("harness.yaml: 'draft_model' must be a model name or null")
    timeouts = _typed(raw, "timeouts", dict)
    workload = _typed(raw, "workload", dict)
    prompts = _prompts(workload)
    return Settings(
        model=_typed(raw, "model", str), draft_model=draft,
        timeouts=Timeouts(**{k: _number(timeouts, k, "timeouts.", positive=True) for k in ("load_s", "call_s")}),
        quality=_quality(raw), verdict=_verdict(raw), prompts=prompts,
        presets=_presets(workload, prompts), search=_search(raw),
        source=json.dumps(raw, sort_keys=True, default=str))


# ---------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------
def digest(obj):
    """A short, stable hash of any JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def protocol_hash(settings, quick, model, extra=None):
    """Hash of everything that shapes the numbers: model, workload preset and locked data.

    Runs are only ever compared within one protocol. Timeouts and the search space are
    left out: they decide when to give up and what to try, not how a run is measured.
    """
    locked = {k: v for k, v in settings.as_dict().items() if k not in ("timeouts", "model", "search")}
    return digest({"settings": locked, "preset": "quick" if quick else "full",
                   "model": model, "extra": extra or {}})
