"""`unimlm` command: generate, serve-bench, convert, export."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROUTE_NAMES = ("DET", "GRD", "SEG", "POSE", "GEN", "EDIT")


def _parse_routes(spec: str | None) -> list[str]:
    if not spec:
        return []
    routes = []
    for r in spec.split(","):
        r = r.strip().strip("[]").upper()
        if r not in ROUTE_NAMES:
            raise ValueError(f"unknown route {r!r}; routes: {', '.join(ROUTE_NAMES)}")
        routes.append(f"[{r}]")
    return routes


def _forced_prefix(routes: list[str], tokenizer, num_keypoints: int) -> tuple[int, ...]:
    """[POSE] expands to one [DET] class (if none given) plus one group per keypoint."""
    out: list[str] = []
    for r in routes:
        if r == "[POSE]":
            if "[DET]" not in out:
                out.append("[DET]")
            out += ["[POSE]"] * num_keypoints
        else:
            out.append(r)
    return tuple(tokenizer.special_ids[r] for r in out)


def cmd_generate(args) -> int:
    import unimlm_engine as ue
    from .processor import load_image

    engine = ue.Engine.from_pretrained(args.model, device=args.device)
    try:
        tok = engine.tokenizer
        npts = engine.model.cfg.pose.num_keypoints if engine.model.cfg.pose else 17
        forced = _forced_prefix(_parse_routes(args.route), tok, npts)
        sp = ue.SamplingParams(max_tokens=max(args.max_tokens, len(forced) + 1), temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, forced_prefix=forced)
        images = [args.image] if args.image else None
        handle = engine.submit(ue.Request(prompt=args.prompt, images=images, sampling=sp))
        if not args.json:
            for ev in handle.stream():
                if ev.text:
                    print(ev.text, end="", flush=True)
            print()
        out = handle.result()
        if args.json:
            print(json.dumps(out.to_json(), indent=2))
        else:
            for t in out.tasks:
                print(json.dumps(t.to_json()))
        if args.save_dir:
            _save(out, load_image(args.image) if args.image else None, args.save_dir)
        return 0
    finally:
        engine.close()


def _save(out, image, save_dir: str) -> None:
    from .visualize import save_result

    for i, t in enumerate(out.tasks):
        if t.error is not None or t.raw is None:
            continue
        if image is None and t.images is None:
            continue
        paths = save_result(t.raw, image, save_dir, f"{i}_{t.route.strip('[]').lower()}")
        print(f"saved {', '.join(paths)}", file=sys.stderr)


def cmd_serve_bench(args) -> int:
    from tqdm import tqdm

    import unimlm_engine as ue
    from . import serve_bench as sb

    engine = ue.Engine.from_pretrained(args.model, device=args.device, config=ue.EngineConfig(
        max_num_seqs=args.max_num_seqs, decoder_max_batch_size=args.decoder_batch))
    try:
        npts = engine.model.cfg.pose.num_keypoints if engine.model.cfg.pose else 17
        reqs = sb.make_workload(args.num_requests, sb.parse_mix(args.mix), engine.tokenizer, args.images,
                                args.max_tokens, seed=args.seed, num_keypoints=npts)
        with tqdm(total=len(reqs), desc="serve-bench", file=sys.stderr) as bar:
            if args.request_rate:
                res = sb.run_poisson(engine, reqs, args.request_rate, seed=args.seed, progress=bar)
            else:
                res = sb.run_closed_loop(engine, reqs, args.concurrency, progress=bar)
        summary = res.summary()
        stats = engine.stats()
        summary["decoder_mean_batch_size"] = stats["decoder_mean_batch_size"]
        summary["memory_bytes"] = stats["memory_bytes"]
        summary["preemptions"] = stats["preemptions"]
        for k, v in summary.items():
            print(f"{k:>24}: {v}")
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        engine.close()


def cmd_convert(args) -> int:
    from .loader import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, num_shards=args.num_shards)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    try:
        from .export.cli import run_export
    except ImportError as e:
        print(f"unimlm export is not available: {e}", file=sys.stderr)
        return 2
    return run_export(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimlm", description="unimlm-engine command line")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="run one request and print text and task results")
    g.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    g.add_argument("--image", help="input image path")
    g.add_argument("--prompt", required=True)
    g.add_argument("--route", help="force routing tokens, e.g. DET,SEG,POSE,GEN,EDIT (random-weight presets "
                                   "do not emit them by themselves)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--json", action="store_true", help="print the whole output as JSON")
    g.add_argument("--save-dir", help="save visualisations and generated images here")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("serve-bench", help="load generator over the Python API")
    b.add_argument("--model", default="tiny")
    b.add_argument("--device", default=None)
    b.add_argument("--num-requests", type=int, default=64)
    b.add_argument("--concurrency", type=int, default=16)
    b.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (open loop)")
    b.add_argument("--mix", default="vqa:0.4,text:0.2,det:0.2,seg:0.1,pose:0.1")
    b.add_argument("--max-tokens", type=int, default=16)
    b.add_argument("--max-num-seqs", type=int, default=64)
    b.add_argument("--decoder-batch", type=int, default=8)
    b.add_argument("--images", nargs="+", default=["examples/images/chelsea.png", "examples/images/coffee.png"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", help="write the summary JSON here")
    b.set_defaults(func=cmd_serve_bench)

    c = sub.add_parser("convert", help="rewrite a checkpoint directory as safetensors shards")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--num-shards", type=int, default=None)
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="export a decoder (ONNX / AOTInductor / TensorRT)")
    e.add_argument("decoder")
    e.add_argument("--model", default="tiny")
    e.add_argument("--format", default="onnx")
    e.add_argument("--msda", default="onnx", choices=("onnx", "plugin"))
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--out", default="out/export")
    e.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"unimlm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
