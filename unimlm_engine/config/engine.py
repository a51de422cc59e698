"""EngineConfig: the serving knobs (vLLM-like names where they mean the same thing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .model import ConfigError, require


@dataclass(slots=True)
class EngineConfig:
    """Serving knobs (vLLM-like names where they mean the same thing)."""

    block_size: int = 16
    num_kv_blocks: Optional[int] = None  # overrides the memory-budget sizing
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 256 << 20  # KV pool budget when serving on the CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue_size: int = 1024
    max_model_len: Optional[int] = None  # default: llm.max_position_embeddings
    policy: str = "fcfs"  # "fcfs" | "priority"
    enable_prefix_caching: bool = True
    decoder_max_batch_size: int = 8
    decoder_max_queue_delay_ms: float = 2.0
    decoder_options: dict[str, Any] = field(default_factory=dict)  # route ("[GEN]" or "gen") -> decoder options
    # route or decoder name -> "KIND[:PATH]": the decoder back end per route, e.g. {"det": "onnxruntime:det.onnx"}
    # ("gdino": every route of that decoder; kinds eager | onnxruntime | aoti | tensorrt); default eager
    decoder_backends: dict[str, str] = field(default_factory=dict)
    idle_wait_s: float = 0.005
    # output processing (detokenization, stop strings, stream events) on its own thread; None: when the
    # model runs on CUDA (there it overlaps the device's work; on a CPU it only adds a hand-off per step)
    output_thread: Optional[bool] = None
    cuda_graphs: bool = True  # all-decode steps replay a captured CUDA graph per batch-size bucket (CUDA only)
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    cuda_graph_max_context: int = 8192  # longer sequences take the eager path
    # tensor parallelism of the LLM over this many ranks (worker processes 1 .. N-1; unimlm_engine/distributed)
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 60.0  # the longest wait of one collective (a hung peer fails the engine)

    def __post_init__(self) -> None:
        o = "EngineConfig"
        self.cuda_graph_batch_sizes = tuple(self.cuda_graph_batch_sizes)
        require(len(self.cuda_graph_batch_sizes) > 0 and all(
            isinstance(b, int) and b > 0 for b in self.cuda_graph_batch_sizes), o,
            f"cuda_graph_batch_sizes must be non-empty positive ints, got {self.cuda_graph_batch_sizes}")
        require(self.cuda_graph_max_context > 0, o,
                 f"cuda_graph_max_context must be positive, got {self.cuda_graph_max_context}")
        require(self.block_size in (16, 32), o, f"block_size must be 16 or 32, got {self.block_size}")
        require(self.num_kv_blocks is None or self.num_kv_blocks > 0, o, "num_kv_blocks must be positive")
        require(0.0 < self.gpu_memory_utilization <= 1.0, o, "gpu_memory_utilization must be in (0, 1]")
        for n in ("max_num_seqs", "max_num_batched_tokens", "max_queue_size", "decoder_max_batch_size",
                  "cpu_kv_cache_bytes"):
            require(getattr(self, n) > 0, o, f"{n} must be positive, got {getattr(self, n)}")
        require(self.policy in ("fcfs", "priority"), o, f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        require(self.tensor_parallel_size >= 1, o,
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        require(self.distributed_timeout_s > 0, o, "distributed_timeout_s must be positive")
        require(self.decoder_max_queue_delay_ms >= 0, o, "decoder_max_queue_delay_ms must be >= 0")
        from ..model.decoders.backends import parse_backend_spec

        self.decoder_backends = dict(self.decoder_backends)
        for key, value in self.decoder_backends.items():
            try:
                parse_backend_spec(f"{key}={value}")
            except ValueError as e:
                raise ConfigError(f"{o}: decoder_backends: {e}") from None
