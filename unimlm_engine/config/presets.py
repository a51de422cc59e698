"""Named model configs.

- `tiny`: the shapes model (issue 18): VisionLLM v2 at a small size, trained by training/train_shapes.py on
  the procedurally generated shapes world (unimlm_engine/shapes), shipped with the package as an official-layout
  checkpoint (unimlm_engine/assets/shapes-tiny: fp16 safetensors, a BPE tokenizer with the official added
  tokens). It answers questions about shapes and detects, segments and finds keypoints of them; GEN / EDIT keep
  the tiny random diffusers pipelines, and its region encoder is untrained.
- `tiny-random`: runs end to end on a CPU in seconds; random weights from a fixed seed and the
  byte-level tokenizer built in code (`unimlm_engine.inputs.tokenizer.ByteTokenizer`); what most tests use.
- `visionllm-v2-7b`: the released model's shapes (CLIP ViT-L/14-336, Vicuna-7B with vocabulary
  32,026, no LoRA-MoE, K=4 / 64 super-link queries, every tool).
- `unifiedmllm-7b`: UnifiedMLLM's shapes (CLIP ViT-L/14-336 on one tile, Vicuna-7B with LoRA-MoE
  E=8 r=4 alpha=32 on the FFN linears); no super-link decoders; span-route experts from local
  directories (ExpertConfig.*_dir, empty here: set them to serve those routes).
- `tiny-unified`: the same at test size, tiny random experts built in code; runs on a CPU in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .model import LLMConfig, LoRAMoEConfig, ModelConfig, SuperLinkConfig, VisionConfig
from ..routes import required_special_tokens, span_tokens, special_tokens
from .decoders import DetectorConfig, ExpertConfig, GenConfig, PoseConfig

# Byte tokenizer layout (see inputs/tokenizer.py): <unk> <s> </s>, 256 bytes, then the special tokens.
TINY_VOCAB_SIZE = 3 + 256 + len(required_special_tokens())
TINY_SEED = 1234


def tiny_random() -> ModelConfig:
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
        # UniPose needs hidden_dim 256 (its sine embeddings are hard-coded) and >= 50 queries; small otherwise,
        # with a Swin outside the official table (the swin_params extension)
        pose=PoseConfig(backbone="swin_tiny_test", swin_params=(16, (1, 1, 1, 1), (1, 2, 4, 8), 4), enc_layers=1,
                        dec_layers=3, dim_feedforward=64, num_queries=50, enc_n_points=2, dec_n_points=2,
                        l_hidden_size=256, image_short=64, image_long=96),
        gen=GenConfig(llm_hidden_size=256, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                      num_prompt_tokens=77),
        edit=GenConfig(llm_hidden_size=256, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                       num_prompt_tokens=77),
        use_region_encoder=True,
    )


def visionllm_v2_7b() -> ModelConfig:
    """The released VisionLLM v2 (7B) as the official code builds it: CLIP ViT-L/14-336 (layer -2), the
    mlp2x_gelu bridge, Vicuna-7B with the 26 added tokens (vocabulary 32,026) and no LLM LoRA / LoRA-MoE
    (LoRA-MoE is UnifiedMLLM's: `unifiedmllm-7b`), K = 4 / 64 queries, and every tool. The released
    config.json itself is not available offline; a checkpoint directory's own config.json always governs."""
    return ModelConfig(
        vision=VisionConfig(),
        llm=LLMConfig(vocab_size=32000 + len(required_special_tokens())),
        lora_moe=None,
        superlink=SuperLinkConfig(num_embs=4, num_embs_gen=64),
        detector=DetectorConfig(),
        pose=PoseConfig(l_hidden_size=4096),  # X-Pose's UniPose Swin-T config, l_hidden_size = LLM width
        gen=GenConfig(pipeline_dir="checkpoints/stable-diffusion-v1-5"),  # sd.json's sd_model_id
        edit=GenConfig(pipeline_dir="checkpoints/instruct-pix2pix"),  # ip2p.json's sd_model_id
        use_region_encoder=True,
    )


def tiny_unified() -> ModelConfig:
    """tiny's LLM and vision shapes on one tile, the byte tokenizer with the span tokens, tiny experts
    (2 denoising steps, 32 px images)."""
    t = tiny_random()
    t.vision.max_tiles, t.vision.use_thumbnail = 1, False
    return ModelConfig(vision=t.vision,
                       llm=LLMConfig(vocab_size=3 + 256 + len(special_tokens()) + len(span_tokens()), hidden_size=256,
                                     intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=2048),
                       lora_moe=LoRAMoEConfig(num_experts=4, rank=2, alpha=8.0), superlink=t.superlink,
                       experts=ExpertConfig(tiny=True, num_inference_steps=2, guidance_scale=2.0, image_size=32))


def unifiedmllm_7b() -> ModelConfig:
    """Vocabulary: Vicuna's 32000, the official added tokens the engine's tokenizers carry ([PAD] <image>
    ...), then the 10 span tokens (our layout: UnifiedMLLM's released vocabulary was not available)."""
    return ModelConfig(
        vision=VisionConfig(max_tiles=1, use_thumbnail=False),
        llm=LLMConfig(vocab_size=32000 + len(required_special_tokens()) + len(span_tokens())),
        lora_moe=LoRAMoEConfig(num_experts=8, rank=4, alpha=32.0),
        experts=ExpertConfig(),
    )


def shapes_dir() -> Path:
    """The shipped shapes checkpoint (the `tiny` preset's weights)."""
    return Path(__file__).resolve().parent.parent / "assets" / "shapes-tiny"


def tiny() -> ModelConfig:
    """The shipped shapes model's config (its checkpoint's config.json)."""
    from ..checkpoint.loader import read_config

    return read_config(shapes_dir())


# presets whose weights ship with the package (a checkpoint directory) instead of being drawn from TINY_SEED
SHIPPED: dict[str, Callable[[], Path]] = {"tiny": shapes_dir}

PRESETS: dict[str, Callable[[], ModelConfig]] = {"tiny": tiny, "tiny-random": tiny_random,
                                                 "visionllm-v2-7b": visionllm_v2_7b,
                                                 "unifiedmllm-7b": unifiedmllm_7b, "tiny-unified": tiny_unified}


class UnknownPresetError(ValueError):
    pass


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
