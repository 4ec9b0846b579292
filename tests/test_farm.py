"""The warm farm on a real local Ray with fake GPUs: warm workers across renders, the image of a local render,
cancel, down and up again. Tests run in file order over one farm (module scope)."""

import json
import time
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")

from farm_helpers import WAIT_S, controller, render_locally, submit, wait_for, write_toml  # noqa: E402

from cluster import farm_client  # noqa: E402
from cluster.queue import RenderQueue, expire_results  # noqa: E402
from farm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    try:
        farm_client.down("auto")  # a failed test leaves no detached actors behind
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def spec(small_spec):
    """A 128 px render from a 64 px base: 2 + 1 chess tiles, a few seconds."""
    return replace(small_spec, width=128, height=128, native=64, tile=64, steps=1, base_steps=2, cfg=1.0)


@pytest.fixture(scope="module")
def farm(local_ray, tmp_path_factory):
    state = tmp_path_factory.mktemp("farm-state")
    assert main(["up", "--state-dir", str(state), "--max-running", "1"]) == 0
    return state


@pytest.fixture(scope="module")
def local_png(spec, tmp_path_factory):
    return render_locally(spec, tmp_path_factory.mktemp("local"))


def test_two_renders_back_to_back_share_warm_workers_and_match_a_local_render(farm, spec, local_png, tmp_path):
    first = submit(spec)  # runs while the client below submits the second (the farm runs one at a time)
    out = tmp_path / "farm.png"
    assert main(["render", str(write_toml(spec, tmp_path / "spec.toml")), "--farm", "auto", "--out", str(out)]) == 0
    second = farm_client.call(controller().list, 1)[0]["id"]
    assert second > first
    a, b = wait_for(first), wait_for(second)
    assert a["state"] == b["state"] == "done"
    infos = farm_client.call(controller().worker_infos)
    assert len(infos) == 2 and len({i["pid"] for i in infos}) == 2
    assert set(a["stats"]["workers"]) == set(b["stats"]["workers"]) == {0, 1}  # both renders on both workers
    assert [len(i["loads"]) for i in infos] == [1, 1]  # each worker loaded the models once ...
    assert all(e["render"] == first for i in infos for e in i["loads"])  # ... for the first render
    assert a["stats"]["loads"] == 2 and a["stats"]["load_seconds"] > 0
    assert b["stats"]["loads"] == 0 and b["stats"]["load_seconds"] == 0  # the second spent no time loading
    assert out.read_bytes() == local_png  # pixels and metadata, bit for bit
    assert farm_client.call(controller().image, first) == local_png


def test_a_ray_job_is_a_client_of_the_farm_when_one_is_up(farm, spec, local_png, tmp_path):
    from cluster.job import main as job_main

    before = len(farm_client.call(controller().list, 100))
    out = tmp_path / "job.png"
    assert job_main([str(write_toml(spec, tmp_path / "spec.toml")), "--out", str(out)]) == 0
    assert len(farm_client.call(controller().list, 100)) == before + 1  # it went through the farm's queue
    infos = farm_client.call(controller().worker_infos)
    assert all(len(i["loads"]) == 1 for i in infos)  # on the warm workers: no model loaded again
    assert out.read_bytes() == local_png


def test_a_client_that_disconnects_mid_render_leaves_the_render_to_finish(farm, spec, tmp_path):
    import subprocess
    import sys

    long = replace(spec, width=512, height=512, native=128, tile=128)  # 5 x 5 chess tiles
    toml, out = write_toml(long, tmp_path / "long.toml"), tmp_path / "client.png"
    before = {r["id"] for r in farm_client.call(controller().list, 1000)}
    client = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "render", str(toml), "--farm", "auto", "--out", str(out), "--quiet"]
    )
    try:
        end, record = time.monotonic() + WAIT_S, None
        while time.monotonic() < end and not (record and record["progress"]):
            mine = [r["id"] for r in farm_client.call(controller().list, 1000) if r["id"] not in before]
            record = farm_client.call(controller().status, mine[0]) if mine else None
            assert client.poll() is None, "the client ended before its render made progress"
            time.sleep(0.05)
    finally:
        client.kill()  # the client's process is gone mid-render, as a laptop that goes to sleep
        client.wait()
    assert record["state"] == "running" and not out.exists()
    finished = wait_for(record["id"])
    assert finished["state"] == "done"
    again = wait_for(submit(long))  # the same spec from a client that stays: the same picture
    image = farm_client.call(controller().image, record["id"])
    assert image == farm_client.call(controller().image, again["id"])


