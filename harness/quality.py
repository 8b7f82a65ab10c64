"""Quality gates against an independent float32 reference.

Three views of quality, all computed here in the parent from what the workers
return (nothing the pipeline says about itself is used):
  * the locked corpus through the pipeline's `score`: perplexity, and mean KL
    divergence (reference || pipeline), its 99th percentile and top-1 agreement,
    as llama.cpp's `llama-perplexity --kl-divergence` reports them;
  * locked chat tasks answered by the pipeline, checked by harness/tasks.py and
    compared with the reference's own greedy answers;
  * every speed call of the challenger, teacher-forced through the reference: the
    log-probs the pipeline yielded while it was timed against the reference's, and
    where its tokens sit in both distributions, so canned, random or cheaper tokens
    fail. All of them, not a sample: a pipeline that cheats on a share of its calls
    would otherwise pass whenever the sample missed them. The reference likes loops as
    much as any language model does, so every speed output is also checked for
    repetition.
"""

import hashlib
import io
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np

from harness import settings as settings_mod
from harness.gates import TAIL_PIT
from harness.models import cache_dir
from harness.report import Progress, note, stage
from harness.tasks import check, load_tasks
from harness.worker import Worker, WorkerInvalid
from harness.workload import chat_tokens

REFERENCE_PIPELINE = Path(__file__).resolve().parent / "reference_pipeline.py"
TASK_SEED = 1234  # seeds MLX's generator before each task answer, so sampling repeats


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------
def selected_tasks(settings, quick):
    """The locked tasks this preset answers, in order."""
    by_id = {t.id: t for t in load_tasks()}
    return [by_id[i] for i in settings.quality.tasks["quick" if quick else "full"]]


