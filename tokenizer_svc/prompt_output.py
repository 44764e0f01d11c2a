"""The prompt as a client gets it back: completions `echo` text and prompt-token logprobs.

Built once per request, for its first text delta, from the whole prompt (DetokRequest.
prompt_token_ids, sent only when echo or prompt logprobs were asked) and the prompt logprob rows
the scheduler attached to the request's first output (rows for prompt tokens 1..; token 0 has
nothing before it, so no logprob).
"""

from __future__ import annotations

from typing import Any

from protocol.messages import PromptOutput, TokenLogprobs
from protocol.sampling import SamplingParams
from tokenizer_svc.logprobs_format import TokenTexts, format_logprobs


def build_prompt_output(
    tokenizer: Any, texts: TokenTexts, prompt_ids: list[int], params: SamplingParams,
    rows: TokenLogprobs | None,
) -> PromptOutput:
    """Echo text (when asked), the first token's text and each later token's logprob, rank and
    top `params.prompt_logprobs` alternatives (when asked and the rows came)."""
    text = tokenizer.decode(prompt_ids, skip_special_tokens=params.skip_special_tokens) if params.echo else ""
    first = texts.get(prompt_ids[0])[0] if prompt_ids else ""
    logprobs = []
    if rows is not None and params.prompt_logprobs is not None:
        logprobs = format_logprobs(rows, params.prompt_logprobs, texts)
        for token, rank in zip(logprobs, rows.ranks.tolist()):
            token.rank = int(rank)
    return PromptOutput(text=text, first_token=first, logprobs=logprobs)
