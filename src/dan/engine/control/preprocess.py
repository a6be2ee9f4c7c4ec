"""ControlNet preprocessors: the control images ``sd15_canny`` and ``sd15_openpose`` expect.

- ``canny``: OpenCV's Canny edge map, white edges on black, RGB (what lllyasviel's annotator
  fed ``sd15_canny`` in training). Thresholds are 0-255, default 100/200, ``low <= high``.
- ``openpose``: the 18-joint OpenPose body stick figure on black. The joints come from
  mediapipe Pose, whose wheel carries its model, so nothing is downloaded; its 33 landmarks are
  mapped onto the OpenPose COCO-18 joints (:func:`from_mediapipe`) and drawn the way the
  ``sd15_openpose`` training images were drawn (:func:`render_openpose`): joint circles first,
  then the 17 limbs as filled ellipses blended at 0.6 opacity, in the standard OpenPose colours.

mediapipe is optional: this module imports without it, and only :func:`estimate_pose` needs it
(it raises :class:`~dan.errors.EngineError` naming the package when it is missing). No torch here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from PIL.Image import Image

from dan.errors import EngineError

# "none": the image already is a control image (an edge map, a pose drawn elsewhere).
PREPROCESSORS: tuple[str, ...] = ("canny", "openpose", "none")
# The reference misspells "openpose" once; requests using that spelling must keep working.
PREPROCESSOR_ALIASES: dict[str, str] = {"openopse": "openpose"}
CANNY_LOW = 100
CANNY_HIGH = 200

# OpenPose COCO-18 body joints, in OpenPose's order (index = OpenPose joint id).
JOINTS: tuple[str, ...] = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
# The 17 limbs OpenPose draws, as (joint, joint) indices into JOINTS; limb i has COLORS[i].
# OpenPose's list has two more (shoulder-ear) that its body drawing never shows.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# The standard OpenPose colours (RGB): joint i is drawn in colour i, limb i in colour i.
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4  # half the limb ellipse's minor axis, in pixels
JOINT_RADIUS = 4
LIMB_OPACITY = 0.6
# mediapipe Pose landmark index for each OpenPose joint; the neck (None) has no landmark.
# Both use the person's own left/right, so no mirroring is needed.
MEDIAPIPE_INDEX: tuple[int | None, ...] = (
    0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7,
)  # fmt: skip
MEDIAPIPE_LANDMARKS = 33
MEDIAPIPE_LEFT_SHOULDER = 11
MEDIAPIPE_RIGHT_SHOULDER = 12

Point = tuple[float, float]
RgbArray = npt.NDArray[np.uint8]


class Landmark(Protocol):
    """A normalized landmark as mediapipe returns it (``NormalizedLandmark``)."""

    @property
    def x(self) -> float: ...
    @property
    def y(self) -> float: ...
    @property
    def visibility(self) -> float: ...


@dataclass(frozen=True)
class Keypoints:
    """One person's 18 OpenPose body joints, in :data:`JOINTS` order.

    Each point is ``(x, y)`` in pixels of the image it was found in, or ``None`` when that joint
    is not visible. Construction guarantees exactly 18 entries.
    """

    points: tuple[Point | None, ...]

    def __post_init__(self) -> None:
        if len(self.points) != len(JOINTS):
            raise EngineError(f"Keypoints needs {len(JOINTS)} points, got {len(self.points)}")

    def __getitem__(self, joint: str) -> Point | None:
        """The point of the joint named ``joint`` (a name from :data:`JOINTS`)."""
        if joint not in JOINTS:
            raise KeyError(f"unknown joint {joint!r}; joints are {', '.join(JOINTS)}")
        return self.points[JOINTS.index(joint)]

    @classmethod
    def from_names(cls, named: dict[str, Point]) -> Keypoints:
        """Keypoints from ``{joint name: (x, y)}``; joints not named are not visible."""
        unknown = sorted(set(named) - set(JOINTS))
        if unknown:
            raise EngineError(f"unknown joints {unknown}; joints are {', '.join(JOINTS)}")
        return cls(tuple(named.get(name) for name in JOINTS))

    @property
    def visible(self) -> int:
        """How many joints are visible."""
        return sum(point is not None for point in self.points)


# --- Canny ---------------------------------------------------------------------------------


def canny(image: Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image:
    """The Canny edge map of ``image``: an RGB image of its size, edges 255 on a 0 background.

    Edges are found on the RGB image (OpenCV takes the strongest gradient of the channels), as
    the ``sd15_canny`` training maps were. Raises ``EngineError`` unless
    ``0 <= low <= high <= 255``.
    """
    _check_thresholds(low, high)
    edges = cv2.Canny(_rgb_array(image), float(low), float(high))
    return PILImage.fromarray(np.stack([edges] * 3, axis=-1), mode="RGB")


def _check_thresholds(low: float, high: float) -> None:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
            raise EngineError(f"canny {name} threshold must be a number, got {value!r}")
    if not 0 <= low <= high <= 255:
        raise EngineError(
            f"canny thresholds must satisfy 0 <= low <= high <= 255, got low={low}, high={high}"
        )


def _rgb_array(image: Image) -> RgbArray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


# --- OpenPose ------------------------------------------------------------------------------


def from_mediapipe(
    landmarks: Sequence[Landmark | tuple[float, float, float]],
    width: int,
    height: int,
    *,
    min_visibility: float = 0.5,
) -> Keypoints:
    """Map mediapipe Pose's 33 normalized landmarks onto the 18 OpenPose joints, in pixels.

    ``landmarks`` are mediapipe ``NormalizedLandmark``s or ``(x, y, visibility)`` tuples, with
    x and y in 0-1 of a ``width`` x ``height`` image. A joint is visible when its landmark's
    visibility is at least ``min_visibility`` and it lies inside the image (OpenPose never
    reports joints outside the frame). The neck, which mediapipe lacks, is the midpoint of the
    shoulders and is visible only when both shoulders are. Raises ``EngineError`` unless there
    are exactly 33 landmarks and the size is positive.
    """
    if len(landmarks) != MEDIAPIPE_LANDMARKS:
        raise EngineError(f"mediapipe Pose gives 33 landmarks, got {len(landmarks)}")
    if width <= 0 or height <= 0:
        raise EngineError(f"image size must be positive, got {width}x{height}")
    pixels = [_to_pixel(mark, width, height, min_visibility) for mark in landmarks]
    points = [pixels[i] if i is not None else None for i in MEDIAPIPE_INDEX]
    points[JOINTS.index("neck")] = _midpoint(
        pixels[MEDIAPIPE_LEFT_SHOULDER], pixels[MEDIAPIPE_RIGHT_SHOULDER]
    )
    return Keypoints(tuple(points))


def _to_pixel(
    mark: Landmark | tuple[float, float, float], width: int, height: int, min_visibility: float
) -> Point | None:
    x, y, visibility = mark if isinstance(mark, tuple) else (mark.x, mark.y, mark.visibility)
    if visibility < min_visibility or not (0 <= x <= 1 and 0 <= y <= 1):
        return None
    return (x * width, y * height)


def _midpoint(a: Point | None, b: Point | None) -> Point | None:
    if a is None or b is None:
        return None
    return ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)


def render_openpose(keypoints: Keypoints, width: int, height: int) -> Image:
    """Draw ``keypoints`` as the OpenPose body figure on a black ``width`` x ``height`` RGB image.

    As in the ``sd15_openpose`` training images: each visible joint is a filled circle of radius
    4 in its joint colour; then each of the 17 limbs whose two joints are both visible is a
    filled ellipse spanning the joints, 4 px half-width, blended over the canvas at 0.6 opacity
    in its limb colour. Limbs touching a missing joint are not drawn. Raises ``EngineError``
    for a non-positive size.
    """
    if width <= 0 or height <= 0:
        raise EngineError(f"image size must be positive, got {width}x{height}")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for point, color in zip(keypoints.points, COLORS, strict=False):
        if point is not None:
            center = (int(point[0]), int(point[1]))
            cv2.circle(canvas, center, JOINT_RADIUS, color, thickness=-1)
    for (start, end), color in zip(LIMBS, COLORS, strict=False):
        a, b = keypoints.points[start], keypoints.points[end]
        if a is not None and b is not None:
            _blend_limb(canvas, a, b, color)
    return PILImage.fromarray(canvas, mode="RGB")


def _blend_limb(canvas: RgbArray, a: Point, b: Point, color: tuple[int, int, int]) -> None:
    """Blend one limb ellipse into ``canvas`` in place (only the ellipse's pixels change)."""
    length = math.hypot(a[0] - b[0], a[1] - b[1])
    angle = math.degrees(math.atan2(a[1] - b[1], a[0] - b[0]))
    center = (int((a[0] + b[0]) / 2), int((a[1] + b[1]) / 2))
    # Integer centre, axes and angle, and a 1-degree outline, as the training figures used.
    outline = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
    mask = np.zeros(canvas.shape[:2], dtype=np.uint8)
    cv2.fillConvexPoly(mask, np.asarray(outline, dtype=np.int32), (1,))
    inside = mask.astype(bool)
    blended = (1 - LIMB_OPACITY) * canvas[inside] + LIMB_OPACITY * np.array(color, np.float64)
    canvas[inside] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def estimate_pose(image: Image) -> Keypoints:
    """The body keypoints of the most prominent person in ``image``, found by mediapipe Pose.

    Uses mediapipe's bundled full pose model (``static_image_mode=True``,
    ``model_complexity=1``), so nothing is downloaded. Raises ``EngineError`` when mediapipe is
    not installed, or when no person (no visible joint) is found.
    """
    pose_module = _mediapipe_pose()
    rgb = _rgb_array(image)
    with pose_module.Pose(static_image_mode=True, model_complexity=1) as pose:
        result = pose.process(rgb)
    if result.pose_landmarks is None:
        raise EngineError("openpose found no person in the image")
    keypoints = from_mediapipe(result.pose_landmarks.landmark, image.width, image.height)
    if keypoints.visible == 0:
        raise EngineError("openpose found no person in the image (no joint was visible)")
    return keypoints


def _mediapipe_pose() -> Any:
    try:
        mediapipe = importlib.import_module("mediapipe")
    except ImportError as exc:
        raise EngineError(
            "openpose needs the mediapipe package: pip install --no-deps 'mediapipe==0.10.21' "
            "(its wheel carries the pose model; ./run installs it) or pull the OpenPose body "
            "model with `dan models pull body_pose_model`"
        ) from exc
    return mediapipe.solutions.pose


PoseEstimator = Callable[[Image], Keypoints]


def openpose(image: Image, estimator: PoseEstimator | None = None) -> Image:
    """The OpenPose control image of ``image``, at its size: the keypoints ``estimator`` finds
    (the OpenPose body model, when installed), else mediapipe's (see :func:`estimate_pose`)."""
    keypoints = (estimator or estimate_pose)(image)
    return render_openpose(keypoints, image.width, image.height)


# --- Dispatch ------------------------------------------------------------------------------


def preprocess(
    name: str,
    image: Image,
    param1: float | None = None,
    param2: float | None = None,
    *,
    pose: PoseEstimator | None = None,
) -> Image:
    """Run the preprocessor ``name`` on ``image``; the result is an RGB image of the same size.

    ``name`` is ``canny`` (``param1``/``param2`` are its low/high thresholds, default 100/200)
    or ``openpose`` (also spelt ``openopse``, as the reference does once; params are ignored;
    ``pose`` finds the keypoints, mediapipe when it is ``None``), or ``none`` (the image is
    the control image already: it is only made RGB).
    Raises ``EngineError`` for an unknown name, bad thresholds, or a failed pose estimate.
    """
    canonical = PREPROCESSOR_ALIASES.get(name, name)
    if canonical == "canny":
        low = CANNY_LOW if param1 is None else param1
        high = CANNY_HIGH if param2 is None else param2
        return canny(image, low, high)
    if canonical == "openpose":
        return openpose(image, pose)
    if canonical == "none":
        return image.convert("RGB")
    raise EngineError(f"unknown preprocess {name!r}; choose one of {', '.join(PREPROCESSORS)}")