# ---------------------------------------------------------------------------
# The reference, computed once per (model, corpus, tasks, settings) and cached
# ---------------------------------------------------------------------------
def corpus_tokens(tokenizer, corpus_text, n):
    """The first `n` corpus tokens (BOS first when the tokenizer has one)."""
    ids = tokenizer.encode(corpus_text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    return (([bos] if bos is not None else []) + list(ids))[:n]


def reference_key(ctx, tasks):
    """The cache key of the reference: only what its figures depend on, not the gates."""
    q = ctx.settings.quality
    return settings_mod.digest({
        "model": ctx.model_digest, "corpus": ctx.corpus_sha256,
        "tasks": [(t.id, t.prompt, t.kind) for t in tasks],
        "corpus_tokens": max(q.corpus_tokens.full, q.corpus_tokens.quick), "max_tokens": dict(q.max_tokens),
        "reference": hashlib.sha256(REFERENCE_PIPELINE.read_bytes()).hexdigest()[:12],
    })


REFERENCE_ARRAYS = ("nll.npy", "kl_logprobs.npy")


def load_reference(ctx, tasks, log_dir):
    """The reference's corpus log-probs and task results, from the cache or computed now.

    The cache is read whole (never a writable memory map) and checked against the hashes
    written when it was built; a missing, damaged or altered cache is rebuilt, and the
    run says so.
    """
    folder = cache_dir() / "reference" / reference_key(ctx, tasks)
    if (folder / "meta.json").exists():
        reference, problem = _read_reference(folder)
        if reference is not None:
            return reference
        note(f"warning: the cached reference in {folder} is damaged ({problem}): rebuilding it")
    else:
        note("computing the float32 reference for this model, corpus and task set (once; cached) ...")
    _build_reference(ctx, tasks, folder, log_dir)
    reference, problem = _read_reference(folder)
    if reference is None:
        raise RuntimeError(f"the reference just built in {folder} does not read back: {problem}")
    return reference


def _sha256(blob):
    return hashlib.sha256(blob).hexdigest()


def _meta_digest(meta):
    """Hash of the meta fields (everything but the digest itself)."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


def _read_reference(folder):
    """(reference dict, None) when the cache reads and every hash matches, else (None, why)."""
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
        if not isinstance(meta, dict) or meta.get("digest") != _meta_digest(meta):
            return None, "meta.json does not match its hash"
        arrays = {}
        for name in REFERENCE_ARRAYS:
            blob = (folder / name).read_bytes()
            if _sha256(blob) != meta["files"].get(name):
                return None, f"{name} does not match its hash"
            arrays[name] = np.load(io.BytesIO(blob), allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON and .npy errors are ValueErrors
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    meta["nll"], meta["kl_logprobs"] = arrays["nll.npy"], arrays["kl_logprobs.npy"]
    return meta, None


def _build_reference(ctx, tasks, folder, log_dir):
    q = ctx.settings.quality
    timeout = ctx.settings.timeouts.call_s
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    worker = Worker(REFERENCE_PIPELINE, Path(log_dir) / "reference.log", expose=[ctx.model_dir])
    try:
        worker.load(ctx.model_dir, timeout_s=ctx.settings.timeouts.load_s)
        # Score as many tokens as the largest preset needs; smaller ones use a prefix.
        tokens = corpus_tokens(ctx.tokenizer, ctx.corpus_text, max(q.corpus_tokens.full, q.corpus_tokens.quick))
        stage(f"reference: corpus ({len(tokens)} tokens)")
        nll, rows_kept = [], []
        for rows, start in _rows_with_offsets(worker.score(tokens, timeout_s=timeout)):
            nll.extend(_token_nll(rows, tokens, start))
            rows_kept.append(rows.astype(np.float16))  # float16 on disk; renormalized on use
        np.save(tmp / "nll.npy", np.asarray(nll, dtype=np.float64))
        np.save(tmp / "kl_logprobs.npy", np.concatenate(rows_kept))
        stage(f"reference: tasks ({len(tasks)})")
        results = answer_tasks(worker, ctx, tasks, progress=Progress("reference: tasks"))
    finally:
        worker.close()
    meta = {"tokens": len(tokens), "tasks": results,
            "sanity": sum(r["passed"] for r in results) / len(results),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {name: _sha256((tmp / name).read_bytes()) for name in REFERENCE_ARRAYS}}
    meta["digest"] = _meta_digest(meta)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # a whole reference or none: an interrupted build leaves nothing


def _rows_with_offsets(chunks):
    start = 0
    for rows in chunks:
        yield rows, start
        start += rows.shape[0]


def _token_nll(rows, tokens, start):
    """NLL of each next token: row i (position start+i) predicts tokens[start+i+1]."""
    n = min(rows.shape[0], len(tokens) - 1 - start)
    if n <= 0:
        return []
    targets = np.asarray(tokens[start + 1:start + 1 + n])
    return list(-rows[np.arange(n), targets].astype(np.float64))


# ---------------------------------------------------------------------------
# Measuring a pipeline
# ---------------------------------------------------------------------------
def answer_tasks(worker, ctx, tasks, *, progress=None):
    """Have `worker` answer each task (EOS honoured, capped) and check every answer."""
    caps = ctx.settings.quality.max_tokens
    eos = set(getattr(ctx.tokenizer, "eos_token_ids", None) or [ctx.tokenizer.eos_token_id])
    results = []
    for i, task in enumerate(tasks):
        out = worker.generate(chat_tokens(ctx.tokenizer, task.prompt), max_tokens=caps[task.kind],
                              stop_at_eos=True, timeout_s=ctx.settings.timeouts.call_s,
                              seed=TASK_SEED)
        answer = out["tokens"][:caps[task.kind]]  # a pipeline that overruns the cap gains nothing
        text = ctx.tokenizer.decode([t for t in answer if t not in eos])
        passed, why = check(task, text)
        results.append({"id": task.id, "kind": task.kind, "passed": passed, "why": why,
                        "answer": text[:2000]})
        if progress:
            progress(i + 1, len(tasks), task.id)
    return results


def score_corpus(worker, ctx, reference):
    """Perplexity of the corpus through the pipeline's `score`, and KL / top-1 against the reference.

    Also returns the reference's perplexity on the same tokens.
    """
    n = ctx.settings.quality.corpus_tokens[ctx.preset.name]
    tokens = corpus_tokens(ctx.tokenizer, ctx.corpus_text, n)
    ref_rows = reference["kl_logprobs"]
    nll, kl, top1 = [], [], []
    for rows, start in _rows_with_offsets(worker.score(tokens, timeout_s=ctx.settings.timeouts.call_s)):
        rows = _log_softmax(rows)
        nll.extend(_token_nll(rows, tokens, start))
        keep = max(0, min(rows.shape[0], ref_rows.shape[0] - start))
        if keep:
            ref = _log_softmax(np.asarray(ref_rows[start:start + keep], dtype=np.float32))
            mine = rows[:keep]
            p = np.exp(ref)
            with np.errstate(invalid="ignore", over="ignore"):
                kl.extend(np.sum(p * (ref - mine), axis=-1).astype(np.float64))
            top1.extend(np.argmax(ref, axis=-1) == np.argmax(mine, axis=-1))
    nll = np.asarray(nll)
    mean_nll = float(np.mean(nll))
    se_nll = float(np.std(nll, ddof=1) / math.sqrt(len(nll)))
    perplexity = math.exp(mean_nll) if mean_nll < 700 else float("inf")  # exp overflows past ~709
    kl = np.asarray(kl)
    ref_nll = np.asarray(reference["nll"][:len(nll)], dtype=np.float64)
    return {"perplexity": perplexity, "perplexity_se": perplexity * se_nll if np.isfinite(se_nll) else None,
            "reference_perplexity": math.exp(float(np.mean(ref_nll))),
            "kl_mean": float(np.mean(kl)),
            "kl_p99": float(np.percentile(kl, 99)) if np.all(np.isfinite(kl)) else float("inf"),
            "top1_agreement": float(np.mean(top1)), "scored_tokens": len(tokens),
            # per position, for the gates' tests (nll_diff: the pipeline's NLL minus the reference's)
            "corpus": {"nll_diff": list(nll - ref_nll), "kl": list(kl), "top1": list(top1)}}


def _log_softmax(rows):
    """Renormalize log-probabilities (the pipeline's output is not trusted to sum to 1).
    Shifted by the row's top first: `rows - (top + log-sum)` rounded the log-sum away when the
    top was large (a red team's rows topped at 2^20 kept 0.25 nats of extra mass: KL below 0)."""
    rows = np.asarray(rows, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = rows - np.max(rows, axis=-1, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def own_rows(rows, tokens, folder):
    """What the timed-call check keeps of one call's log-prob rows (n_tokens, vocab), taken
    right after the call: the rows themselves, renormalized, in a float16 file in `folder`
    (the run's temporary folder, which no worker can see), until the reference reads the
    call; and, from the float32 rows, their argmax and where each token sits in the
    pipeline's own distribution (own_pit, own_pit_var: the self-consistency test).

    On disk, not in memory: every timed call is checked, and calls x tokens x vocabulary
    add up (180 calls of 32 tokens of a 150k vocabulary: 1.7 GB at 2 bytes). Whole rows, not
    the pipeline's likeliest tokens with the rest pooled: a red team's pipeline computed a
    third of the vocabulary and spread a flat tail over the rest, and a KL pooled that way
    showed 0.03 nats where the whole-vocabulary KL was 0.32.
    """
    mine = _log_softmax(rows)
    if mine.ndim != 2 or mine.shape[0] != len(tokens):
        raise WorkerInvalid(f"generate() log-probs: shape {tuple(mine.shape)}, expected one row per token "
                            f"({len(tokens)})")
    path = Path(folder) / f"timed-rows-{secrets.token_hex(8)}.npy"
    # Floored where float16 still holds it: a masked -1e9 (or -inf) would become -inf there,
    # and 0 x inf a NaN where the reference's probability underflows to 0.
    np.save(path, np.maximum(mine, -60000.0).astype(np.float16))
    probs = np.exp(mine.astype(np.float64))
    more, same, total = _pit_parts(probs, tokens)
    drawn = np.random.default_rng(secrets.randbits(64)).random(len(tokens))
    return {"path": str(path), "argmax": np.argmax(mine, axis=-1),
            "own_pit": list((more + 0.5 * same) / total), "own_pit_var": pit_null_variance(probs),
            "own_pit_drawn": list((more + drawn * same) / total)}


def measure_timed_calls(ctx, samples, log_dir):
    """Quality of exactly what was timed: the reference teacher-forces every speed call's
    prompt and tokens, and its distribution at every generated position is compared with
    the log-probabilities the pipeline yielded for that position (Sample.own, own_rows).

    Args:
        samples: the challenger's speed calls (bench.Sample with `own`).
    Returns:
        Per-position arrays under "timed" (kl, top1, own_pit / ref_pit = each token's place
        in the pipeline's own / the reference's distribution, see token_pit; ref_nll,
        ref_entropy) and their summaries: timed_kl_mean, timed_kl_p99, timed_top1,
        self_consistency (mean own_pit), continuation_fit (mean ref_pit), self_consistency_tail /
        continuation_tail (share of own_pit_drawn / ref_pit_drawn beyond gates.TAIL_PIT),
        continuation_nll, reference_entropy, verified_calls.
    """
    timed = {"kl": [], "top1": [], "own_pit": [], "ref_pit": [], "own_pit_var": [], "ref_pit_var": [],
             "own_pit_drawn": [], "ref_pit_drawn": [], "ref_nll": [], "ref_entropy": []}
    worker = Worker(REFERENCE_PIPELINE, Path(log_dir) / "reference.log", expose=[ctx.model_dir])
    try:
        worker.load(ctx.model_dir, timeout_s=ctx.settings.timeouts.load_s)
        progress = Progress("quality: timed calls", unit="calls")
        for i, s in enumerate(samples):
            ref = _reference_rows(worker, ctx, list(s.prompt_ids), list(s.tokens))
            _compare_positions(_log_softmax(ref), s.own, s.tokens, timed)
            progress(i + 1, len(samples), s.prompt)
    finally:
        worker.close()
    kl = np.asarray(timed["kl"])
    return {"timed": timed,
            "timed_kl_mean": float(np.mean(kl)),
            "timed_kl_p99": float(np.percentile(kl, 99)) if np.all(np.isfinite(kl)) else float("inf"),
            "timed_top1": float(np.mean(timed["top1"])),
            "self_consistency": float(np.mean(timed["own_pit"])),
            "self_consistency_tail": float(np.mean(np.asarray(timed["own_pit_drawn"]) >= TAIL_PIT)),
            "continuation_fit": float(np.mean(timed["ref_pit"])),
            "continuation_tail": float(np.mean(np.asarray(timed["ref_pit_drawn"]) >= TAIL_PIT)),
            "continuation_nll": float(np.mean(timed["ref_nll"])),
            "reference_entropy": float(np.mean(timed["ref_entropy"])),
            "verified_calls": [[s.prompt, s.repeat] for s in samples]}


def _reference_rows(worker, ctx, prompt, tokens):
    """The reference's log-prob rows that predict each of `tokens` after `prompt`."""
    first, rows = len(prompt) - 1, []
    for chunk, start in _rows_with_offsets(worker.score(prompt + tokens, timeout_s=ctx.settings.timeouts.call_s)):
        lo, hi = max(first, start), min(first + len(tokens), start + chunk.shape[0])
        if lo < hi:
            rows.append(chunk[lo - start:hi - start])
    return np.concatenate(rows)


def _compare_positions(ref, own, tokens, out):
    """Append per-position KL(ref || pipeline), top-1 agreement, the reference's NLL and
    entropy, and each token's rank in the reference's and the pipeline's own distribution
    (PIT) to `out`; `own` is what own_rows kept of the pipeline's rows."""
    mine = np.load(own["path"]).astype(np.float32)
    idx = np.arange(len(tokens)), np.asarray(tokens)
    p_ref = np.exp(ref)
    with np.errstate(invalid="ignore", over="ignore"):
        ref_entropy = -np.sum(p_ref * ref, axis=-1)
        out["kl"].extend(np.sum(p_ref * (ref - mine), axis=-1).astype(np.float64))
    out["top1"].extend(np.argmax(ref, axis=-1) == own["argmax"])
    out["ref_nll"].extend(-ref[idx].astype(np.float64))
    out["ref_entropy"].extend(ref_entropy.astype(np.float64))
    more, same, total = _pit_parts(p_ref, tokens)
    drawn = np.random.default_rng(secrets.randbits(64)).random(len(tokens))  # within ties: the tail tests
    out["ref_pit"].extend(list((more + 0.5 * same) / total))
    out["ref_pit_drawn"].extend(list((more + drawn * same) / total))
    out["own_pit"].extend(own["own_pit"])
    out["ref_pit_var"].extend(pit_null_variance(p_ref))
    out["own_pit_var"].extend(own["own_pit_var"])
    out["own_pit_drawn"].extend(own["own_pit_drawn"])


def pit_null_variance(probs):
    """Per position, the variance token_pit has for a token drawn from `probs`:
    (1 - sum p^3) / 12 (the mid-distribution transform of a discrete distribution; ties
    would only lower it). Peaked distributions vary far less than 1/12."""
    probs = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    total = np.maximum(np.sum(probs, axis=-1, keepdims=True), 1e-30)
    return list((1.0 - np.sum((probs / total) ** 3, axis=-1)) / 12.0)


def token_pit(probs, tokens, draw=None):
    """Per position, where the token sits in the distribution it is said to come from: the
    mass of the tokens more likely than it, plus half the mass of those as likely (mid-p).

    For a token drawn from `probs` itself this has mean 1/2 and variance at most 1/12 (the
    probability integral transform); sampling sharper than `probs` (lower temperature,
    top-p, argmax) gives less, sampling flatter or from something else gives more.
    With `draw` (a numpy Generator, the harness's own entropy), a uniform share of the tied
    mass instead of half: then a token drawn from `probs` lands above any u with
    probability exactly 1 - u (at most that, sampling sharper), the tail test's null.
    """
    more, same, total = _pit_parts(probs, tokens)
    share = 0.5 if draw is None else draw.random(len(tokens))
    return list((more + share * same) / total)


def _pit_parts(probs, tokens):
    """Per position: the mass of tokens likelier than the chosen one, of those as likely
    (itself included), and the row's total."""
    probs = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    chosen = probs[np.arange(len(tokens)), np.asarray(tokens)][:, None]
    more = np.sum(np.where(probs > chosen, probs, 0.0), axis=-1)
    same = np.sum(np.where(probs == chosen, probs, 0.0), axis=-1)
    return more, same, np.maximum(np.sum(probs, axis=-1), 1e-30)


def repetition(tokens, n=4):
    """Share of the `n`-grams in `tokens` that already occurred earlier in them
    (0 for ordinary text; near 1 for one token or a short cycle over and over)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
