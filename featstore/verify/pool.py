"""Running verify's checks over worker processes with a bounded number of tasks in flight."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm


def _init_worker() -> None:
    torch.set_num_threads(1)


class _Star:
    """Picklable adapter calling ``fn(*args)`` (``ProcessPoolExecutor.submit`` gets one argument here)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, args: tuple) -> Any:
        return self.fn(*args)


def run_tasks(fn: Callable[..., Any], tasks: Iterable[tuple], workers: int, progress: bool, desc: str,
              total: int | None = None) -> Iterator[Any]:
    """``fn(*task)`` for each task, in order, in worker processes when there is more than one of each.

    Tasks are taken lazily (give ``total`` for an iterator) and at most ``2 * workers`` are in flight, so memory
    stays bounded.
    """
    todo = iter(tasks) if total is not None else list(tasks)
    count = total if total is not None else len(todo)  # type: ignore[arg-type]
    bar = tqdm(total=count, desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or count <= 1:
            for t in todo:
                yield fn(*t)
                bar.update(1)
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        call = _Star(fn)
        with cf.ProcessPoolExecutor(min(workers, count), mp_context=ctx, initializer=_init_worker) as pool:
            pending: collections.deque = collections.deque()
            for t in todo:
                pending.append(pool.submit(call, t))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
                    bar.update(1)
            while pending:
                yield pending.popleft().result()
                bar.update(1)
    finally:
        bar.close()
