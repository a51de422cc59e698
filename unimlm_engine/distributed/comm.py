"""The tensor-parallel process group: torch.distributed's gloo (CPU) or NCCL (CUDA) group, built
straight from a TCPStore (no global default group, so one process may hold several engines).

Every collective waits at most `timeout_s`; a peer that died makes it raise (gloo: the closed
connection, at once; otherwise the timeout). NCCL is written but has not run (no multi-GPU machine).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed (a peer died or the wait timed out)."""


def make_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The master binds `port` (0: any free port; read it back from `store.port`)."""
    return dist.TCPStore(host, port, world_size, is_master=is_master,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class TPGroup:
    """rank / world_size of this process and the collectives the parallel layers and the step
    broadcast use. backend: "gloo" or "nccl"."""

    def __init__(self, rank: int, world_size: int, backend: str, timeout_s: float, device: torch.device | str = "cpu"):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"TPGroup: backend must be 'gloo' or 'nccl', got {backend!r}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pg = None

    def connect(self, store) -> None:
        """Join the group (blocks until every rank has called it, at most the store's timeout)."""
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, self.timeout)
        else:  # untested: no multi-GPU machine was available
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as e:
            raise CollectiveError(f"{what} failed on rank {self.rank}: {e}") from None
        if ok is False:
            raise CollectiveError(f"{what} timed out on rank {self.rank} after {self.timeout.total_seconds()} s")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it."""
        if self.world_size > 1:
            self._wait(self.pg.allreduce([t]), "all_reduce")
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` into every rank's `t` (same shape and dtype), in place."""
        if self.world_size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self._wait(self.pg.broadcast([t], opts), "broadcast")
        return t
