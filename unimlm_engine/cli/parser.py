"""The `unimlm` argument parser (cli/main.py maps each subcommand to its function)."""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _add_tp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                        help="tensor parallelism of the LLM over N ranks (worker processes; README: tensor "
                             "parallelism)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimlm", description="unimlm-engine command line")
    sub = p.add_subparsers(dest="cmd", required=True)
    backend_help = ("ROUTE=KIND[:PATH], repeatable: run ROUTE's decoder through an exported back end, e.g. "
                    "det=onnxruntime:out/export/det.onnx (KIND: eager, onnxruntime, aoti, tensorrt; ROUTE may "
                    "be a decoder name, gdino or unipose, for all its routes)")
    g = sub.add_parser("generate", help="run one request and print text and task results")
    g.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    g.add_argument("--image", help="input image path")
    g.add_argument("--prompt", required=True)
    g.add_argument("--route", help="force routing tokens, e.g. DET,SEG,POSE,GEN,EDIT (random-weight presets "
                                   "do not emit them by themselves)")
    g.add_argument("--region", action="append",
                   help="visual prompt in image pixels, repeatable, one per <region> token of the prompt "
                        "(write <reg>region1<region></reg>): box:x1,y1,x2,y2 | point:x,y[;x,y...] | "
                        "scribble:x,y;x,y[;...][@width] | mask:PATH.png")
    g.add_argument("--force-text", help="text the answer starts with (forced tokens), e.g. span routes: "
                                        "'<IMGSEG>dog</IMGSEG><BOX>dog:[0.1, 0.2, 0.6, 0.9]</BOX>' (tiny-unified)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--decoder-backend", action="append", help=backend_help)
    g.add_argument("--json", action="store_true", help="print the whole output as JSON (README: task results)")
    g.add_argument("--save-dir", help="save visualisations and generated images here (JSON then names the "
                                      "image files instead of inlining them)")
    g.add_argument("--draw-threshold", type=float, default=0.3,
                   help="--save-dir pictures draw the instances scoring at least this (default 0.3)")
    _add_tp(g)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    v.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    v.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--device", default=None)
    v.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (or set "
                                                   "UNIMLM_API_KEY)")
    v.add_argument("--max-queue-size", type=int, default=256, help="waiting requests before new ones get 429")
    v.add_argument("--max-num-seqs", type=int, default=64)
    v.add_argument("--allowed-local-media-path", default=None, help="serve file:// images from inside this folder")
    v.add_argument("--max-body-bytes", type=int, default=32 << 20)
    v.add_argument("--max-image-pixels", type=int, default=32_000_000)
    v.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: none)")
    v.add_argument("--default-max-tokens", type=int, default=256)
    v.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let requests in "
                                                                     "flight finish before cancelling them")
    v.add_argument("--cors-origin", action="append", help="allow this origin (repeatable); CORS is off without")
    v.add_argument("--decoder-backend", action="append", help=backend_help)
    v.add_argument("--log-level", default="info")
    r = v.add_argument_group("replicas on Ray Serve (README: replicas with Ray Serve; needs the ray extra)")
    r.add_argument("--ray", action="store_true", help="serve replicas of this server on Ray Serve")
    r.add_argument("--replicas", type=_positive_int, default=1, help="number of replicas (default 1)")
    r.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                   help="autoscale between MIN and MAX replicas on the requests in flight (instead of --replicas)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (auto or HEAD:6379); default: start "
                                                       "a local one")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (1 for a GPU replica)")

    b = sub.add_parser("serve-bench", help="load generator: a running server (--url) or the Python API")
    b.add_argument("--url", default=None, help="benchmark the OpenAI-compatible server at this URL instead of an "
                                               "in-process engine (--model, --device, engine knobs then unused)")
    b.add_argument("--api-key", default=None, help="with --url")
    b.add_argument("--plot", default=None, help="with --url: save latency against request rate here (PNG)")
    b.add_argument("--model", default="tiny")
    b.add_argument("--device", default=None)
    b.add_argument("--num-requests", type=int, default=64)
    b.add_argument("--concurrency", type=int, default=16)
    b.add_argument("--request-rate", default=None, help="Poisson arrivals per second (open loop); with --url a list "
                                                        "like 1,2,4 runs once per rate")
    b.add_argument("--mix", default="vqa:0.4,text:0.2,det:0.2,seg:0.1,pose:0.1",
                   help="workload kinds with weights: vqa, text, or any route name (det, seg, pose, gen...)")
    b.add_argument("--max-tokens", type=int, default=16)
    b.add_argument("--max-num-seqs", type=int, default=64)
    b.add_argument("--decoder-batch", type=int, default=8)
    b.add_argument("--decoder-backend", action="append", help=backend_help)
    b.add_argument("--images", nargs="+", default=["examples/images/chelsea.png", "examples/images/coffee.png"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", help="write the summary JSON here")
    _add_tp(b)

    c = sub.add_parser("convert", help="rewrite a checkpoint directory as safetensors shards")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--num-shards", type=int, default=None)

    e = sub.add_parser("export", help="export a decoder (ONNX / AOTInductor / TensorRT), one artifact per canvas",
                       description="Export the decoder the engine serves for --model: one artifact per canvas bucket "
                                   "(batch and class count dynamic) and OUT/DECODER.json listing them; point "
                                   "--decoder-backend at OUT/DECODER.onnx (or .pt2 / .plan). See export/README.md.")
    e.add_argument("decoder", help="det (or detector) or seg (detector with the mask head); pose is refused "
                                   "(UniPose, the [POSE] decoder, has no export path)")
    e.add_argument("--model", default="tiny", help="preset name or checkpoint directory (the weights the engine "
                                                   "serves for it)")
    e.add_argument("--format", default="onnx", help="onnx, aoti or tensorrt (needs TensorRT installed; checked "
                                                    "before exporting)")
    e.add_argument("--msda", default="onnx", choices=("onnx", "plugin"),
                   help="deformable attention as GridSample ops (onnx) or TensorRT plugin nodes (plugin)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset written: 17 (default) .. 21")
    e.add_argument("--canvas", default="auto", help="canvas buckets HxW[,HxW...], multiples of the decoder's pad "
                                                    "multiple; auto: every canvas the detector's resize can "
                                                    "produce (tiny: 32x96,96x32,64x64,64x96,96x64)")
    e.add_argument("--batch", default=None, help="dynamic batch range MAX, MIN:MAX or MIN:OPT:MAX (opt: the "
                                                 "TensorRT profile's; min = max: static); default 1:8:8")
    e.add_argument("--classes", default=None, help="dynamic class-count range, same forms; default "
                                                   "1:min(8, max_classes):max_classes")
    e.add_argument("--out", default="out/export")
    return p
