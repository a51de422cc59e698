"""Tensor parallelism of the LLM over torch.distributed (gloo on the CPU, NCCL on GPUs: untested)."""
from .driver import TensorParallel, WorkerDiedError, WorkerStartError
from .layers import check_tp

__all__ = ["TensorParallel", "WorkerDiedError", "WorkerStartError", "check_tp"]
