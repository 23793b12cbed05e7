"""Resuming an epoch elastically: a stream's ``state_dict()`` saved at one world size and DataLoader worker count
restores at any other, each record the job had not consumed yielded exactly once across the new consumers.

A state says how far each rank got: the items its DataLoader had handed out (``consumed``), under the plan it
was counted on (world size, workers, batching). From that and the epoch's plan, every consumer's consumed
records are known (a DataLoader takes items from its workers in turn, :func:`~featstore.read.plans.round_robin_taken`),
so what is left of the epoch is too. The new consumers continue their own remaining sequence when their number
is unchanged, else the remaining records (in their order) are cut into nearly equal contiguous slices. A
state saved during a resumed epoch carries the states before it (``resumed``), so resumes chain.

Items handed out but not yet trained on when the state was saved are not distinguished from trained ones;
items a DataLoader's workers had prefetched but not handed out are not consumed (they come again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from featstore.errors import StoreError
from featstore.read.batches import Batching, batch_plan
from featstore.read.plans import items_of, round_robin_taken

STATE_VERSION = 2
#: What a resumed stream must share with the one that saved the state (the plan depends on them).
SAME = ("seed", "shuffle", "shuffle_buffer", "records")


@dataclass(frozen=True)
class Counted:
    """The plan a state's ``consumed`` was counted on: consumers, and how records were grouped into items."""

    world_size: int
    num_workers: int  # DataLoader workers per rank (0: iterated in the rank's own process)
    loader_batch: int | None  # the DataLoader's batch_size
    drop_last: bool
    batching: Batching  # the stream's own batches

    @property
    def per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def consumers(self) -> int:
        return self.world_size * self.per_rank

    @staticmethod
    def of(state: Mapping[str, Any]) -> "Counted":
        return Counted(int(state["world_size"]), int(state["num_workers"]), state.get("batch_size"),
                       bool(state.get("drop_last")), Batching.from_json(state.get("batching")))


def _items(order: np.ndarray, plan: Counted, specs: np.ndarray) -> list[np.ndarray] | int:
    """The items (row batches) a consumer yields, or, when they are consecutive runs, how many."""
    if plan.batching.batch_size is not None:
        return batch_plan(order, specs[order], plan.batching)
    return items_of(len(order), plan.loader_batch, plan.drop_last)


def remaining(orders: list[np.ndarray], plan: Counted, consumed: int, specs: np.ndarray) -> list[np.ndarray]:
    """Each consumer's rows not yet handed out after each rank's DataLoader handed out ``consumed`` items."""
    out: list[np.ndarray] = []
    per = plan.per_rank
    for rank in range(plan.world_size):
        mine = orders[rank * per:(rank + 1) * per]
        items = [_items(o, plan, specs) for o in mine]
        counts = [len(i) if isinstance(i, list) else i for i in items]
        taken = round_robin_taken(counts, consumed)
        for o, it, t in zip(mine, items, taken):
            if isinstance(it, list):
                done = np.concatenate(it[:t]) if t else o[:0]
                out.append(o[~np.isin(o, done)])
            else:
                out.append(o[min(len(o), t * (plan.loader_batch or 1)):])
    return out


def split(seq: np.ndarray, consumers: int) -> list[np.ndarray]:
    """``seq`` cut into ``consumers`` contiguous slices whose sizes differ by at most one."""
    n = len(seq)
    return [seq[c * n // consumers:(c + 1) * n // consumers] for c in range(consumers)]


def resumed_orders(fresh: Callable[[int], list[np.ndarray]], chain: list[Mapping[str, Any]], consumers: int,
                   specs: np.ndarray) -> list[np.ndarray]:
    """Every consumer's rows, in the order it yields them, for an epoch resumed through the states ``chain``
    (oldest first) by ``consumers`` consumers; ``fresh(m)`` is the epoch's plan for ``m`` consumers."""
    orders = fresh(Counted.of(chain[0]).consumers)
    for i, state in enumerate(chain):
        plan = Counted.of(state)
        left = remaining(orders, plan, int(state["consumed"]), specs)
        nxt = Counted.of(chain[i + 1]).consumers if i + 1 < len(chain) else consumers
        orders = left if nxt == plan.consumers else split(np.concatenate(left) if left else left, nxt)
    return orders


def check_resumable(state: Mapping[str, Any], mine: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chain of states a saved ``state`` resumes through; StoreError naming what differs from ``mine``."""
    diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in SAME if state.get(k) != mine[k]]
    if diff:
        raise StoreError(f"cannot resume this stream from the saved state ({'; '.join(diff)}); open the stream "
                         f"with the saved settings on the same store")
    if int(state.get("version", 1)) > STATE_VERSION:
        raise StoreError(f"the saved stream state is version {state.get('version')}, newer than this featstore "
                         f"reads ({STATE_VERSION}); upgrade featstore to resume from it")
    last = {k: v for k, v in state.items() if k != "resumed"}
    return [*[dict(s) for s in state.get("resumed") or []], last]
