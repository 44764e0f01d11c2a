"""One request's detokenization state: engine outputs in, client text deltas out.

Combines the incremental detokenizer (token ids -> text), the stop-string matcher (text ->
text safe to show, or the end) and the logprob formatter. The detokenizer process keeps one of
these per live request; a stop-string match ends the request here, and the process then tells
the scheduler to abort it (`matched_stop`).

Like vLLM (and OpenAI), the text of the token that stopped generation (EOS or one of
stop_token_ids) is not part of the output unless include_stop_str_in_output; it still counts
in token_ids, num_output_tokens and logprobs.
"""

from __future__ import annotations

from typing import Any

from protocol.messages import DetokRequest, FinishReason, RequestOutput, TextDelta, TokenLogprob
from tokenizer_svc.incremental_detok import IncrementalDetokenizer
from tokenizer_svc.logprobs_format import TokenTexts, format_logprobs
from tokenizer_svc.prompt_output import build_prompt_output
from tokenizer_svc.stop_strings import StopStringMatcher


class RequestDetokenizer:
    """Turns each RequestOutput of one request into a TextDelta, or None when there is nothing
    to send yet."""

    def __init__(self, tokenizer: Any, req: DetokRequest, token_texts: TokenTexts | None = None) -> None:
        params = req.params
        self.request_id = req.request_id
        self._client_id = req.parent_id or req.request_id
        self._index = req.index
        self._num_prompt_tokens = req.num_prompt_tokens
        self._include_stop = params.include_stop_str_in_output
        self._num_top = params.logprobs
        self._detok = IncrementalDetokenizer(tokenizer, req.prompt_tail_ids, params.skip_special_tokens)
        self._stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._texts = token_texts
        # echo / prompt logprobs: the prompt goes back with the first delta (prompt_output.py)
        self._prompt_ids = list(req.prompt_token_ids) if params.echo or params.prompt_logprobs is not None else None
        self._tokenizer = tokenizer
        self._params = params
        if (self._num_top is not None or self._prompt_ids is not None) and self._texts is None:
            self._texts = TokenTexts(tokenizer)
        self._num_output_tokens = 0
        self.finished = False  # a finish reason arrived or a stop string matched
        self.matched_stop: str | None = None  # the stop string that ended it, if one did

    def step(self, out: RequestOutput) -> TextDelta | None:
        """The delta for one engine output; None when it carries nothing worth a chunk.

        Outputs that arrive after the request ended (the scheduler had not seen the abort yet)
        are ignored.
        """
        if self.finished:
            return None
        new_ids = [int(i) for i in out.new_token_ids]
        self._num_output_tokens += len(new_ids)
        ending = out.finish_reason is not None
        finish = FinishReason(out.finish_reason) if ending else None
        text_ids = new_ids
        if finish == FinishReason.STOP and new_ids and not self._include_stop:
            text_ids = new_ids[:-1]  # the stop token (EOS or a stop_token_id) is not shown
        text = self._detok.add(text_ids)
        if ending:
            text += self._detok.flush()
        text, matched = self._stops.feed(text, final=ending)
        if matched is not None:
            self.matched_stop = matched
        self.finished = ending or matched is not None

        logprobs = self._logprobs(out)
        prompt = None
        if self._prompt_ids is not None and self._texts is not None:
            prompt = build_prompt_output(self._tokenizer, self._texts, self._prompt_ids, self._params,
                                         out.prompt_logprobs)
            self._prompt_ids = None
        if not text and not self.finished and not (new_ids and logprobs is not None) and prompt is None:
            return None
        if matched is not None:
            finish_reason: str | None = "stop"
            stop_reason: int | str | None = matched
        elif finish is not None:
            finish_reason, stop_reason = finish.openai_name, out.stop_token_id
        else:
            finish_reason, stop_reason = None, None
        return TextDelta(
            request_id=self._client_id,
            index=self._index,
            text=text,
            token_ids=new_ids,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            logprobs=logprobs,
            num_prompt_tokens=out.num_prompt_tokens or self._num_prompt_tokens,
            num_output_tokens=self._num_output_tokens,
            num_cached_tokens=out.num_cached_tokens,
            queue_seconds=getattr(out, "queue_seconds", None),
            error=out.error,
            prompt=prompt,
        )

    def _logprobs(self, out: RequestOutput) -> list[TokenLogprob] | None:
        if self._num_top is None or self._texts is None:
            return None
        if out.logprobs is None:
            return []
        return format_logprobs(out.logprobs, self._num_top, self._texts)
