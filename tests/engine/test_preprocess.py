"""ControlNet preprocessors: canny edges, the mediapipe-to-OpenPose mapping, the pose drawing."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw
from PIL.Image import Image

from dan.engine.control.preprocess import (
    COLORS,
    JOINTS,
    LIMBS,
    Keypoints,
    canny,
    estimate_pose,
    from_mediapipe,
    preprocess,
    render_openpose,
)
from dan.errors import EngineError

SIZE = 64
RECT = (16, 16, 47, 47)  # inclusive corners of the white rectangle


def rectangle_image() -> Image:
    image = PILImage.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(image).rectangle(RECT, fill="white")
    return image


def distance_to_border(x: int, y: int) -> int:
    """Chebyshev distance from pixel (x, y) to the rectangle's outline (its border pixels)."""
    x0, y0, x1, y1 = RECT
    inside = x0 <= x <= x1 and y0 <= y <= y1
    if inside:
        return min(x - x0, x1 - x, y - y0, y1 - y)
    return max(x0 - x, x - x1, y0 - y, y - y1, 0)


# --- canny ---------------------------------------------------------------------------------


def test_canny_draws_white_edges_only_along_the_rectangle_border() -> None:
    edges = np.asarray(canny(rectangle_image()))
    assert edges.shape == (SIZE, SIZE, 3)
    assert set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    ys, xs = np.nonzero(edges[..., 0])
    assert len(xs) > 0
    assert max(distance_to_border(int(x), int(y)) for x, y in zip(xs, ys, strict=True)) <= 1
    # Every side of the rectangle is traced along its whole length (corners aside).
    x0, y0, x1, y1 = RECT
    near = edges[..., 0] > 0
    for along in range(x0 + 2, x1 - 1):
        assert near[y0 - 1 : y0 + 2, along].any() and near[y1 - 1 : y1 + 2, along].any()
        assert near[along, x0 - 1 : x0 + 2].any() and near[along, x1 - 1 : x1 + 2].any()


def test_canny_of_a_flat_image_is_black() -> None:
    flat = PILImage.new("RGB", (SIZE, SIZE), (90, 120, 200))
    assert not np.asarray(canny(flat)).any()


def test_canny_thresholds_above_the_contrast_find_nothing() -> None:
    faint = PILImage.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(faint).rectangle(RECT, fill=(6, 6, 6))
    assert np.asarray(canny(faint, 0, 10)).any()
    assert not np.asarray(canny(faint, 250, 255)).any()


@pytest.mark.parametrize(
    ("low", "high"), [(-1, 200), (100, 256), (200, 100), (float("nan"), 200), (True, 200)]
)
def test_canny_rejects_bad_thresholds(low: float, high: float) -> None:
    with pytest.raises(EngineError, match="canny"):
        canny(rectangle_image(), low, high)


def test_preprocess_dispatches_canny_with_defaults_and_params() -> None:
    image = rectangle_image()
    assert preprocess("canny", image, None, None).tobytes() == canny(image).tobytes()
    assert preprocess("canny", image, 10, 20).tobytes() == canny(image, 10, 20).tobytes()
    with pytest.raises(EngineError, match="low <= high"):
        preprocess("canny", image, 200, 100)


def test_preprocess_none_passes_a_ready_control_image_through() -> None:
    edges = canny(rectangle_image())
    assert preprocess("none", edges).tobytes() == edges.convert("RGB").tobytes()
    assert preprocess("none", edges).mode == "RGB"


def test_preprocess_rejects_unknown_names() -> None:
    with pytest.raises(EngineError, match="unknown preprocess 'depth'"):
        preprocess("depth", rectangle_image())


# --- from_mediapipe ------------------------------------------------------------------------


def landmarks(
    visible: dict[int, tuple[float, float]],
    hidden: frozenset[int] = frozenset(),
) -> list[tuple[float, float, float]]:
    """33 mediapipe landmarks: the given ones visible (0.9), those in ``hidden`` at 0.1."""
    marks = [(0.5, 0.5, 0.0)] * 33
    for index, (x, y) in visible.items():
        marks[index] = (x, y, 0.1 if index in hidden else 0.9)
    return marks


