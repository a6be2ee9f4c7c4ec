"""Decoding OpenPose body maps into people, on synthetic maps of people drawn at known joints."""

from __future__ import annotations

import numpy as np
import pytest

from dan.engine.control.openpose_decode import PAF_INDEX, PAF_LIMBS, decode_people
from dan.engine.control.preprocess import JOINTS, LIMBS, Keypoints
from dan.errors import EngineError

Point = tuple[float, float]
Person = list[Point | None]
# One upright person facing the viewer, inside a 64 x 160 box (OpenPose joint order).
PERSON: tuple[Point, ...] = (
    (32, 20), (32, 40),  # nose, neck
    (20, 40), (14, 60), (10, 80), (44, 40), (50, 60), (54, 80),  # right arm, left arm
    (24, 80), (24, 110), (24, 140), (40, 80), (40, 110), (40, 140),  # right leg, left leg
    (28, 16), (36, 16), (24, 20), (40, 20),  # eyes, ears
)  # fmt: skip
SIZE = 160
BLOB_SIGMA = 2.5
PAF_HALF_WIDTH = 2.0


def person_at(dx: float, without: tuple[str, ...] = ()) -> Person:
    """PERSON moved ``dx`` pixels right, minus the joints named in ``without``."""
    return [
        None if name in without else (x + dx, y)
        for name, (x, y) in zip(JOINTS, PERSON, strict=True)
    ]


def halved(person: Person) -> Person:
    """``person`` in a map of half the size: pixel x of the full map is at (x - 0.5) / 2."""
    return [None if p is None else ((p[0] - 0.5) / 2, (p[1] - 0.5) / 2) for p in person]


def render_maps(people: list[Person], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal network output: a Gaussian blob of peak 1 per joint, and the limb's unit vector in
    its two PAF channels within PAF_HALF_WIDTH pixels of each limb."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    heatmaps = np.zeros((height, width, 19))
    pafs = np.zeros((height, width, 38))
    for person in people:
        for joint, point in enumerate(person):
            if point is not None:
                blob = np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * BLOB_SIGMA**2))
                heatmaps[:, :, joint] = np.maximum(heatmaps[:, :, joint], blob)
        for (a, b), (cx, cy) in zip(PAF_LIMBS, PAF_INDEX, strict=True):
            start, end = person[a], person[b]
            if start is not None and end is not None:
                inside, unit = limb_band(xs, ys, start, end)
                pafs[inside, cx], pafs[inside, cy] = unit
    heatmaps[:, :, 18] = 1 - heatmaps[:, :, :18].max(axis=2)
    return heatmaps, pafs


def limb_band(
    xs: np.ndarray, ys: np.ndarray, a: Point, b: Point
) -> tuple[np.ndarray, tuple[float, float]]:
    length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    along = (xs - a[0]) * ux + (ys - a[1]) * uy
    across = np.abs((xs - a[0]) * uy - (ys - a[1]) * ux)
    return (along >= -1) & (along <= length + 1) & (across <= PAF_HALF_WIDTH), (ux, uy)


def assert_near(keypoints: Keypoints, expected: Person, tolerance: float) -> None:
    for name, got, want in zip(JOINTS, keypoints.points, expected, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert got is not None, name
            assert max(abs(got[0] - want[0]), abs(got[1] - want[1])) <= tolerance, (name, got)


def test_the_paf_limbs_are_the_drawn_limbs_plus_shoulder_to_ear() -> None:
    assert set(LIMBS) <= set(PAF_LIMBS) and len(PAF_LIMBS) == 19
    assert set(PAF_LIMBS) - set(LIMBS) == {(2, 16), (5, 17)}
    assert sorted(c for pair in PAF_INDEX for c in pair) == list(range(38))


def test_decode_recovers_one_person_at_the_joints() -> None:
    person = person_at(48)
    heatmaps, pafs = render_maps([person], SIZE, SIZE)
    people = decode_people(heatmaps, pafs, SIZE, SIZE)
    assert len(people) == 1
    keypoints, score = people[0]
    assert_near(keypoints, person, tolerance=1)
    # 18 peaks of 1 and 17 limbs scoring 1 each; the shoulder-ear limbs find the ears placed.
    assert score == pytest.approx(35, abs=0.01)


def test_decode_separates_two_people_most_joints_first() -> None:
    full, partial = person_at(90), person_at(0, without=("r_knee", "r_ankle", "l_ankle"))
    heatmaps, pafs = render_maps([partial, full], SIZE, SIZE)
    people = decode_people(heatmaps, pafs, SIZE, SIZE)
    assert [keypoints.visible for keypoints, _ in people] == [18, 15]
    assert_near(people[0][0], full, tolerance=1)
    assert_near(people[1][0], partial, tolerance=1)


def test_decode_resizes_maps_given_at_another_size() -> None:
    heatmaps, pafs = render_maps([halved(person_at(48))], SIZE // 2, SIZE // 2)
    people = decode_people(heatmaps, pafs, SIZE, SIZE)
    assert len(people) == 1
    assert_near(people[0][0], person_at(48), tolerance=2)


def test_decode_finds_nobody_in_joints_without_limbs() -> None:
    heatmaps, _ = render_maps([person_at(48)], SIZE, SIZE)
    assert decode_people(heatmaps, np.zeros((SIZE, SIZE, 38)), SIZE, SIZE) == []


@pytest.mark.parametrize(
    ("heatmaps", "pafs", "message"),
    [
        (np.zeros((8, 8, 17)), np.zeros((8, 8, 38)), "heatmaps must be"),
        (np.zeros((8, 8, 19)), np.zeros((8, 8, 19)), "pafs must be"),
        (np.zeros((8, 8, 19)), np.zeros((8, 9, 38)), "one, non-empty size"),
    ],
)
def test_decode_rejects_maps_of_the_wrong_shape(
    heatmaps: np.ndarray, pafs: np.ndarray, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        decode_people(heatmaps, pafs, 8, 8)
