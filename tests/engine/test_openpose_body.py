"""The OpenPose body network under its original names: loading its file, running it end to end."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from dan.engine.control.openpose_body import BodyPoseNet, OpenPoseBody, original_key
from dan.engine.control.preprocess import Keypoints
from dan.errors import EngineError

CPU = torch.device("cpu")

# Tensors of body_pose_model.pth, by the names and shapes the annotator's transfer() expects.
ORIGINAL_SHAPES = {
    "conv1_1.weight": (64, 3, 3, 3),
    "conv4_4_CPM.weight": (128, 256, 3, 3),
    "conv5_5_CPM_L1.weight": (38, 512, 1, 1),
    "conv5_5_CPM_L2.bias": (19,),
    "Mconv1_stage2_L1.weight": (128, 185, 7, 7),
    "Mconv6_stage4_L2.weight": (128, 128, 1, 1),
    "Mconv7_stage6_L1.bias": (38,),
    "Mconv7_stage6_L2.weight": (19, 128, 1, 1),
}


@pytest.fixture(scope="module")
def random_net() -> BodyPoseNet:
    torch.manual_seed(0)
    return BodyPoseNet().eval()


@pytest.fixture(scope="module")
def original_state(random_net: BodyPoseNet) -> dict[str, torch.Tensor]:
    """``random_net``'s weights under body_pose_model.pth's names."""
    return {original_key(key): value for key, value in random_net.state_dict().items()}


@pytest.fixture(scope="module")
def weights(
    original_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("openpose") / "body_pose_model.pth"
    torch.save(original_state, path)
    yield path
    path.unlink()  # 200 MB


@pytest.fixture(scope="module")
def body(weights: Path) -> OpenPoseBody:
    """``random_net`` loaded from ``weights``, on the CPU, at a scale small enough for tests
    (the network sees images 92 px high instead of the annotator's 184)."""
    return OpenPoseBody.load(weights, CPU, torch.float32, scales=(0.25,))


def load_variant(state: dict[str, torch.Tensor], path: Path) -> OpenPoseBody:
    torch.save(state, path)
    try:
        return OpenPoseBody.load(path, CPU, torch.float32)
    finally:
        path.unlink()


def test_the_state_dict_has_the_original_names(original_state: dict[str, torch.Tensor]) -> None:
    # 12 backbone convolutions, 2 x 5 in stage 1, 2 x 7 in each of stages 2-6; weight and bias.
    assert len(original_state) == 2 * (12 + 10 + 5 * 14)
    for key, shape in ORIGINAL_SHAPES.items():
        assert tuple(original_state[key].shape) == shape, key


def test_load_puts_each_tensor_in_its_layer(body: OpenPoseBody, random_net: BodyPoseNet) -> None:
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = random_net(x), body.net(x)
    assert got[0].shape == (1, 38, 4, 6) and got[1].shape == (1, 19, 4, 6)
    torch.testing.assert_close(got, expected)


def test_predict_maps_are_at_the_image_size(body: OpenPoseBody) -> None:
    heatmaps, pafs = body.predict_maps(PILImage.new("RGB", (36, 40), "gray"))
    assert heatmaps.shape == (40, 36, 19) and pafs.shape == (40, 36, 38)
    assert heatmaps.dtype == np.float32 and np.isfinite(heatmaps).all() and np.isfinite(pafs).all()


def test_estimate_runs_end_to_end_with_random_weights(body: OpenPoseBody) -> None:
    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    try:
        keypoints = body.estimate(image)
    except EngineError as exc:  # random weights may well see nobody
        assert "found no person" in str(exc)
    else:
        assert isinstance(keypoints, Keypoints) and keypoints.visible >= 4
        assert all(0 <= p[0] < 48 and 0 <= p[1] < 64 for p in keypoints.points if p is not None)


def test_estimate_raises_when_the_heatmaps_are_empty(random_net: BodyPoseNet) -> None:
    net = copy.deepcopy(random_net)
    for name in ("weight", "bias"):  # the last heatmap layer: all heatmaps become 0
        torch.nn.init.zeros_(net.get_parameter(f"heatmaps.5.Mconv7_stage6_L2.{name}"))
    with pytest.raises(EngineError, match="openpose found no person in the image"):
        body = OpenPoseBody(net, CPU, torch.float32, scales=(0.125, 0.25))  # two, and small
        body.estimate(PILImage.new("RGB", (40, 40), "white"))


def test_a_missing_tensor_is_named(original_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = {k: v for k, v in original_state.items() if k != "Mconv7_stage6_L2.bias"}
    with pytest.raises(EngineError, match=r"partial\.pth.*missing Mconv7_stage6_L2\.bias"):
        load_variant(state, tmp_path / "partial.pth")


def test_an_unexpected_tensor_is_named(
    original_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    state = {**original_state, "model0.conv1_1.weight": original_state["conv1_1.weight"]}
    with pytest.raises(EngineError, match=r"missing none, unexpected model0\.conv1_1\.weight"):
        load_variant(state, tmp_path / "annotator-names.pth")


def test_a_tensor_of_the_wrong_shape_is_refused(
    original_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    state = {**original_state, "conv1_1.weight": torch.zeros(64, 3, 5, 5)}
    with pytest.raises(EngineError, match=r"wrong\.pth does not fit.*conv1_1"):
        load_variant(state, tmp_path / "wrong.pth")


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a pickle")
    with pytest.raises(EngineError, match=r"cannot read OpenPose body weights broken\.pth"):
        OpenPoseBody.load(path, CPU, torch.float32)


def test_scales_must_be_positive(random_net: BodyPoseNet) -> None:
    with pytest.raises(EngineError, match="scales must be positive"):
        OpenPoseBody(random_net, CPU, torch.float32, scales=(0.5, 0.0))


def test_the_engine_uses_the_body_model_when_the_request_names_it(
    weights: Path, tmp_path: Path
) -> None:
    from dan.config import Settings
    from dan.domain import DetectRequest, InstalledModel, ModelKind
    from dan.engine.diffusers_engine import DiffusersEngine
    from dan.models.hashing import sha256_file
    from tests.engine.test_preprocess import portrait

    engine = DiffusersEngine(Settings(data_dir=tmp_path, device="cpu", dtype="float32"))  # type: ignore[call-arg]
    model = InstalledModel(ModelKind.ANNOTATOR, "body_pose_model", sha256_file(weights), weights, 1)
    photo = portrait().resize((128, 150))
    # mediapipe finds her; the random-weight body model, when named, finds nobody.
    plain = DetectRequest("task/input.png", "openpose")
    assert np.asarray(engine.annotate(plain, photo, {}, lambda *s: None)).any()
    with_body = DetectRequest("task/input.png", "openpose", pose_model=model.ref)
    with pytest.raises(EngineError, match="found no person"):
        engine.annotate(with_body, photo, {model.sha256: model}, lambda *s: None)
