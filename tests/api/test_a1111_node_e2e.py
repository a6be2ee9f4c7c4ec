"""End to end, a node that runs its tasks on an AUTOMATIC1111 instance: a network DAN server
(keys required, no models of its own), a gateway `dan node --backend a1111` process, and a
second DAN server playing the instance through its ``/sdapi/v1`` facade (its worker runs the
FakeEngine, so the colour of an image says which seed made it there).

A user's txt2img goes network -> gateway -> instance and its image comes back; a cancel on the
network interrupts the instance's task; an instance killed under a task loses the task to
nobody: it goes back to the network's queue (one try) and runs again once the instance is
back, while the gateway stays up. The gateway process can never import torch: it dies at once
if anything tries.
"""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dan.api.app import create_app
from dan.domain import TaskRecord, TaskStatus
from dan.imaging import read_parameters
from dan.services import Services, build_services
from dan.workers.a1111.client import A1111Client, A1111Unreachable
from tests.api.conftest import install_dummy_checkpoint, make_settings
from tests.fixtures.fake_instance import Instance, instance_settings
from tests.fixtures.live import serving
from tests.fixtures.server import free_port

pytestmark = pytest.mark.slow

STEP_S = 0.05  # the instance's FakeEngine, per step
QUICK, SLOW = 3, 120  # steps of a quick task and of one that runs for seconds
# The gateway process: `dan node` under an import hook that kills it if torch is imported.
GATEWAY = """
import os, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            print(f"THE A1111 NODE IMPORTED {name}", flush=True)
            os._exit(97)
        return None

sys.meta_path.insert(0, NoTorch())
from dan.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Network:
    client: httpx.Client  # the network server, as its users call it
    services: Services
    user_key: str
    donor_key: str
    instance: Instance
    instance_checkpoint: str  # sha256
    instance_key: str
    gateway: subprocess.Popen[bytes]
    root: Path

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {key or self.user_key}"}
        response = self.client.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def submit(self, seed: int, steps: int, prompt: str = "a fox") -> str:
        body = {
            "prompt": prompt,
            "seed": seed,
            "steps": steps,
            "width": 64,
            "height": 64,
            "model": self.instance_checkpoint,
        }
        return str(self.call("POST", "/api/sd/txt2img/async", json=body)["taskId"])

    def status(self, task_id: str) -> dict[str, Any]:
        return dict(self.call("POST", "/api/sd/task/status", json={"taskId": task_id}))

    def record(self, task_id: str) -> TaskRecord:
        record = self.services.store.get(task_id)
        assert record is not None
        return record

    def online(self) -> list[str]:
        nodes = self.call("GET", "/api/nodes")
        return [node["name"] for node in nodes if node["status"] == "online"]

    def instance_tasks(self) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.instance_key}"}
        response = httpx.get(f"{self.instance.url}/api/sd/tasks", headers=headers, timeout=10)
        return list(response.json()["data"]["tasks"])

    def logs(self) -> str:
        gateway = (self.root / "gateway.log").read_text(errors="replace")
        return f"--- gateway\n{gateway[-8000:]}\n--- instance\n{self.instance.log()[-6000:]}"

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.gateway.poll() is None:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        ended = (
            f"the gateway exited ({self.gateway.returncode})"
            if self.gateway.poll() is not None
            else ""
        )
        raise AssertionError(f"timed out waiting for {what} {ended}\n{self.logs()}")


def fake_colour(seed: int) -> tuple[int, ...]:
    """The colour of the FakeEngine's image for ``seed`` (a grey)."""
    return tuple(random.Random(seed).randrange(256) for _ in range(3))


def start_instance(root: Path) -> tuple[Instance, str, str]:
    """The instance with a checkpoint and a LoRA, and a key of it; (instance, its checkpoint's
    sha256, key)."""
    checkpoint = install_dummy_checkpoint(root / "models", "instance-base")
    lora = root / "models" / "loras" / "ink.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(os.urandom(128))
    services = build_services(instance_settings(root))
    try:
        key = services.accounts.issue_key("gateway").key.key
        sha = services.registry.hashes.sha256(checkpoint)
    finally:
        services.close()
    instance = Instance(root, free_port(), STEP_S)
    instance.start()
    return instance, sha, key


