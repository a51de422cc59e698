"""ModelRunner: one batched forward per scheduler step over the paged KV cache.

Input embeddings come from three sources, by position: vocabulary ids (embedding table),
`<im_patch>` positions (vision features, computed once per request, batched across the
requests that need them this step), and super-link query markers (query tables).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..model.vlm import VisionLLM
from .paged_attention import PagedAttention, PagedAttentionMetadata, PagedKVCache
from .sequence import Sequence, decode_marker


class ModelRunner:
    def __init__(self, model: VisionLLM, num_blocks: int, block_size: int, kv_dtype: Optional[torch.dtype] = None):
        self.model = model
        c = model.cfg.llm
        self.block_size = block_size
        self.cache = PagedKVCache(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                                  dtype=kv_dtype or model.dtype, device=model.device)
        self.attn = PagedAttention(self.cache)
        self.device = model.device

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: KV block src -> dst in every layer."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for t in self.cache.k + self.cache.v:
            t[dst] = t[src]

    def encode_images(self, seqs: list[Sequence]) -> None:
        """Vision tower + projector for all `seqs` at once (tiles concatenated)."""
        tiles = [p for s in seqs for p in s.pixel_values]
        feats = self.model.encode_images(torch.cat(tiles))  # [sum tiles * tokens_per_tile, hidden]
        per_tile = self.model.cfg.vision.tokens_per_tile
        offset = 0
        for s in seqs:
            n = sum(p.shape[0] for p in s.pixel_values) * per_tile
            s.image_features = feats[offset:offset + n]
            offset += n

    def _embeddings(self, seqs: list[Sequence], starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """-> [T, hidden] input embeddings of positions [start_i, start_i + count_i) of each sequence."""
        ids = np.concatenate([np.asarray(s.tokens[a:a + n], dtype=np.int64) for s, a, n in zip(seqs, starts, counts)])
        ids_t = torch.from_numpy(ids).to(self.device)
        embeds = self.model.llm.embed(ids_t.clamp(min=0))
        if (ids >= 0).all() and not any(s.patch_index is not None and a < s.prompt_len
                                        for s, a in zip(seqs, starts)):
            return embeds  # the decode fast path: vocabulary ids only
        embeds = embeds.clone()
        row = 0
        for s, a, n in zip(seqs, starts, counts):
            a, n = int(a), int(n)
            if s.patch_index is not None and a < s.prompt_len:
                idx = s.patch_index[a:min(a + n, s.prompt_len)]
                sel = (idx >= 0).nonzero().flatten()
                if sel.numel():
                    embeds[row + sel.to(self.device)] = s.image_features[idx[sel].to(self.device)].to(embeds.dtype)
            for j, tok in enumerate(s.tokens[a:a + n]):
                if tok < 0:
                    table, k = decode_marker(tok)
                    embeds[row + j] = getattr(self.model, f"emb_embeddings_{table}").weight[k].to(embeds.dtype)
            row += n
        return embeds

    @torch.inference_mode()
    def execute(self, out, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one scheduled step. -> (hidden [T, hidden] final-norm, last_rows [N] row of each
        sequence's last new token)."""
        counts = np.asarray(out.num_new_tokens, dtype=np.int64)
        starts = np.asarray(out.num_computed, dtype=np.int64)
        need = [s for s, a, n in zip(seqs, starts, counts) if s.needs_images(int(a), int(a + n))]
        if need:
            self.encode_images(need)
        qsl = np.asarray(out.query_start_loc, dtype=np.int64)
        total = int(qsl[-1])
        positions = np.repeat(starts - qsl[:-1], counts) + np.arange(total)
        meta = PagedAttentionMetadata(
            cu_seqlens_q=torch.from_numpy(qsl.astype(np.int32)).to(self.device),
            context_lens=torch.from_numpy((starts + counts).astype(np.int32)).to(self.device),
            block_tables=torch.from_numpy(np.asarray(out.block_tables(-1), dtype=np.int32)).to(self.device),
            slot_mapping=torch.from_numpy(np.asarray(out.slot_mapping, dtype=np.int64)).to(self.device),
            is_all_decode=bool((counts == 1).all()), num_tokens=total)
        self.attn.set_metadata(meta)
        embeds = self._embeddings(seqs, starts, counts)
        hidden = self.model.llm.forward(embeds, torch.from_numpy(positions).to(self.device), self.attn)
        return hidden, torch.from_numpy(qsl[1:] - 1)

    @torch.inference_mode()
    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] fp32"""
        return self.model.llm.logits(hidden_rows)
