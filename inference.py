"""The MLX inference pipeline: the ONE file the agent edits.

The locked harness (prepare.py) imports this file in a worker process and calls
three functions:

    load(model_path, draft_model_path=None) -> pipeline
    generate(pipeline, prompt, *, max_tokens, stop_at_eos) -> iterator of token ids
    score(pipeline, tokens) -> iterator of log-probability chunks, shape (chunk, vocab)

The harness holds the stopwatch (it timestamps every token as it arrives), checks
that speed calls yield exactly `max_tokens` integer tokens, and measures quality
through `score` and the answers against an independent float32 reference.
"""

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx.utils import tree_map

# ---------------------------------------------------------------------------
# Knobs (the search mode overrides these by name; keep them plain literals)
# ---------------------------------------------------------------------------
TEMP = 0.7                 # sampling temperature; 0 = argmax (greedy)
TOP_P = 0.9                # nucleus sampling: keep the smallest set with this mass (1.0 = off)
TOP_K = 0                  # keep only the k most likely tokens (0 = off)
MIN_P = 0.0                # drop tokens below MIN_P x the top probability (0 = off)
REPETITION_PENALTY = 1.0   # >1 discourages repeating recent tokens (1.0 = off)
REPETITION_CONTEXT = 20    # how many recent tokens the repetition penalty looks at
KV_BITS = None             # quantize the KV cache to 4 or 8 bits (None = full precision)
KV_GROUP_SIZE = 64         # group size for KV quantization (must divide head_dim)
QUANTIZED_KV_START = 0     # position from which the KV cache is quantized (when KV_BITS is set)
MAX_KV_SIZE = None         # rotating KV window in tokens (None = unbounded cache)
PREFILL_STEP_SIZE = 2048   # prompt tokens processed per forward pass during prefill
COMPUTE_DTYPE = "float32"  # dtype of activations, norms and quantization scales: float32 | float16 | bfloat16
CACHE_LIMIT_GB = None      # cap on MLX's buffer cache in GB (None = MLX default)
NUM_DRAFT_TOKENS = 3       # tokens the draft model proposes per step (speculative decoding only)


class Pipeline:
    """Everything `generate` and `score` need, built once by `load`."""

    def __init__(self, model, tokenizer, draft_model=None):
        self.model = model
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.sampler = make_sampler(temp=TEMP, top_p=TOP_P, top_k=TOP_K, min_p=MIN_P)
        self.logits_processors = make_logits_processors(
            repetition_penalty=REPETITION_PENALTY if REPETITION_PENALTY != 1.0 else None,
            repetition_context_size=REPETITION_CONTEXT,
        )


def _cast(model, dtype):
    """Cast every floating-point parameter (quantization scales included) to `dtype`.

    Quantized weights stay packed integers; only their scales/biases and the dense
    parameters change, which is what decides the compute precision in MLX.
    """
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())


def load(model_path, draft_model_path=None):
    """Load the model (and an optional draft model for speculative decoding)."""
    if CACHE_LIMIT_GB is not None:
        mx.set_cache_limit(int(CACHE_LIMIT_GB * 1024**3))
    dtype = getattr(mx, COMPUTE_DTYPE)
    model, tokenizer = mlx_load(str(model_path))
    _cast(model, dtype)
    draft_model = None
    if draft_model_path is not None:
        draft_model, _ = mlx_load(str(draft_model_path))
        _cast(draft_model, dtype)
    return Pipeline(model, tokenizer, draft_model)


def _new_cache(pipeline):
    """A fresh KV cache; a rotating window when MAX_KV_SIZE is set.

    mlx-lm ignores max_kv_size for models with their own make_cache (llama has one),
    so the window is built here for plain full-attention caches.
    """
    cache = make_prompt_cache(pipeline.model, max_kv_size=MAX_KV_SIZE)
    if MAX_KV_SIZE is not None:
        cache = [RotatingKVCache(max_size=MAX_KV_SIZE, keep=4) if type(c) is KVCache else c for c in cache]
    return cache


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    """Yield generated token ids for `prompt` (a list of token ids).

    Speed calls pass stop_at_eos=False and must receive exactly `max_tokens` tokens.
    """
    kv = dict(kv_bits=KV_BITS, kv_group_size=KV_GROUP_SIZE, quantized_kv_start=QUANTIZED_KV_START)
    prompt = mx.array(prompt)
    if pipeline.draft_model is not None:
        steps = speculative_generate_step(
            prompt, pipeline.model, pipeline.draft_model, max_tokens=max_tokens,
            num_draft_tokens=NUM_DRAFT_TOKENS, sampler=pipeline.sampler,
            logits_processors=pipeline.logits_processors,
            prefill_step_size=PREFILL_STEP_SIZE, **kv)
        steps = ((token, logprobs) for token, logprobs, _from_draft in steps)
    else:
        steps = generate_step(
            prompt, pipeline.model, max_tokens=max_tokens, sampler=pipeline.sampler,
            logits_processors=pipeline.logits_processors, prompt_cache=_new_cache(pipeline),
            prefill_step_size=PREFILL_STEP_SIZE, **kv)
    eos = set(pipeline.tokenizer.eos_token_ids)
    for token, _logprobs in steps:
        yield token
        if stop_at_eos and token in eos:
            return


def score(pipeline, tokens):
    """Yield log-probabilities of the next token at every position of `tokens`.

    Runs the pipeline's own forward path and KV cache in PREFILL_STEP_SIZE chunks,
    so cache quantization, a rotating window or a lower dtype show up in quality.
    Each chunk has shape (chunk_len, vocab); rows follow `tokens` one to one.
    """
    cache = _new_cache(pipeline)
    for start in range(0, len(tokens), PREFILL_STEP_SIZE):
        if KV_BITS is not None and start >= QUANTIZED_KV_START:
            # Quantize before the chunk, so its attention reads the quantized cache too.
            cache = [c.to_quantized(group_size=KV_GROUP_SIZE, bits=KV_BITS)
                     if isinstance(c, KVCache) else c for c in cache]
        chunk = mx.array(tokens[start:start + PREFILL_STEP_SIZE])[None]  # (1, L)
        logits = pipeline.model(chunk, cache=cache)[0].astype(mx.float32)  # (L, vocab)
        yield logits - mx.logsumexp(logits, axis=-1, keepdims=True)
