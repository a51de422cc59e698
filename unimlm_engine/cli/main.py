"""`unimlm` command: generate, serve, serve-bench, convert, export.

Arguments are checked before a model loads; a usage problem prints one `unimlm: error: ...` line and
exits 2. `generate` exits 1 when the request or any of its tasks failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class UsageError(ValueError):
    """A bad argument: one line on stderr, exit 2."""


def _quiet_third_party() -> None:
    """No library notices on every command (transformers' image-processor fallbacks, diffusers notes)."""
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    for module in ("transformers", "diffusers", "torch.onnx", "onnxscript", "huggingface_hub"):
        warnings.filterwarnings("ignore", module=module)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) has no usable CUDA device; "
                         f"use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")


def _check_model(model: str) -> None:
    from ..config.presets import PRESETS

    if model not in PRESETS and not Path(model).is_dir():
        raise UsageError(f"--model {model}: neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                         f"directory")


def _decoder_backends(specs: list[str] | None) -> dict[str, str]:
    """--decoder-backend ROUTE=KIND[:PATH] (repeatable) -> EngineConfig.decoder_backends."""
    from ..model.decoders.backends import parse_backend_spec
    from ..routes import RouteError, get_route

    out: dict[str, str] = {}
    for spec in specs or []:
        key, kind, path = parse_backend_spec(spec)
        if key not in ("gdino", "unipose"):
            try:
                key = get_route(key).token
            except RouteError as e:
                raise UsageError(f"--decoder-backend {spec}: {e}") from None
        if path is not None and not Path(path).exists():
            raise UsageError(f"--decoder-backend {spec}: {path} not found")
        out[key] = kind if path is None else f"{kind}:{path}"
    return out


def cmd_generate(args) -> int:
    from .forcing import parse_routes

    routes = parse_routes(args.route)
    backends = _decoder_backends(args.decoder_backend)
    _check_device(args.device)
    _check_model(args.model)
    image = _load_image(args.image) if args.image else None
    regions = _regions(args.region, image)
    import unimlm_engine as ue

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    ue.SamplingParams(**sampling)  # validate before loading
    engine = ue.Engine.from_pretrained(args.model, device=args.device,
                                       config=ue.EngineConfig(decoder_backends=backends,
                                                              tensor_parallel_size=args.tp))
    try:
        return _generate(engine, args, routes, sampling, image, regions)
    finally:
        engine.close()


def _load_image(path: str):
    from ..inputs.processor import load_image

    if not Path(path).is_file():
        raise UsageError(f"--image {path}: no such file")
    try:
        return load_image(path)
    except ValueError as e:
        raise UsageError(f"--image {path}: {e}") from None


def _regions(specs: list[str] | None, image) -> list:
    """--region KIND:VALUES (repeatable) -> Regions, checked against the image before the model loads."""
    from ..engine.regions import InvalidRegionError, parse_region, rasterize

    if specs and image is None:
        raise UsageError("--region needs --image (regions are in the image's pixels)")
    out = []
    for spec in specs or []:
        try:
            r = parse_region(spec)
            rasterize(r, image.width, image.height, 64, f"--region {spec}")
        except InvalidRegionError as e:
            raise UsageError(str(e)) from None
        out.append(r)
    return out


def _generate(engine, args, routes, sampling: dict, image, regions=None) -> int:
    import unimlm_engine as ue

    from .forcing import forced_route_tokens

    forced = forced_route_tokens(engine.model, routes)
    if args.force_text:  # e.g. span routes: "<IMGGEN>a red car</IMGGEN>"
        forced += tuple(engine.tokenizer.encode(args.force_text))
    sampling["max_tokens"] = max(sampling["max_tokens"], len(forced) + 1)
    handle = engine.submit(ue.Request(prompt=args.prompt, images=[image] if image is not None else None,
                                      regions=regions or None,
                                      sampling=ue.SamplingParams(**sampling, forced_prefix=forced)))
    if not args.json:
        for ev in handle.stream():
            if ev.text:
                print(ev.text, end="", flush=True)
        print()
    out = handle.future.result()
    paths = _save(out, image, args.save_dir, engine.tokenizer, args.draw_threshold) if args.save_dir \
        else [None] * len(out.tasks)
    if args.json:
        print(json.dumps(out.to_json(paths), indent=2))
    else:
        for t, p in zip(out.tasks, paths):
            print(json.dumps(t.to_json(p)))
        for t in out.spans:
            print(json.dumps(t.to_json()))
    failed = [t for t in out.tasks + out.spans if t.error is not None]
    if out.error is not None:
        print(f"unimlm: request failed: {type(out.error).__name__}: {out.error}", file=sys.stderr)
    for t in failed:
        print(f"unimlm: task {t.route} failed: {type(t.error).__name__}: {t.error}", file=sys.stderr)
    return 1 if out.error is not None or failed else 0


def _save(out, image, save_dir: str, tokenizer, min_score: float) -> list:
    """Draw / save each task's result (instances scoring >= min_score, labelled with the names the model wrote
    before its routing tokens); -> per task the saved generated images' paths (None otherwise)."""
    from ..outputs.labels import routed_group_names
    from ..outputs.visualize import save_result

    names = routed_group_names(out.token_ids, tokenizer)
    paths = []
    for i, t in enumerate(out.tasks):
        saved = None
        if t.error is None and t.raw is not None and (image is not None or t.images is not None):
            # a [POSE] result's labels are its object classes: the request's [DET] / [GRD] groups
            cls = names.get("[DET]", names.get("[GRD]")) if t.route == "[POSE]" else names.get(t.route)
            labels = getattr(t.raw, "labels", None)
            if cls is not None and labels is not None and any(int(x) >= len(cls) for x in labels.tolist()):
                cls = None  # the text and the groups disagree (a forced route): number the classes instead
            saved = save_result(t.raw, image, save_dir, f"{i}_{t.route.strip('[]').lower()}", cls, min_score)
            print(f"saved {', '.join(saved)}", file=sys.stderr)
        paths.append(saved if t.images is not None else None)
    return paths


def _rates(spec: str | None) -> list[float]:
    if not spec:
        return []
    try:
        rates = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--request-rate {spec}: expected numbers, e.g. 2 or 1,2,4") from None
    if any(r <= 0 for r in rates):
        raise UsageError(f"--request-rate {spec}: rates must be positive")
    return rates


def cmd_serve_bench_http(args, mix: dict) -> int:
    """serve-bench --url: load on a running server, one run per request rate (or one closed-loop run)."""
    from tqdm import tqdm

    from . import serve_bench_http as hb

    rates = _rates(args.request_rate)
    model = hb.served_model(args.url, args.api_key)
    summaries = []
    for rate in rates or [None]:
        bodies = hb.make_bodies(args.num_requests, mix, args.images, args.max_tokens, model, seed=args.seed)
        with tqdm(total=len(bodies), desc=f"serve-bench {args.url}", file=sys.stderr) as bar:
            summaries.append(hb.run(args.url, bodies, rate, args.concurrency, args.api_key, args.seed, bar))
    print(hb.table(summaries))
    for s in summaries:
        if s["errors"]:
            print(f"errors (rate {s['request_rate']}): {'; '.join(s['errors'])}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({"url": args.url, "model": model, "runs": summaries}, indent=2))
    if args.plot:
        hb.plot(summaries, args.plot)
        print(f"saved {args.plot}", file=sys.stderr)
    return 0 if all(s["ok"] for s in summaries) else 1


def cmd_serve_bench(args) -> int:
    from tqdm import tqdm

    from . import serve_bench as sb

    mix = sb.parse_mix(args.mix)
    for path in args.images:
        _load_image(path)
    if args.url:
        return cmd_serve_bench_http(args, mix)
    if args.plot or len(_rates(args.request_rate)) > 1:
        raise UsageError("--plot and several --request-rate values need --url (a running server)")
    backends = _decoder_backends(args.decoder_backend)
    _check_device(args.device)
    _check_model(args.model)
    import unimlm_engine as ue

    engine = ue.Engine.from_pretrained(args.model, device=args.device, config=ue.EngineConfig(
        max_num_seqs=args.max_num_seqs, decoder_max_batch_size=args.decoder_batch, decoder_backends=backends,
        tensor_parallel_size=args.tp))
    try:
        reqs = sb.make_workload(args.num_requests, mix, engine.model, args.images, args.max_tokens, seed=args.seed,
                                tokenizer=engine.tokenizer)
        with tqdm(total=len(reqs), desc="serve-bench", file=sys.stderr) as bar:
            if args.request_rate:
                res = sb.run_poisson(engine, reqs, _rates(args.request_rate)[0], seed=args.seed, progress=bar)
            else:
                res = sb.run_closed_loop(engine, reqs, args.concurrency, progress=bar)
        summary = res.summary()
        stats = engine.stats()
        for key in ("decoder_mean_batch_size", "decoder_backends", "memory_bytes", "preemptions"):
            summary[key] = stats[key]
        for k, v in summary.items():
            print(f"{k:>24}: {v}")
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        engine.close()


def cmd_serve(args) -> int:
    try:
        from ..server import ServerConfig, serve
    except ImportError as e:
        raise UsageError(f"serve needs the serve extra (pip install 'unimlm-engine[serve]'): {e}") from None
    backends = _decoder_backends(args.decoder_backend)
    if not args.ray:  # Ray replicas may run on other nodes than this one
        _check_device(args.device)
    _check_model(args.model)
    media = args.allowed_local_media_path
    if media is not None and not Path(media).is_dir():
        raise UsageError(f"--allowed-local-media-path {media}: not a directory")
    if args.api_key is None and os.environ.get("UNIMLM_API_KEY"):
        args.api_key = os.environ["UNIMLM_API_KEY"]
    import unimlm_engine as ue

    cfg = ServerConfig(model_name=args.served_model_name or args.model, api_key=args.api_key,
                       allowed_local_media_path=media, max_body_bytes=args.max_body_bytes,
                       max_image_pixels=args.max_image_pixels, request_timeout_s=args.request_timeout or None,
                       default_max_tokens=args.default_max_tokens, cors_origins=tuple(args.cors_origin or ()),
                       drain_timeout_s=args.drain_timeout)
    if args.ray or args.replicas != 1 or args.autoscale or args.ray_address:
        return _serve_ray(args, cfg, dict(max_num_seqs=args.max_num_seqs, max_queue_size=args.max_queue_size,
                                          decoder_backends=backends))
    engine = ue.Engine.from_pretrained(args.model, device=args.device, config=ue.EngineConfig(
        max_num_seqs=args.max_num_seqs, max_queue_size=args.max_queue_size, decoder_backends=backends))
    serve(engine, cfg, args.host, args.port, log_level=args.log_level)
    return 0


def _serve_ray(args, cfg, engine_kwargs: dict) -> int:
    """serve --ray: replicas of the same app on Ray Serve (README: replicas with Ray Serve)."""
    if not args.ray:
        raise UsageError("--replicas, --autoscale and --ray-address need --ray")
    if (args.device or "").startswith("cuda") and args.replica_gpus <= 0:
        raise UsageError(f"--device {args.device} with --ray needs --replica-gpus (Ray hides GPUs from replicas "
                         "that reserve none)")
    autoscaling = None
    if args.autoscale:
        lo, _, hi = args.autoscale.partition(":")
        if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi) and int(hi) >= 1):
            raise UsageError(f"--autoscale {args.autoscale}: expected MIN:MAX, e.g. 1:4")
        autoscaling = {"min_replicas": int(lo), "max_replicas": int(hi), "target_ongoing_requests": args.max_num_seqs}
    try:
        from ..server import ray_serve
    except ImportError as e:
        raise UsageError(f"serve --ray needs the ray extra (pip install 'unimlm-engine[ray]'): {e}") from None
    app = ray_serve.build_application(args.model, num_replicas=args.replicas, autoscaling=autoscaling,
                                      device=args.device, engine_kwargs=engine_kwargs, server_config=cfg,
                                      num_cpus=args.replica_cpus, num_gpus=args.replica_gpus)
    ray_serve.run(app, args.host, args.port, address=args.ray_address, drain_timeout_s=cfg.drain_timeout_s)
    return 0


def cmd_convert(args) -> int:
    from ..checkpoint.loader import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, num_shards=args.num_shards)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    try:
        from ..export.cli import run_export
    except ImportError as e:
        print(f"unimlm: error: export needs the export extras (onnx, onnxruntime, onnxscript): {e}", file=sys.stderr)
        return 2
    return run_export(args)


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
    g.set_defaults(func=cmd_generate)

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
    v.set_defaults(func=cmd_serve)

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
    b.set_defaults(func=cmd_serve_bench)

    c = sub.add_parser("convert", help="rewrite a checkpoint directory as safetensors shards")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--num-shards", type=int, default=None)
    c.set_defaults(func=cmd_convert)

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
    e.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        name = "" if isinstance(e, UsageError) else f"{type(e).__name__}: "
        print(f"unimlm: error: {name}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
