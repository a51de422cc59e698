"""LoRA-MoE module == the per-expert loop formula; with all B_i = 0 it is the base linear."""
import pytest
import torch
import torch.nn.functional as F

from unimlm_engine.config import LoRAMoEConfig
from unimlm_engine.model.lora_moe import LoRAMoELinear


def _loop_formula(m: LoRAMoELinear, x: torch.Tensor) -> torch.Tensor:
    """o = W0 x + (alpha/r) sum_i softmax(x Wg)_i B_i A_i x, written from the paper, fp64."""
    x = x.double()
    g = torch.softmax(x @ m.lora_router.double().t(), dim=-1)
    out = x @ m.weight.double().t()
    r = m.rank
    for i in range(m.num_experts):
        a = m.lora_A[i * r:(i + 1) * r].double()
        b = m.lora_B[:, i * r:(i + 1) * r].double()
        out += m.scaling * g[:, i:i + 1] * (x @ a.t() @ b.t())
    return out


@pytest.mark.parametrize("tokens,experts,rank", [(1, 1, 1), (17, 4, 2), (63, 8, 4), (5, 16, 8)],
                         ids=["t1-e1-r1", "t17-e4-r2", "t63-e8-r4", "t5-e16-r8"])
def test_module_equals_per_expert_loop(tokens, experts, rank):
    m = LoRAMoELinear(48, 40, LoRAMoEConfig(num_experts=experts, rank=rank, alpha=2.0 * rank))
    x = torch.randn(tokens, 48)
    with torch.no_grad():
        got = m(x)
        ref = _loop_formula(m, x)
    assert got.shape == (tokens, 40)
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5)
    if experts == 1:
        return
    # the gate really mixes experts: sharpening the router changes the result
    with torch.no_grad():
        m.lora_router.mul_(10)
        assert not torch.allclose(m(x).double(), ref, atol=1e-4)


def test_zero_b_is_base_linear():
    m = LoRAMoELinear(32, 24, LoRAMoEConfig(num_experts=4, rank=4, alpha=32))
    with torch.no_grad():
        m.lora_B.zero_()
        x = torch.randn(3, 7, 32)  # leading dims are flattened and restored
        assert torch.allclose(m(x), F.linear(x, m.weight), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="num_experts"):
        LoRAMoEConfig(num_experts=0)
    with pytest.raises(ValueError, match="target_modules"):
        LoRAMoEConfig(target_modules=("q_proj",))
