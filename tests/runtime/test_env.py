"""The one rank/worker detector (featstore.runtime.env.dist_env, consumer) and its precedence: an initialised
torch.distributed group, then torchrun's RANK/WORLD_SIZE, then rank 0 of 1; LOCAL_RANK from the environment;
the DataLoader worker from get_worker_info()."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from featstore.runtime.env import Consumer, consumer, dist_env
from featstore.errors import OptionError
from helpers import environment

NO_DIST = {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}


def test_outside_torchrun_rank_0_of_1():
    d = dist_env({})
    assert (d.rank, d.world_size, d.local_rank) == (0, 1, 0)


def test_torchrun_variables():
    d = dist_env({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank) == (2, 3, 1)


@pytest.mark.parametrize("env, named", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
                                        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
                                        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 is outside WORLD_SIZE=2"),
                                        ({"LOCAL_RANK": "-"}, "LOCAL_RANK='-'")])
def test_bad_variables_are_option_errors_naming_them(env, named):
    with pytest.raises(OptionError, match=re.escape(named)):
        dist_env(env)


def test_an_initialised_process_group_wins_over_the_variables(tmp_path):
    # The variables claim rank 1 of 4; the real (one-process) gloo group says rank 0 of 1.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}):
            d = dist_env()
            assert (d.rank, d.world_size, d.local_rank) == (0, 1, 3)
            assert consumer() == Consumer(0, 1)
    finally:
        dist.destroy_process_group()
    with environment({"RANK": "1", "WORLD_SIZE": "4"}):
        assert (dist_env().rank, dist_env().world_size) == (1, 4)


class _WhoAmI(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, int, int, int, bool]:
        c = consumer()
        return c.rank, c.world_size, c.worker, c.num_workers, c.in_worker


def test_consumer_in_dataloader_workers_and_main_process():
    with environment(dict(NO_DIST, RANK="1", WORLD_SIZE="2")):
        assert consumer() == Consumer(1, 2, 0, 1, in_worker=False)
        seen = {tuple(t) for t in torch.utils.data.DataLoader(_WhoAmI(), batch_size=None, num_workers=2)}
    assert seen == {(1, 2, 0, 2, True), (1, 2, 1, 2, True)}
    c = Consumer(1, 2, 1, 2, True)
    assert (c.index, c.count) == (3, 4)  # rank-major: rank 1's workers are consumers 2 and 3 of 4
