"""ONNX -> TensorRT engine builder and runner (TensorRT 10 Python API). UNTESTED: TensorRT cannot be installed
on the build machine (no GPU). Written against the documented TensorRT 10 API (Builder, OnnxParser,
IBuilderConfig, IOptimizationProfile, Runtime, IExecutionContext.execute_async_v3); only the pure-Python
profile planning below is tested.

- `plan_profiles(entry)`: a bucket entry of the export record (its "inputs": min/opt/max per input; the
  batch and class dims range over the export's --batch / --classes) -> optimization profile shapes,
  validated (same rank, min <= opt <= max).
- `build_engine(onnx_path, out_path, precision=...)`: parses the ONNX (plugin registry initialised first so a
  `MultiscaleDeformableAttnPlugin_TRT` node maps to TensorRT's built-in plugin), adds the profiles, sets the
  fp16 / bf16 flag and keeps normalization layers (LayerNormalization) in fp32 with precision constraints.
- `TrtRunner(engine_path)`: deserializes and runs with torch CUDA tensors on the current stream.

`import tensorrt` happens inside the functions: this module imports without it and raises
RuntimeError("tensorrt is not installed") only when a builder or runner is used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(slots=True)
class Profile:
    """One input's optimization-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile {self.name}: min/opt/max ranks differ: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (1 <= lo <= mid <= hi):
                raise ValueError(f"profile {self.name}: need 1 <= min <= opt <= max per dim, got "
                                 f"{self.min}, {self.opt}, {self.max}")


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError("tensorrt is not installed (pip install tensorrt on a machine with an NVIDIA GPU)") from e
    return trt


def require_tensorrt() -> None:
    """Fail before any export work when TensorRT cannot be imported (`unimlm export --format tensorrt`)."""
    try:
        _trt()
    except RuntimeError as e:
        raise RuntimeError(f"--format tensorrt: {e}; nothing was exported (use --format onnx here and build the "
                           f"engine on the GPU machine)") from None


def plan_profiles(record: dict | str | Path, artifact: str | None = None) -> list[Profile]:
    """record: a dict or JSON file with inputs {name: {min, opt, max}} (a bucket entry of the export record),
    or the whole export record (then the bucket whose files include `artifact`, a file name; the only one
    when artifact is None) -> one Profile per input."""
    if not isinstance(record, dict):
        record = json.loads(Path(record).read_text())
    if "buckets" in record:
        entries = record["buckets"]
        found = [b for b in entries if (artifact is None and len(entries) == 1)
                 or artifact in b.get("files", {}).values()]
        if not found:
            raise ValueError(f"export record: no bucket with the file {artifact!r}")
        record = found[0]
    inputs = record.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("export record has no 'inputs' table of min/opt/max shapes")
    out = []
    for name, spec in inputs.items():
        missing = {"min", "opt", "max"} - set(spec)
        if missing:
            raise ValueError(f"input {name}: missing {sorted(missing)} in the export record")
        out.append(Profile(name, tuple(spec["min"]), tuple(spec["opt"]), tuple(spec["max"])))
    return out


def widen_batch(profiles: list[Profile], max_batch: int) -> list[Profile]:
    """Profiles whose leading (batch) dim ranges 1..max_batch, opt at the recorded batch (to re-plan a bucket
    for another batch range; the file must have a dynamic batch, the default of this package's exports)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out = []
    for p in profiles:
        opt_b = min(p.opt[0], max_batch)
        out.append(Profile(p.name, (1,) + p.min[1:], (opt_b,) + p.opt[1:], (max_batch,) + p.max[1:]))
    return out


def _keep_norms_fp32(trt, network) -> int:
    """Pin normalization layers (and their outputs) to fp32; returns how many were pinned."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def build_engine(onnx_path: str | Path, out_path: str | Path, precision: str = "fp16",
                 profiles: list[Profile] | None = None, workspace_gib: float = 4.0) -> Path:
    """Build and serialize an engine. profiles: default the bucket of `onnx_path` in the export record
    (<decoder>.json beside it, <decoder> = the file name up to its first dot). Untested (no TensorRT)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _keep_norms_fp32(trt, network)
    profile = builder.create_optimization_profile()
    if profiles is None:
        onnx_path = Path(onnx_path)
        profiles = plan_profiles(onnx_path.with_name(onnx_path.name.split(".")[0] + ".json"), onnx_path.name)
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    out_path = Path(out_path)
    out_path.write_bytes(bytes(blob))
    return out_path


class TrtRunner:
    """Deserialized engine; `run(*inputs)` with torch CUDA tensors in the engine's input order -> outputs.
    Untested (no TensorRT / GPU on the build machine)."""

    def __init__(self, engine_path: str | Path):
        trt = _trt()
        import torch

        self._torch, self._trt = torch, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str):
        t, trt = self._torch, self._trt
        table = {trt.float32: t.float32, trt.float16: t.float16, trt.bfloat16: t.bfloat16, trt.int32: t.int32,
                 trt.int64: t.int64, trt.bool: t.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, *inputs):
        """inputs: CUDA tensors matching self.inputs -> list of CUDA output tensors."""
        torch = self._torch
        if len(inputs) != len(self.inputs):
            raise ValueError(f"engine takes {len(self.inputs)} inputs {self.inputs}, got {len(inputs)}")
        keep = []
        for name, x in zip(self.inputs, inputs):
            x = x.contiguous().to(self._torch_dtype(name))
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            y = torch.empty(shape, dtype=self._torch_dtype(name), device=inputs[0].device)
            self.context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        stream = torch.cuda.current_stream(inputs[0].device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outs
