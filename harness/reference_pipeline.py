"""The independent reference: the same weights through stock mlx-lm in float32.

Locked harness code, never the pipeline's. It runs in its own worker process
(no inference.py is imported there) and answers the same contract as
inference.py: it teacher-forces the corpus and the timed calls, and answers the tasks.
"""

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

SCORE_CHUNK = 512  # tokens per forward pass when scoring


class Reference:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer


def load(model_path, draft_model_path=None):
    """Load the model and cast every floating-point parameter to float32."""
    model, tokenizer = mlx_load(str(model_path))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return Reference(model, tokenizer)


def generate(ref, prompt, *, max_tokens, stop_at_eos):
    """Greedy decoding (the reference's answers to the tasks): (token, logprobs) pairs,
    the contract of inference.py's generate()."""
    eos = set(ref.tokenizer.eos_token_ids)
    for token, logprobs in generate_step(mx.array(prompt), ref.model, max_tokens=max_tokens,
                                         prompt_cache=make_prompt_cache(ref.model)):
        yield token, logprobs
        if stop_at_eos and token in eos:
            return


def _logprobs(ref, tokens):
    """Yield (start, logprobs) for `tokens` in SCORE_CHUNK pieces, through one KV cache."""
    cache = make_prompt_cache(ref.model)
    for start in range(0, len(tokens), SCORE_CHUNK):
        chunk = mx.array(tokens[start:start + SCORE_CHUNK])[None]
        logits = ref.model(chunk, cache=cache)[0].astype(mx.float32)
        yield start, logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def score(ref, tokens):
    """Next-token log-probabilities at every position, chunk by chunk."""
    for _, logprobs in _logprobs(ref, tokens):
        yield logprobs
