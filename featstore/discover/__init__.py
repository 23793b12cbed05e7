"""Where the records come from: one module per job.

* ``annotations``: annotation files (found recursively, never featstore's own outputs) and their records,
  each with its file and line;
* ``references``: an image reference of a record -> (key, path) (``resolve_image_ref``, ``ImageResolver``);
* ``scan``: what discovery's folder scans take and skip (the walk itself: ``runtime.walk``);
* ``images``: the images of a per-image build (``discover_images``, ``discover_recorded``);
* ``samples``: what a training sample is (frames in training order, sample keys) and JanusVLN's frame rule;
* ``training``: the training samples of a build (``discover_samples``: annotation records or episode folders);
* ``dedup``: samples that share one record (``dedup_samples`` -> ``RecordPlan`` with the ids mapping to it);
* ``result``: ``Discovery``, the one result shape of both (items, ``missing`` frames, malformed lines).

Words: a *source* is what discovery reads to choose records (an annotation file, an image list, or the
scan; the manifest's ``sources``); an *annotation record* is one entry of an annotation file; a *record*
alone is what a store holds under one key.
"""

from featstore.discover.annotations import (AnnotationRecord, MalformedLine, find_annotation_files,
                                            iter_annotation_records, read_annotation_records, record_image_refs)
from featstore.discover.images import ImageItem, discover_images, discover_recorded
from featstore.discover.references import ImageResolver, ResolvedImage, resolve_image_ref
from featstore.discover.result import Discovery, MissingFrame, SourceStats
from featstore.discover.samples import SampleItem
from featstore.discover.training import discover_samples

__all__ = ["AnnotationRecord", "Discovery", "ImageItem", "ImageResolver", "MalformedLine", "MissingFrame",
           "ResolvedImage", "SampleItem", "SourceStats", "discover_images", "discover_recorded",
           "discover_samples", "find_annotation_files", "iter_annotation_records", "read_annotation_records",
           "record_image_refs", "resolve_image_ref"]