def start_gateway(root: Path, server: str, donor_key: str, instance: Instance, key: str) -> Any:
    env = {
        **os.environ,
        "DAN_DATA_DIR": str(root / "gateway"),
        "DAN_MODELS_DIR": str(root / "gateway" / "models"),  # stays empty
        "DAN_API_KEY": donor_key,
        # HTTP Basic, as A1111's --api-auth wants it (DAN's facade reads the key there too).
        "DAN_A1111_USER": "gateway",
        "DAN_A1111_PASSWORD": key,
    }
    arguments = ["node", "--backend", "a1111", "--a1111-url", instance.url]
    arguments += ["--server", server, "--name", "gateway"]
    with (root / "gateway.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", GATEWAY, *arguments],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("a1111-node")
    settings = make_settings(root / "network", auth="required", lease_s=5.0, worker=False)
    services = build_services(settings)
    donor_key = services.accounts.issue_key("donor", can_run_nodes=True).key.key
    user_key = services.accounts.issue_key("user").key.key
    instance, sha, instance_key = start_instance(root / "instance")
    gateway = None
    try:
        with serving(create_app(services)) as client:
            gateway = start_gateway(root, str(client.base_url), donor_key, instance, instance_key)
            network = Network(
                client, services, user_key, donor_key, instance, sha, instance_key, gateway, root
            )
            network.wait("the gateway online", lambda: network.online() == ["gateway"])
            yield network
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(30)
        instance.kill()
        services.close()


def image_of(data: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data["images"][0])))


def test_the_gateway_reports_the_instances_checkpoint(net: Network) -> None:
    info = net.call("GET", "/api/sd/supportedModelInfo")
    # The node read the family from the checkpoint's header (its file is on this machine).
    expected = {"name": "instance-base", "hash": net.instance_checkpoint, "family": "sd15"}
    assert info["Models"] == [expected]
    [node] = net.call("GET", "/api/nodes/mine", key=net.donor_key)
    assert node["name"] == "gateway" and node["capabilities"]["backend"] == "a1111"
    assert node["capabilities"]["families"] == ["sd15"]  # what its checkpoints are
    assert net.instance_checkpoint in node["installed"]
    assert node["loaded"] == [net.instance_checkpoint]  # the instance's, from its options


def test_a_txt2img_runs_on_the_instance_and_comes_back(net: Network) -> None:
    task_id = net.submit(seed=1234, steps=QUICK)
    done = net.wait("the task to finish", lambda: (s := net.status(task_id))["status"] >= 2 and s)
    assert done["status"] == TaskStatus.SUCCESS, done
    image = image_of(done)
    assert image.size == (64, 64)
    assert image.convert("RGB").getpixel((10, 10)) == fake_colour(1234)  # made on the instance
    parameters = read_parameters(base64.b64decode(done["images"][0])) or ""
    assert f"Model hash: {net.instance_checkpoint[:10]}" in parameters
    assert "Seed: 1234" in parameters and "Steps: 3" in parameters
    latest = net.instance_tasks()[0]
    assert latest["seed"] == 1234 and latest["steps"] == QUICK and latest["prompt"] == "a fox"
    assert net.record(task_id).attempts == 1


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_hires_inpainting_upscale_and_detect_go_through_too(net: Network) -> None:
    model = net.instance_checkpoint
    hires = {"scale": 1.5, "denoising_strength": 0.5, "upscaler": "Latent"}
    body = {"prompt": "a fox", "seed": 5, "steps": QUICK, "width": 64, "height": 64}
    done = net.call("POST", "/api/sd/txt2img", json=body | {"model": model, "upscale": hires})
    assert image_of(done).size == (96, 96)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white: redraw the middle only
    inpaint = {"mask": b64_png(mask), "mask_blur": 0, "mask_mode": 0, "inpaint_area": 0}
    red = b64_png(Image.new("RGB", (64, 64), (255, 0, 0)))
    body |= {"model": model, "init_image": red, "denoising_strength": 0.75, "inpaint": inpaint}
    redrawn = image_of(net.call("POST", "/api/sd/img2img", json=body)).convert("RGB")
    assert redrawn.getpixel((32, 32)) == fake_colour(5) and redrawn.getpixel((4, 4)) == (255, 0, 0)

    small = b64_png(Image.new("RGB", (20, 12), (0, 128, 255)))
    upscaled = net.call("POST", "/api/sd/upscale", json={"image": small, "upscalingRate": 2.5})
    assert image_of(upscaled).size == (50, 30)

    detected = net.call(
        "POST", "/api/sd/controlnet/detect", json={"image": small, "preprocess": "canny"}
    )
    assert image_of(detected).size == (20, 12)
    kinds = [task["kind"] for task in net.instance_tasks()[:4]]
    assert kinds == ["detect", "upscale", "img2img", "txt2img"]


