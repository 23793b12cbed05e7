"""``featstore verify``: prove a store is complete and right, or name every record that is not.

Checks (docs/verify.md has the full list): counts (manifest vs index vs files vs source listing), every
record (decodes, checksums, dtype/shape, finite values, provenance, staleness of its source image), shard
files (size and sha256 against the manifest, tar structure, stray temporary files and locks, index entries
pointing at the right bytes), and optionally a recompute of N records with the model.

Modules: :mod:`.report` (findings and the report), :mod:`.checks` (checks of one record), :mod:`.shard_scan`
(one shard in one pass on the formats tar walker), :mod:`.shard_store` and :mod:`.per_image` (a whole store of
each layout), :mod:`.listing` (the store against its recorded sources), :mod:`.leftovers` (stray files),
:mod:`.recompute` (``--recompute``), :mod:`.fixes` (the commands findings suggest), :mod:`.pool` (worker
processes), :mod:`.run` (the entry, :func:`verify`). Exit status: 0 all good, 1 problems found, 2 could not run.
"""

from featstore.verify.checks import Expectations, check_record, check_sample_record, image_path_of
from featstore.verify.recompute import RECOMPUTE_TOL, recorded_model
from featstore.verify.report import KINDS, Finding, Report
from featstore.verify.run import verify
from featstore.verify.per_image import verify_per_image
from featstore.verify.shard_store import verify_shard_store

__all__ = ["KINDS", "RECOMPUTE_TOL", "Expectations", "Finding", "Report", "check_record", "check_sample_record",
           "image_path_of", "recorded_model", "verify", "verify_per_image", "verify_shard_store"]
