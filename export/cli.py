"""`unimlm export <decoder> --model M --format onnx|aoti|tensorrt --msda onnx|plugin --opset 17 --out DIR
[--canvas auto|HxW,...] [--batch MAX|MIN:OPT:MAX] [--classes MAX|MIN:OPT:MAX]`.

decoder: detector | det | seg (detector with the mask head); pose is refused (UniPose, the [POSE] decoder,
has no export path: serve [POSE] eagerly). M: a preset name or a checkpoint
directory; the decoder exported is the one the engine serves for M (source.py). One artifact per canvas
bucket (buckets.py), batch and classes dynamic: <out>/<decoder>.<onnx|pt2> holds the largest canvas,
<out>/<decoder>.<H>x<W>.<onnx|pt2> the others, and <out>/<decoder>.json (the record the runtime reads from
either main path) lists them all. tensorrt also builds <decoder>[.<H>x<W>].plan from each ONNX file; it checks
that TensorRT imports before exporting anything.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .buckets import plan_buckets
from .opset import DEFAULT_OPSET, check_opset
from .wrappers import ExportShape

DECODERS = {"detector": ("detector", False), "det": ("detector", False), "seg": ("detector", True)}
# decoder names with no export path, and why (a clear error instead of "unknown decoder")
REFUSED = {"pose": "the [POSE] decoder is the official UniPose now, which has no export wrapper yet (the export "
                   "covered the engine's former pose network); serve [POSE] eagerly"}
FORMATS = ("onnx", "aoti", "tensorrt")
MSDA_FORMS = ("onnx", "plugin")


def artifact_name(decoder_name: str, canvas: tuple[int, int], main: tuple[int, int], suffix: str) -> str:
    """<decoder>.<suffix> for the main (largest) canvas, <decoder>.<H>x<W>.<suffix> for the others."""
    return f"{decoder_name}{suffix}" if canvas == main else f"{decoder_name}.{canvas[0]}x{canvas[1]}{suffix}"


def _check_args(decoder_name: str, fmt: str, msda: str, opset: int) -> None:
    if decoder_name in REFUSED:
        raise ValueError(f"{decoder_name}: {REFUSED[decoder_name]}")
    if decoder_name not in DECODERS:
        raise ValueError(f"unknown decoder {decoder_name!r}; decoders: {', '.join(DECODERS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if msda not in MSDA_FORMS:
        raise ValueError(f"--msda must be one of {MSDA_FORMS}, got {msda!r}")
    if fmt != "aoti":
        check_opset(opset)
    if fmt == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()


def _export_bucket(kind: str, decoder, shape: ExportShape, out: Path, fmt: str, names: dict, plan, msda: str,
                   opset: int, masks: bool) -> dict:
    if fmt == "aoti":
        from .aoti import export_aoti

        entry = export_aoti(kind, decoder, shape, out / names[".pt2"], masks, plan.batch, plan.classes)
        return {**entry, "files": {"aoti": names[".pt2"]}}
    from .onnx_export import export_onnx

    entry = export_onnx(kind, decoder, shape, out / names[".onnx"], msda, opset, masks, plan.batch, plan.classes)
    entry["files"] = {"onnx": names[".onnx"]}
    if fmt == "tensorrt":
        from .tensorrt import build_engine, plan_profiles

        build_engine(out / names[".onnx"], out / names[".plan"], profiles=plan_profiles(entry))
        entry["files"]["tensorrt"] = names[".plan"]
    return entry


def export_decoder(decoder_name: str, model: str | os.PathLike = "tiny", fmt: str = "onnx", msda: str = "onnx",
                   opset: int = DEFAULT_OPSET, out: str | os.PathLike = "out/export", *,
                   decoder: torch.nn.Module | None = None, canvases: str | None = None,
                   batch: str | int | None = None, classes: str | int | None = None,
                   progress: bool = True) -> dict:
    """Library form of the CLI -> the JSON record written to <out>/<decoder_name>.json, plus "path" (the
    main artifact: <out>/<decoder_name>.onnx or .pt2, what the runtime is pointed at) and, for tensorrt,
    "engine" (<out>/<decoder_name>.plan). decoder: export this module instead of loading `model`'s (model
    still gives the payload width K). canvases / batch / classes: bucket specs (buckets.py; defaults: "auto",
    1..8, 1..max_classes). progress: a tqdm bar on stderr."""
    from tqdm import tqdm

    from .source import load_decoder, model_config

    _check_args(decoder_name, fmt, msda, opset)
    kind, masks = DECODERS[decoder_name]
    queries = model_config(model).superlink.num_embs
    decoder = decoder if decoder is not None else load_decoder(kind, model)
    plan = plan_buckets(decoder.cfg, decoder.pad_multiple, canvases, batch, classes, queries)
    out, main = Path(out), plan.main_canvas()
    record = {"decoder": kind, "with_masks": masks, "format": fmt, "model": str(model), **plan.to_dict()}
    record["gdino"] = "official"  # exact-canvas buckets (backends.BucketedBackend(exact_canvas=True))
    if fmt != "aoti":
        record.update(msda=msda, opset=opset)
    record["buckets"] = []
    bar = tqdm(plan.canvases, desc=f"export {decoder_name} ({fmt})", unit="canvas", disable=not progress,
               file=sys.stderr)
    for h, w in bar:
        bar.set_postfix_str(f"{h}x{w}")
        names = {s: artifact_name(decoder_name, (h, w), main, s) for s in (".onnx", ".pt2", ".plan")}
        shape = ExportShape(plan.batch.opt, h, w, plan.classes.opt, queries)
        record["buckets"].append(_export_bucket(kind, decoder, shape, out, fmt, names, plan, msda, opset, masks))
    record["export_s"] = round(sum(b["export_s"] + b.get("compile_s", 0.0) for b in record["buckets"]), 2)
    (out / f"{decoder_name}.json").write_text(json.dumps(record, indent=2))
    suffix = ".pt2" if fmt == "aoti" else ".onnx"
    result = {**record, "path": str(out / artifact_name(decoder_name, main, main, suffix))}
    if fmt == "tensorrt":
        result["engine"] = str(out / artifact_name(decoder_name, main, main, ".plan"))
    return result


def run_export(args) -> int:
    """args: decoder, model, format, msda, opset, out, canvas, batch, classes (the `unimlm export` namespace)."""
    record = export_decoder(args.decoder, args.model, args.format, args.msda, args.opset, args.out,
                            canvases=getattr(args, "canvas", None), batch=getattr(args, "batch", None),
                            classes=getattr(args, "classes", None))
    summary = {k: record[k] for k in ("path", "engine", "opset", "export_s") if k in record}
    summary["canvases"] = [f"{b['height']}x{b['width']}" for b in record["buckets"]]
    summary.update(batch=record["batch"], classes=record["classes"])
    print(json.dumps(summary), file=sys.stdout)
    return 0
