"""Decode steps through static buffers, one batch-size bucket at a time, replayed as CUDA graphs.

An all-decode step (every sequence feeds one vocabulary id) of N sequences runs on the smallest
bucket B >= N. Static input buffers are allocated once at the largest bucket and each bucket uses
their first B rows:

    ids [B] int64, positions [B] int64, slot_mapping [B] int64, context_lens [B] int32,
    block_tables [B, max_blocks] int32 (max_blocks = ceil(max_context / block_size)), cu_seqlens [B+1]

All but cu_seqlens are views of one device buffer laid out as [ids | positions | slots]
(int64 words) then [context_lens | block_tables] (int32), mirrored by one host staging
buffer (pinned for a CUDA device) allocated once: a step fills the staging buffer in
numpy and issues one non_blocking host-to-device copy of its prefix (everything up to the
bucket's last block-table row). Before the staging buffer is refilled, the previous step's copy
is waited for (a CUDA event), so an in-flight copy never reads half-written host memory.

Rows N..B-1 are padding: id 0, position 0, slot -1 (write_kv_cache skips it, so padding never
writes the KV cache), context 1 and block-table row starting with block 0 (every cache has a
block 0, so padding reads one in-bounds key and its output row is discarded). Every op in the
decode forward is row-independent apart from attention, which is per sequence, so the first N
output rows equal the unpadded forward's. Decode split counts: a captured graph fixes its grid,
so the bucket's metadata passes the context bound (max_blocks * block_size) as max_context_len
when capturing; each sequence then divides its *live* context over those splits on the device
(unimlm_engine/kernels/paged_attention.py), so no program walks pages past a live context. Uncaptured
(capture=False), the metadata carries each step's live longest context.

Two modes share that buffer logic:
- capture=False: the padded forward runs eagerly on the static buffers (any device). This is
  how the padding is tested on the CPU.
- capture=True (CUDA): per bucket, on first use, warm up twice on a side stream (Triton JIT and
  cuBLAS handles happen outside capture), then capture `torch.cuda.graph` on that same stream
  with one private memory pool shared by all buckets (`torch.cuda.graph_pool_handle()`).
  Warm-up and capture run on all-padding buffers, so they write nothing into the KV cache;
  the step's inputs are copied into the buffers afterwards and the graph replayed. Buckets are
  replayed one at a time on one stream, so sharing the pool is safe: each bucket keeps its
  output tensor alive, and the rows handed back are cloned before the next replay can reuse
  pool memory. `capture_error_mode="thread_local"` because decoder workers issue CUDA work from
  other threads while a bucket is captured.
  The capture path has run on an H100 (torch 2.11, Triton 3.6):
  tests/test_cuda_graphs.py::test_capture_and_replay_equal_eager_on_cuda, buckets 1, 8 and 64.

Capture requirements of the decode forward (checked by reading the code): no host syncs
(.item(), .tolist(), nonzero, data-dependent Python branches) in LLM.forward, write_kv_cache or
the decode attention launcher on CUDA; RoPE cos/sin are computed from the positions buffer on
the device; the decode launcher's grid depends only on shapes and the metadata's host ints. The
PyTorch reference ops do sync
(context_lens.tolist()); they are the CPU path and are never captured.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..model.llm import LLM
from .paged_attention import PagedAttention, PagedAttentionMetadata


class _Bucket:
    """One batch size: its metadata (views of the static buffers), graph and output."""

    __slots__ = ("size", "meta", "graph", "hidden")

    def __init__(self, size: int, meta: PagedAttentionMetadata):
        self.size, self.meta = size, meta
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # [size, hidden], the captured graph's output


class DecodeGraphRunner:
    """Padded static-buffer decode forward per batch-size bucket (see the module doc)."""

    def __init__(self, llm: LLM, attn: PagedAttention, batch_sizes: tuple[int, ...], max_context: int,
                 capture: bool):
        if not batch_sizes or min(batch_sizes) < 1 or max_context < 1:
            raise ValueError(f"DecodeGraphRunner: batch_sizes must be positive and max_context >= 1, got "
                             f"{batch_sizes}, {max_context}")
        device = attn.cache.device
        if capture and device.type != "cuda":
            raise ValueError(f"DecodeGraphRunner: capture=True needs a CUDA cache, got {device}")
        self.llm, self.attn, self.capture, self.device = llm, attn, capture, device
        self.block_size = attn.cache.block_size
        self.max_blocks = -(-max_context // self.block_size)
        self.sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        b = self.sizes[-1]
        self._ctx_word = 3 * b  # int64 words before the int32 region: ids, positions, slots
        words = self._ctx_word + -(-(b + b * self.max_blocks) // 2)
        self._dev = torch.zeros(words, dtype=torch.int64, device=device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        self._host = torch.zeros(words, dtype=torch.int64, pin_memory=pin)
        self._copied: torch.cuda.Event | None = None  # the last staging copy (CUDA only)
        self.ids, self.positions, self.slot_mapping = self._dev[:3 * b].view(3, b)
        i32 = self._dev[self._ctx_word:].view(torch.int32)
        self.context_lens = i32[:b]
        self.block_tables = i32[b:b + b * self.max_blocks].view(b, self.max_blocks)
        self.cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=device)
        self._buckets: dict[int, _Bucket] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @property
    def captured(self) -> tuple[int, ...]:
        """Bucket sizes that hold a captured graph."""
        return tuple(sorted(s for s, k in self._buckets.items() if k.graph is not None))

    def bucket_for(self, n: int) -> int:
        """The smallest bucket >= n (n <= max_batch)."""
        return next(s for s in self.sizes if s >= n)

    def fits(self, n: int, max_context_len: int) -> bool:
        """Whether a step of n sequences whose longest context is max_context_len can take this path."""
        return 1 <= n <= self.max_batch and max_context_len <= self.max_blocks * self.block_size

    def run(self, ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            block_tables: np.ndarray, device_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """ids, positions, slot_mapping: [N] int; block_tables: [N, W] int (entries past a sequence's
        pages may be anything >= 0 or -1) -> final-norm hidden [N, hidden] (a fresh tensor).
        Context length of row i is positions[i] + 1. device_ids: (rows [r], values [r]) on the device: ids
        known only there (the in-flight step's samples), written over ids[rows] after the staging copy."""
        n = len(ids)
        longest = int(np.max(positions)) + 1 if n else 0
        if not self.fits(n, longest):
            raise ValueError(f"DecodeGraphRunner: {n} sequences / longest context {longest} do not fit the buckets "
                             f"(1..{self.max_batch} sequences, max blocks {self.max_blocks})")
        bucket = self._buckets.get(self.bucket_for(n)) or self._prepare(self.bucket_for(n))
        self._fill(bucket.size, ids, positions, slot_mapping, block_tables)
        if device_ids is not None:
            rows, values = device_ids
            self.ids[rows] = values.to(self.ids.dtype)
        if bucket.graph is not None:
            bucket.graph.replay()
            hidden = bucket.hidden
        else:
            bucket.meta.max_context_len = max(1, longest)
            hidden = self._forward(bucket)
        return hidden[:n].clone()

    def _fill(self, b: int, ids, positions, slot_mapping, block_tables) -> None:
        """Stage one step in rows [0, n) and padding in rows [n, b), then one host-to-device copy."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still be reading the staging buffer
        n, big = len(ids), self.max_batch
        host = self._host.numpy()
        i64 = host[:3 * big].reshape(3, big)
        i64[:, n:b] = 0
        i64[2, n:b] = -1
        i64[0, :n], i64[1, :n], i64[2, :n] = ids, positions, slot_mapping
        i32 = host[self._ctx_word:].view(np.int32)
        i32[:n] = np.asarray(positions, dtype=np.int32) + 1
        i32[n:b] = 1
        table = i32[big:big + b * self.max_blocks].reshape(b, self.max_blocks)
        width = min(block_tables.shape[1], self.max_blocks)
        table[:n, :width] = np.maximum(block_tables[:, :width], 0)  # pages past a context are never read
        table[:n, width:] = 0
        table[n:] = 0
        words = self._ctx_word + -(-(big + b * self.max_blocks) // 2)
        self._dev[:words].copy_(self._host[:words], non_blocking=True)
        if self._dev.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _reset(self, b: int) -> None:
        """All b rows padding (warm-up and capture write nothing to the KV cache)."""
        self._fill(b, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 1), np.int32))

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The padded forward on the static buffers: -> [b, hidden]."""
        b = bucket.size
        self.attn.set_metadata(bucket.meta)
        return self.llm.forward(self.llm.embed(self.ids[:b]), self.positions[:b], self.attn)

    def _prepare(self, b: int) -> _Bucket:
        meta = PagedAttentionMetadata(cu_seqlens_q=self.cu_seqlens[:b + 1], context_lens=self.context_lens[:b],
                                      block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
                                      is_all_decode=True, num_tokens=b, max_query_len=1,
                                      max_context_len=self.max_blocks * self.block_size)
        bucket = _Bucket(b, meta)
        if self.capture:
            self._capture(bucket)
        self._buckets[b] = bucket
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream, then capture into the shared pool on the same stream."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.device)
        self._reset(bucket.size)
        bucket.meta.max_context_len = self.max_blocks * self.block_size  # the graph's fixed decode split count
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                self._forward(bucket)
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            bucket.hidden = self._forward(bucket)
        bucket.graph = graph
