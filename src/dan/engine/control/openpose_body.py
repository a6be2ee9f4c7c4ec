"""CMU's OpenPose body model (COCO-18), run the way lllyasviel's ControlNet annotator runs it.

The network is ``body_pose_model.pth`` (lllyasviel/Annotators): a VGG-19 front end and six
two-branch stages, branch 1 predicting 38 part-affinity-field channels (PAFs: an x and a y
channel for each of 19 limbs) and branch 2 predicting 19 heatmaps (18 joints and background),
both at 1/8 of the input. The file stores each convolution under its Caffe layer name
(``conv1_1.weight``, ``Mconv7_stage6_L2.bias``); the modules here are named so that the last two
parts of a module key are that name (:func:`original_key`), so the file loads unchanged.

Inference (:meth:`OpenPoseBody.estimate`): the BGR image (the Caffe model was trained on BGR) is
scaled so its height is ``scale * 368`` for each scale, padded right and down to a multiple of 8
with grey 128, fed as ``x / 256 - 0.5``; the outputs are upsampled 8x (bicubic), cropped to the
unpadded size, resized to the image and averaged over the scales. The default, one scale of 0.5,
is what the annotator (and sd-webui-controlnet) uses; :data:`CMU_SCALES` is CMU's 4-scale search.

Decoding the maps into people is :func:`dan.engine.control.openpose_decode.decode_people`, kept
in its own module because it needs no torch (see there for the thresholds and the assembly).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from PIL.Image import Image
from torch import nn

from dan.engine.control.openpose_decode import (
    HEATMAP_CHANNELS,
    PAF_CHANNELS,
    FloatArray,
    decode_people,
    resized_maps,
)
from dan.engine.control.preprocess import Keypoints
from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import Limits, check_tensors
from dan.errors import EngineError

BOXSIZE = 368  # network input height at scale 1.0, in pixels
STRIDE = 8  # the network's output is 1/STRIDE of its input
PAD_VALUE = 128
ANNOTATOR_SCALES: tuple[float, ...] = (0.5,)
CMU_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
# VGG-style convolutions; the file's shapes are then held to the network's own.
BODY_LIMITS = Limits("the OpenPose body model", max_rank=4, max_side=1 << 17)

# --- the network -------------------------------------------------------------------------------

Layer = tuple[str, int, int, int] | None  # (Caffe name, in, out, kernel); None: a 2x2 max pool
BACKBONE: tuple[Layer, ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), None,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), None,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3), None,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
)  # fmt: skip
FEATURES = 128


def stage_layers(stage: int, branch: int) -> tuple[Layer, ...]:
    """The layers of ``stage`` (1-6), branch 1 (PAFs) or 2 (heatmaps), under their Caffe names."""
    out = PAF_CHANNELS if branch == 1 else HEATMAP_CHANNELS
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        shapes = [(FEATURES, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        first = PAF_CHANNELS + HEATMAP_CHANNELS + FEATURES
        shapes = [(first, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, out, 1)]
    return tuple((name, *shape) for name, shape in zip(names, shapes, strict=True))


def _sequential(layers: Sequence[Layer], *, relu_last: bool) -> nn.Sequential:
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for index, layer in enumerate(layers):
        if layer is None:
            modules[f"pool{index}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            continue
        name, inputs, outputs, kernel = layer
        modules[name] = nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2)
        if relu_last or index < len(layers) - 1:
            modules[f"relu_{name}"] = nn.ReLU()
    return nn.Sequential(modules)


class BodyPoseNet(nn.Module):
    """CMU's COCO body network: ``forward(x)`` gives ``(pafs, heatmaps)`` of the last stage.

    ``x`` is ``(N, 3, H, W)`` BGR scaled to ``x / 256 - 0.5`` with H and W multiples of 8; the
    outputs are ``(N, 38, H/8, W/8)`` and ``(N, 19, H/8, W/8)``. Parameters are randomly
    initialised; see :func:`original_key` for the names in ``body_pose_model.pth``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _sequential(BACKBONE, relu_last=True)
        self.pafs = nn.ModuleList(
            _sequential(stage_layers(stage, 1), relu_last=False) for stage in range(1, 7)
        )
        # The annotator's last heatmap layer keeps its ReLU (its no-ReLU list names the last PAF
        # layer twice instead); ControlNet's pose maps were made that way, so it is kept.
        self.heatmaps = nn.ModuleList(
            _sequential(stage_layers(stage, 2), relu_last=stage == 6) for stage in range(1, 7)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        stage_input = features
        for paf_branch, heatmap_branch in zip(self.pafs, self.heatmaps, strict=True):
            pafs, heatmaps = paf_branch(stage_input), heatmap_branch(stage_input)
            stage_input = torch.cat([pafs, heatmaps, features], dim=1)
        return pafs, heatmaps


def original_key(module_key: str) -> str:
    """The ``body_pose_model.pth`` key of a :class:`BodyPoseNet` state-dict key.

    The file names tensors by Caffe layer only (``conv1_1.weight``); layer names are unique, so
    the last two parts of the module key are the file's key (``backbone.conv1_1.weight``).
    """
    return ".".join(module_key.split(".")[-2:])


# --- loading and running -----------------------------------------------------------------------


class OpenPoseBody:
    """A loaded body model on one device, and how to find people with it (see the module doc)."""

    def __init__(
        self,
        net: BodyPoseNet,
        device: torch.device,
        dtype: torch.dtype,
        scales: Sequence[float] = ANNOTATOR_SCALES,
    ) -> None:
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise EngineError(f"openpose scales must be positive numbers, got {list(scales)}")
        self.net = net.to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype
        self.scales = tuple(scales)

    @classmethod
    def load(
        cls,
        weights: Path,
        device: torch.device,
        dtype: torch.dtype,
        *,
        scales: Sequence[float] = ANNOTATOR_SCALES,
    ) -> OpenPoseBody:
        """The model in ``weights`` (``body_pose_model.pth``, unchanged) on ``device`` in ``dtype``.

        The file is read with ``weights_only=True``. Raises EngineError naming the file when it
        cannot be read, declares more than it holds (see :mod:`dan.engine.loading.pickles`), is
        not a state dict, lacks or adds tensors, or has a tensor of the wrong shape; and for a
        scale that is not a positive number.
        """
        state = _read_state(weights)
        with torch.device("meta"):  # no random init: every parameter comes from the file
            net = BodyPoseNet()
        try:
            net.load_state_dict(_to_module_keys(net, state, weights.name), assign=True)
        except RuntimeError as exc:  # size mismatches, one per line: keep the message on one
            mismatches = " ".join(str(exc).split())
            raise EngineError(
                f"{weights.name} does not fit the OpenPose body model: {mismatches}"
            ) from exc
        return cls(net, device, dtype, scales)

    def estimate(self, image: Image) -> Keypoints:
        """The joints of the most prominent person in ``image`` (most joints, then best score).

        Points are in pixels of ``image``. Raises EngineError when no person is found.
        """
        heatmaps, pafs = self.predict_maps(image)
        people = decode_people(heatmaps, pafs, image.height, image.width)
        if not people:
            raise EngineError("openpose found no person in the image")
        return people[0][0]

    def predict_maps(self, image: Image) -> tuple[FloatArray, FloatArray]:
        """The heatmaps ``(H, W, 19)`` and PAFs ``(H, W, 38)`` of ``image``, averaged over the
        scales, at the image's size ``H`` x ``W`` (float32)."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[:, :, ::-1])
        size = (bgr.shape[0], bgr.shape[1])
        heatmaps = np.zeros((*size, HEATMAP_CHANNELS), np.float32)
        pafs = np.zeros((*size, PAF_CHANNELS), np.float32)
        for scale in self.scales:
            scaled_heatmaps, scaled_pafs = self._maps_at(bgr, scale * BOXSIZE / size[0])
            heatmaps += scaled_heatmaps / len(self.scales)
            pafs += scaled_pafs / len(self.scales)
        return heatmaps, pafs

    def _maps_at(self, bgr: npt.NDArray[np.uint8], factor: float) -> tuple[FloatArray, FloatArray]:
        scaled = _scaled(bgr, factor)
        planar = np.ascontiguousarray(_padded(scaled).transpose(2, 0, 1)[None])
        batch = torch.from_numpy(planar / 256 - 0.5)
        with torch.inference_mode():
            pafs, heatmaps = self.net(batch.to(device=self.device, dtype=self.dtype))
        valid, size = (scaled.shape[0], scaled.shape[1]), (bgr.shape[0], bgr.shape[1])
        return _to_image(heatmaps, valid, size), _to_image(pafs, valid, size)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_pickle(path, EngineError)
    except EngineError:
        raise
    except Exception as exc:  # missing, truncated, not a pickle: all mean the same here
        raise EngineError(
            f"cannot read OpenPose body weights {path.name}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise EngineError(f"{path.name} is not a state dict of tensors (body_pose_model.pth is)")
    check_tensors(path.name, state, BODY_LIMITS, EngineError)
    return state


def _to_module_keys(
    net: BodyPoseNet, state: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    keys = {original_key(key): key for key in net.state_dict()}
    missing = sorted(set(keys) - set(state))
    unexpected = sorted(set(state) - set(keys))
    if missing or unexpected:
        raise EngineError(
            f"{name} is not the OpenPose body model (body_pose_model.pth): "
            f"missing {_some(missing)}, unexpected {_some(unexpected)}"
        )
    return {keys[key]: tensor for key, tensor in state.items()}


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def _scaled(image: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return np.asarray(cv2.resize(image, size, interpolation=interpolation), np.uint8)


def _padded(image: npt.NDArray[np.uint8]) -> FloatArray:
    """``image`` as float32, padded right and down with PAD_VALUE to multiples of STRIDE."""
    down, right = (-image.shape[0]) % STRIDE, (-image.shape[1]) % STRIDE
    padded = np.pad(image, ((0, down), (0, right), (0, 0)), constant_values=PAD_VALUE)
    return padded.astype(np.float32)


def _to_image(maps: torch.Tensor, valid: tuple[int, int], size: tuple[int, int]) -> FloatArray:
    """Network maps ``(1, C, h, w)`` as ``(H, W, C)`` float32 at the image size ``size``."""
    array = np.ascontiguousarray(maps[0].float().permute(1, 2, 0).cpu().numpy())
    upsampled = cv2.resize(
        array, (array.shape[1] * STRIDE, array.shape[0] * STRIDE), interpolation=cv2.INTER_CUBIC
    )
    unpadded = np.ascontiguousarray(upsampled[: valid[0], : valid[1]], dtype=np.float32)
    return resized_maps(unpadded, size)
