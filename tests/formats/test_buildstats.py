"""The build's throughput series on disk: its JSON form, its bound on size, and what a real build writes."""

from __future__ import annotations

import json

import pytest

from featstore.errors import StoreError
from featstore.formats.buildstats import (FIELDS, MAX_POINTS, MAX_RUNS, BuildStatsRun, decode_build_stats,
                                          encode_build_stats, read_build_stats, write_process_runs)
from featstore.formats.layout import build_stats_name
from featstore.storage import LocalStorage
from helpers import build, copy_images


def test_round_trip_and_thinning_keeps_the_file_small():
    run = BuildStatsRun(gid=3, started=1.5e9, interval_s=0.25)
    for i in range(10 * MAX_POINTS):
        run.add([i * 0.25, i, 0.1 * i, 0.2 * i, 0.05 * i])
    assert len(run.points) <= MAX_POINTS and run.points[0][0] == 0.0 and run.points[-1][1] == 10 * MAX_POINTS - 1
    assert run.interval_s > 0.25
    data = encode_build_stats([run] * (MAX_RUNS + 4))
    assert len(data) < 64_000
    back = decode_build_stats(data, "x")
    assert len(back) == MAX_RUNS and back[0] == run
    assert json.loads(data)["fields"] == list(FIELDS)
    with pytest.raises(ValueError):
        run.add([1.0, 2.0])


@pytest.mark.parametrize("text", [b"not json", b'{"format": "other", "runs": []}',
                                  b'{"format": "featstore-build-stats", "version": 1, "runs": [{"gid": 0}]}',
                                  b'{"format": "featstore-build-stats", "version": 99, "runs": []}'])
def test_malformed_files_are_store_errors(text):
    with pytest.raises(StoreError, match="build stats where"):
        decode_build_stats(text, "where")


def test_reader_collects_every_process_and_names_unreadable_files(tmp_path):
    st = LocalStorage(tmp_path)
    write_process_runs(st, "shards", 1, [BuildStatsRun(1, 20.0, 0.5, [[0, 0, 0, 0, 0], [1, 5, 0, 0.5, 0.1]])])
    write_process_runs(st, "shards", 0, [BuildStatsRun(0, 10.0, 0.5, [[0, 0, 0, 0, 0]])])
    (tmp_path / "build_stats" / "rank-00002.json").write_text("{")
    runs, problems = read_build_stats(st, "shards")
    assert [(r.gid, r.started) for r in runs] == [(0, 10.0), (1, 20.0)]
    assert len(problems) == 1 and "rank-00002.json" in problems[0]
    assert read_build_stats(LocalStorage(tmp_path / "none"), "shards") == ([], [])


def _built(tmp_path):
    data = copy_images(tmp_path / "data", drop=8)
    build(data)
    return data, data / "vggt_featstore"


def test_a_build_records_its_series(tmp_path):
    data, store = _built(tmp_path)
    runs, problems = read_build_stats(LocalStorage(store), "shards")
    assert not problems and len(runs) == 1
    last = runs[0].points[-1]
    assert last[1] == 4 and last[0] > 0 and last[3] > 0  # every record, after some model time
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(runs[0].points, runs[0].points[1:]))
    build(data)  # nothing left to build: no data loop, no new run
    assert len(read_build_stats(LocalStorage(store), "shards")[0]) == 1


@pytest.mark.slow  # three builds
def test_a_rebuild_appends_a_run_and_per_image_builds_record_too(tmp_path):
    data, store = _built(tmp_path)
    build(data, "--no-skip-existing")
    assert [int(r.points[-1][1]) for r in read_build_stats(LocalStorage(store), "shards")[0]] == [4, 4]
    build(data, "--format", "per-image")
    pi, _ = read_build_stats(LocalStorage(data), "per-image")
    assert (data / build_stats_name("per-image", 0)).is_file() and int(pi[0].points[-1][1]) == 4