def test_from_mediapipe_maps_landmarks_to_openpose_joints() -> None:
    # mediapipe: 0 nose, 2 left eye, 5 right eye, 7/8 left/right ear, 11/12 shoulders,
    # 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles.
    marks = {i: (0.01 * i, 0.02 * i) for i in (0, 2, 5, 7, 8, *range(11, 17), *range(23, 29))}
    keypoints = from_mediapipe(landmarks(marks), 200, 100)
    expected = {
        "nose": 0, "r_shoulder": 12, "r_elbow": 14, "r_wrist": 16, "l_shoulder": 11,
        "l_elbow": 13, "l_wrist": 15, "r_hip": 24, "r_knee": 26, "r_ankle": 28, "l_hip": 23,
        "l_knee": 25, "l_ankle": 27, "r_eye": 5, "l_eye": 2, "r_ear": 8, "l_ear": 7,
    }  # fmt: skip
    for joint, index in expected.items():
        assert keypoints[joint] == pytest.approx((0.01 * index * 200, 0.02 * index * 100))
    assert keypoints["neck"] == pytest.approx((11.5 * 0.01 * 200, 11.5 * 0.02 * 100))
    assert keypoints.visible == 18


def test_from_mediapipe_hides_low_visibility_and_out_of_frame_points() -> None:
    marks = landmarks(
        {0: (0.5, 0.1), 11: (0.6, 0.3), 12: (0.4, 0.3), 15: (1.2, 0.5)}, frozenset({11})
    )
    keypoints = from_mediapipe(marks, 100, 100)
    assert keypoints["nose"] == pytest.approx((50, 10))
    assert keypoints["r_shoulder"] == pytest.approx((40, 30))
    assert keypoints["l_shoulder"] is None
    assert keypoints["neck"] is None  # needs both shoulders
    assert keypoints["l_wrist"] is None  # outside the image
    assert keypoints.visible == 2
    lenient = from_mediapipe(marks, 100, 100, min_visibility=0.05)
    assert lenient["neck"] == pytest.approx((50, 30))


def test_from_mediapipe_accepts_landmark_objects() -> None:
    class Mark:
        def __init__(self, x: float, y: float, visibility: float) -> None:
            self.x, self.y, self.visibility = x, y, visibility

    marks = [Mark(*mark) for mark in landmarks({0: (0.25, 0.75)})]
    assert from_mediapipe(marks, 40, 20)["nose"] == pytest.approx((10, 15))


def test_from_mediapipe_rejects_wrong_landmark_counts() -> None:
    with pytest.raises(EngineError, match="33 landmarks"):
        from_mediapipe([(0.5, 0.5, 1.0)] * 17, 64, 64)


# --- render_openpose -----------------------------------------------------------------------

# A standing figure on a 256 x 256 canvas, joints far enough apart that limbs do not overlap
# at their midpoints.
SKELETON = {
    "nose": (128.0, 40.0), "neck": (128.0, 80.0),
    "r_shoulder": (88.0, 80.0), "r_elbow": (70.0, 130.0), "r_wrist": (60.0, 180.0),
    "l_shoulder": (168.0, 80.0), "l_elbow": (186.0, 130.0), "l_wrist": (196.0, 180.0),
    "r_hip": (108.0, 160.0), "r_knee": (104.0, 200.0), "r_ankle": (100.0, 245.0),
    "l_hip": (148.0, 160.0), "l_knee": (152.0, 200.0), "l_ankle": (156.0, 245.0),
    "r_eye": (118.0, 30.0), "l_eye": (138.0, 30.0), "r_ear": (104.0, 36.0), "l_ear": (152.0, 36.0),
}  # fmt: skip


def limb_midpoint(keypoints: Keypoints, limb: int) -> tuple[int, int]:
    a, b = (keypoints.points[i] for i in LIMBS[limb])
    assert a is not None and b is not None
    return int((a[0] + b[0]) / 2), int((a[1] + b[1]) / 2)


def faded(color: tuple[int, int, int]) -> tuple[int, ...]:
    """A limb colour at 0.6 opacity over black."""
    return tuple(round(0.6 * c) for c in color)


def test_openpose_tables_match_the_standard_body_figure() -> None:
    assert len(JOINTS) == 18 and len(COLORS) == 18 and len(LIMBS) == 17
    named = [(JOINTS[a], JOINTS[b]) for a, b in LIMBS]
    assert named[0] == ("neck", "r_shoulder") and COLORS[0] == (255, 0, 0)
    assert named[12] == ("neck", "nose") and COLORS[12] == (0, 0, 255)
    assert named[16] == ("l_eye", "l_ear") and COLORS[16] == (255, 0, 170)


