"""`unimlm export <decoder> --model tiny --format onnx|aoti|tensorrt --msda onnx|plugin --opset 17 --out DIR`.

decoder: detector | det | seg (detector with the mask head) | pose. The export bucket (`default_shape`) is the
largest canvas the decoder's resize can produce (image_long rounded up to the pad multiple 64, square so both
orientations fit), batch 1, min(max_classes, 8) classes; calls with more classes need a larger bucket
(export_decoder(shape=...)). Writes <out>/<decoder>.<onnx|pt2|plan> and the JSON record beside it. tensorrt builds the
ONNX first, then the engine (needs TensorRT on a GPU machine; untested here).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .wrappers import ExportShape

DECODERS = {"detector": ("detector", False), "det": ("detector", False), "seg": ("detector", True),
            "pose": ("pose", False)}
FORMATS = ("onnx", "aoti", "tensorrt")


def default_shape(kind: str, cfg, batch: int = 1, classes: int | None = None) -> ExportShape:
    """Canvas = image_long rounded up to the decoder's pad multiple (64), square."""
    side = -(-cfg.image_long // 64) * 64
    c = classes if classes is not None else min(cfg.max_classes, 8)
    return ExportShape(batch, side, side, c, cfg.num_keypoints if kind == "pose" else 0)


def build_decoder(kind: str, model: str, seed: int = 0) -> torch.nn.Module:
    """The decoder of preset `model` with seeded random weights (checkpoint loading is the loader's job)."""
    from unimlm_engine.config.presets import get_preset

    cfg = get_preset(model)
    torch.manual_seed(seed)
    if kind == "detector":
        from unimlm_engine.model.decoders.detector import DetectorDecoder

        return DetectorDecoder(cfg.detector).eval()
    from unimlm_engine.model.decoders.pose import PoseDecoder

    return PoseDecoder(cfg.pose).eval()


def export_decoder(decoder_name: str, model: str, fmt: str, msda: str, opset: int, out: str | Path,
                   decoder: torch.nn.Module | None = None, shape: ExportShape | None = None) -> dict:
    """Library form of the CLI -> the JSON record (plus "path")."""
    if decoder_name not in DECODERS:
        raise ValueError(f"unknown decoder {decoder_name!r}; decoders: {', '.join(DECODERS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    kind, masks = DECODERS[decoder_name]
    decoder = decoder if decoder is not None else build_decoder(kind, model)
    shape = shape or default_shape(kind, decoder.cfg)
    out = Path(out)
    if fmt == "aoti":
        from .aoti import export_aoti

        path = out / f"{decoder_name}.pt2"
        return {**export_aoti(kind, decoder, shape, path, masks), "path": str(path)}
    from .onnx_export import export_onnx

    path = out / f"{decoder_name}.onnx"
    record = {**export_onnx(kind, decoder, shape, path, msda, opset, masks), "path": str(path)}
    if fmt == "tensorrt":
        from .tensorrt import build_engine

        record["engine"] = str(build_engine(path, path.with_suffix(".plan")))
    return record


def run_export(args) -> int:
    """args: decoder, model, format, msda, opset, out (argparse namespace from unimlm_engine/cli.py)."""
    record = export_decoder(args.decoder, args.model, args.format, args.msda, args.opset, args.out)
    print(json.dumps({k: record[k] for k in ("path", "export_s") if k in record} | {"shape": record["shape"]}),
          file=sys.stdout)
    return 0
