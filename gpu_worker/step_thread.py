"""The worker's step thread: runs the scheduler's plans on the model runner, in order.

Steps run off the event loop so heartbeats, KV transfers and the socket keep going while the
model computes (torch releases the GIL in its kernels); answers go back to the loop's queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback

import torch

from gpu_worker.inflight import InFlightStep
from gpu_worker.runner import ModelRunner
from protocol.messages import StepPlan, StepResult, WorkerError

log = logging.getLogger("pdserve.worker")


class StepThread:
    """The one thread that drives torch for the worker's whole life.

    OpenMP keeps one thread team per calling thread, so steps hopping between threads would
    oversubscribe the cores. Plans queue up here as they arrive and run back to back: when the
    scheduler has sent step N+1 before N finished, N+1 starts the moment N ends, with no hop
    through the event loop; results go back to the loop, which owns the socket.

    With overlapped steps (CUDA by default, `--overlap-steps`), step N+1 is launched while N
    still runs on the device, its decode inputs fed from N's samples on the device
    (gpu_worker.inflight), and only then does the thread wait for N's tokens: the host work of
    N+1 (bookkeeping, packing, staging, launches) hides behind N's device time. Results still
    go out in plan order.
    """

    def __init__(self, worker_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.results: asyncio.Queue[StepResult | WorkerError] = asyncio.Queue()
        self._plans: queue.SimpleQueue[StepPlan | object | None] = queue.SimpleQueue()
        self.submitted = 0  # plans handed to the thread
        self.completed = 0  # of those, run (loop thread only: bumped through call_soon_threadsafe)
        self._progress = asyncio.Event()
        self._runner: ModelRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    async def start(self, make_runner, torch_threads: int | None) -> ModelRunner:
        """Start the thread, build the runner on it, and return the runner once loaded."""
        ready: asyncio.Future[ModelRunner] = self.loop.create_future()

        def main() -> None:
            try:
                if torch_threads:
                    torch.set_num_threads(torch_threads)
                self._runner = make_runner()
            except BaseException as exc:  # reported to the awaiting coroutine
                self.loop.call_soon_threadsafe(_settle, ready, None, exc)
                return
            self.loop.call_soon_threadsafe(_settle, ready, self._runner, None)
            self._run_plans()

        self._thread = threading.Thread(target=main, name="pdserve-step", daemon=True)
        self._thread.start()
        return await ready

    def submit(self, plan: StepPlan) -> None:
        self.submitted += 1
        self._plans.put(plan)

    async def ran(self, count: int) -> None:
        """Returns once the first `count` submitted plans have run (answered or failed)."""
        while self.completed < count:
            self._progress.clear()
            await self._progress.wait()

    def reset(self) -> None:
        """Drop every sequence (after the plans queued before this call have run)."""
        self._plans.put(_RESET)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the step that runs now, and wait for the thread to end: a process that
        exits while torch still computes on a daemon thread aborts ("terminate called without
        an active exception")."""
        self._stopping = True  # plans still queued are not started
        self._plans.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run_plans(self) -> None:
        runner = self._runner
        assert runner is not None
        pending: InFlightStep | None = None  # launched, result not yet sent
        while True:
            item = self._next_item(runner, pending)
            if self._stopping:
                item = None
            if item is _NOTHING or item is None or item is _RESET:
                if pending is not None and not self._answer(runner, pending.step_id, lambda: runner.finish(pending)):
                    return
                pending = None
                if item is None:
                    return
                if item is _RESET:
                    runner.reset()
                continue
            plan = item
            try:
                launched = runner.launch(plan, pending)
            except Exception as exc:  # the step failed: report it (after the step before), keep serving
                log.error("step %d failed: %s", plan.step_id, traceback.format_exc())
                if pending is not None and not self._answer(runner, pending.step_id, lambda: runner.finish(pending)):
                    return
                pending = None
                runner.fail(plan)  # the scheduler fails exactly this plan's requests
                if not self._send(WorkerError(self.worker_id, plan.step_id, f"{type(exc).__name__}: {exc}")):
                    return
                continue
            if pending is not None and not self._answer(runner, pending.step_id, lambda: runner.finish(pending)):
                return
            pending = launched
            if not runner.overlap:
                if not self._answer(runner, pending.step_id, lambda: runner.finish(pending)):
                    return
                pending = None

    def _next_item(self, runner: ModelRunner, pending: InFlightStep | None):
        """The next queued item; with a step in flight, _NOTHING as soon as its device work is
        done and nothing is queued (its result must not wait for a plan that may never come)."""
        if pending is None:
            try:
                return self._plans.get_nowait()
            except queue.Empty:
                runner.starved()
                return self._plans.get()
        while True:
            try:
                return self._plans.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if pending.done is None or pending.done.query():
                    return _NOTHING

    def _answer(self, runner: ModelRunner, step_id: int, finish) -> bool:
        """Finish a launched step and send its result (or its failure). False: loop closed."""
        try:
            out: StepResult | WorkerError = finish()
        except Exception as exc:
            log.error("step %d failed: %s", step_id, traceback.format_exc())
            out = WorkerError(self.worker_id, step_id, f"{type(exc).__name__}: {exc}")
        return self._send(out)

    def _send(self, out: StepResult | WorkerError) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._finished, out)
        except RuntimeError:  # the loop closed: the worker is shutting down
            return False
        return True

    def _finished(self, out: StepResult | WorkerError) -> None:
        """On the loop: one plan ran; its answer goes out and waiting pulls may write."""
        self.completed += 1
        self._progress.set()
        self.results.put_nowait(out)


_RESET = object()  # StepThread queue item: drop every sequence
_NOTHING = object()  # nothing queued while the step in flight finished on the device
_POLL_SECONDS = 0.0002  # how often a waiting step thread checks the device for the step in flight


def _settle(fut: asyncio.Future, value, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