def test_bad_input_is_refused_before_anything_is_sent(farm, spec, tmp_path, capsys):
    before = len(farm_client.call(controller().list, 1000))
    toml = write_toml(replace(spec, width=100, height=100), tmp_path / "bad.toml")
    assert main(["render", str(toml), "--farm", "auto", "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert main(["status", "999"]) == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and "no render 999" in err and "Traceback" not in err
    assert len(farm_client.call(controller().list, 1000)) == before


def test_a_render_of_higher_priority_runs_at_once_then_cancel_stops_the_other(farm, spec, local_png, capsys):
    long = replace(spec, width=512, height=512, native=128, tile=128)  # 5 x 5 chess tiles
    running, queued = submit(long), submit(long)
    assert main(["cancel", str(queued)]) == 0  # still queued: canceled at once
    assert wait_for(running, ("running",))["state"] == "running"
    end = time.monotonic() + WAIT_S
    while not farm_client.call(controller().status, running)["progress"] and time.monotonic() < end:
        time.sleep(0.05)
    # the farm runs one render at a time, but one that outranks it starts now and takes the workers first
    urgent = wait_for(submit(spec, priority=5))
    assert urgent["state"] == "done" and farm_client.call(controller().image, urgent["id"]) == local_png
    assert farm_client.call(controller().status, running)["state"] == "running"
    assert main(["cancel", str(running)]) == 0
    canceled = wait_for(running)
    assert canceled["state"] == "canceled" and wait_for(queued)["state"] == "canceled"
    reached = canceled["stats"]["progress"]
    assert reached and "chess odd" not in reached  # stopped long before its last pass
    assert "canceled (it was running" in capsys.readouterr().out
    assert farm_client.call(controller().idle_workers) == 2
    infos = farm_client.call(controller().worker_infos)  # the workers answer: nothing is queued on them
    assert [len(i["loads"]) for i in infos] == [1, 1]  # still the models of the first render


def test_remote_specs_name_only_files_under_the_model_roots(small_spec, tiny_dir, tmp_path):
    from cluster.remote_spec import Forbidden, check_remote_spec
    from pipeline.errors import SpecError

    good = replace(small_spec, width=128, height=128, native=64, tile=64).to_dict()
    assert check_remote_spec(good, [tiny_dir]).model == good["model"]
    (tmp_path / "link").symlink_to("/etc")
    cases = [
        ({"model": "/etc/passwd"}, [tiny_dir], Forbidden, "outside the farm's model roots"),
        ({"model": f"{tiny_dir}/../../etc/passwd"}, [tiny_dir], Forbidden, "'..' is not allowed"),
        ({"upscaler": "compact-4x.safetensors"}, [tiny_dir], Forbidden, "give an absolute path"),
        ({"model": str(tmp_path / "link" / "passwd")}, [tmp_path], Forbidden, "outside the farm's model roots"),
        ({}, [], Forbidden, "farm up --model-root"),
        ({"width": 100000, "height": 100000}, [tiny_dir], SpecError, "at most 16384 px"),
        ({"out": "/etc/cron.d/x.png"}, [tiny_dir], SpecError, "cannot name an output file"),
    ]
    for change, roots, error, message in cases:
        with pytest.raises(error, match=message):
            check_remote_spec(good | change, roots)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_api_submit_status_image_with_a_key(farm, spec, local_png, tiny_dir, tmp_path, capsys):
    import requests
    import torch

    from pipeline.errors import UserError

    with pytest.raises(UserError, match="only with a key"):
        farm_client.start_api("0.0.0.0", free_port(), "", [str(tiny_dir)])
    key, port = "k" * 32, free_port()
    (tmp_path / "key").write_text(key)
    up = ["up", "--state-dir", str(farm), "--max-running", "1", "--http-port", str(port)]
    assert main([*up, "--model-root", str(tiny_dir), "--api-key-file", str(tmp_path / "key")]) == 0
    assert "(API key required)" in capsys.readouterr().out
    url, auth = f"http://127.0.0.1:{port}/v1/renders", {"Authorization": f"Bearer {key}"}
    body = {"spec": spec.to_dict(), "cpu_threads": torch.get_num_threads()}
    assert requests.post(url, json=body, timeout=60).status_code == 401
    for change, code, message in [
        ({"model": "/etc/passwd"}, 403, "outside the farm's model roots"),
        ({"model": f"{tiny_dir}/../x"}, 403, "'..' is not allowed"),
        ({"width": 100000, "height": 100000}, 400, "at most 16384 px"),
    ]:
        refused = requests.post(url, json={"spec": body["spec"] | change}, headers=auth, timeout=60)
        assert refused.status_code == code and message in refused.json()["error"]
    created = requests.post(url, json=body, headers=auth, timeout=60)
    assert created.status_code == 201 and created.json()["seed"] == spec.seed
    render_id = created.json()["id"]
    assert requests.get(f"{url}/{render_id}/events", timeout=60).status_code == 401
    with requests.get(f"{url}/{render_id}/events", headers=auth, stream=True, timeout=WAIT_S) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in stream.iter_lines(decode_unicode=True) if line]  # ends with the render
    assert all(line.startswith("data: ") for line in lines)
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    order = ("queued", "running", "done")
    assert [e["state"] for e in events] == sorted((e["state"] for e in events), key=order.index)
    assert events[-1]["state"] == "done" and events[-1]["stats"]["stages"]
    counts = [[sum(c[i] for c in e["progress"].values()) for i in (0, 1)] for e in events]
    assert counts[-1][0] == counts[-1][1] > 0, events  # the done event shows every task, even one done between polls
    for (done, total), (more_done, more_total) in zip(counts, counts[1:], strict=False):
        assert done <= more_done and total <= more_total, counts
    running = [count for e, count in zip(events, counts, strict=True) if e["state"] == "running"]
    assert all(a != b for a, b in zip(running, running[1:], strict=False)), running  # only what changed
    image = requests.get(f"{url}/{render_id}/image", headers=auth, timeout=60)
    assert image.headers["content-type"] == "image/png" and image.content == local_png
    assert requests.get(f"{url}/9999", headers=auth, timeout=60).status_code == 404
    assert requests.get(f"{url}/9999/events", headers=auth, timeout=60).status_code == 404
    # a day later (the sweep's clock, not a wait): every image done by now expires, this one with the others
    assert render_id in expire_results(RenderQueue(farm / "queue.sqlite"), 24 * 3600, time.time() + 24 * 3600 + 1)
    gone = requests.get(f"{url}/{render_id}/image", headers=auth, timeout=60)
    assert gone.status_code == 410 and f"render {render_id} expired" in gone.json()["detail"]
    capsys.readouterr()
    assert main(["status", str(render_id)]) == 2
    out, err = capsys.readouterr()
    assert "image: expired" in out and f"render {render_id} expired" in err and "Traceback" not in err


def test_a_killed_controller_restarts_and_the_render_gives_the_same_image(farm, spec, local_png):
    workers = farm_client.call(controller().worker_infos)
    before = farm_client.call(controller().ready)["pid"]
    render_id = submit(spec)
    first_start = wait_for(render_id, ("running",))["started"]
    ray.kill(controller(), no_restart=False)  # its process dies mid-render; Ray starts it again
    record = wait_for(render_id)
    assert record["state"] == "done" and record["started"] > first_start  # queued again by the new one, run again
    assert farm_client.call(controller().ready)["pid"] != before
    assert farm_client.call(controller().image, render_id) == local_png
    assert farm_client.call(controller().worker_infos) == workers  # the same warm workers: no model loaded


def test_down_leaves_no_actors_and_up_resumes_what_was_queued_by_priority(farm, spec, local_png, capsys):
    pids = {i["pid"] for i in farm_client.call(controller().worker_infos)}
    running = submit(replace(spec, width=512, height=512, native=128, tile=128))  # still running at `farm down`
    wait_for(running, ("running",))
    cut, low, high = submit(spec), submit(replace(spec, seed=8), priority=-1), submit(replace(spec, seed=9), priority=5)
    assert main(["down"]) == 0
    assert farm_client.farm_actors() == []
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"] == []
    records = {r["id"]: r for r in RenderQueue(farm / "queue.sqlite").list()}
    assert [records[i]["state"] for i in (running, cut, low, high)] == ["queued"] * 4  # the queue persists
    assert main(["up", "--state-dir", str(farm), "--max-running", "1"]) == 0
    assert f"renders {running}, {cut}, {low}, {high} are queued" in capsys.readouterr().out
    assert main(["cancel", str(running)]) == 0  # resumed first (priority 0, oldest); not needed here
    done = [wait_for(i) for i in (cut, low, high)]
    assert [r["state"] for r in done] == ["done"] * 3
    assert done[2]["started"] < done[0]["started"] < done[1]["started"]  # priority, then submit time
    assert farm_client.call(controller().image, cut) == local_png  # the same image after the restart
    assert pids.isdisjoint(i["pid"] for i in farm_client.call(controller().worker_infos))  # new workers
    capsys.readouterr()
    assert main(["ls"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [high, "done", "5"] in [[int(r[0]), r[1], r[2]] for r in rows]
