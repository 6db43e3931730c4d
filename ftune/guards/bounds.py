"""Sizes a user may ask for, cut to what the model can use.

A recipe or command line may ask for more new tokens than a model has positions for
(`--max-new-tokens 1000000000000`, evaluation.max_new_tokens: 1048576). No model continues a
text past its context, and a model whose generation config preallocates its cache (a static or
sliding-window cache) would allocate for the whole request before the first token: the request
is cut to the positions left after the prompt.
"""

from __future__ import annotations


def new_tokens(model, asked: int, prompt_tokens: int = 0) -> int:
    """`asked` new tokens, at most the model's positions left after a prompt of `prompt_tokens`."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return asked
    return max(1, min(asked, positions - prompt_tokens))
