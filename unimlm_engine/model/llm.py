"""LLaMA-architecture decoder (HF `LlamaForCausalLM` structure and parameter names).

RoPE, RMSNorm, SwiGLU, GQA; LoRA-MoE on the FFN linears when configured. Tokens of all
sequences are packed along one axis (no padding): the attention backend knows where each
sequence starts and what it has cached.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig, LoRAMoEConfig
from .attention import AttentionBackend
from .lora_moe import LoRAMoELinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """inv_freq [D/2] stays fp32 whatever the module is cast to: `.to(bf16)` / `.half()` would round
    it (bf16: ~1 rad of angle error at position 1000), so `_apply` recomputes it in fp32 on the
    buffer's new device after every cast or move."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        """[D/2] fp32 on `device` (None: the default device)."""
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exps)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, D] in fp32"""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] (rotate-half convention, computed in fp32)"""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.d ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.h, self.d), cos, sin)
        k = apply_rope(self.k_proj(x).view(t, self.hkv, self.d), cos, sin)
        v = self.v_proj(x).view(t, self.hkv, self.d)
        out = attn.forward(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(t, self.h * self.d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig]):
        super().__init__()
        targets = lora_moe.target_modules if lora_moe else ()
        shapes = {"gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
        for name, (i, o) in shapes.items():
            setattr(self, name, LoRAMoELinear(i, o, lora_moe) if name in targets else nn.Linear(i, o, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int, lora_moe: Optional[LoRAMoEConfig]):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg, lora_moe)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, lora_moe) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class LLM(nn.Module):
    """Checkpoint prefix `llm.`: `llm.model.*` and `llm.lm_head.*` as in HF."""

    def __init__(self, cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, lora_moe)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, hidden]"""
        return self.model.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """embeds: [T, hidden], positions: [T] int64 -> final-norm hidden states [T, hidden]"""
        cos, sin = self.model.rotary_emb.cos_sin(positions)
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, hidden] -> [T, vocab] (fp32)"""
        return self.lm_head(hidden).float()
