"""How a worker's policy gives requests to other workers and takes them over.

The central scheduler moves requests between WorkerSchedulers: a prefilled request is handed
off (OUTGOING: blocks kept for the transfer), a decode worker reserves blocks for its KV and
activates it once the KV has arrived, and a dead or draining worker's requests are adopted by
another worker and recomputed. These methods are part of WorkerScheduler (which inherits them);
they live here so the batching policy reads on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler_svc.request import Request, RequestStatus

if TYPE_CHECKING:
    from protocol.config import SchedulerSettings
    from scheduler_svc.kv_cache_manager import KVCacheManager


class RequestRejected(ValueError):
    """A request that can never run here (too long, bad parameters); `param` names the cause."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestMoves:
    """Mixin of WorkerScheduler: the attributes below are WorkerScheduler's."""

    settings: SchedulerSettings
    kv: KVCacheManager
    max_model_len: int
    requests: dict[str, Request]
    waiting: list[Request]
    running: list[Request]
    outgoing: dict[str, Request]
    incoming: dict[str, Request]
    handoffs: list[Request]
    _worker_forget: list[str]
    _order: int
    # and its methods _insert (into a sorted queue) and _detach (out of every queue)

    def adopt(self, req: Request, prefill_only: bool = False) -> None:
        """Take over a request from another worker, to be recomputed here from its tokens.

        Like a preempted request: prompt plus outputs so far are prefilled again, and sampling
        continues at the next output index with the same seed, so the stream neither repeats
        nor skips a token. The waiting-queue bound does not apply: the request was admitted.
        """
        if req.request_id in self.requests:
            raise ValueError(f"request {req.request_id!r} is already on this worker")
        if req.num_tokens >= self.max_model_len:
            raise RequestRejected(
                f"the request has {req.num_tokens} tokens, more than this worker's context "
                f"({self.max_model_len}) can hold with one more", "prompt")
        self._order += 1
        req.order = self._order
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_inflight_samples = 0
        req.on_worker = False
        req.prefill_only = prefill_only
        self.requests[req.request_id] = req
        self._insert(self.waiting, req)

    def take_all(self) -> list[Request]:
        """Every request here, removed with its blocks freed (the worker died or drains). Blocks
        reserved for KV still being copied in were never offered to the prefix cache."""
        taken = []
        for req in [*self.running, *self.waiting, *self.outgoing.values(), *self.incoming.values()]:
            self._detach(req)
            self.kv.free(req.request_id)
            taken.append(req)
        return taken

    def take_waiting(self) -> list[Request]:
        """Requests that have not started here (no blocks held), removed for another worker."""
        taken = [r for r in self.waiting if not self.kv.block_ids(r.request_id)]
        for req in taken:
            self._detach(req)
            self.kv.free(req.request_id)
        return taken

    def release_outgoing(self, request_id: str) -> Request:
        """The decode side has the KV (or gave up): free the blocks, which stay in the prefix cache."""
        req = self.outgoing[request_id]
        self._detach(req)
        self.kv.free(request_id)
        return req

    def reserve_incoming(self, req: Request, num_kv: int) -> int | None:
        """Reserve blocks for the KV of the first `num_kv` tokens of a request being prefilled
        elsewhere, plus room for one more token; None (nothing changed) if they don't fit.

        Blocks this worker already caches for that prefix are reused; the rest are new and not
        offered to the prefix cache until `activate_incoming`, since their KV has not arrived.
        Returns the table index of the first block to copy: the source's blocks at the same
        indices are the ones to read. The request may still be prefilling on its source (an
        early handoff), so its shared record is left as it is.
        """
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"request {rid!r} is already on this worker")
        if num_kv + 1 >= self.max_model_len or len(self.running) + len(self.incoming) >= self.settings.max_num_seqs:
            return None
        hits, num_hit = self.kv.get_computed_blocks(rid, req.token_ids)
        hits = hits[: num_kv // self.kv.block_size]
        num_hit = len(hits) * self.kv.block_size
        blocks = self.kv.allocate_slots(rid, req.token_ids, num_kv + 1 - num_hit, num_hit, hits,
                                        cache_blocks=False)
        if blocks is None:
            self.kv.free(rid)
            return None
        self.requests[rid] = req
        self.incoming[rid] = req
        return len(hits)

    def activate_incoming(self, request_id: str) -> None:
        """The KV arrived: offer its full blocks to the prefix cache and decode from here."""
        req = self.incoming.pop(request_id)
        num_kv = req.num_tokens - 1
        self.kv.cache_blocks(request_id, req.token_ids, num_kv)
        req.num_computed_tokens = num_kv
        req.num_inflight_samples = 0
        req.on_worker = False
        req.prefill_only = False
        req.status = RequestStatus.RUNNING
        self._order += 1
        req.order = self._order
        self._insert(self.running, req)

    def cancel_incoming(self, request_id: str) -> Request:
        """The copy failed or its source went away: unreserve (no uncopied block is cached)."""
        req = self.incoming[request_id]
        self._detach(req)
        self.kv.free(request_id)
        return req

    def _hand_off(self, req: Request) -> None:
        """Prefill done and the first token out: keep the blocks for a transfer, stop here."""
        self.running.remove(req)
        req.status = RequestStatus.OUTGOING
        self.outgoing[req.request_id] = req
        self.handoffs.append(req)
        if req.on_worker:
            self._worker_forget.append(req.request_id)
            req.on_worker = False

    def take_handoffs(self) -> list[Request]:
        handoffs, self.handoffs = self.handoffs, []
        return handoffs
