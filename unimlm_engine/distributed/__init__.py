"""Tensor parallelism of the LLM over torch.distributed (gloo on the CPU, NCCL on GPUs: untested)."""
from .driver import TensorParallel, TensorParallelError, WorkerDiedError, WorkerStartError
from .layers import check_tp

__all__ = ["TensorParallel", "TensorParallelError", "WorkerDiedError", "WorkerStartError", "check_tp"]
