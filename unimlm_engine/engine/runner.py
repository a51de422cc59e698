"""ModelRunner: one batched forward per scheduler step over the paged KV cache.

Input embeddings come from four sources, by position: vocabulary ids (embedding table),
`<im_patch>` and `<region>` positions (vision and region-encoder features, computed once per
request, batched across the requests that need them this step), super-link query markers (query
tables), and PLACEHOLDER: a token the in-flight step sampled, read from its device tensor
(overlapped scheduling, core.py).
Host arrays go to the device through pinned, non-blocking copies (`sampler.h2d`).

All-decode steps (every sequence feeds one vocabulary id or placeholder, no image position) of at
most the largest bucket's size take `DecodeGraphRunner` (engine/cuda_graphs.py): a CUDA graph per
batch-size bucket when the model is on CUDA and `cuda_graphs` is on (capture and replay ran on an
H100 in tests/test_cuda_graphs.py; the engine's use of it with placeholders has not run on a GPU).
`graph_capture=False` runs that padded static-buffer path eagerly on any device (tests).
Logits stay outside the graph: they run only for the sampled rows.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Optional

import numpy as np
import torch

from ..config import EngineConfig
from ..model.llm import fuse_projections_
from ..model.vlm import VisionLLM
from .cuda_graphs import DecodeGraphRunner
from .paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache
from .sampler import h2d
from .sequence import PLACEHOLDER, Sequence
from .superlink import SuperLinks


def _inference(fn):
    """`torch.inference_mode()` for a method, entered only when the caller is not already in it: the engine
    loop enters it once per step around the forward, the logits and the sampler (the decorator's context
    object costs ~5 us per call on the CPU)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return run


_GRAPH_DEFAULTS = EngineConfig()


