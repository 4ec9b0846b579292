"""What the farm tests share: a spec as a TOML file, submitting to the farm on this machine, waiting for a render."""

import time
from dataclasses import fields

from cluster import farm_client
from farm.executor import prepare
from pipeline.spec import RenderSpec

WAIT_S = 240.0  # a bound for a render on a busy 2-core machine; a render here takes seconds


def write_toml(spec: RenderSpec, path):
    """The spec's fields that differ from the defaults, as a TOML spec file."""
    default, lines = RenderSpec(), []
    for f in fields(RenderSpec):
        value = getattr(spec, f.name)
        if value != getattr(default, f.name):
            value = str(value).lower() if isinstance(value, bool) else value
            lines.append(f'{f.name} = "{value}"' if isinstance(value, str) else f"{f.name} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def render_locally(spec: RenderSpec, folder) -> bytes:
    """The spec rendered locally by `farm render`: the bytes a farm render must match."""
    from farm.cli import main

    out = folder / "local.png"
    assert main(["render", str(write_toml(spec, folder / "spec.toml")), "--out", str(out), "--quiet"]) == 0
    return out.read_bytes()


def controller():
    return farm_client.controller("auto")


def submit(spec: RenderSpec, priority: int = 0) -> int:
    """Submit as `farm render --farm` does: the spec checked here, the client's CPU thread count sent along."""
    import torch

    plan = prepare(spec, "cpu", cluster=True)
    options = {"cpu_threads": torch.get_num_threads(), "metadata": True}
    return farm_client.call(controller().submit, plan.spec.to_dict(), options, priority)


def wait_for(render_id: int, states=("done", "failed", "canceled")) -> dict:
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        record = farm_client.call(controller().status, render_id)
        if record["state"] in states:
            return record
        time.sleep(0.05)
    raise AssertionError(f"render {render_id} still {record['state']} after {WAIT_S} s")
