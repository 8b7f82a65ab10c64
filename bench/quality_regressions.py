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

from harness import evaluate, quality  # noqa: E402
from harness.settings import ROOT, load_settings  # noqa: E402

BASE = (ROOT / "inference.py").read_text()

NOISY_MODEL = '''
class _Noisy:
    """Wraps the model: Gaussian noise (std 2) on every logit."""
    def __init__(self, model):
        self._model = model
    def __call__(self, *args, **kwargs):
        logits = self._model(*args, **kwargs)
        return logits + 2.0 * mx.random.normal(logits.shape).astype(logits.dtype)
    def __getattr__(self, name):
        return getattr(self._model, name)

'''

# Every call, tasks included: the model runs, but its tokens are replaced by one fixed token
# (the log-probs it yields are the model's own, for the tokens it did not yield).
FIXED_TOKEN = '''
_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    token = pipeline.tokenizer.encode(" the", add_special_tokens=False)[0]
    for _, logprobs in _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=False):
        yield token, logprobs
'''

def honest_on_tasks(timed_body):
    """Source appended to inference.py: honest when EOS is honoured (the tasks), `timed_body`
    when timed (speed calls ignore EOS), so only the speed-output checks can see it.
    `timed_body` yields its tokens with `flat`, a uniform claimed distribution over the
    vocabulary (its size taken from one forward pass), so no model runs per token."""
    return '''
_honest_generate = generate


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    if stop_at_eos:
        yield from _honest_generate(pipeline, prompt, max_tokens=max_tokens, stop_at_eos=stop_at_eos)
        return
    vocab = pipeline.model(mx.array([prompt[:1]])).shape[-1]
    flat = mx.full((vocab,), -float(mx.log(mx.array(vocab, mx.float32))))
''' + timed_body


# When timed: one token over and over.
LOOP_WHEN_TIMED = honest_on_tasks('''    token = pipeline.tokenizer.encode(" the", add_special_tokens=False)[0]
    for _ in range(max_tokens):
        yield token, flat
''')

# When timed: a fixed fluent paragraph, no model call per token.
CANNED_WHEN_TIMED = honest_on_tasks('''    text = ("Transformers are neural networks that read a whole sequence at once. Each layer lets "
            "every token attend to the others, weighs what matters, and passes a richer picture of "
            "the text to the next layer. Training on large amounts of writing teaches them grammar, "
            "facts and style, which is why they can answer questions, summarise articles and write "
            "code. Their cost grows with the length of the input, so long documents are expensive.")
    tokens = pipeline.tokenizer.encode(text, add_special_tokens=False)
    for i in range(max_tokens):
        yield tokens[i % len(tokens)], flat
''')

def variant(name):
    """The source of inference.py for one variant."""
    if name == "baseline":
        return BASE
    if name == "argmax":
        return BASE.replace("TEMP = 0.7 ", "TEMP = 0.0 ", 1)
    if name == "kv4_from_0":
        return BASE.replace("KV_BITS = None ", "KV_BITS = 4 ", 1)
    if name == "temp_2":
        return BASE.replace("TEMP = 0.7 ", "TEMP = 2.0 ", 1)
    if name == "noisy_logits":
        src = BASE.replace("class Pipeline:", NOISY_MODEL + "class Pipeline:", 1)
        return src.replace("    _cast(model, dtype)\n", "    _cast(model, dtype)\n    model = _Noisy(model)\n", 1)
    if name == "fixed_token":
        return BASE + FIXED_TOKEN  # the later definition wins
    if name == "loop_when_timed":
        return BASE + LOOP_WHEN_TIMED
    if name == "canned_when_timed":
        return BASE + CANNED_WHEN_TIMED
    raise ValueError(name)


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
            out = evaluate.measure(ctx, {"challenger": path}, reference=reference, tasks=tasks,
                                   log_dir=path.parent)
            if out["failure"]:
                print(f"{name:18s} {out['failure']['decision']}: {out['failure']['reason']}")
                ok &= name not in EXPECT_PASS
                continue
            m = out["quality"]
            gate_list = quality.gates(settings, m, reference)
            failed = [g["name"] for g in gate_list if not g["passed"]]
            print(f"{name:18s} {m['perplexity']:8.3f} {m['kl_mean']:9.2e} {m['kl_p99']:8.3f} "
                  f"{m['top1_agreement']:6.3f} {m['sanity']:6.2f} {m['continuation_nll']:8.3f} "
                  f"{m['reference_entropy']:7.3f} {m['repetition']:6.3f} {m['quality_s']:9.1f}  "
                  f"{'PASS' if not failed else 'FAIL ' + ','.join(failed)}", flush=True)
            ok &= (not failed) == (name in EXPECT_PASS)
    print(f"all_as_expected: {str(ok).lower()}")


if __name__ == "__main__":
    main()
