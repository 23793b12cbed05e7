"""``featstore report``: one self-contained HTML page to look at a store (needs matplotlib: ``featstore[report]``).

Sections (element ids in :data:`featstore.report.page.SECTION_IDS`): provenance (the manifest), feature maps
(seeded records, frames beside the PCA colours of their patch tokens), distributions (token norms, per-channel
moments, non-finite values), codec error (lossy stores' stored bounds), build throughput (the build's
``build_stats`` series) and verify (with ``--verify``). Modules: :mod:`.select` (which records), :mod:`.pca`,
:mod:`.stats`, :mod:`.maps`, :mod:`.provenance`, :mod:`.figures` (PNG), :mod:`.page` (HTML), :mod:`.inputs`
(what is read), :mod:`.sections`, :mod:`.verified`, :mod:`.run` (the entry, :func:`report`).
"""

from featstore.report.run import DEFAULT_OUT, ReportResult, report

__all__ = ["DEFAULT_OUT", "ReportResult", "report"]
