"""`unimlm` command: generate, serve, serve-bench, convert, export (arguments: cli/parser.py).

Arguments are checked before a model loads; a usage problem prints one `unimlm: error: ...` line and
exits 2. `generate` exits 1 when the request or any of its tasks failed.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .parser import build_parser


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


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "serve-bench": cmd_serve_bench, "convert": cmd_convert,
            "export": cmd_export}


def main(argv=None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        name = "" if isinstance(e, UsageError) else f"{type(e).__name__}: "
        print(f"unimlm: error: {name}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
