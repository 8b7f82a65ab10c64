"""What one search trial does: skip a configuration that cannot fit in memory, run a
normal evaluation with the knobs set by name, and turn its result into the objective
(or into the reason the trial is pruned).

Imports search_space and search_storage (see search_space's docstring for the order).
"""

import json

from harness import geometry, ledger
from harness.report import note
from harness.search_space import SurplusTrial, optuna_module, suggest
from harness.search_storage import counted_trials

MEMORY_HEADROOM = 1.25      # estimated bytes x this must fit the memory budget
PROMPT_OVERHEAD = 256       # tokens of chat template and instruction around a prompt's document
DEFAULT_PREFILL_STEP = 2048  # mlx-lm's prefill step when PREFILL_STEP_SIZE is not set


# ---------------------------------------------------------------------------
# Memory: skip what cannot fit
# ---------------------------------------------------------------------------
def longest_sequence(settings, quick):
    """Tokens the worker holds at most: the longest speed prompt or the scored corpus
    (quality.corpus_tokens of the preset), plus the generated tokens."""
    preset = settings.preset(quick)
    prompt = max((p.document_tokens or 0) for p in preset.prompts) + PROMPT_OVERHEAD
    scored = settings.quality.corpus_tokens[preset.name]
    return max(prompt, scored) + preset.max_tokens


def estimate_memory(model_dir, knobs, settings, *, quick, draft_dir=None):
    """Estimated peak bytes of a worker running inference.py with `knobs` in force.

    weights (at the compute dtype) + KV cache for the longest sequence (at KV_BITS,
    capped by MAX_KV_SIZE) + the largest prefill chunk's activations (logits in
    float32, attention scores, MLP). An estimate to skip the impossible, not a promise.
    Returns {"weights", "kv_cache", "activations", "total"} in bytes.
    """
    dtype = knobs.get("COMPUTE_DTYPE", "float32")
    size = geometry.dtype_bytes(dtype)
    weights = geometry.weight_bytes(model_dir, dtype)
    if draft_dir:
        weights += geometry.weight_bytes(draft_dir, dtype)
    shape = geometry.model_geometry(model_dir)
    longest = longest_sequence(settings, quick)
    tokens = min(longest, knobs["MAX_KV_SIZE"]) if knobs.get("MAX_KV_SIZE") else longest
    bits = knobs.get("KV_BITS")
    group = knobs.get("KV_GROUP_SIZE") or 64
    per_value = bits / 8 + 2 * size / group if bits else size  # packed values + scale and bias per group
    kv = shape.kv_bytes_per_position(per_value) * tokens
    step = min(knobs.get("PREFILL_STEP_SIZE") or DEFAULT_PREFILL_STEP, longest)
    activations = (step * shape.vocab_size * 4 * 2                 # logits, float32, and their log-softmax
                   + shape.heads * step * tokens * 4               # attention scores of one chunk
                   + step * shape.intermediate_size * size * 3)   # the MLP's inner activations
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
    if decision in ledger.FAILED:
        return f"{decision}: {result.get('reason') or 'no reason given'}"
    if result.get("quality_pass") is False:
        failed = [g.get("name", "?") for g in result.get("gates") or [] if not g.get("passed")]
        return "quality gates failed: " + (", ".join(failed) or result.get("reason") or "quality_pass is false")
    if result.get("decode_tps") is None:
        return f"{decision}: no decode speed was measured"
    return None


def _prune(trial, reason):
    optuna = optuna_module()
    trial.set_user_attr("prune_reason", reason)
    raise optuna.TrialPruned(reason)


def make_objective(ctx, space, defaults, budget_bytes, n_trials):
    """The Optuna objective: one normal evaluation per trial, gates and memory enforced.

    ctx: the evaluate.Context of the run; space: a search_space.Space; defaults:
    inference.py's knob values; n_trials: --trials (a trial beyond it is turned away).
    """
    from harness import evaluate

    def objective(trial):
        ahead = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.set_user_attr("fail_reason", f"surplus: the study already had {n_trials} trials")
            raise SurplusTrial(f"the study already has {n_trials} trials")
        params = suggest(trial, space, defaults, draft_model=ctx.settings.draft_model)
        if not params:
            _prune(trial, "no knob of the space applies")
        estimate = estimate_memory(ctx.model_dir, {**defaults, **params}, ctx.settings,
                                   quick=ctx.quick, draft_dir=ctx.draft_dir)
        trial.set_user_attr("memory_estimate_gb", round(estimate["total"] / 1e9, 3))
        ok, why = fits(estimate, budget_bytes)
        if not ok:
            _prune(trial, why)
        note(f"search: trial {trial.number}: {json.dumps(params, sort_keys=True)}")
        result = evaluate.evaluate(ctx, overrides=params, source="search")
        for key in ("decision", "decode_tps", "prefill_tps", "quality_score", "quality_adjusted_tps",
                    "quality_pass", "run_file"):
            if result.get(key) is not None:
                trial.set_user_attr(key, result[key])
        failure = gate_failure(result)
        if failure:
            _prune(trial, failure)
        value, metric = objective_value(result)
        trial.set_user_attr("objective_metric", metric)
        return value

    return objective
