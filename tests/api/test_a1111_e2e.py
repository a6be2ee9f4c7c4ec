"""End to end through the AUTOMATIC1111 facade: the real webuiapi client against the real
`dan serve` (its worker process and the diffusers engine) on a tiny SD1.x checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import webuiapi
from PIL import Image, ImageChops

from tests.api.test_server_e2e import install_tiny_checkpoint
from tests.fixtures.server import Server, start_server

pytestmark = pytest.mark.slow

SMALL = {"prompt": "a red fox", "steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("a1111")
    install_tiny_checkpoint(root / "models")
    server = start_server(root)
    yield server
    server.stop()


@pytest.fixture
def api(server: Server) -> webuiapi.WebUIApi:
    """As A1111 users make it (the embedded server needs no key on loopback)."""
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


def test_txt2img_makes_a_real_image_that_its_seed_reproduces(api: webuiapi.WebUIApi) -> None:
    first = api.txt2img(**SMALL, seed=-1)
    assert first.image.size == (64, 64) and len(set(first.image.getdata())) > 10
    again = api.txt2img(**SMALL, seed=first.info["seed"])
    assert again.image.tobytes() == first.image.tobytes()
    assert api.png_info(first.image).parameters["Seed"] == str(first.info["seed"])
    [model] = api.get_sd_models()
    assert first.info["sd_model_hash"] == model["hash"] == model["sha256"][:10]


def test_only_masked_inpainting_keeps_every_pixel_outside_the_mask(
    api: webuiapi.WebUIApi,
) -> None:
    init = api.txt2img(**SMALL, seed=3).image.convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    result = api.img2img(
        images=[init],
        mask_image=mask,
        inpainting_fill=1,
        inpaint_full_res=True,
        inpaint_full_res_padding=8,
        mask_blur=0,
        denoising_strength=0.9,
        seed=4,
        **SMALL,
    )
    out = result.image.convert("RGB")
    changed = ImageChops.difference(out, init).getbbox()
    assert changed is not None
    left, top, right, bottom = changed
    assert min(left, top) >= 24 and max(right, bottom) <= 40


def test_hires_steps_and_karras_through_the_engine(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(
        **SMALL,
        sampler_name="DPM++ SDE",
        scheduler="Karras",
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
        denoising_strength=0.5,
    )
    assert result.image.size == (96, 96)
    infotext = result.info["infotexts"][0]
    assert "Sampler: DPM++ SDE, Schedule type: Karras," in infotext
    assert "Hires steps: 2" in infotext
