"""The MLX inference pipeline: the ONE file the agent edits.

The locked harness (prepare.py) imports this file in a worker process and calls
three functions:

    load(model_path, draft_model_path=None) -> pipeline
    generate(pipeline, prompt, *, max_tokens, stop_at_eos) -> iterator of (token, logprobs)
    score(pipeline, tokens) -> iterator of log-probability chunks, shape (chunk, vocab)

`generate` yields one pair per new token: the token id (an int) and `logprobs`, the
log-probabilities (an mx.array of shape (vocab,) or (1, vocab)) that this pipeline's own
forward pass produced for that position, i.e. the distribution the token was sampled from
(before the sampler's transforms such as temperature and top-p, as mlx-lm's generate_step
yields them). The harness holds the stopwatch: it timestamps every token as it arrives and
reads its log-probs before it takes the next pair, so lazy work cannot hide past the last
token. It checks that speed calls yield exactly `max_tokens` pairs, and measures quality
against an independent float32 reference: through `score` on a corpus, and on the speed
calls' own tokens and log-probs.

Top to bottom: the knobs; load(); the one cache and forward path that generate() and
score() share (_new_cache, _pieces, _forward); the decode loop (_prefill, _step, _decode:
mlx-lm's generate_step written out); then generate() and score().
"""

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load as mlx_load
from mlx_lm.generate import maybe_quantize_kv_cache, speculative_generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

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
QUANTIZED_KV_START = 0     # positions from this one on are computed on the quantized KV cache
MAX_KV_SIZE = None         # rotating KV window in tokens (None = unbounded cache)
PREFILL_STEP_SIZE = 2048   # prompt tokens processed per forward pass during prefill (and score)
COMPUTE_DTYPE = "float32"  # dtype of activations, norms and quantization scales: float32 | float16 | bfloat16
CACHE_LIMIT_GB = None      # cap on MLX's buffer cache in GB (None = MLX default)
NUM_DRAFT_TOKENS = 3       # tokens the draft model proposes per step (speculative decoding only)


class Pipeline:
    """Everything `generate` and `score` need, built once by `load`."""

    def __init__(self, model, tokenizer, draft_model=None):
        self.model = model
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        # The sampler reads log-probabilities; the processors rewrite logits from the history.
        self.sampler = make_sampler(temp=TEMP, top_p=TOP_P, top_k=TOP_K, min_p=MIN_P)
        self.logits_processors = make_logits_processors(
            repetition_penalty=REPETITION_PENALTY if REPETITION_PENALTY != 1.0 else None,
            repetition_context_size=REPETITION_CONTEXT,
        )
        # A stream of our own, as mlx-lm's generation_stream: the queued step runs there.
        self.stream = mx.new_stream(mx.default_device())


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


# ---------------------------------------------------------------------------
# The one cache and forward path: generate() and score() both go through here
# ---------------------------------------------------------------------------
def _new_cache(pipeline):
    """A fresh KV cache; a rotating window when MAX_KV_SIZE is set.

    mlx-lm ignores max_kv_size for models with their own make_cache (llama has one),
    so the window is built here for plain full-attention caches.
    """
    cache = make_prompt_cache(pipeline.model, max_kv_size=MAX_KV_SIZE)
    if MAX_KV_SIZE is not None:
        cache = [RotatingKVCache(max_size=MAX_KV_SIZE, keep=4) if type(c) is KVCache else c for c in cache]
    return cache


def _pieces(start, stop):
    """Split positions [start, stop) into forward passes of at most PREFILL_STEP_SIZE tokens.

    With a quantized cache, a pass never straddles QUANTIZED_KV_START: the positions
    before it run on the full-precision cache, those from it on the quantized one.
    """
    while start < stop:
        end = min(start + PREFILL_STEP_SIZE, stop)
        if KV_BITS is not None and start < QUANTIZED_KV_START < end:
            end = QUANTIZED_KV_START
        yield start, end
        start = end


def _forward(pipeline, cache, tokens):
    """Run `tokens` (a 1-D mx.array) through the model on `cache`; logits (len(tokens), vocab).

    The cache is quantized BEFORE a pass that starts at or after QUANTIZED_KV_START
    (mlx-lm's rule on the cache offset), so the pass's attention already reads the
    quantized cache. Position p is thus computed on a quantized cache exactly when
    p >= QUANTIZED_KV_START, in prefill, decode and score alike.
    """
    maybe_quantize_kv_cache(cache, quantized_kv_start=QUANTIZED_KV_START,
                            kv_group_size=KV_GROUP_SIZE, kv_bits=KV_BITS)
    return pipeline.model(tokens[None], cache=cache)[0]


