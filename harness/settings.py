"""Locked settings: read and validate harness.yaml, and hash what shapes a measurement."""

import hashlib
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PATH = ROOT / "harness.yaml"
PROMPT_KINDS = ("decode", "prefill")


class SettingsError(Exception):
    """harness.yaml is missing, malformed or incomplete; str(e) is one line saying what to fix."""


def _require(mapping, key, kind, where):
    if not isinstance(mapping, dict) or key not in mapping:
        raise SettingsError(f"harness.yaml: missing key '{where}{key}'")
    value = mapping[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingsError(f"harness.yaml: '{where}{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SettingsError(f"harness.yaml: '{where}{key}' must be a number, got {value!r}")
    if kind in (str, list, dict) and not isinstance(value, kind):
        raise SettingsError(f"harness.yaml: '{where}{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _positive(value, name):
    if value <= 0:
        raise SettingsError(f"harness.yaml: '{name}' must be positive, got {value!r}")


def load_settings(path=SETTINGS_PATH):
    """Read harness.yaml and check every key the harness uses; return it as a dict."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path} not found: run from the repository root or restore it with git")
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SettingsError(f"harness.yaml is not valid YAML{where}: restore it with git") from None
    if not isinstance(settings, dict):
        raise SettingsError("harness.yaml must be a mapping of keys to values")

    _require(settings, "model", str, "")
    if settings.get("draft_model") is not None and not isinstance(settings["draft_model"], str):
        raise SettingsError("harness.yaml: 'draft_model' must be a model name or null")
    timeouts = _require(settings, "timeouts", dict, "")
    for key in ("load_s", "call_s"):
        _positive(_require(timeouts, key, float, "timeouts."), f"timeouts.{key}")

    workload = _require(settings, "workload", dict, "")
    prompts = _require(workload, "prompts", list, "workload.")
    names = set()
    for i, prompt in enumerate(prompts):
        where = f"workload.prompts[{i}]."
        name = _require(prompt, "name", str, where)
        kind = _require(prompt, "kind", str, where)
        text = _require(prompt, "text", str, where)
        if kind not in PROMPT_KINDS:
            raise SettingsError(f"harness.yaml: '{where}kind' must be one of {PROMPT_KINDS}, got {kind!r}")
        if kind == "prefill":
            _positive(_require(prompt, "document_tokens", int, where), where + "document_tokens")
            if "{document}" not in text:
                raise SettingsError(f"harness.yaml: '{where}text' of a prefill prompt needs a {{document}} slot")
        if name in names:
            raise SettingsError(f"harness.yaml: prompt name '{name}' appears twice")
        names.add(name)

    presets = _require(workload, "presets", dict, "workload.")
    for preset in ("full", "quick"):
        p = _require(presets, preset, dict, "workload.presets.")
        where = f"workload.presets.{preset}."
        for key in ("max_tokens", "repeats"):
            _positive(_require(p, key, int, where), where + key)
        if _require(p, "max_tokens", int, where) < 2:
            raise SettingsError(f"harness.yaml: '{where}max_tokens' must be at least 2 to time decoding")
        if _require(p, "warmup", int, where) < 0:
            raise SettingsError(f"harness.yaml: '{where}warmup' must be 0 or more")
        chosen = _require(p, "prompts", list, where)
        if not chosen:
            raise SettingsError(f"harness.yaml: '{where}prompts' is empty")
        for name in chosen:
            if name not in names:
                raise SettingsError(f"harness.yaml: '{where}prompts' names unknown prompt '{name}'")
    return settings


def preset(settings, quick):
    """The workload preset in use: its settings plus the full prompt entries, in order."""
    chosen = dict(settings["workload"]["presets"]["quick" if quick else "full"])
    by_name = {p["name"]: p for p in settings["workload"]["prompts"]}
    chosen["prompts"] = [by_name[name] for name in chosen["prompts"]]
    chosen["name"] = "quick" if quick else "full"
    return chosen


def digest(obj):
    """A short, stable hash of any JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def protocol_hash(settings, quick, model, extra=None):
    """Hash of everything that shapes the numbers: model, workload preset and locked data.

    Runs are only ever compared within one protocol. Timeouts and the search space are
    left out: they decide when to give up and what to try, not how a run is measured.
    """
    locked = {k: v for k, v in settings.items() if k not in ("timeouts", "model", "search")}
    return digest({"settings": locked, "preset": "quick" if quick else "full",
                   "model": model, "extra": extra or {}})
