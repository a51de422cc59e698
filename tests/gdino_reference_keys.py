"""Official gdino key names and shapes (from the official module definitions) and random official-layout state
dicts, for tests/gdino_reference.py and tests/test_gdino_official.py."""
from __future__ import annotations

import math

import torch

P = "gdino."


# ---------------------------------------------------------------- keys
def _kmlp(out, name, dims):
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{name}.layers.{i}.weight"], out[f"{name}.layers.{i}.bias"] = (b, a), (b,)


def _klin(out, name, i, o, bias=True):
    out[name + ".weight"] = (o, i)
    if bias:
        out[name + ".bias"] = (o,)


def _kln(out, name, c):
    out[name + ".weight"], out[name + ".bias"] = (c,), (c,)


def _kmha(out, name, d):
    out[name + ".in_proj_weight"], out[name + ".in_proj_bias"] = (3 * d, d), (3 * d,)
    _klin(out, name + ".out_proj", d, d)


def _kmsda(out, name, d, heads, levels, points):
    _klin(out, name + ".sampling_offsets", d, heads * levels * points * 2)
    _klin(out, name + ".attention_weights", d, heads * levels * points)
    _klin(out, name + ".value_proj", d, d)
    _klin(out, name + ".output_proj", d, d)


def official_keys(cfg: dict) -> dict[str, tuple]:
    bb, d, L = cfg["backbone_config"], cfg["d_model"], cfg["decoder_layers"]
    out: dict[str, tuple] = {}
    m = P + "model."
    s = m + "backbone.conv_encoder.model."
    e = bb["embed_dim"]
    out[s + "embeddings.patch_embeddings.projection.weight"] = (e, 3, 4, 4)
    out[s + "embeddings.patch_embeddings.projection.bias"] = (e,)
    _kln(out, s + "embeddings.norm", e)
    w = bb["window_size"]
    for i, (depth, heads) in enumerate(zip(bb["depths"], bb["num_heads"])):
        dim = e * 2 ** i
        for j in range(depth):
            b = f"{s}encoder.layers.{i}.blocks.{j}."
            _kln(out, b + "layernorm_before", dim)
            out[b + "attention.self.relative_position_bias_table"] = ((2 * w - 1) ** 2, heads)
            out[b + "attention.self.relative_position_index"] = (w * w, w * w)
            for n in ("query", "key", "value"):
                _klin(out, b + "attention.self." + n, dim, dim)
            _klin(out, b + "attention.output.dense", dim, dim)
            _kln(out, b + "layernorm_after", dim)
            _klin(out, b + "intermediate.dense", dim, 4 * dim)
            _klin(out, b + "output.dense", 4 * dim, dim)
        if i < 3:
            _klin(out, f"{s}encoder.layers.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False)
            _kln(out, f"{s}encoder.layers.{i}.downsample.norm", 4 * dim)
        _kln(out, f"{s}hidden_states_norms.stage{i + 1}", dim)
    chans = [e * 2, e * 4, e * 8, e * 8]
    for i, c in enumerate(chans):
        k = 3 if i == 3 else 1
        out[f"{m}input_proj_vision.{i}.0.weight"], out[f"{m}input_proj_vision.{i}.0.bias"] = (d, c, k, k), (d,)
        _kln(out, f"{m}input_proj_vision.{i}.1", d)
    out[m + "mask_features.weight"], out[m + "mask_features.bias"] = (cfg["mask_dim"], d, 1, 1), (cfg["mask_dim"],)
    out[m + "lateral_convs.0.weight"] = (d, e, 1, 1)
    _kln(out, m + "lateral_convs.0.norm", d)
    out[m + "output_convs.0.weight"] = (d, d, 3, 3)
    _kln(out, m + "output_convs.0.norm", d)
    out[m + "query_position_embeddings.weight"] = (cfg["num_queries"], d)
    _kmlp(out, m + "mask_embed", [d, d, d, cfg["mask_dim"]])
    ef, eh, lv = cfg["encoder_ffn_dim"], cfg["encoder_attention_heads"], 4
    for i in range(cfg["encoder_layers"]):
        b = f"{m}encoder.layers.{i}."
        t = b + "text_enhancer_layer."
        _kmha(out, t + "self_attn", d)
        _klin(out, t + "fc1", d, ef // 2)
        _klin(out, t + "fc2", ef // 2, d)
        _kln(out, t + "layer_norm_before", d)
        _kln(out, t + "layer_norm_after", d)
        f = b + "fusion_layer."
        _kln(out, f + "layer_norm_vision", d)
        _kln(out, f + "layer_norm_text", d)
        for n in ("vision_proj", "text_proj", "values_vision_proj", "values_text_proj"):
            _klin(out, f + "attn." + n, d, ef // 2)
        _klin(out, f + "attn.out_vision_proj", ef // 2, d)
        _klin(out, f + "attn.out_text_proj", ef // 2, d)
        out[f + "vision_param"], out[f + "text_param"] = (d,), (d,)
        g = b + "deformable_layer."
        _kmsda(out, g + "self_attn", d, eh, lv, cfg["encoder_n_points"])
        _kln(out, g + "self_attn_layer_norm", d)
        _klin(out, g + "fc1", d, ef)
        _klin(out, g + "fc2", ef, d)
        _kln(out, g + "final_layer_norm", d)
    df, dh = cfg["decoder_ffn_dim"], cfg["decoder_attention_heads"]
    _kln(out, m + "decoder.layer_norm", d)
    for i in range(L):
        b = f"{m}decoder.layers.{i}."
        _kmha(out, b + "self_attn", d)
        _kln(out, b + "self_attn_layer_norm", d)
        _kmha(out, b + "encoder_attn_text", d)
        _kln(out, b + "encoder_attn_text_layer_norm", d)
        _kmsda(out, b + "encoder_attn", d, dh, lv, cfg["decoder_n_points"])
        _kln(out, b + "encoder_attn_layer_norm", d)
        _klin(out, b + "fc1", d, df)
        _klin(out, b + "fc2", df, d)
        _kln(out, b + "final_layer_norm", d)
    _kmlp(out, m + "decoder.reference_points_head", [2 * d, d, d])
    for i in range(L):
        _kmlp(out, f"{m}decoder.bbox_embed.{i}", [d, d, d, 4])
    out[m + "level_embed"] = (4, d)
    _klin(out, m + "enc_output", d, d)
    _kln(out, m + "enc_output_norm", d)
    _kmlp(out, m + "encoder_output_bbox_embed", [d, d, d, 4])
    for i in range(L):
        _kmlp(out, f"{P}mask_embed.{i}", [d, d, d, cfg["mask_dim"]])
        _kmlp(out, f"{P}bbox_embed.{i}", [d, d, d, 4])
    _kmlp(out, P + "patch2query", [cfg["l_hidden_size"], d, d, d])
    return out


def tied_names(cfg: dict) -> list[list[str]]:
    """The official tied groups: every decoder layer's bbox_embed (head and decoder) is one MLP; mask_embed too."""
    L, groups = cfg["decoder_layers"], []
    for n in range(3):
        for kind in ("weight", "bias"):
            groups.append([f"{P}model.decoder.bbox_embed.{i}.layers.{n}.{kind}" for i in range(L)]
                          + [f"{P}bbox_embed.{i}.layers.{n}.{kind}" for i in range(L)])
            groups.append([f"{P}mask_embed.{i}.layers.{n}.{kind}" for i in range(L)])
    return groups


def _rel_index(w: int) -> torch.Tensor:
    ch, cw = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    flat = torch.stack([ch.flatten(), cw.flatten()])
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + w - 1) * (2 * w - 1) + rel[..., 1] + w - 1


def random_state_dict(cfg: dict, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Random official-layout weights (tied names hold equal tensors); LayerNorm / GroupNorm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(cfg).items():
        if k.endswith("relative_position_index"):
            sd[k] = _rel_index(cfg["backbone_config"]["window_size"])
        elif len(shape) == 1 and k.endswith(".weight"):  # LayerNorm / GroupNorm
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) >= 2 else 16
            sd[k] = torch.randn(shape, generator=g) * scale / math.sqrt(fan) * (3.0 if len(shape) == 1 else 1.0)
    # the class logits are dot products of two LayerNorm outputs (~d_model): scale the decoder's final norm
    # so the sigmoid scores spread over (0, 1) instead of tying at 1.0
    for k in (P + "model.decoder.layer_norm.weight", P + "model.decoder.layer_norm.bias"):
        sd[k] = sd[k] * 0.1
    for group in tied_names(cfg):
        for k in group[1:]:
            sd[k] = sd[group[0]].clone()
    return sd
