"""One torchrun rank for tests/test_loader_ddp.py: stream a store with 2 DataLoader workers, write the keys seen."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from featstore.read import stream


def main() -> None:
    store, out, seed, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = stream(store, seed=seed, epoch=epoch, shuffle_buffer=3)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [s["key"] for s in dl]
    # every rank reaches the barrier: no rank hangs waiting for data that never comes
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"keys": keys, "len": len(ds), "world": dist.get_world_size()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