class ModelRunner:
    """`cuda_graphs`, `cuda_graph_batch_sizes`, `cuda_graph_max_context`: as in EngineConfig.
    graph_capture: None = capture CUDA graphs when the model is on CUDA (else no graph path);
    False = the padded static-buffer decode path without capture, on any device; True = capture."""

    def __init__(self, model: VisionLLM, num_blocks: int, block_size: int, kv_dtype: Optional[torch.dtype] = None,
                 *, cuda_graphs: bool = _GRAPH_DEFAULTS.cuda_graphs,
                 cuda_graph_batch_sizes: tuple[int, ...] = _GRAPH_DEFAULTS.cuda_graph_batch_sizes,
                 cuda_graph_max_context: int = _GRAPH_DEFAULTS.cuda_graph_max_context,
                 graph_capture: Optional[bool] = None, superlinks: Optional[SuperLinks] = None, tp=None):
        self.model = model
        # tp: a `distributed.TensorParallel` runs the decoder stack over its ranks (this runner's cache is
        # rank 0's share of the KV heads); the embedding and the logits stay `model.llm`'s
        self.tp = tp
        self.llm = tp if tp is not None else model.llm
        self.superlinks = superlinks or SuperLinks(model)
        self.model_cpu_s = 0.0  # CPU seconds of the calling thread inside the model (vision, embedding, LLM, logits)
        c = model.cfg.llm
        self.block_size = block_size
        kv_heads = tp.num_kv_heads if tp is not None else c.num_key_value_heads
        self.cache = PagedKVCache(c.num_hidden_layers, num_blocks, block_size, kv_heads, c.head_dim,
                                  dtype=kv_dtype or model.dtype, device=model.device)
        self.attn = PagedAttention(self.cache)
        self.device = model.device
        if torch.device(self.device).type == "cuda" and tp is None:
            # q/k/v and gate/up as one GEMM each (parameters become views: no extra memory); on CPU the
            # separate projections stay (the CPU path is the reference, unchanged)
            fuse_projections_(model.llm.model.layers)
        self.graphs: Optional[DecodeGraphRunner] = None
        if cuda_graphs and tp is None and (graph_capture is not None or torch.device(self.device).type == "cuda"):
            self.graphs = DecodeGraphRunner(model.llm, PagedAttention(self.cache), cuda_graph_batch_sizes,
                                            cuda_graph_max_context, capture=graph_capture is not False)

    def release(self) -> None:
        """Free the KV pool and the captured graphs (Engine.close, once the loop thread has stopped): an
        engine's threads and handles form reference cycles, so without this the pool (most of the card's
        memory) stays allocated until the garbage collector happens to run, and the next engine on the
        same card runs out of memory."""
        self.graphs = None
        self.cache.k.clear()
        self.cache.v.clear()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: KV block src -> dst in every layer."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        if self.tp is not None:
            self.tp.copy_blocks(src, dst)
        for t in self.cache.k + self.cache.v:
            t[dst] = t[src]

    def encode_images(self, seqs: list[Sequence]) -> None:
        """Vision tower + projector for all `seqs` at once (tiles concatenated), and the region encoder for all
        their regions at once: its CLIP levels come from the same pass (`forward_with_levels`: the layers past
        the projector's run on the regions' canvas tiles only). s.image_features = image rows, region rows."""
        tiles = [p for s in seqs for p in s.pixel_values]
        pixels = torch.cat(tiles).to(device=self.model.device, dtype=self.model.dtype)
        canvas_of, regions = [], []  # per region: row of its canvas tile among `pixels`
        first = 0
        for s in seqs:
            ends = np.cumsum([p.shape[0] for p in s.pixel_values]) + first
            canvas_of += [int(ends[r.image]) - 1 for r in s.regions]  # an image's last tile is its canvas
            regions += s.regions
            first = int(ends[-1]) if len(ends) else first
        if regions:
            rows, inverse = torch.tensor(canvas_of).unique(return_inverse=True)
            vis, levels = self.model.vis_encoder.forward_with_levels(pixels, rows.to(pixels.device),
                                                                     (-3, -2, -1))
            inv = inverse.to(pixels.device)
            region_feats = self.model.region_features(pixels[rows.to(pixels.device)][inv],
                                                      [lv[inv] for lv in levels], regions)
        else:
            vis = self.model.vis_encoder(pixels)
        feats = self.model.vl_bridge(vis).flatten(0, 1)  # [sum tiles * tokens_per_tile, hidden]
        per_tile = self.model.cfg.vision.tokens_per_tile
        offset = r0 = 0
        for s in seqs:
            n = sum(p.shape[0] for p in s.pixel_values) * per_tile
            s.image_features = feats[offset:offset + n]
            if s.regions:
                s.image_features = torch.cat([s.image_features, region_feats[r0:r0 + len(s.regions)]])
                r0 += len(s.regions)
            offset += n

    @staticmethod
    def _host_ids(seqs: list[Sequence], starts: np.ndarray, counts: np.ndarray, decode: bool) -> np.ndarray:
        """-> the step's fed tokens [T] int64 as the host knows them: vocabulary ids, markers, PLACEHOLDER.
        decode: every sequence feeds one token."""
        if decode:  # no per-sequence slicing
            return np.fromiter((s.tokens[a] for s, a in zip(seqs, starts.tolist())), dtype=np.int64,
                               count=len(seqs))
        return np.concatenate([np.asarray(s.tokens[a:a + n], dtype=np.int64) for s, a, n in zip(seqs, starts, counts)])

    @staticmethod
    def _sample_rows(seqs: list[Sequence], owners) -> np.ndarray:
        """Row of each owner sequence's PLACEHOLDER in the in-flight step's sampled ids."""
        return np.fromiter((seqs[i].sample_row for i in owners), dtype=np.int64, count=len(owners))

    def _input_ids(self, seqs: list[Sequence], counts: np.ndarray, ids: np.ndarray, ph: np.ndarray, every: bool,
                   placeholders) -> torch.Tensor:
        """ids: `_host_ids`, ph: its PLACEHOLDER mask, every: ph.all() -> device ids [T] >= 0 for the
        embedding table: a PLACEHOLDER row reads the in-flight step's sampled id of its sequence, on the device."""
        sampled = placeholders
        if every and len(ids) == len(seqs) == sampled.shape[0] and all(s.sample_row == i for i, s in enumerate(seqs)):
            return sampled.to(self.device)  # a decode step of the same sequences in the same order: no gather
        ph = np.flatnonzero(ph)
        if not ph.size:
            return h2d(np.maximum(ids, 0), self.device)
        owner = ph if len(ph) == len(seqs) == len(ids) else np.searchsorted(np.cumsum(counts), ph, side="right")
        rows = self._sample_rows(seqs, owner)
        if every:  # every row is an in-flight sample (a pure decode step)
            return sampled[h2d(rows, sampled.device)].to(self.device)
        src = h2d(rows, sampled.device)
        ids_t = h2d(np.maximum(ids, 0), self.device)
        ids_t[h2d(ph, self.device)] = sampled[src].to(ids_t.device)
        return ids_t

    def _embeddings(self, seqs: list[Sequence], starts: np.ndarray, counts: np.ndarray, ids: np.ndarray,
                    placeholders=None, prefill: bool = True) -> torch.Tensor:
        """-> [T, hidden] input embeddings of positions [start_i, start_i + count_i) of each sequence
        (ids: `_host_ids`). prefill=False: no sequence feeds a prompt position (no image features to place)."""
        ph = ids == PLACEHOLDER
        every = bool(ph.all())
        ids_t = self._input_ids(seqs, counts, ids, ph, every, placeholders)
        c0 = time.thread_time()
        embeds = self.model.llm.embed(ids_t)  # the model's first layer: model time
        self.model_cpu_s += time.thread_time() - c0
        has_images = prefill and any(s.patch_index is not None and a < s.prompt_len for s, a in zip(seqs, starts))
        if not has_images and (every or not ((ids < 0) & ~ph).any()):
            return embeds  # the decode fast path: vocabulary ids (or in-flight samples) only
        embeds = embeds.clone()
        row = 0
        for s, a, n in zip(seqs, starts, counts) if has_images else ():
            a, n = int(a), int(n)
            if s.patch_index is not None and a < s.prompt_len:
                idx = s.patch_index[a:min(a + n, s.prompt_len)]
                sel = (idx >= 0).nonzero().flatten()
                if sel.numel():
                    embeds[row + sel.to(self.device)] = s.image_features[idx[sel].to(self.device)].to(embeds.dtype)
            row += n
        return self.superlinks.override_embeddings(embeds, ids)

    @_inference
    def execute(self, out, seqs: list[Sequence], placeholders=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one scheduled step. placeholders: the in-flight step's sampled ids [m] on the device; a token
        still PLACEHOLDER on the host is row `seq.sample_row` of it. -> (hidden [T, hidden] final-norm,
        last_rows [N] row of each sequence's last new token)."""
        counts = np.asarray(out.num_new_tokens, dtype=np.int64)
        starts = np.asarray(out.num_computed, dtype=np.int64)
        qsl = np.asarray(out.query_start_loc, dtype=np.int32)
        total = int(qsl[-1])
        decode = total == len(seqs)  # one new token each (every count is >= 1)
        last_rows = torch.arange(total) if decode else torch.from_numpy(qsl[1:] - 1)
        prefill = bool(out.is_prefill.any())  # image positions are prompt positions
        need = [s for s, a, n in zip(seqs, starts, counts) if s.needs_images(int(a), int(a + n))] if prefill else ()
        if need:
            c0 = time.thread_time()
            self.encode_images(need)
            self.model_cpu_s += time.thread_time() - c0
        ids = self._host_ids(seqs, starts, counts, decode)
        hidden = self._decode_graph(out, seqs, starts, counts, ids, placeholders) if decode else None
        if hidden is not None:
            return hidden, last_rows
        positions = starts if decode else np.repeat(starts - qsl[:-1], counts) + np.arange(total)
        context = (starts + counts).astype(np.int32)
        meta = PagedAttentionMetadata(
            cu_seqlens_q=h2d(qsl, self.device),
            context_lens=h2d(context, self.device),
            block_tables=h2d(np.asarray(out.block_tables(-1), dtype=np.int32), self.device),
            slot_mapping=h2d(np.asarray(out.slot_mapping, dtype=np.int64), self.device),
            is_all_decode=decode, num_tokens=total, max_query_len=1 if decode else int(counts.max()),
            max_context_len=int(context.max()))
        self.attn.set_metadata(meta)
        embeds = self._embeddings(seqs, starts, counts, ids, placeholders, prefill)
        c0 = time.thread_time()
        hidden = self.llm.forward(embeds, h2d(positions, self.device), self.attn)
        self.model_cpu_s += time.thread_time() - c0
        return hidden, last_rows

    def _decode_graph(self, out, seqs: list[Sequence], starts: np.ndarray, counts: np.ndarray, ids: np.ndarray,
                      placeholders=None) -> Optional[torch.Tensor]:
        """The bucketed static-buffer decode (CUDA graph) when the step qualifies, else None (eager). Called
        for decode steps only (one new token per sequence). ids: `_host_ids`. -> hidden [N, hidden] final-norm."""
        g = self.graphs
        if g is None or not g.fits(len(seqs), int(starts.max()) + 1):
            return None
        if any(s.patch_index is not None and a < s.prompt_len for s, a in zip(seqs, starts)):
            return None  # a prompt position of an image request: maybe an image token
        ph = ids == PLACEHOLDER
        if (ids[~ph] < 0).any():
            return None  # super-link query markers take the embedding override
        device_ids = None
        if ph.any():  # the in-flight step's samples, read on the device
            rows = np.flatnonzero(ph)
            device_ids = (h2d(rows, self.device), placeholders[h2d(self._sample_rows(seqs, rows), placeholders.device)])
            ids = np.where(ph, 0, ids)
        slots = np.asarray(out.slot_mapping, dtype=np.int64)
        try:
            c0 = time.thread_time()
            hidden = g.run(ids, starts, slots, np.asarray(out.block_tables(0), dtype=np.int32), device_ids)
            self.model_cpu_s += time.thread_time() - c0
            return hidden
        except RuntimeError as e:
            if not g.capture:
                raise
            # a capture failure (made before any KV write: warm-up and capture run on padding)
            # switches this runner to eager decode instead of failing the step
            warnings.warn(f"ModelRunner: CUDA graph decode disabled after an error: {e}", RuntimeWarning)
            self.graphs = None
            return None

    @_inference
    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] fp32"""
        c0 = time.thread_time()
        out = self.model.llm.logits(hidden_rows)
        self.model_cpu_s += time.thread_time() - c0
        return out
