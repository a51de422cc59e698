"""Megatron-style tensor parallelism of the LLaMA decoder stack (model/llm.py).

Per layer, with tp ranks:
  - q_proj, k_proj, v_proj, gate_proj, up_proj: column-parallel (each rank holds 1/tp of the output rows);
  - o_proj, down_proj: row-parallel (1/tp of the input columns), the partial outputs all-reduced;
  - attention heads split: rank r holds query heads [r*H/tp, (r+1)*H/tp) and KV heads
    [r*Hkv/tp, (r+1)*Hkv/tp) (GQA groups stay whole because Hkv % tp == 0), and its share of the paged
    KV cache (Hkv/tp heads);
  - RMSNorms, RoPE: replicated.

LoRA-MoE, o = W0 x + s B (softmax(Wg x) (.) A x), split as its base linear:
  - column-parallel: router Wg and A replicated, B split on its output rows with W0: rank r computes
    output rows r exactly (`LoRAMoELinear` with the local out_features, the same fused op);
  - row-parallel (down_proj): x arrives split on K. The router needs the full x (softmax is not linear),
    so each rank computes its partial router logits Wg[:, K_r] x_r and partial A[:, K_r] x_r and one small
    all-reduce of [T, E + E*r] gives every rank the exact full logits and A x (the same sums as
    Wg x and A x, up to the order of the fp32 additions). B is replicated: rank 0 adds s B (g (.) A x) to its
    partial W0[:, K_r] x_r before the output all-reduce, so it is added once.
The embedding and the LM head are not split: they run on rank 0 only (the step's input embeddings are
broadcast; the logits are computed from rank 0's final hidden state, identical on every rank).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, LLMConfig, LoRAMoEConfig
from ..model.attention import AttentionBackend
from ..model.llm import LlamaDecoderLayer, RMSNorm, RotaryEmbedding, run_layers
from .comm import TPGroup

COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
ROW = {"o_proj", "down_proj"}


def check_tp(cfg: LLMConfig, tp: int) -> None:
    """ConfigError unless the LLM splits evenly over `tp` ranks."""
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tp}")
    if cfg.num_key_value_heads % tp:
        raise ConfigError(f"tensor_parallel_size={tp} must divide num_key_value_heads={cfg.num_key_value_heads} "
                          "(each rank holds whole KV heads of the paged cache)")
    if cfg.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size={tp} must divide intermediate_size={cfg.intermediate_size}")


def local_config(cfg: LLMConfig, tp: int) -> LLMConfig:
    """The per-rank shapes: 1/tp of the heads, KV heads and FFN width (head_dim kept)."""
    check_tp(cfg, tp)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=cfg.num_key_value_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp, head_dim=cfg.head_dim)


def _split(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].contiguous().clone()


def shard_state(full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """`LlamaModel` state dict (keys `layers.N.self_attn.q_proj.weight`, ..., `norm.weight`; the embedding
    is dropped) -> rank `rank`'s shard, with the keys of `TPLlamaStack`."""
    out = {}
    for key, t in full.items():
        if key.startswith("embed_tokens."):
            continue
        parts = key.split(".")
        linear, param = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
        if linear in COLUMN:  # W0 and B split on the output rows; A, router replicated
            out[key] = _split(t, 0, rank, tp) if param in ("weight", "lora_B") else t.clone()
        elif linear in ROW:  # W0, A, router split on the input columns; B replicated
            out[key] = _split(t, 1, rank, tp) if param in ("weight", "lora_A", "lora_router") else t.clone()
        else:
            out[key] = t.clone()
    return out


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W[:, K_r]^T); weight [N, K/tp]."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(F.linear(x, self.weight))


class RowParallelLoRAMoE(nn.Module):
    """Row-parallel LoRA-MoE (module docstring): weight [N, K/tp], lora_router [E, K/tp], lora_A [E*r, K/tp],
    lora_B [N, E*r] replicated. Computed in fp32 like the op's reference, returned in x.dtype."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAMoEConfig, group: TPGroup):
        super().__init__()
        e, r = cfg.num_experts, cfg.rank
        self.num_experts, self.rank, self.scaling, self.group = e, r, cfg.scaling, group
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.lora_router = nn.Parameter(torch.empty(e, in_features), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(e * r, in_features), requires_grad=False)
        self.lora_B = nn.Parameter(torch.empty(out_features, e * r), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, e, r = x.shape[:-1], self.num_experts, self.rank
        xf = x.reshape(-1, x.shape[-1]).float()
        part = xf @ torch.cat([self.lora_router, self.lora_A]).float().t()  # [T, E + E*r] partial sums
        self.group.all_reduce(part)
        gate = torch.softmax(part[:, :e], dim=-1)
        mid = (part[:, e:].reshape(-1, e, r) * gate.unsqueeze(-1)).reshape(-1, e * r)
        y = xf @ self.weight.float().t()
        if self.group.rank == 0:
            y = y + self.scaling * (mid @ self.lora_B.float().t())
        return self.group.all_reduce(y).to(x.dtype).view(*lead, self.out_features)


class TPLlamaStack(nn.Module):
    """One rank's share of `LlamaModel`'s decoder layers + the final norm (same parameter names as
    `LlamaModel`, local shapes): `LlamaDecoderLayer` built at the local config, with o_proj and
    down_proj swapped for their row-parallel forms."""

    def __init__(self, cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig], group: TPGroup):
        super().__init__()
        tp = group.world_size
        loc = local_config(cfg, tp)
        self.layers = nn.ModuleList()
        targets = lora_moe.target_modules if lora_moe else ()
        for i in range(cfg.num_hidden_layers):
            layer = LlamaDecoderLayer(loc, i, lora_moe)  # q/k/v/gate/up at the local widths: column-parallel
            layer.self_attn.o_proj = RowParallelLinear(loc.num_attention_heads * loc.head_dim, cfg.hidden_size, group)
            layer.mlp.down_proj = (RowParallelLoRAMoE(loc.intermediate_size, cfg.hidden_size, lora_moe, group)
                                   if "down_proj" in targets else
                                   RowParallelLinear(loc.intermediate_size, cfg.hidden_size, group))
            self.layers.append(layer)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.requires_grad_(False)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """As `LLM.forward`: embeds [T, hidden], positions [T] -> final-norm hidden [T, hidden] (every rank)."""
        cos, sin = self.rotary_emb.cos_sin(positions)
        return run_layers(self.layers, self.norm, embeds, cos, sin, attn)


def build_stack(cfg: LLMConfig, lora_moe: Optional[LoRAMoEConfig], group: TPGroup, state: dict,
                device, dtype: torch.dtype) -> TPLlamaStack:
    """The rank's stack with its shard `state` (from `shard_state`) loaded (strict)."""
    with torch.device("meta"):
        stack = TPLlamaStack(cfg, lora_moe, group)
    stack = stack.to_empty(device=device)
    stack.load_state_dict(state, strict=True)
    return stack.to(dtype=dtype)