def test_render_openpose_draws_each_limb_in_its_colour() -> None:
    keypoints = Keypoints.from_names(SKELETON)
    pixels = np.asarray(render_openpose(keypoints, 256, 256))
    assert pixels.shape == (256, 256, 3)
    # Limbs 13-16 (the face) are short and overlap near the eyes; check the body limbs.
    for limb in range(13):
        x, y = limb_midpoint(keypoints, limb)
        assert tuple(pixels[y, x]) == faded(COLORS[limb]), JOINTS[LIMBS[limb][1]]
    assert tuple(pixels[2, 2]) == (0, 0, 0)  # nowhere near a limb
    assert tuple(pixels[120, 128]) == (0, 0, 0)  # between the hips, below the neck: no limb


def test_render_openpose_draws_joints_as_circles_in_the_joint_colours() -> None:
    only_wrist = Keypoints.from_names({"r_wrist": (30.0, 40.0)})
    pixels = np.asarray(render_openpose(only_wrist, 64, 64))
    r_wrist = JOINTS.index("r_wrist")
    assert tuple(pixels[40, 30]) == COLORS[r_wrist]
    assert tuple(pixels[40, 33]) == COLORS[r_wrist]  # inside the radius-4 circle
    assert tuple(pixels[40, 36]) == (0, 0, 0)
    assert int(np.count_nonzero(pixels.any(axis=-1))) < 60  # one small disc, no limb


def test_render_openpose_skips_limbs_touching_a_missing_joint() -> None:
    without_elbow = {name: point for name, point in SKELETON.items() if name != "r_elbow"}
    full = Keypoints.from_names(SKELETON)
    pixels = np.asarray(render_openpose(Keypoints.from_names(without_elbow), 256, 256))
    for limb in (2, 3):  # r_shoulder -> r_elbow, r_elbow -> r_wrist
        x, y = limb_midpoint(full, limb)
        assert tuple(pixels[y, x]) == (0, 0, 0)
    x, y = limb_midpoint(full, 0)  # neck -> r_shoulder is still drawn
    assert tuple(pixels[y, x]) == faded(COLORS[0])


def test_render_openpose_of_no_keypoints_is_black() -> None:
    empty = Keypoints((None,) * 18)
    assert not np.asarray(render_openpose(empty, 32, 48)).any()
    assert render_openpose(empty, 32, 48).size == (32, 48)


def test_keypoints_validate_their_joints() -> None:
    with pytest.raises(EngineError, match="18 points"):
        Keypoints(((1.0, 2.0),) * 17)
    with pytest.raises(EngineError, match="unknown joints"):
        Keypoints.from_names({"tail": (1.0, 2.0)})


# --- estimate_pose -------------------------------------------------------------------------


def portrait() -> Image:
    """A real photo of a person: the Grace Hopper portrait matplotlib ships (512x600,
    head and shoulders)."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return PILImage.open(file).convert("RGB")


def test_estimate_pose_finds_the_head_and_shoulders_of_a_real_portrait() -> None:
    keypoints = estimate_pose(portrait())
    nose, neck = keypoints["nose"], keypoints["neck"]
    right, left = keypoints["r_shoulder"], keypoints["l_shoulder"]
    assert nose is not None and neck is not None and right is not None and left is not None
    # Facing the camera: her right shoulder is on the image's left, both below the nose.
    assert right[0] < nose[0] < left[0]
    assert right[1] > nose[1] and left[1] > nose[1]
    assert keypoints["r_eye"] is not None and keypoints["l_eye"] is not None


@pytest.mark.parametrize("name", ["openpose", "openopse"])
def test_openpose_control_image_draws_the_found_limbs(name: str) -> None:
    image = portrait()
    keypoints = estimate_pose(image)
    control = np.asarray(preprocess(name, image))
    assert control.shape == (600, 512, 3)
    neck, shoulder = keypoints["neck"], keypoints["r_shoulder"]
    assert neck is not None and shoulder is not None
    x, y = int((neck[0] + shoulder[0]) / 2), int((neck[1] + shoulder[1]) / 2)
    # The neck-right shoulder limb, blended at 0.6 over black, in its OpenPose colour.
    limb = COLORS[LIMBS.index((1, 2))]
    assert tuple(control[y, x]) == tuple(round(0.6 * c) for c in limb)


def test_openpose_without_a_person_says_so() -> None:
    with pytest.raises(EngineError, match="found no person"):
        estimate_pose(PILImage.new("RGB", (128, 128), (30, 30, 30)))


def test_openpose_without_mediapipe_says_which_package_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = importlib.import_module

    def without_mediapipe(name: str, package: str | None = None) -> object:
        if name == "mediapipe":
            raise ImportError("No module named 'mediapipe'")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_mediapipe)
    with pytest.raises(EngineError, match="openpose needs the mediapipe package"):
        preprocess("openpose", portrait())