def test_a_lora_goes_to_the_instance_by_its_name_there(net: Network) -> None:
    info = net.call("GET", "/api/sd/supportedModelInfo")
    assert [lora["name"] for lora in info["LoRAs"]] == ["ink"]
    task_id = net.submit(seed=99, steps=QUICK, prompt="a fox <lora:ink:0.5>")
    done = net.wait("the task to finish", lambda: (s := net.status(task_id))["status"] >= 2 and s)
    assert done["status"] == TaskStatus.SUCCESS, done
    assert "Lora hashes" in (read_parameters(base64.b64decode(done["images"][0])) or "")
    latest = net.instance_tasks()[0]
    assert latest["seed"] == 99 and "<lora:ink:0.5>" in latest["prompt"]


def test_a_cancel_on_the_network_interrupts_the_instance(net: Network) -> None:
    task_id = net.submit(seed=77, steps=SLOW)
    net.wait(
        "the instance's progress relayed to the network",
        lambda: (s := net.status(task_id))["status"] == TaskStatus.PROCESSING and s["progress"] > 0,
    )
    preview = net.wait("a step preview relayed", lambda: net.record(task_id).preview)
    assert Image.open(io.BytesIO(preview)).format == "PNG"
    net.call("POST", "/api/sd/task/cancel", json={"taskId": task_id})
    net.wait("the network task to end", lambda: net.status(task_id)["status"] >= 2)
    record = net.record(task_id)
    assert record.status == TaskStatus.CANCELLED, record
    # The instance's own task stopped too, long before its 120 steps.
    latest = net.wait(
        "the instance's task to end",
        lambda: (t := net.instance_tasks()[0])["status"] >= 2 and t,
    )
    assert latest["seed"] == 77 and latest["status"] == 3, latest
    assert net.gateway.poll() is None


def test_a_dead_instance_loses_no_task_and_the_gateway_waits_for_it(net: Network) -> None:
    task_id = net.submit(seed=4321, steps=SLOW // 2)
    net.wait(
        "the task to run on the instance",
        lambda: (s := net.status(task_id))["status"] == TaskStatus.PROCESSING and s["progress"] > 0,
    )
    net.instance.kill()
    # The gateway hands the task back at once (one try) and goes offline; it does not die.
    net.wait("the gateway offline", lambda: net.online() == [])
    record = net.record(task_id)
    assert record.status == TaskStatus.PENDING and record.attempts == 1, record
    assert net.gateway.poll() is None
    net.instance.start()
    net.wait("the gateway back online", lambda: net.online() == ["gateway"])
    done = net.wait(
        "the task to finish", lambda: (s := net.status(task_id))["status"] >= 2 and s, 90
    )
    assert done["status"] == TaskStatus.SUCCESS, done
    assert image_of(done).convert("RGB").getpixel((5, 5)) == fake_colour(4321)
    assert net.record(task_id).attempts == 2


def test_credentials_go_to_the_instance_and_a_refusal_is_not_a_task_failure(
    net: Network,
) -> None:
    with A1111Client(net.instance.url, api_key=net.instance_key) as by_key:
        [model] = by_key.get("/sdapi/v1/sd-models")
    assert model["sha256"] == net.instance_checkpoint
    wrong = A1111Client(net.instance.url, user="gateway", password="sk-wrong")
    with wrong, pytest.raises(A1111Unreachable, match="--a1111-user and --a1111-password"):
        wrong.get("/sdapi/v1/sd-models")


def test_the_gateway_never_imported_torch(net: Network) -> None:
    assert net.gateway.poll() is None, net.logs()
    assert "IMPORTED" not in (net.root / "gateway.log").read_text(errors="replace")
