"""Named model configs.

- `tiny`: runs end to end on a CPU in seconds; random weights from a fixed seed and the
  byte-level tokenizer built in code (`unimlm_engine.inputs.tokenizer.ByteTokenizer`).
- `visionllm-v2-7b`: the real shapes of DESIGN.md section 1 (CLIP ViT-L/14-336,
  Vicuna-7B, LoRA-MoE E=8 r=4 alpha=32, K=4 / 64 super-link queries).
"""
from __future__ import annotations

from typing import Callable

from .model import LLMConfig, LoRAMoEConfig, ModelConfig, SuperLinkConfig, VisionConfig
from ..routes import required_special_tokens, special_tokens
from .decoders import DetectorConfig, GenConfig, PoseConfig

# Byte tokenizer layout (see inputs/tokenizer.py): <unk> <s> </s>, 256 bytes, then the special tokens.
TINY_VOCAB_SIZE = 3 + 256 + len(required_special_tokens())
TINY_SEED = 1234


def tiny() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),
        # the byte tokenizer's vocabulary, routes registered after the built-in ones included
        llm=LLMConfig(vocab_size=3 + 256 + len(special_tokens()), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        lora_moe=LoRAMoEConfig(num_experts=4, rank=2, alpha=8.0),
        superlink=SuperLinkConfig(num_embs=4, num_embs_gen=8),
        detector=DetectorConfig(d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
                                llm_hidden_size=256, mask_dim=32, image_short=64, image_long=96, embed_dim=16,
                                depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2),
        pose=PoseConfig(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
                        num_keypoints=17, llm_hidden_size=256, image_short=64, image_long=96, embed_dim=16,
                        depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, max_detections=3),
        gen=GenConfig(llm_hidden_size=256, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                      num_prompt_tokens=77),
        edit=GenConfig(llm_hidden_size=256, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                       num_prompt_tokens=77),
    )


def visionllm_v2_7b() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(),
        llm=LLMConfig(vocab_size=32000 + 17),
        lora_moe=LoRAMoEConfig(num_experts=8, rank=4, alpha=32.0),
        superlink=SuperLinkConfig(num_embs=4, num_embs_gen=64),
        detector=DetectorConfig(),
        pose=PoseConfig(),
        gen=GenConfig(),
        edit=GenConfig(),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"tiny": tiny, "visionllm-v2-7b": visionllm_v2_7b}


class UnknownPresetError(ValueError):
    pass


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
