"""`featstore report s3://...`: a store built into a bucket (real S3 protocol, moto), its throughput series
read from there, and no credential on the page."""

from __future__ import annotations

import json
import re

import pytest

from s3server import SECRET, new_bucket, s3_server
from helpers import run_inproc
from helpers import build, copy_images


@pytest.mark.slow  # an S3 server, a remote build and a report: about 15 s
def test_report_of_a_store_in_a_bucket(tmp_path):
    server = s3_server()
    url = f"s3://{new_bucket(server)}/stores/report"
    options = json.dumps(server.storage_options())
    data = copy_images(tmp_path / "data", drop=8)
    build(data, "--out", url, "--storage-options", options)
    out = tmp_path / "remote.html"
    r = run_inproc("report", url, "-o", str(out), "--samples", "2", "--storage-options", options)
    assert r.returncode == 0, r.stderr
    page = out.read_text(encoding="utf-8")
    maps = re.search(r'<section id="feature-maps">(.*?)</section>', page, re.S).group(1)
    assert maps.count('class="map figure"') == 2 and "could not read" not in maps
    thr = re.search(r'<section id="throughput">(.*?)</section>', page, re.S).group(1)
    assert 'alt="records per second over time and stage seconds"' in thr
    assert SECRET not in page and SECRET not in r.stderr
