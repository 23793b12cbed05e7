"""Training samples: the ordered frame lists whose per-sample (causal context) features are cached.

A JanusVLN training sample is an ordered list of frames, chronological with the current frame last. Its
VGGT features are computed by streaming the frames one at a time through the aggregator (fresh KV cache)
and keeping the patch tokens of the *last frame fed*. With ``reference_frame="last"`` JanusVLN reverses
the list before streaming, so the kept tokens are the oldest frame's, with the newer frames as context.

Sample keys (:func:`sample_key`): the record's ``id`` when there is one, else the frame-list key
:func:`featstore.formats.keys.frames_key` (frames being the ordered frame keys in training order).

:func:`featstore.discover.training.discover_samples` finds the samples of a build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from featstore.formats.keys import SAMPLE_KEY_PREFIX, frames_key  # noqa: F401  (SAMPLE_KEY_PREFIX: re-exported)

REFERENCE_FRAMES = ("first", "last")
JANUSVLN_HISTORY = 8  # JanusVLN's max_history_images / --num_history: up to 9 frames per sample


def _check_reference_frame(reference_frame: str) -> None:
    if reference_frame not in REFERENCE_FRAMES:
        raise ValueError(f"reference frame {reference_frame!r} is not one of {', '.join(REFERENCE_FRAMES)}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: `frames` are frame keys in training order (chronological, current frame last)."""

    key: str
    frames: tuple[str, ...]
    reference_frame: str = "first"
    id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        if not self.frames:
            raise ValueError(f"sample {self.key!r} has no frames")
        if not all(map(isinstance, self.frames, repeat(str))) or "" in self.frames:
            raise ValueError(f"sample {self.key!r}: every frame key must be a non-empty string")
        _check_reference_frame(self.reference_frame)


def stream_order(sample: Sample) -> tuple[str, ...]:
    """The frames in the order they are fed to the model: as given for 'first', reversed for 'last'."""
    return sample.frames if sample.reference_frame == "first" else sample.frames[::-1]


def kept_index(sample: Sample) -> int:
    """Index into `sample.frames` of the frame whose tokens are kept (the last frame fed)."""
    return len(sample.frames) - 1 if sample.reference_frame == "first" else 0


def janusvln_history(i: int, history: int = JANUSVLN_HISTORY) -> list[int]:
    """JanusVLN's frame indices for step `i` of an episode: ``range(i+1)`` if ``i <= history``, else
    ``numpy.linspace(0, i, history+1, dtype=int)`` (i=20, history=8 gives 0,2,5,7,10,12,15,17,20)."""
    if i < 0 or history < 0:
        raise ValueError(f"step {i} and history {history} must be non-negative")
    if i <= history:
        return list(range(i + 1))
    return [int(j) for j in np.linspace(0, i, history + 1, dtype=int)]


def janusvln_history_padded(i: int, history: int = JANUSVLN_HISTORY) -> list[int]:
    """The front-padding variant (NewJanusVLN): like :func:`janusvln_history`, with frame 0 repeated in front
    until there are ``history+1`` frames (i=2, history=8 gives 0,0,0,0,0,0,0,1,2)."""
    idx = janusvln_history(i, history)
    return [0] * (history + 1 - len(idx)) + idx


def sample_key(frames: Sequence[str], reference_frame: str = "first", id: str | None = None) -> str:
    """The record's `id` when given, else a stable digest of the ordered frame keys and the reference frame
    (the rule is in the module docstring)."""
    _check_reference_frame(reference_frame)
    if id is not None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"sample id {id!r} must be a non-empty string")
        return id
    return frames_key(frames, reference_frame)


def make_sample(frames: Sequence[str], reference_frame: str = "first", id: str | None = None) -> Sample:
    """A :class:`Sample` keyed by :func:`sample_key`."""
    return Sample(sample_key(frames, reference_frame, id), tuple(frames), reference_frame, id)


def episode_samples(frame_keys: Sequence[str], history: int = JANUSVLN_HISTORY, pad: bool = False,
                    reference_frame: str = "first") -> list[Sample]:
    """One sample per frame of an episode (frames in episode order), built with JanusVLN's history rule
    (`pad=True`: the front-padding variant)."""
    rule = janusvln_history_padded if pad else janusvln_history
    return [make_sample([frame_keys[j] for j in rule(i, history)], reference_frame) for i in range(len(frame_keys))]


def _string_list(record: dict[str, Any], field: str) -> list[str]:
    value = record[field]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(map(isinstance, items, repeat(str))) or "" in items:
        raise ValueError(f"annotation field {field!r} must be a path or a list of paths, got {value!r:.80}")
    return list(items)


def frames_of_record(record: dict[str, Any]) -> list[str] | None:
    """An annotation record's ordered frame references: ``images``, or ``history_images`` + ``current_image``
    (history then current), or ``image``; None when the record has none of them (or an empty list)."""
    if "images" in record:
        frames = _string_list(record, "images")
    elif "history_images" in record and "current_image" in record:
        if not isinstance(record["current_image"], str) or not record["current_image"]:
            raise ValueError(f"annotation field 'current_image' must be a path, got {record['current_image']!r:.80}")
        frames = _string_list(record, "history_images") + [record["current_image"]]
    elif "image" in record:
        frames = _string_list(record, "image")
    else:
        return None
    return frames or None


class RecordItem(Protocol):
    """What one record is built from: its key and an ordered list of frames (keys and file paths, in training
    order). A per-image record (``pipeline.WorkItem``) is a one-frame sample; a :class:`SampleItem` has many."""

    @property
    def key(self) -> str: ...

    @property
    def frames(self) -> tuple[str, ...]: ...

    @property
    def paths(self) -> tuple[str, ...]: ...

    @property
    def owner_frame(self) -> str:
        """The frame whose key decides which rank builds the record (``resume.rank_share``)."""
        ...


@dataclass(frozen=True, slots=True)
class SampleItem:
    """One training sample to build: the sample (key, frame keys in training order) and its frame paths;
    ``annotation``: its annotation record, when kept (a frame transform reads it); ``own_input``: the frame
    transform reads this record's own fields, so it never shares a record with another sample; ``count``:
    the annotation records that named this sample (same key)."""

    sample: Sample
    paths: tuple[str, ...]
    annotation: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    own_input: bool = field(default=False, compare=False)
    count: int = field(default=1, compare=False)

    @property
    def key(self) -> str:
        """The record key."""
        return self.sample.key

    @property
    def frames(self) -> tuple[str, ...]:
        """The frame keys in training order."""
        return self.sample.frames

    @property
    def owner_frame(self) -> str:
        """The first frame streamed: the samples sharing a prefix tree go to one rank and share its work."""
        return stream_order(self.sample)[0]

    @property
    def kept_path(self) -> str:
        """Path of the frame whose tokens the record keeps."""
        return self.paths[kept_index(self.sample)]
