"""CUDA graphs for decode steps: captured once per batch-size bucket at start-up, replayed.

A decode step of a 8B model is a few hundred kernel launches over a few milliseconds of memory
traffic; launched one by one from Python the host, not the GPU, sets the pace. Here every
bucket size B (1, 2, 4, ... up to --max-num-seqs) is captured once as one graph over fixed
device buffers, and a decode-only step of n <= B sequences is replayed from the smallest bucket
that holds it:

1. the host writes the step into one pinned int32 buffer (token ids, positions, slots, context
   lengths, query starts for B rows, rows n..B-1 padding: slot -1 writes no KV, context 0
   attends to nothing; then the compact [n, w] block table and the rows to sample),
2. one host-to-device copy, then two device copies into the captured buffers (the block table
   into the first w columns of its fixed [B_max, max_blocks] buffer: later columns are never
   read, the kernels stop at each row's context length),
3. token ids sampled by the previous, still running step are copied in on the device (overlapped
   steps), the graph replays, and the logits of the sampled rows are gathered from its output.

The kernels read the lengths on the device and the decode split count is fixed per bucket,
so no host value is baked into a graph. Steps with a prefill, more sequences than the largest
bucket or a block table wider than the buffer run eagerly. `GraphLayout` is the host-side
arithmetic (gpu_worker.backends.graph_layout, tested on CPU); `CudaGraphExecutor` the device side.
"""

from __future__ import annotations

import time

import torch

from gpu_worker.backends.executor import EagerExecutor
from gpu_worker.backends.graph_layout import GraphLayout, choose_bucket
from gpu_worker.backends.staging import HostStaging
from gpu_worker.backends.triton_backend import TritonBackend, TritonMetadata
from gpu_worker.inflight import FedTokens
from gpu_worker.step_inputs import StepInputs



class CudaGraphExecutor:
    """Decode steps replayed from captured graphs; everything else through `eager`."""

    def __init__(self, eager: EagerExecutor, sizes: list[int], max_blocks: int, max_context: int) -> None:
        if not isinstance(eager.backend, TritonBackend):
            raise TypeError(f"CUDA graphs need the triton backend, not {eager.backend.name}")
        self.eager = eager
        self.backend: TritonBackend = eager.backend
        self.sizes = sorted(sizes)
        self.layout = GraphLayout(self.sizes[-1], max_blocks)
        self.max_context = max_context
        self.device = eager.device
        self.buffer = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        self.staging = HostStaging(self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0
        self.name = "triton + CUDA graphs"

    def _metadata(self, bucket: int) -> tuple[torch.Tensor, TritonMetadata]:
        ids, positions, slots, ctx, qstart, tables = self.layout.views(self.buffer, bucket)
        return ids, TritonMetadata(
            positions=positions, slot_mapping=slots, context_lens=ctx, query_start=qstart,
            block_tables=tables, max_query_len=1, decode=True,
            decode_launch=self.backend.graph_decode_launch(bucket, self.max_context),
        )

    def _run(self, bucket: int) -> torch.Tensor:
        ids, meta = self._metadata(bucket)
        model = self.eager.model
        x, residual = model(ids, meta, self.eager.kv_caches, self.backend)
        return model.compute_logits(x, residual, None, self.backend)

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> float:
        """Capture every bucket, largest first, into one memory pool. Returns seconds taken."""
        from tqdm import tqdm

        start = time.perf_counter()
        self.buffer.zero_()
        self.layout_padding()
        pool = torch.cuda.graph_pool_handle()
        sizes = sorted(self.sizes, reverse=True)
        for bucket in tqdm(sizes, desc="capturing CUDA graphs", unit="graph", disable=not progress):
            self._run(bucket)  # compiles the kernels of this shape, warms cuBLAS
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bucket] = self._run(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def layout_padding(self) -> None:
        """Every row padding (slot -1, context 0): what capture runs on, writing no KV."""
        o = self.layout.offset
        self.buffer[o("slot_mapping") : o("slot_mapping") + self.layout.max_batch].fill_(-1)

    @torch.inference_mode()
    def forward(self, step: StepInputs, fed: FedTokens | None = None) -> torch.Tensor:
        bucket = choose_bucket(self.sizes, step.num_seqs) if self.layout.fits(step) else None
        if bucket is None or bucket not in self.graphs:
            return self.eager.forward(step, fed)
        n, width = step.num_seqs, step.block_tables.shape[1]
        staged_head, staged_tables, rows = self.staging.to_device(self.layout.host_parts(step, bucket))
        head = self.layout.head
        self.buffer[:head].copy_(staged_head)
        tables = self.buffer[head:].view(self.layout.max_batch, self.layout.max_blocks)
        tables[:n, :width].copy_(staged_tables.view(n, width))
        if fed is not None:  # the previous step's samples, still on the device
            ids = self.buffer[self.layout.offset("input_ids") :][:n]
            ids.index_copy_(0, fed.rows, fed.values.to(torch.int32))
        self.graphs[bucket].replay()
        self.replays += 1
        return self.logits[bucket].index_select(0, rows)
