"""The offline engine: scheduler and model runner in one process, no sockets.

`pdserve generate` and the tests drive it. The loop is the one the scheduler process runs in the
service pipeline (plan, execute, update), with the worker called directly instead of over ZeroMQ;
the plan and result are the same protocol messages either way. With overlapped steps (CUDA) it
also keeps one step in flight as the service does: step N+1 is planned and launched before step
N's tokens are read back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from gpu_worker.runner import ModelRunner
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.messages import AddRequest, FinishReason, RequestOutput, TokenLogprobs
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.worker_scheduler import WorkerScheduler


@dataclass
class Completion:
    """Everything one request produced, gathered from its RequestOutputs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    logprobs: list = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str = ""
    prompt_logprobs: TokenLogprobs | None = None  # prompt tokens 1.., when asked


class OfflineEngine:
    def __init__(
        self,
        model: ModelSettings,
        cache: CacheSettings,
        scheduler: SchedulerSettings,
        check_integrity: bool = False,
    ) -> None:
        self.runner = ModelRunner(
            model, cache, scheduler.max_num_batched_tokens, scheduler.max_num_seqs
        )
        self.kv = KVCacheManager(
            self.runner.num_kv_blocks, cache.block_size, cache.enable_prefix_caching
        )
        self.scheduler = WorkerScheduler(
            scheduler, self.kv, self.runner.max_model_len, self.runner.vocab_size, model.seed
        )
        self.check_integrity = check_integrity
        self.num_steps = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        outputs = self.scheduler.update(result)
        self.num_steps += 1
        if self.check_integrity:
            self.scheduler.check_integrity()
        return outputs

    def generate(
        self, requests: list[AddRequest], on_output: Callable[[RequestOutput], bool] | None = None
    ) -> list[Completion]:
        """Run every request to completion; results in the order given.

        `on_output` sees every output as it comes (`pdserve generate` detokenizes there); when it
        returns True for an unfinished request, that request stops now with reason "stop" (a stop
        string matched), as the service's detokenizer does by aborting it.
        """
        done = {
            r.request_id: Completion(r.request_id, list(r.prompt_token_ids)) for r in requests
        }
        for r in requests:
            self.scheduler.add_request(r)
        overlapped = self._overlapped_steps() if self.runner.overlap else None
        while self.scheduler.has_unfinished:
            for out in next(overlapped) if overlapped is not None else self.step():
                _collect(done[out.request_id], out)
                if on_output is not None and on_output(out) and out.finish_reason is None:
                    for ended in self.scheduler.abort([out.request_id], FinishReason.STOP):
                        _collect(done[ended.request_id], ended)
        if overlapped is not None:
            overlapped.close()
        if self.scheduler.has_pending_forgets:  # let the worker drop finished sequences
            self.runner.execute(self.scheduler.schedule())
        return [done[r.request_id] for r in requests]

    def _overlapped_steps(self):
        """Outputs of one step per iteration, the next step launched before they are read."""
        pending = None
        try:
            while True:
                launched = self.runner.launch(self.scheduler.schedule(), pending)
                outputs = [] if pending is None else self.scheduler.update(self.runner.finish(pending))
                pending = launched
                self.num_steps += 1
                if self.check_integrity:
                    self.scheduler.check_integrity()
                yield outputs
        finally:
            if pending is not None:  # generator closed: the last step's samples are not needed
                self.scheduler.update(self.runner.finish(pending))


def _collect(c: Completion, out: RequestOutput) -> None:
    c.token_ids.extend(out.new_token_ids)
    c.num_cached_tokens = out.num_cached_tokens
    if out.logprobs is not None:
        c.logprobs.append(out.logprobs)
    if out.prompt_logprobs is not None:
        c.prompt_logprobs = out.prompt_logprobs
    if out.finish_reason is not None:
        c.finish_reason = out.finish_reason
        c.stop_token_id = out.stop_token_id
        c.error = out.error


def make_request(
    request_id: str, prompt_token_ids: list[int], params, eos_token_ids: list[int], priority: int = 0
) -> AddRequest:
    return AddRequest(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        params=params,
        eos_token_ids=eos_token_ids,
        arrival_time=time.time(),
        priority=priority,
    )
