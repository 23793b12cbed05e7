"""One torchrun rank for tests/read/test_stream_resume.py: stream part of an epoch and save the state, or resume it
(at any world size and DataLoader worker count: argv[5] workers, default 2)."""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch.distributed as dist

from featstore.read import stream


def main() -> None:
    store, out, phase, stop_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 2  # the restarted job may have another count
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = stream(store, seed=5, epoch=1, shuffle_buffer=4)
    if phase == "rest":  # a restarted job: every rank loads the state rank 0 saved
        with open(os.path.join(out, "state-rank0.json")) as f:
            ds.load_state_dict(json.load(f))
    loader = ds.loader(batch_size=2, num_workers=workers)
    batches = list(itertools.islice(loader, stop_after)) if phase == "first" else list(loader)
    keys = [k for b in batches for k in b["key"]]
    dist.barrier()
    with open(os.path.join(out, f"{phase}-rank{rank}.json"), "w") as f:
        json.dump({"keys": keys}, f)
    if phase == "first":
        with open(os.path.join(out, f"state-rank{rank}.json"), "w") as f:
            json.dump(ds.state_dict(), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
