"""The yardstick: the same weights through stock mlx-lm at the model's own dtype.

Locked harness code, never the pipeline's. It runs in its own worker process beside the
pipelines in every run (bench.run_workload, one call per round), so each pipeline's speed
is also known relative to it, a ratio the machine's load cancels out of. A champion's
ratio now against its ratio when it was measured itself (pace.check_champion_yardstick)
says whether it slowed down since, whatever told it its role.
"""

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache


def load(model_path, draft_model_path=None):
    """The model as mlx-lm loads it (no draft model)."""
    return mlx_load(str(model_path))


def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    """Greedy decoding: (token, logprobs) pairs, the contract of inference.py's generate()."""
    model, tokenizer = pipeline
    eos = set(tokenizer.eos_token_ids)
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                         prompt_cache=make_prompt_cache(model)):
        yield token, logprobs
        if stop_at_eos and token in eos:
            return


def score(pipeline, tokens):
    """Not used (the yardstick is only timed); here because every pipeline has it."""
    raise NotImplementedError("the yardstick only generates")
