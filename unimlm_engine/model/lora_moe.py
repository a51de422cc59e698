"""LoRA-MoE linear (UnifiedMLLM, after LoRAMoE), DESIGN.md section 1.

    o = W0 x + (alpha / r) * sum_i softmax(x Wg)_i * B_i A_i x

Parameters (our addition to the official key layout, under the wrapped linear's name):
    weight      [N, K]    frozen base W0 (same key as the plain linear: `...gate_proj.weight`)
    lora_router [E, K]    dense router Wg (fp32 softmax, no top-k)
    lora_A      [E*r, K]  A_cat: expert i owns rows i*r:(i+1)*r
    lora_B      [N, E*r]  B_cat: expert i owns columns i*r:(i+1)*r
The forward is the `unimlm::lora_moe_linear` op (Triton on GPU, PyTorch reference on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LoRAMoEConfig
from ..ops.lora_moe import lora_moe_linear


class LoRAMoELinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: LoRAMoEConfig):
        super().__init__()
        e, r = cfg.num_experts, cfg.rank
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.scaling = e, r, cfg.scaling
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_router = nn.Parameter(torch.empty(e, in_features))
        self.lora_A = nn.Parameter(torch.empty(e * r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, e * r))
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]"""
        lead = x.shape[:-1]
        out = lora_moe_linear(x.reshape(-1, self.in_features), self.weight, self.lora_router, self.lora_A,
                              self.lora_B, self.scaling)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
                f"scaling={self.scaling}")
