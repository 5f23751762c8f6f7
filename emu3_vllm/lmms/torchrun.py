"""The lmms-eval adapters on many GPUs: `torchrun --nproc_per_node=TP*DP -m lmms_eval ...`, as lmms-eval's own `vllm`
model runs, on vLLM's `external_launcher` executor.

Each torchrun process is one rank. lmms-eval gives every rank its share of the requests (by RANK and WORLD_SIZE) and
gathers the answers itself; ranks `d*TP .. d*TP+TP-1` form data-parallel replica d, one engine sharded over TP
ranks. Two rules of the external launcher shape the adapters:

- the TP ranks of one replica run the same program on the same inputs, so each rank shares its requests with
  the other ranks of its tensor-parallel group, all of them submit the group's requests, and each keeps the
  answers to its own (`Launch.share`);
- the data-parallel replicas step in lockstep (every engine step is a collective across them), so each replica
  makes the same sequence of engine passes: the sampling-settings groups are agreed over all ranks
  (`Launch.agree`), a replica with nothing to do still takes part (`offline.stepping.DataParallelLockstep`), and
  engines are never closed before the end (closing one takes the process group down with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Launch:
    """This process's place in a torchrun launch (a world of 1 when started without torchrun)."""

    world_size: int = 1
    rank: int = 0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    @classmethod
    def from_env(cls, tensor_parallel_size: int, data_parallel_size: int | None) -> Launch:
        """Check the model_args against the launch; `data_parallel_size` defaults to WORLD_SIZE / TP under torchrun
        (a single process runs one engine, over `tensor_parallel_size` devices of its own)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        tp = tensor_parallel_size
        if data_parallel_size is None and world == 1:
            data_parallel_size = 1
        elif data_parallel_size is None:
            if world % tp:
                raise ValueError(f"emu3_vllm: torchrun started {world} processes, which tensor_parallel_size={tp} "
                                 "does not divide; start TP * DP processes")
            data_parallel_size = world // tp
        dp = data_parallel_size
        if dp < 1 or tp < 1:
            raise ValueError(f"emu3_vllm: tensor_parallel_size and data_parallel_size must be >= 1, got {tp} and {dp}")
        if dp > 1 and world == 1:
            raise ValueError(f"emu3_vllm: data_parallel_size={dp} needs one process per rank: launch with "
                             f"torchrun --nproc_per_node={tp * dp} -m lmms_eval ... (world size = "
                             "tensor_parallel_size * data_parallel_size)")
        if world > 1 and world != tp * dp:
            raise ValueError(f"emu3_vllm: torchrun started {world} processes, but tensor_parallel_size * "
                             f"data_parallel_size = {tp} * {dp} = {tp * dp}")
        return cls(world_size=world, rank=rank, tensor_parallel_size=tp, data_parallel_size=dp)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def engine_kwargs(self) -> dict[str, Any]:
        """What the engine needs on top of the model_args: one rank per process on vLLM's external launcher."""
        kwargs: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size}
        if self.distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
            if self.data_parallel_size > 1:
                kwargs["data_parallel_size"] = self.data_parallel_size
        return kwargs

    def device(self):
        """The device lmms-eval's evaluator puts its bookkeeping tensors on (it gathers them across ranks)."""
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def share(self, local: list) -> tuple[list, range]:
        """The requests of this rank's tensor-parallel group, all ranks' in rank order, and where this rank's are.

        Needs a started engine (vLLM sets the groups up).
        """
        if not self.distributed or self.tensor_parallel_size == 1:
            return local, range(len(local))
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        gathered: list = [None] * group.world_size
        dist.all_gather_object(gathered, local, group=group.cpu_group)
        start = sum(len(part) for part in gathered[:group.rank_in_group])
        return [item for part in gathered for item in part], range(start, start + len(local))

    def agree(self, keys: list) -> list:
        """The union of every rank's keys, in one order: the engine passes every replica makes."""
        if not self.distributed or self.data_parallel_size == 1:
            return sorted(set(keys))
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(set(keys)))
        return sorted({key for part in gathered for key in part})
