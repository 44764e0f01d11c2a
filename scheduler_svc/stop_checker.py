"""When a request is done, judged after each new token (pure; stop strings are the detokenizer's)."""

from __future__ import annotations

from protocol.messages import FinishReason
from protocol.sampling import SamplingParams


def check_stop(
    last_token: int,
    num_output_tokens: int,
    num_tokens: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    max_model_len: int,
) -> tuple[FinishReason | None, int | None]:
    """(finish reason, stop token id) after `last_token` was appended; (None, None) to go on.

    EOS and stop tokens count only once min_tokens are out (the sampler also bans them before
    that); EOS is ignored with ignore_eos. Length limits: max_tokens and the context length.
    """
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last_token in eos_token_ids:
            return FinishReason.STOP, None
        if last_token in params.stop_token_ids:
            return FinishReason.STOP, last_token
    if num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None, None
