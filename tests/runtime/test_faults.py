"""faults.py names every crash point the code has, and the crash driver only schedules real ones."""

from __future__ import annotations

import re
from pathlib import Path

import featstore
from featstore.runtime import faults

PACKAGE = Path(featstore.__file__).parent


def crash_points_in_code() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        found |= set(re.findall(r'crash_point\("([a-z-]+)"\)', path.read_text()))
    return found


def test_the_docstring_lists_exactly_the_crash_points_in_the_code():
    listed = set(re.findall(r"``([a-z]+(?:-[a-z]+)+)``", faults.__doc__ or ""))
    assert crash_points_in_code() and listed == crash_points_in_code()


def test_the_crash_driver_schedules_only_real_points():
    import importlib.util

    driver = PACKAGE.parent / "tools" / "crash_driver.py"
    spec = importlib.util.spec_from_file_location("crash_driver", driver)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    schedules = [v for k, v in vars(mod).items() if k.endswith("_KILLS")]
    assert len(schedules) == 4
    assert {s.split(":")[0] for sched in schedules for s in sched} <= crash_points_in_code()
