"""Decoding OpenPose body maps into people: pure numpy/scipy/cv2, no torch.

:func:`decode_people` turns the heatmaps and part-affinity fields (PAFs) of CMU's COCO-18 body
network (:mod:`dan.engine.control.openpose_body`) into keypoints, as lllyasviel's ControlNet
annotator does: peaks of the Gaussian-smoothed heatmaps above 0.1, limb candidates scored by
sampling the PAF at 10 points along them (80 % of samples above 0.05, and a positive mean after a
penalty for limbs longer than half the image height), greedy one-to-one matching per limb, then
people grown limb by limb, keeping those with at least 4 joints and a mean score of at least 0.4.

It lives apart from the network so that it can be read, tested and reused on maps from anywhere
without torch, and so that neither file outgrows the house limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from dan.engine.control.preprocess import JOINTS, Keypoints
from dan.errors import EngineError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]

HEATMAP_CHANNELS = 19  # 18 joints, then the background
PAF_CHANNELS = 38
PEAK_SIGMA = 3.0
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
PAF_SAMPLES = 10
PAF_MIN_FRACTION = 0.8  # of the samples that must be above PAF_THRESHOLD
MIN_PARTS = 4
MIN_MEAN_SCORE = 0.4
# The limbs the PAFs encode, as (joint, joint) indices into JOINTS, in the order people are
# assembled; PAF_INDEX[i] holds limb i's (x, y) PAF channels. The last two (shoulder-ear) only
# extend people found through the first SEEDING_LIMBS limbs.
PAF_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
PAF_INDEX: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
SEEDING_LIMBS = 17


def resized_maps(maps: FloatArray, size: tuple[int, int]) -> FloatArray:
    """Float32 ``maps`` ``(h, w, C)`` resized (bicubic) to ``size``, ``(H, W)``; ``maps`` itself
    when it is already that size."""
    if maps.shape[:2] == size:
        return maps
    resized = cv2.resize(maps, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    # cv2 drops a trailing axis of length 1; keep the channel axis.
    return np.asarray(resized, np.float32).reshape(*size, maps.shape[2])


@dataclass(frozen=True)
class _Peaks:
    points: FloatArray  # (n, 3): x, y, heatmap score of every peak, joint after joint
    by_joint: tuple[IntArray, ...]  # for each joint, the indices of its peaks in ``points``


@dataclass(frozen=True)
class _Connection:
    start: int  # peak index of the limb's first joint
    end: int  # peak index of its second joint
    score: float


@dataclass
class _Person:
    joints: list[int]  # peak index per joint, -1 when missing
    score: float  # its joints' peak scores plus its limbs' PAF scores
    count: int  # joints added (as in OpenPose, a replaced joint counts again)


def decode_people(
    heatmaps: npt.NDArray[np.floating],
    pafs: npt.NDArray[np.floating],
    image_height: int,
    image_width: int,
) -> list[tuple[Keypoints, float]]:
    """The people in the network's maps, most prominent first: ``(keypoints, score)`` pairs.

    ``heatmaps`` is ``(h, w, 19)`` (or 18, without background) and ``pafs`` ``(h, w, 38)``,
    covering the whole image; maps not at ``image_height`` x ``image_width`` are resized to it
    (bicubic) first. Points are pixel positions in the image. A person's score sums its joints'
    heatmap peaks and its limbs' PAF scores; people are ordered by visible joints, then score.
    Raises EngineError for maps of the wrong shape or a non-positive image size.
    """
    size = _checked_size(heatmaps, pafs, image_height, image_width)
    heat = resized_maps(np.asarray(heatmaps, np.float32), size)
    field = resized_maps(np.asarray(pafs, np.float32), size)
    peaks = _find_peaks(heat)
    people: list[_Person] = []
    for limb in range(len(PAF_LIMBS)):
        for connection in _connect(limb, peaks, field, image_height):
            _add(people, limb, connection, peaks.points[:, 2])
    found = [
        (_keypoints(person, peaks.points), person.score)
        for person in people
        if person.count >= MIN_PARTS and person.score / person.count >= MIN_MEAN_SCORE
    ]
    return sorted(found, key=lambda found: (-found[0].visible, -found[1]))


def _checked_size(
    heatmaps: npt.NDArray[np.floating], pafs: npt.NDArray[np.floating], height: int, width: int
) -> tuple[int, int]:
    if height <= 0 or width <= 0:
        raise EngineError(f"image size must be positive, got {width}x{height}")
    if heatmaps.ndim != 3 or heatmaps.shape[2] not in (len(JOINTS), HEATMAP_CHANNELS):
        raise EngineError(f"heatmaps must be (height, width, 19), got shape {heatmaps.shape}")
    if pafs.ndim != 3 or pafs.shape[2] != PAF_CHANNELS:
        raise EngineError(f"pafs must be (height, width, 38), got shape {pafs.shape}")
    if heatmaps.shape[:2] != pafs.shape[:2] or 0 in heatmaps.shape[:2]:
        raise EngineError(
            f"heatmaps {heatmaps.shape[:2]} and pafs {pafs.shape[:2]} must have one, non-empty size"
        )
    return (height, width)


def _find_peaks(heatmaps: FloatArray) -> _Peaks:
    """Local maxima (4-neighbourhood) of each smoothed joint heatmap above PEAK_THRESHOLD."""
    joints = len(JOINTS)
    smooth = gaussian_filter(heatmaps[:, :, :joints], sigma=(PEAK_SIGMA, PEAK_SIGMA, 0))
    rows: list[FloatArray] = []
    by_joint: list[IntArray] = []
    for joint in range(joints):
        ys, xs = np.nonzero(_local_maxima(smooth[:, :, joint]))
        start = sum(len(row) for row in rows)
        by_joint.append(np.arange(start, start + len(xs), dtype=np.intp))
        # The score is the unsmoothed heatmap at the peak.
        rows.append(np.stack([xs, ys, heatmaps[ys, xs, joint]], axis=1).astype(np.float32))
    return _Peaks(np.concatenate(rows, axis=0), tuple(by_joint))


def _local_maxima(smooth: FloatArray) -> npt.NDArray[np.bool_]:
    padded = np.pad(smooth, 1)  # zeros outside: a border pixel may be a peak, as in OpenPose
    center = padded[1:-1, 1:-1]
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    maxima = np.logical_and.reduce([center >= n for n in neighbours] + [center > PEAK_THRESHOLD])
    return np.asarray(maxima, dtype=np.bool_)


def _connect(limb: int, peaks: _Peaks, pafs: FloatArray, image_height: int) -> list[_Connection]:
    """The limb's connections: best-scored pairs first, each peak used at most once."""
    starts, ends = (peaks.by_joint[joint] for joint in PAF_LIMBS[limb])
    if not len(starts) or not len(ends):
        return []
    field = pafs[:, :, list(PAF_INDEX[limb])]
    scores, valid = _pair_scores(
        peaks.points[starts, :2], peaks.points[ends, :2], field, image_height
    )
    pairs = [(i, j) for i, j in zip(*np.nonzero(valid), strict=True)]
    pairs.sort(key=lambda pair: -scores[pair])  # stable: ties keep (start, end) order
    connections: list[_Connection] = []
    used_starts: set[int] = set()
    used_ends: set[int] = set()
    for i, j in pairs:
        if i not in used_starts and j not in used_ends:
            connections.append(_Connection(int(starts[i]), int(ends[j]), float(scores[i, j])))
            used_starts.add(i)
            used_ends.add(j)
    return connections


