"""A real `ray start --head` on 127.0.0.1 and `ray job submit -- python -m cluster.job spec.toml`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    bin_dir = Path(sys.executable).parent
    ray = shutil.which("ray", path=str(bin_dir)) or "ray"
    # Ray 2.60 turns token auth on; a loopback test head runs without it
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    gcs, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="tf-ray-")  # short: Ray's socket paths must fit in 107 bytes
    start = [
        ray,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=1",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        yield ray, f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_renders_end_to_end(ray_head, tiny_sdxl, tiny_upscaler, tmp_path):
    ray, address, env = ray_head
    out = tmp_path / "job.png"
    spec = {
        "model": str(tiny_sdxl),
        "upscaler": str(tiny_upscaler),
        "prompt": "a harbour at night",
        "width": 512,
        "height": 512,
        "steps": 2,
        "base_steps": 2,
        "cfg": 3.0,
        "tile": 128,
        "native": 128,
        "upscale_tile": 64,
        "out": str(out),
    }
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.items()))
    submit = [
        ray,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "cluster.job",
        str(spec_file),
    ]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-3000:]
    assert "succeeded" in logs
    assert "refine blend" in logs and "50/50" in logs  # the blended steps' progress reaches the job log
    with Image.open(out) as image:
        assert image.size == (512, 512)
        seed = json.loads(image.info["tilefarm"])["spec"]["seed"]  # the spec has none: the job drew one
    assert 0 <= seed < 2**32 and f"seed: {seed}" in logs
