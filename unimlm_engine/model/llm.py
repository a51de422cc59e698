"""LLaMA-architecture decoder (HF `LlamaForCausalLM` structure and parameter names).

RoPE, RMSNorm, SwiGLU, GQA; LoRA-MoE on the FFN linears when configured. Tokens of all
sequences are packed along one axis (no padding): the attention backend knows where each
sequence starts and what it has cached. The residual stream is carried beside each layer's output
(`forward_residual`), so on CUDA every residual add shares a launch with the next RMSNorm; RMSNorm, RoPE and
SiLU x up are `unimlm::` ops (ops/layer_ops.py: one Triton launch each on CUDA, the eager code on the CPU),
and the engine serves q/k/v and gate/up as one GEMM each on CUDA (`fuse_projections_`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig, LoRAMoEConfig
from ..ops.layer_ops import add_rms_norm, rms_norm, rope, silu_mul
from .attention import AttentionBackend
from .lora_moe import LoRAMoELinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(x + residual), x + residual): the residual add and the norm in one launch on CUDA."""
        return add_rms_norm(x, residual, self.weight, self.eps)


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
        self.qkv_weight: Optional[torch.Tensor] = None  # set by fuse_projections_

    def _apply(self, fn, recurse: bool = True):
        self.qkv_weight = None  # a cast or move gives the projections their own storage again
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_weight is not None:  # one GEMM; q, k, v are column views of its output
            q, k, v = F.linear(x, self.qkv_weight).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], 1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = rope(q.view(t, self.h, self.d), k.view(t, self.hkv, self.d), cos, sin)
        out = attn.forward(self.layer_idx, q, k, v.view(t, self.hkv, self.d), self.scale)
        return self.o_proj(out.reshape(t, self.h * self.d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig]):
        super().__init__()
        targets = lora_moe.target_modules if lora_moe else ()
        shapes = {"gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
        for name, (i, o) in shapes.items():
            setattr(self, name, LoRAMoELinear(i, o, lora_moe) if name in targets else nn.Linear(i, o, bias=False))
        self.gate_up_weight: Optional[torch.Tensor] = None  # set by fuse_projections_

    def _apply(self, fn, recurse: bool = True):
        self.gate_up_weight = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int, lora_moe: Optional[LoRAMoEConfig]):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg, lora_moe)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn: AttentionBackend) -> torch.Tensor:
        out, residual = self.forward_residual(x, None, cos, sin, attn)
        return out + residual

    def forward_residual(self, x: torch.Tensor, residual: Optional[torch.Tensor], cos, sin,
                         attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer with the residual stream carried apart (as vLLM does): the stream is `x + residual`
        (x alone when residual is None) and the layer returns (mlp output, stream before it), so each
        residual add happens inside the next norm's launch. The same sums, rounded the same way, as
        `x = x + attn(norm(x)); x = x + mlp(norm(x))`."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, attn)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


def run_layers(layers, norm: RMSNorm, x: torch.Tensor, cos, sin, attn: AttentionBackend) -> torch.Tensor:
    """The decoder stack and its final norm over the embeddings x -> final-norm hidden states."""
    residual = None
    for layer in layers:
        x, residual = layer.forward_residual(x, residual, cos, sin, attn)
    return norm(x) if residual is None else norm.add_forward(x, residual)[0]


def fuse_projections_(layers) -> int:
    """Serve each layer's q/k/v (and gate/up, when both are plain linears) as one GEMM: the weights are
    copied into one [sum of outputs, K] tensor and the Parameters become row views of it, so memory does not
    grow and the state dict keeps the checkpoint's names and values (its tensors then share storage: clone
    them before safetensors.save_file). Undone by any later cast or move (`_apply`). On a GPU at batch 1 this
    is 2 fewer launches per layer over the same bytes. -> number of fused groups."""
    fused = 0
    with torch.no_grad():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            groups = [(a, "qkv_weight", (a.q_proj, a.k_proj, a.v_proj))]
            if type(m.gate_proj) is nn.Linear and type(m.up_proj) is nn.Linear:
                groups.append((m, "gate_up_weight", (m.gate_proj, m.up_proj)))
            for owner, attr, linears in groups:
                if getattr(owner, attr) is not None or any(type(lin) is not nn.Linear or lin.bias is not None
                                                           for lin in linears):
                    continue
                merged = torch.cat([lin.weight for lin in linears])
                start = 0
                for lin in linears:
                    n = lin.weight.shape[0]
                    lin.weight.data = merged[start:start + n]
                    start += n
                setattr(owner, attr, merged)
                fused += 1
    return fused


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
        return run_layers(self.model.layers, self.model.norm, embeds, cos, sin, attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, hidden] -> [T, vocab] (fp32)"""
        return self.lm_head(hidden).float()