def _pair_scores(
    starts: FloatArray, ends: FloatArray, field: FloatArray, image_height: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Each (start, end) pair's PAF score ``(n_starts, n_ends)`` and whether it is a limb."""
    start, end = starts[:, None, :].astype(np.float64), ends[None, :, :].astype(np.float64)
    start, end = np.broadcast_arrays(start, end)
    vector = end - start
    norm = np.maximum(np.hypot(vector[..., 0], vector[..., 1]), 0.001)
    unit = vector / norm[..., None]
    samples = np.rint(np.linspace(start, end, num=PAF_SAMPLES, axis=2)).astype(np.intp)
    sampled = field[samples[..., 1], samples[..., 0]]  # (n_starts, n_ends, samples, 2)
    along = np.sum(sampled * unit[:, :, None, :], axis=-1)
    # Limbs longer than half the image height are penalised, as in OpenPose.
    score = along.mean(axis=-1) + np.minimum(0.5 * image_height / norm - 1, 0)
    supported = np.count_nonzero(along > PAF_THRESHOLD, axis=-1) > PAF_MIN_FRACTION * PAF_SAMPLES
    return score, supported & (score > 0)


def _add(
    people: list[_Person], limb: int, connection: _Connection, peak_scores: FloatArray
) -> None:
    """Grow, merge or start people with one connection of ``limb`` (OpenPose's assembly)."""
    joint_a, joint_b = PAF_LIMBS[limb]
    owners = [
        index
        for index, person in enumerate(people)
        if person.joints[joint_a] == connection.start or person.joints[joint_b] == connection.end
    ]
    if not owners:
        if limb < SEEDING_LIMBS:
            joints = [-1] * len(JOINTS)
            joints[joint_a], joints[joint_b] = connection.start, connection.end
            score = peak_scores[connection.start] + peak_scores[connection.end] + connection.score
            people.append(_Person(joints, float(score), 2))
        return
    first = people[owners[0]]
    if len(owners) > 1 and _disjoint(first, people[owners[1]]):
        _merge(first, people.pop(owners[1]), connection.score)
    # The annotator adds the end joint again here when two overlapping people both own the
    # connection, counting it twice; a joint is counted once here, so scores can differ there.
    elif first.joints[joint_b] != connection.end:
        first.joints[joint_b] = connection.end
        first.count += 1
        first.score += float(peak_scores[connection.end]) + connection.score


def _disjoint(a: _Person, b: _Person) -> bool:
    return not any(i >= 0 and j >= 0 for i, j in zip(a.joints, b.joints, strict=True))


def _merge(into: _Person, other: _Person, connection_score: float) -> None:
    into.joints = [j if j >= 0 else k for j, k in zip(into.joints, other.joints, strict=True)]
    into.count += other.count
    into.score += other.score + connection_score


def _keypoints(person: _Person, points: FloatArray) -> Keypoints:
    return Keypoints(
        tuple((float(points[i, 0]), float(points[i, 1])) if i >= 0 else None for i in person.joints)
    )
