"""Real Ray heads on 127.0.0.1: the README's job recipe followed literally, and a cluster tilefarm cannot run on.

The recipe's head is started as the README says (`.venv/bin/ray start --head`) from a shell whose PATH
lacks the venv, which is what a user who did not activate it has; a job's bare `python` then is not the
venv's. The foreign head is run by the system Python with the venv's packages on PYTHONPATH but without
tilefarm installed: a cluster from another Python environment, as far as a driver can tell.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.job import JOB_CONFIG, use_the_nodes_cores
from farm.cli import main as farm_main

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a Ray dependency

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the project's `.venv/bin` (sys.executable is not resolved in a venv)
PLAIN_PATH = "/usr/bin:/bin"  # a shell where the venv is not activated
SYSTEM_PYTHON = shutil.which("python3", path=PLAIN_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_env(**extra: str) -> dict[str, str]:
    """The user's shell: no venv on PATH, no PYTHONPATH; Ray's token auth off (loopback only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    return env | {"PATH": PLAIN_PATH, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"} | extra


def _start_head(command: list[str], env: dict[str, str], temp: str) -> int:
    """`command ... start --head` on loopback with its own ports and temp dir; returns the GCS port."""
    gcs = _free_port()
    flags = [
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=1",
        "--disable-usage-stats",
        f"--temp-dir={temp}",  # short: Ray's socket paths must fit in 107 bytes
    ]
    proc = subprocess.run([*command, *flags], env=env, capture_output=True, text=True, timeout=180, cwd=temp)
    if proc.returncode:
        _stop_head(temp)
        pytest.fail(f"ray start failed: {proc.stderr[-2000:]}")
    return gcs


def _stop_head(temp: str) -> None:
    """Stop this head's processes only (`ray stop` would stop every Ray on the machine)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp in arg for arg in p.info["cmdline"] or [])]
    procs = set(mine)
    for p in mine:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    for p in psutil.wait_procs(procs, timeout=5)[1]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _write_spec(folder: Path, tiny_sdxl: Path, tiny_upscaler: Path, out: Path, **more) -> Path:
    spec = more | {
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
    path = folder / "spec.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.items()))
    return path


@dataclass(frozen=True)
class Head:
    dashboard: str  # where `ray job submit --address` goes
    address: str  # the GCS, for `farm up --address`


@pytest.fixture(scope="module")
def recipe_head():
    """The README's head: `.venv/bin/ray start --head --port=... --dashboard-host=...`, venv not on PATH."""
    temp = tempfile.mkdtemp(prefix="tf-ray-")
    dashboard = _free_port()
    command = [str(VENV_BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    gcs = _start_head(command, _plain_env(), temp)
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}")
    finally:
        _stop_head(temp)


def _submit(address: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """The README's submit, from the project folder in the same plain shell."""
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", *entrypoint]
    return subprocess.run(submit, env=_plain_env(), capture_output=True, text=True, timeout=600, cwd=REPO)


def test_readme_recipe_renders_end_to_end(recipe_head, tiny_sdxl, tiny_upscaler, tmp_path):
    out = tmp_path / "job.png"
    spec = _write_spec(tmp_path, tiny_sdxl, tiny_upscaler, out)
    # the README's entrypoint, `"$PWD/.venv/bin/python" -m cluster.job spec.toml`, with $PWD expanded
    proc = _submit(recipe_head.dashboard, [str(VENV_BIN / "python"), "-m", "cluster.job", str(spec)])
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-3000:]
    assert "succeeded" in logs
    assert "refine blend" in logs and "50/50" in logs  # the blended steps' progress reaches the job log
    with Image.open(out) as image:
        assert image.size == (512, 512)
        seed = json.loads(image.info["tilefarm"])["spec"]["seed"]  # the spec has none: the job drew one
        pixels = np.asarray(image.convert("RGB"))
    assert 0 <= seed < 2**32 and f"seed: {seed}" in logs
    # the same image as `farm render` gives here: Ray starts a job's entrypoint with OMP_NUM_THREADS=1, and CPU
    # workers take the driver's thread count, whose sums round differently (cluster.job.use_the_nodes_cores)
    local = tmp_path / "local"
    local.mkdir()
    again = _write_spec(local, tiny_sdxl, tiny_upscaler, local / "local.png", seed=seed)
    assert farm_main(["render", str(again), "--quiet"]) == 0
    with Image.open(local / "local.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_a_job_uses_the_nodes_cores_unless_its_runtime_env_names_a_count():
    def job(env_vars: dict) -> dict:
        return {"OMP_NUM_THREADS": "1", JOB_CONFIG: json.dumps({"runtime_env": {"env_vars": env_vars}})}

    forced, named, shell = job({"HF_HOME": "/models"}), job({"OMP_NUM_THREADS": "1"}), {"OMP_NUM_THREADS": "1"}
    for environ in (forced, named, shell):
        use_the_nodes_cores(environ)
    assert "OMP_NUM_THREADS" not in forced  # Ray's supervisor forced it: torch chooses, as in a shell
    assert named["OMP_NUM_THREADS"] == "1" and shell["OMP_NUM_THREADS"] == "1"  # the user's choice stands


def _farm(head: Head, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`.venv/bin/farm ARGS --address HEAD` in the user's plain shell."""
    command = [str(VENV_BIN / "farm"), *args, "--address", head.address]
    return subprocess.run(command, env=_plain_env(), capture_output=True, text=True, timeout=300, cwd=cwd)


def test_two_jobs_against_a_warm_farm_load_the_models_once(recipe_head, tiny_sdxl, tiny_upscaler, tmp_path):
    up = _farm(recipe_head, "up", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        for i in (1, 2):  # the README's job recipe, twice: each job is a client of the farm
            folder = tmp_path / f"job{i}"
            folder.mkdir()
            spec = _write_spec(folder, tiny_sdxl, tiny_upscaler, folder / "job.png")
            proc = _submit(recipe_head.dashboard, [str(VENV_BIN / "python"), "-m", "cluster.job", str(spec)])
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
            assert (folder / "job.png").exists()
        first, second = (_farm(recipe_head, "status", str(i), cwd=tmp_path).stdout for i in (1, 2))
        # the farm's one worker loaded the models for the first job and served the second with them
        assert "done" in first and "model loads: 1 " in first, first
        assert "done" in second and "model loads: 0 " in second, second
    finally:
        down = _farm(recipe_head, "down", cwd=tmp_path)
        assert down.returncode == 0, down.stderr[-3000:]


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no python3 on /usr/bin:/bin")
def test_bare_python_entrypoint_names_the_fix(recipe_head, tmp_path):
    # the head's PATH finds the system python3, which has no torch: the job says so instead of a traceback
    proc = _submit(recipe_head.dashboard, ["python3", "-m", "cluster.job", str(tmp_path / "spec.toml")])
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in logs
    assert f"cluster.job: {SYSTEM_PYTHON} cannot import" in logs, logs[-3000:]
    assert '"$PWD/.venv/bin/python" -m cluster.job spec.toml' in logs
    assert "Traceback" not in logs


def _same_minor(python: str) -> bool:
    probe = [python, "-c", "import sys; print(*sys.version_info[:2])"]
    found = subprocess.run(probe, capture_output=True, text=True, timeout=60).stdout.split()
    return found == [str(v) for v in sys.version_info[:2]]


@pytest.fixture(scope="module")
def foreign_head():
    """A head whose workers run the system Python, with Ray (the venv's packages) but no tilefarm."""
    if SYSTEM_PYTHON is None or not _same_minor(SYSTEM_PYTHON):
        pytest.skip("needs a system python3 of this Python's minor version (Ray's compiled core must load)")
    temp = tempfile.mkdtemp(prefix="tf-ray-")
    env = _plain_env(PYTHONPATH=sysconfig.get_paths()["purelib"])  # packages, but no .pth: no editable tilefarm
    command = [SYSTEM_PYTHON, "-m", "ray.scripts.scripts", "start", "--head", "--include-dashboard=false"]
    gcs = _start_head(command, env, temp)
    try:
        yield f"127.0.0.1:{gcs}"
    finally:
        _stop_head(temp)


def _farm_render(spec: Path, cluster: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The real console script, run from a folder that holds no project code (workers get the driver's cwd)."""
    command = [str(VENV_BIN / "farm"), "render", str(spec), "--cluster", cluster]
    env = os.environ | {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"} | env
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cluster_whose_workers_cannot_import_tilefarm(foreign_head, tiny_sdxl, tiny_upscaler, tmp_path):
    spec = _write_spec(tmp_path, tiny_sdxl, tiny_upscaler, tmp_path / "never.png")
    # the driver accepts the cluster's Python patch version, so the pre-flight is what finds the problem
    proc = _farm_render(spec, foreign_head, tmp_path, RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL="minor")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err and "RayTaskError" not in err
    port = foreign_head.rsplit(":", 1)[1]
    assert re.search(rf"the Ray cluster at [\d.]+:{port} cannot run tilefarm", err), err[-3000:]
    assert f"its workers run {SYSTEM_PYTHON}" in err and "No module named 'cluster'" in err
    assert "`.venv/bin/ray start --head`" in err and "`ray stop`" in err
    assert not (tmp_path / "never.png").exists()


def test_cluster_auto_on_another_python(foreign_head, tiny_sdxl, tiny_upscaler, tmp_path):
    theirs = subprocess.run([SYSTEM_PYTHON, "-V"], capture_output=True, text=True).stdout.split()[-1]
    ours = ".".join(map(str, sys.version_info[:3]))
    if theirs == ours:
        pytest.skip("the system Python is this Python's version: Ray accepts the driver")
    spec = _write_spec(tmp_path, tiny_sdxl, tiny_upscaler, tmp_path / "never.png")
    proc = _farm_render(spec, "auto", tmp_path, RAY_ADDRESS=foreign_head)  # `auto` joins the cluster RAY_ADDRESS names
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err
    port = foreign_head.rsplit(":", 1)[1]
    assert re.search(rf"--cluster auto: the Ray cluster at [\d.]+:{port} runs Ray", err), err[-3000:]
    assert f"on Python {theirs}, but tilefarm runs" in err and f"on Python {ours} ({VENV_BIN}/python" in err
    assert "`.venv/bin/ray start --head`" in err
    assert not (tmp_path / "never.png").exists()
