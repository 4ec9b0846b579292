"""Entry point for Ray job submission.

    ray job submit --address http://HEAD:8265 --working-dir . -- "$PWD/.venv/bin/python" -m cluster.job spec.toml

The entrypoint names the project's interpreter because Ray runs it through /bin/sh with the PATH the
head node was started with: a bare `python` there is whatever that PATH finds (often the system one,
without torch), not the venv `ray start` came from.

Runs on the head node as the job's driver, joins the cluster, renders the spec over its GPU actors
and writes the PNG the spec's `out` names, on the machine the driver runs on (use an absolute path:
the job's working directory is a temporary copy). With a warm farm up on the cluster (`farm up`) the
job is its client: the farm's resident workers render the spec and `ray job stop` cancels the render
there; without one it starts its own actors. Progress goes to the job log, with the seed (a
spec without one gets a drawn seed, stored in the PNG); the run folder is in the driver's state
folder (`farm runs` on the head node lists it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job supervisor gives its entrypoint the job's runtime_env here


def wrong_python(missing: str) -> str:
    """The job's message when its interpreter lacks the project's packages (a bare `python` entrypoint)."""
    return (
        f"cluster.job: {sys.executable} cannot import {missing}: a Ray job's `python` is the one the "
        "head node's PATH finds, not the venv `ray start` was run from. Name the project's interpreter in the "
        "entrypoint: ray job submit --address http://HEAD:8265 --working-dir . -- "
        '"$PWD/.venv/bin/python" -m cluster.job spec.toml'
    )


def use_the_nodes_cores(environ=os.environ) -> None:
    """Let torch choose the driver's thread count as in a shell, where Ray's job supervisor forced one thread.

    The supervisor is an actor that reserves no CPU, so Ray sets OMP_NUM_THREADS=1 in it, and the entrypoint
    inherits it. The driver's own work (the blended sampler's steps over the whole canvas, composites, the 8-bit
    conversion) would then run on one core, and CPU workers, which take the driver's thread count
    (WorkerConfig.cpu_threads), would round differently from a `farm render` of the same spec. A count the job's
    runtime_env names (--runtime-env-json) stands. Call before torch loads."""
    if JOB_CONFIG not in environ or environ.get("OMP_NUM_THREADS") != "1":
        return
    try:
        named = (json.loads(environ[JOB_CONFIG]).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        named = {}
    if "OMP_NUM_THREADS" not in named:
        del environ["OMP_NUM_THREADS"]


def farm_is_up() -> bool:
    """Whether the cluster this job runs on has a warm farm's controller (`farm up`)."""
    import ray

    from cluster.farm_client import join
    from cluster.farm_names import CONTROLLER, NAMESPACE

    joined_here = not ray.is_initialized()
    join("auto")
    try:
        ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        if joined_here:
            ray.shutdown()  # the job's own actors join the cluster afresh, outside the farm's namespace
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="TOML render spec (with out = an absolute .png path)")
    parser.add_argument("--out", help="output .png (overrides the spec's out)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-metadata", action="store_true", help="write the PNG with no text chunks")
    args = parser.parse_args(argv)
    missing = [name for name in ("torch", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        print(wrong_python(" or ".join(missing)), file=sys.stderr)
        return 2
    use_the_nodes_cores()
    from farm.cli import main as farm_main  # after the check: what it imports may need them (torch among them)

    # with a warm farm up (`farm up`), the job is its client: the farm's resident workers render it, and
    # `ray job stop` cancels it there; without one, the job starts its own actors
    on_farm = farm_is_up()
    forwarded = ["render", args.spec, *(["--farm", "auto", "--cancel-on-stop"] if on_farm else ["--cluster", "auto"])]
    if args.out:
        forwarded += ["--out", args.out]
    if args.workers is not None and not on_farm:
        forwarded += ["--workers", str(args.workers)]
    if args.gpus_per_worker is not None and not on_farm:
        forwarded += ["--gpus-per-worker", str(args.gpus_per_worker)]
    if args.overwrite:
        forwarded.append("--overwrite")
    if args.no_metadata:
        forwarded.append("--no-metadata")
    return farm_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
