"""Error rates of the quality gates on the real offline model: false alarms on honest changes,
detection of known damage.

Each variant is the baseline inference.py with one change, measured as `python prepare.py`
measures a challenger (speed workload, the timed calls' own log-probs, corpus, tasks, the
reference's reading of the timed calls) with no champion, so only the gates decide. Honest
variants run `--repeats` times each; every damage variant once (or `--damage-repeats`).
Prints per variant the gates that failed and, per gate, its false-alarm rate on the honest
runs and its detection rate on the damage runs. The target (harness.yaml
`false_alarm_rate`): at most 1 % of honest runs fail any gate; every damage fails one.

    python bench/quality_false_alarms.py [--repeats 5] [--full] [--only NAME ...] [--save F]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import evaluate, gates, knobs, measure, quality  # noqa: E402
from harness.settings import ROOT, load_settings  # noqa: E402

BASE = (ROOT / "inference.py").read_text()


def _when_timed(setup, restore):
    """Source appended to inference.py: speed calls (EOS ignored) run with `setup` done and
    `restore` after; task calls and score() stay honest."""
    return f'''

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
{setup}
    try:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
    finally:
{restore}
'''


KV4_WHEN_TIMED = _when_timed("    global KV_BITS\n    KV_BITS = 4", "        KV_BITS = None")
HALF_LAYERS_WHEN_TIMED = _when_timed(
    "    inner = pipeline.model.model\n    layers = inner.layers\n    inner.layers = layers[:len(layers) // 2]",
    "        inner.layers = layers")

# Red team 9's tail shaping: draws at temperature 1 from the distribution it reports, but
# every 8th token sits just inside the far tail (0.975-0.987 of that distribution).
TAIL_SHAPED_WHEN_TIMED = '''

_drawn = [0]


def _shaped_sampler(logprobs):
    _drawn[0] += 1
    if _drawn[0] % 8:
        return mx.random.categorical(logprobs)
    order = mx.argsort(-logprobs[0])
    places = mx.cumsum(mx.exp(logprobs[0][order].astype(mx.float32)))
    target = 0.975 + 0.012 * mx.random.uniform()
    i = min(int(mx.sum(places < target).item()), order.size - 1)
    return order[i:i + 1]
''' + _when_timed("    honest_sampler = pipeline.sampler\n    pipeline.sampler = _shaped_sampler",
                    "        pipeline.sampler = honest_sampler")

def _choose_when_timed(pick):
    """Source appended to inference.py: speed calls decode one token at a time, the model's
    own row in hand, and `pick` (source of `_pick(row, p, order, n, state) -> (token, row)`:
    p the row's probabilities, order the tokens likeliest first) chooses each token and the
    row reported for it; task calls and score() stay honest."""
    return '''

import numpy as _np

_honest_generate = generate
''' + pick + '''

def _timed_decode(pipeline, prompt, max_tokens):
    cache, state = _new_cache(pipeline), {"taken": 0, "rng": _np.random.default_rng()}
    _prefill(pipeline, cache, prompt)
    feed = prompt[-1:]
    for n in range(max_tokens):
        row = _np.array(_log_softmax(_forward(pipeline, cache, feed)[-1:])[0])
        p = _np.exp(row.astype(_np.float64))
        token, row = _pick(row, p, _np.argsort(-p), n, state)
        feed = mx.array([token])
        yield token, row


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
    with mx.stream(pipeline.stream):
        yield from _timed_decode(pipeline, mx.array(prompt), max_tokens)
'''


# Red team 11's word salad: greedy, but where the top token has under half the mass, 60 % of
# the time a token the model gives < 1e-4, lifted in the reported row to just under the
# token at the middle of the distribution (so it sits mid-row there).
SALAD_WHEN_TIMED = _choose_when_timed('''
def _pick(row, p, order, n, state):
    token = int(order[0])
    if n >= 1 and p[token] < 0.5 and state["rng"].random() < 0.6:
        middle = max(1, int(_np.searchsorted(_np.cumsum(p[order]), 0.5)))
        token = int(state["rng"].choice(_np.flatnonzero(p < 1e-4)))
        row = row.copy()
        row[token] = row[order[middle]] - 1e-3
    return token, row
''')

# Red team 12's flat-tail salad: honest rows, argmax tokens where the top token has 0.35 or
# more, and where it has less the token at 0.89 (2 times in 5: 0.945) of the distribution,
# up to 30 % of the tokens.
FLAT_TAIL_WHEN_TIMED = _choose_when_timed('''
def _pick(row, p, order, n, state):
    token = int(order[0])
    if p[token] < 0.35 and state["taken"] < 0.3 * (n + 1):
        place = _np.cumsum(p[order]) - p[order] / 2
        i = int(_np.searchsorted(place, 0.945 if state["taken"] % 5 in (1, 3) else 0.89)) - 1
        if i > 0:
            token, state["taken"] = int(order[i]), state["taken"] + 1
    return token, row
''')

NOISY_LOGITS = '''

class _Noisy:
    """Wraps the model: Gaussian noise (std 2) on every logit."""
    def __init__(self, model):
        self._model = model
    def __call__(self, *args, **kwargs):
        logits = self._model(*args, **kwargs)
        return logits + 2.0 * mx.random.normal(logits.shape).astype(logits.dtype)
    def __getattr__(self, name):
        return getattr(self._model, name)


_honest_load = load


def load(model_path, draft_model_path=None):
    pipeline = _honest_load(model_path, draft_model_path)
    pipeline.model = _Noisy(pipeline.model)
    return pipeline
'''

# Every call: the model runs, but one fixed token is yielded (with the model's own log-probs).
FIXED_TOKEN = '''

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    token = pipeline.tokenizer.encode(" the", add_special_tokens=False)[0]
    for _, logprobs in _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=False):
        yield token, logprobs
'''


def _fake_when_timed(body):
    """Honest on tasks; when timed, `body` yields tokens with a uniform claimed distribution."""
    return '''

_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
    vocab = pipeline.model(mx.array([prompt[:1]])).shape[-1]
    flat = mx.full((vocab,), -float(mx.log(mx.array(vocab, mx.float32))))
''' + body


LOOP_WHEN_TIMED = _fake_when_timed('''    token = pipeline.tokenizer.encode(" the", add_special_tokens=False)[0]
    for _ in range(max_tokens):
        yield token, flat
''')
CANNED_WHEN_TIMED = _fake_when_timed('''    text = ("Transformers are neural networks that read a whole sequence at once. Each layer lets "
            "every token attend to the others, weighs what matters, and passes a richer picture of "
            "the text to the next layer. Training on large amounts of writing teaches them grammar.")
    tokens = pipeline.tokenizer.encode(text, add_special_tokens=False)
    for i in range(max_tokens):
        yield tokens[i % len(tokens)], flat
''')

# Speed calls answered from a cache keyed on the user's message (the nonce taken out): the
# warm-up call works, every later call of the same prompt replays its tokens and log-probs.
REPLAY_WHEN_TIMED = '''

import re as _re

_honest_generate = generate
_answers = {}


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
    text = pipeline.tokenizer.decode(prompt)
    key = _re.sub(r"\\[request [0-9a-f]+\\]", "", text.split("<|im_start|>assistant")[0])
    if key in _answers:
        yield from _answers[key][:max_tokens]
        return
    pairs = []
    for token, logprobs in _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=False):
        mx.eval(logprobs)
        pairs.append((token, logprobs))
        yield token, logprobs
    _answers[key] = pairs
'''

HONEST = {
    "comment_only": lambda: BASE + "\n# A comment: nothing changes.\n",
    "argmax": lambda: knobs.patched_source(BASE, {"TEMP": 0.0}),
    "prefill_step_64": lambda: knobs.patched_source(BASE, {"PREFILL_STEP_SIZE": 64}),
    "cache_limit_4gb": lambda: knobs.patched_source(BASE, {"CACHE_LIMIT_GB": 4}),
    # draws from the whole reported distribution: the tail tests' hardest honest case
    "temp_1": lambda: knobs.patched_source(BASE, {"TEMP": 1.0, "TOP_P": 1.0}),
}
DAMAGE = {
    "kv4_from_0": lambda: knobs.patched_source(BASE, {"KV_BITS": 4, "QUANTIZED_KV_START": 0}),
    "kv4_when_timed": lambda: BASE + KV4_WHEN_TIMED,
    "half_layers_when_timed": lambda: BASE + HALF_LAYERS_WHEN_TIMED,
    "temp_2": lambda: knobs.patched_source(BASE, {"TEMP": 2.0}),
    "noisy_logits": lambda: BASE + NOISY_LOGITS,
    "fixed_token": lambda: BASE + FIXED_TOKEN,
    "loop_when_timed": lambda: BASE + LOOP_WHEN_TIMED,
    "canned_when_timed": lambda: BASE + CANNED_WHEN_TIMED,
    "replay_when_timed": lambda: BASE + REPLAY_WHEN_TIMED,
    "tail_shaped_when_timed": lambda: BASE + TAIL_SHAPED_WHEN_TIMED,
    "salad_when_timed": lambda: BASE + SALAD_WHEN_TIMED,
    "flat_tail_when_timed": lambda: BASE + FLAT_TAIL_WHEN_TIMED,
}


def run_variant(ctx, name, source, reference, tasks, tmp):
    """Measure one variant; returns {"name", "failed": [gate names] or None (crash), "figures"}."""
    path = Path(tmp) / f"{name}-{time.monotonic_ns()}" / "inference.py"
    path.parent.mkdir()
    path.write_text(source)
    out = measure.measure(ctx, {"challenger": path}, reference=reference, tasks=tasks, log_dir=path.parent)
    if out["failure"]:
        return {"name": name, "failed": None, "figures": {"failure": out["failure"]["reason"]}}
    m = out["quality"]
    gate_list = gates.gates(ctx.settings, m, reference)
    figures = {g["name"]: g["value"] for g in gate_list}
    figures["quality_s"] = m["quality_s"]
    # per-position data too, so a changed gate can be re-judged on the same runs
    measured = {k: v for k, v in m.items() if k not in ("tasks",)} | {"passed": [a["passed"] for a in m["tasks"]]}
    return {"name": name, "failed": [g["name"] for g in gate_list if not g["passed"]], "figures": figures,
            "measured": measured}


def rates(results, names):
    """Per gate: how many of the runs of `names` it failed."""
    runs = [r for r in results if r["name"] in names and r["failed"] is not None]
    per_gate = {}
    for r in runs:
        for gate in r["failed"]:
            per_gate[gate] = per_gate.get(gate, 0) + 1
    return len(runs), per_gate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full preset (default: quick)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each honest variant")
    parser.add_argument("--damage-repeats", type=int, default=1, help="runs of each damage variant")
    parser.add_argument("--only", nargs="*", default=list(HONEST) + list(DAMAGE))
    parser.add_argument("--save", help="write every run's figures to this JSON file")
    args = parser.parse_args()

    settings = load_settings()
    ctx = evaluate.make_context(settings, quick=not args.full, model=args.model)
    tasks = quality.selected_tasks(settings, ctx.quick)
    variants = {**HONEST, **DAMAGE}
    plan = [(n, r) for n in args.only for r in range(args.repeats if n in HONEST else args.damage_repeats)]
    print(f"model: {ctx.model}  preset: {ctx.preset.name}  runs: {len(plan)}  "
          f"false_alarm_rate: {settings.quality.gates.false_alarm_rate}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = quality.load_reference(ctx, tasks, tmp)
        for i, (name, _) in enumerate(plan):
            r = run_variant(ctx, name, variants[name](), reference, tasks, tmp)
            results.append(r)
            verdict = "CRASH " + r["figures"]["failure"] if r["failed"] is None else (
                "FAIL " + ",".join(r["failed"]) if r["failed"] else "PASS")
            print(f"[{i + 1}/{len(plan)}] {name:24s} {verdict}", flush=True)
            if args.save:  # after every run: a long bench cut short keeps what it measured
                Path(args.save).write_text(json.dumps(results, indent=1, default=str))
    honest_runs, honest_fails = rates(results, HONEST)
    alarms = sum(1 for r in results if r["name"] in HONEST and r["failed"])
    print("---")
    print(f"honest_runs: {honest_runs}")
    print(f"honest_runs_failing_any_gate: {alarms}")
    print(f"false_alarm_rate: {alarms / honest_runs:.3f}" if honest_runs else "false_alarm_rate: -")
    for gate, n in sorted(honest_fails.items()):
        print(f"false_alarms_{gate}: {n}/{honest_runs}")
    missed = []
    for name in [n for n in args.only if n in DAMAGE]:
        runs = [r for r in results if r["name"] == name]
        caught = sum(1 for r in runs if r["failed"] is None or r["failed"])
        gates_hit = sorted({g for r in runs for g in (r["failed"] if r["failed"] is not None else ["CRASH"])})
        print(f"detected_{name}: {caught}/{len(runs)}  ({', '.join(gates_hit) or 'none'})")
        if caught < len(runs):
            missed.append(name)
    print(f"every_damage_detected: {str(not missed).lower()}")


if __name__ == "__main__":
    main()
