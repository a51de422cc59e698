"""The shapes model's architecture (issue 18): VisionLLM v2 at a size that trains on 2 CPU cores.

A CLIP-structured ViT on one 224 px tile (patch 28: 64 image tokens), the mlp2x_gelu bridge, a 4-layer LLaMA,
K = 4 super-link queries, the official Grounding-DINO family detector (a small Swin: the swin extension) and
the official UniPose (hidden 256 as its sine embeddings require, 4 keypoint slots for the world's at most 4
keypoints). GEN / EDIT keep the tiny random pipelines (the issue allows it); the region encoder is built but
not trained (no region data in this world).
"""
from __future__ import annotations

from ..config import LLMConfig, ModelConfig, SuperLinkConfig, VisionConfig
from ..config.decoders import DetectorConfig, GenConfig, PoseConfig
from ..routes import required_special_tokens
from .tokenizer import BASE_VOCAB

IMAGE = 224


def shapes_config() -> ModelConfig:
    llm_h = 256
    return ModelConfig(
        vision=VisionConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                            image_size=IMAGE, patch_size=28, max_tiles=1, use_thumbnail=False),
        llm=LLMConfig(vocab_size=BASE_VOCAB + len(required_special_tokens()), hidden_size=llm_h,
                      intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024),
        lora_moe=None,
        superlink=SuperLinkConfig(num_embs=4, num_embs_gen=8),
        detector=DetectorConfig(d_model=64, encoder_layers=1, decoder_layers=3, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=30,
                                llm_hidden_size=llm_h, mask_dim=32, image_short=IMAGE, image_long=IMAGE,
                                embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=7),
        pose=PoseConfig(backbone="swin_tiny_test", swin_params=(16, (1, 1, 1, 1), (1, 2, 4, 8), 7), enc_layers=1,
                        dec_layers=3, dim_feedforward=128, num_queries=50, enc_n_points=2, dec_n_points=2,
                        l_hidden_size=llm_h, image_short=IMAGE, image_long=IMAGE),
        gen=GenConfig(llm_hidden_size=llm_h, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                      num_prompt_tokens=77),
        edit=GenConfig(llm_hidden_size=llm_h, num_embs=8, mapper_dim=32, mapper_layers=1, mapper_heads=4,
                       num_prompt_tokens=77),
        use_region_encoder=True,
    )