def _log_softmax(logits):
    """Log-probabilities in float32 whatever the compute dtype (a float16 log-sum-exp over
    the whole vocabulary loses precision the quality gates would then blame)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# The decode loop (mlx-lm's generate_step, written out)
# ---------------------------------------------------------------------------
def _prefill(pipeline, cache, prompt):
    """Run every prompt token but the last through the cache, one chunk per pass.

    The last one is left for the first decode step, whose logits give the first new
    token. Evaluating each chunk's cache bounds memory to one chunk of activations.
    """
    for start, stop in _pieces(0, len(prompt) - 1):
        _forward(pipeline, cache, prompt[start:stop])
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def _step(pipeline, cache, tokens, history):
    """One decode step, lazy: (sampled token, shape (1,); its log-probs, shape (vocab,)).

    model forward on the cache -> last position's logits -> logits processors (they read
    `history`, every token so far) -> log-softmax -> sampler. The log-probs returned are
    the distribution the sampler drew from, before its own temperature/top-p transforms.
    """
    logits = _forward(pipeline, cache, tokens)[-1:]  # (1, vocab): only the last position samples
    for processor in pipeline.logits_processors:
        logits = processor(history, logits)
    logprobs = _log_softmax(logits)
    return pipeline.sampler(logprobs), logprobs[0]


def _decode(pipeline, cache, prompt, *, max_tokens):
    """Yield (token, logprobs) for `max_tokens` new tokens, after _prefill.

    Double buffering: step n+1 is queued with mx.async_eval BEFORE token n is handed
    to the caller, so the device computes the next token while Python yields this one;
    `.item()` waits only for the current token.
    """
    history = prompt if pipeline.logits_processors else None  # only the processors need it
    y, logprobs = _step(pipeline, cache, prompt[-1:], history)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:  # no step is queued past the last token
            if history is not None:
                history = mx.concatenate([history, y])
            next_y, next_logprobs = _step(pipeline, cache, y, history)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n % 256 == 255:
            mx.clear_cache()  # return the freed buffers now and then, as mlx-lm does
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def _speculative(pipeline, prompt, *, max_tokens):
    """Speculative decoding through mlx-lm: the draft model proposes NUM_DRAFT_TOKENS
    tokens and the model checks them in one pass. mlx-lm keeps its own caches here (no
    rotating window: it must trim rejected tokens) and quantizes them after each pass."""
    steps = speculative_generate_step(
        prompt, pipeline.model, pipeline.draft_model, max_tokens=max_tokens,
        num_draft_tokens=NUM_DRAFT_TOKENS, sampler=pipeline.sampler,
        logits_processors=pipeline.logits_processors, prefill_step_size=PREFILL_STEP_SIZE,
        kv_bits=KV_BITS, kv_group_size=KV_GROUP_SIZE, quantized_kv_start=QUANTIZED_KV_START)
    for token, logprobs, _from_draft in steps:
        yield token, logprobs


# ---------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------
def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    """Yield (token, logprobs) pairs for `prompt` (a list of token ids).

    Speed calls pass stop_at_eos=False and must receive exactly `max_tokens` pairs.
    """
    with mx.stream(pipeline.stream):
        prompt = mx.array(prompt)
        if pipeline.draft_model is not None:
            steps = _speculative(pipeline, prompt, max_tokens=max_tokens)
        else:
            cache = _new_cache(pipeline)
            _prefill(pipeline, cache, prompt)
            steps = _decode(pipeline, cache, prompt, max_tokens=max_tokens)
        eos = set(pipeline.tokenizer.eos_token_ids)
        for token, logprobs in steps:
            yield token, logprobs
            if stop_at_eos and token in eos:
                return


def score(pipeline, tokens):
    """Yield log-probabilities of the next token at every position of `tokens`.

    Teacher forcing through the same cache and forward path as generate(), in the same
    chunks as its prefill, so cache quantization, a rotating window or a lower dtype
    show up in quality. Each chunk has shape (chunk_len, vocab); rows follow `tokens`.
    """
    with mx.stream(pipeline.stream):
        cache = _new_cache(pipeline)
        for start, stop in _pieces(0, len(tokens)):
            yield _log_softmax(_forward(pipeline, cache, mx.array(tokens[start:stop])))
