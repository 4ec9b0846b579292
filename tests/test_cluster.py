"""The Ray executor on a real local Ray with fake GPUs: same pixels as the local executor, faults, checks."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.actor import start_actors  # noqa: E402
from cluster.executor import ClusterError, ClusterExecutor, preflight, run_cluster  # noqa: E402
from cluster.inline import INLINE_BYTES, INLINE_VAR  # noqa: E402
from cluster.scheduler import DEPTH  # noqa: E402
from farm.cli import main  # noqa: E402
from farm.executor import prepare, run_local  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.graph.worker import WorkerConfig  # noqa: E402
from pipeline.render import ENCODE_TILES_PER_TASK, render  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster_plan(small_spec):
    return prepare(small_spec)


@pytest.fixture(scope="module")
def local_image(cluster_plan):
    return run_local(cluster_plan).result.image


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_same_pixels_as_the_local_executor(local_ray, cluster_plan, local_image, workers):
    run = run_cluster(cluster_plan, workers=workers)
    assert run.workers == workers
    assert torch.equal(run.result.image, local_image)
    used = {d.actor for d in run.executor.scheduler.log}
    assert used == set(range(workers))  # every actor took work


@pytest.fixture(scope="module")
def blend_plan(small_spec):
    return prepare(replace(small_spec, tiling="blend"))


@pytest.fixture(scope="module")
def blend_local_rows(blend_plan):
    rows = []
    return run_local(blend_plan, record=rows.append).result.image, rows


@pytest.fixture(scope="module")
def blend_local(blend_local_rows):
    return blend_local_rows[0]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_blended_steps_give_the_same_pixels_as_the_local_executor(local_ray, blend_plan, blend_local, workers):
    faults = {("blend", 1)} if workers == 2 else set()  # and an actor lost mid-step changes nothing
    run = run_cluster(blend_plan, workers=workers, faults=faults)
    assert torch.equal(run.result.image, blend_local)
    steps = [d for d in run.executor.scheduler.log if d.stage == "blend"]
    assert {d.actor for d in steps} == set(range(workers))
    rerun = len(steps) - blend_plan.spec.steps * len(blend_plan.blend_batches)
    # the killed call runs again, and so may the one queued behind it (cluster.scheduler.DEPTH)
    assert 1 <= rerun <= DEPTH if faults else rerun == 0


def test_stages_overlap_and_actors_killed_in_the_encode_and_decode_change_nothing(
    local_ray, blend_plan, blend_local_rows
):
    image, local_rows = blend_local_rows
    count = {
        stage: sum(r["stage"] == stage for r in local_rows if r["kind"] == "task") for stage in ("encode", "blend")
    }
    # an actor's process dies on a base step's branch, one on an encode tile, one on a decode tile and one on a
    # decode tile's blend
    faults = {("base", 3), ("encode", 3), ("decode", 2), ("decode blend", 1)}
    # and the last encode tile and the last refine task are stragglers: what does not read them goes on
    faults |= {("encode", count["encode"] - 1, "slow"), ("blend", count["blend"] - 1, "slow")}
    rows = []
    run = run_cluster(blend_plan, workers=3, faults=faults, record=rows.append)
    assert torch.equal(run.result.image, image)
    assert sum(run.executor.scheduler.failures.values()) == 4
    spans = {}
    for row in rows:
        if row["kind"] == "task":
            spans.setdefault(row["stage"], []).append((row["start"], row["end"]))
    assert {"base", "upscale", "encode stats", "encode", "blend", "decode", "decode blend"} <= spans.keys()
    # the base's guidance branches ran two at a time: each step's on two workers (but the step whose actor died)
    base = {
        r["task"]: r["worker"] for r in rows if r["kind"] == "task" and r["stage"] == "base" and r["pass"] == "steps"
    }
    steps = len(base) // 2
    assert steps == blend_plan.spec.base_steps
    assert sum(base[2 * i] != base[2 * i + 1] for i in range(steps)) >= steps - 1
    # one graph, no barrier between stages: the refine starts before the encode ends, the decode before the refine
    assert min(start for start, _ in spans["blend"]) < max(end for _, end in spans["encode"])
    assert min(start for start, _ in spans["decode"]) < max(end for _, end in spans["blend"])
    # the upscaled pixels never came to the driver: each encode tile's statistics task and its own were sent the
    # handles of the upscale tiles under their input spans, and no pixels by value (TiledCanvas -> HeldCanvas)
    log = run.executor.scheduler.log
    sent = {stage: {d.task: {r.hex() for r in d.refs} for d in log if d.stage == stage} for stage in spans}
    upscaled = {d.task for d in log if d.stage == "upscale"}
    n_tiles = len({t for r in rows if r["kind"] == "task" and r["stage"] == "encode" for t in r["tiles"]})
    assert ENCODE_TILES_PER_TASK == 2 and len(sent["encode"]) == -(-n_tiles // 2)
    reads = [d for d in log if d.stage in ("encode stats", "encode")]
    assert all(d.refs and d.bytes_by_value < 4096 for d in reads)  # handles, the span's place, the statistics
    assert len({r.hex() for d in reads for r in d.refs}) == len(upscaled) > 1  # one handle per upscale tile
    assert not {r.hex() for d in log if d.stage == "upscale" for r in d.refs} & {r.hex() for d in reads for r in d.refs}
    # a tile's statistics task and its own read the same upscale tiles
    assert sorted(map(sorted, sent["encode stats"].values())) == sorted(map(sorted, sent["encode"].values()))
    # the decode tiles stayed on their workers: each block's blend task got the handles of the tiles over it (up to
    # 3 x 3 for a block of 2 x 2 tiles), and no pixels by value
    blends = [d for d in log if d.stage == "decode blend"]
    assert all(1 <= len(d.refs) <= 9 and d.bytes_by_value == 0 for d in blends)
    assert any(len(d.refs) >= 4 for d in blends)


def test_actors_killed_in_the_even_and_odd_pass_change_nothing(local_ray, cluster_plan, local_image):
    n_even = len(cluster_plan.even_batches)
    faults = {("chess", 1), ("chess", n_even + 1)}  # a batch of each pass crashes its actor's process
    run = run_cluster(cluster_plan, workers=2, faults=faults)
    scheduler = run.executor.scheduler
    assert sum(scheduler.failures.values()) == 2 and not scheduler.lost  # no call reached a restarting actor
    runs = [d.task for d in scheduler.log if d.stage == "chess"]
    assert runs.count(1) == 2 and runs.count(n_even + 1) == 2  # each ran again elsewhere
    assert torch.equal(run.result.image, local_image)


def test_scaffold_goes_to_the_object_store_once(local_ray, cluster_plan):
    run = run_cluster(cluster_plan, workers=2)
    refines = [d for d in run.executor.scheduler.log if d.stage == "chess"]
    scaffold_refs = {d.refs[0] for d in refines}
    assert len(scaffold_refs) == 1  # every tile task names the same stored scaffold
    assert scaffold_refs.isdisjoint(r for d in run.executor.scheduler.log if d.stage != "chess" for r in d.refs)
    # by value each task carries its batch's latent crops and nothing else: its noise comes from the ref
    tile_bytes = 4 * cluster_plan.grid.tile_h * cluster_plan.grid.tile_w * cluster_plan.model.latent_channels
    sizes = [len(b) for b in (*cluster_plan.even_batches, *cluster_plan.odd_batches)]
    # odd tasks also carry their pin masks (one float per latent pixel of each tile)
    pin_bytes = [0] * len(cluster_plan.even_batches) + [4 * cluster_plan.grid.tile_h * cluster_plan.grid.tile_w] * len(
        cluster_plan.odd_batches
    )
    expected = [(i, n * (tile_bytes + pin)) for i, (n, pin) in enumerate(zip(sizes, pin_bytes, strict=True))]
    assert sorted((d.task, d.bytes_by_value) for d in refines) == expected


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads an actor's environment from /proc")
def test_actors_return_tile_sized_results_inline(local_ray, cluster_plan):
    # Ray reads its inline limit from each process's environment as it starts there: the farm's actors get it
    config = WorkerConfig.from_spec(cluster_plan.spec)
    actor = start_actors(config, 1, 1, max_restarts=0)[0]
    try:
        pid = ray.get(actor.info.remote())["pid"]
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    finally:
        ray.kill(actor)
    assert int(environ[INLINE_VAR]) == INLINE_BYTES > 2 * 4 * 128 * 128 * 4  # a batch of two 1024 px SDXL tiles


def test_no_worker_left_is_a_clear_error_and_keeps_what_is_done(local_ray, cluster_plan, tmp_path):
    from safetensors import safe_open

    config = WorkerConfig.from_spec(cluster_plan.spec)
    actors = start_actors(config, 1, 1, max_restarts=0)
    keep = tmp_path / "render.partial.safetensors"
    ex = ClusterExecutor(actors, faults={("chess", 2)}, keep_path=keep)
    with pytest.raises(ClusterError, match=r"all 1 workers were lost during chess .* 2 of \d+ chess tasks") as err:
        render(cluster_plan, ex)
    assert str(keep) in str(err.value)
    with safe_open(str(keep), "pt") as kept:
        tiles = {t.id for b in cluster_plan.even_batches[:2] for t in b}
        assert {k for k in kept.keys()} == {f"{i}/{t.id}" for i in (0, 1) for t in cluster_plan.even_batches[i]}
        assert kept.metadata()["stage"] == "chess" and len(tiles) == len(list(kept.keys()))


def test_gpus_required_but_missing(local_ray, cluster_plan, tmp_path, capsys):
    spec = cluster_plan.spec
    args = [
        "render",
        "--model",
        spec.model,
        "--upscaler",
        spec.upscaler,
        "--prompt",
        "x",
        "--size",
        "512x512",
        "--tile",
        "128",
        "--native",
        "128",
        "--out",
        str(tmp_path / "o.png"),
        "--cluster",
        "auto",
        "--gpus-per-worker",
        "4",
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the cluster has 3 GPUs but each worker needs 4" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_model_missing_on_the_workers(local_ray, tmp_path):
    config = WorkerConfig(str(tmp_path / "only-on-the-driver"), "", "", "auto")
    with pytest.raises(UserError, match="only-on-the-driver does not exist on worker node"):
        preflight(config, gpus_per_worker=1)


@pytest.fixture(scope="module")
def detail_plan(small_spec, tiny_sam3):
    from dataclasses import replace

    from pipeline.detail.detection import Concept

    concepts = (
        Concept("face", threshold=0.0, selection="all", max_objects=3),
        Concept("eyes", layer=1, threshold=0.0, prompt="an eye", denoise=0.3),
    )
    return prepare(replace(small_spec, detector=str(tiny_sam3), concepts=concepts, tile_batch=2))


@pytest.fixture(scope="module")
def detail_local(detail_plan):
    return run_local(detail_plan).result


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_detailer_gives_the_same_pixels_on_1_2_3_actors(local_ray, detail_plan, detail_local, workers):
    run = run_cluster(detail_plan, workers=workers)
    assert detail_local.refined_mask.max() > 0  # the detailer refined something
    assert torch.equal(run.result.refined_mask, detail_local.refined_mask)
    assert torch.equal(run.result.image, detail_local.image)
    crops = [d for d in run.executor.scheduler.log if d.stage == "detail"]
    assert crops and (workers == 1 or len({d.actor for d in crops}) > 1)  # the crop batches went over the actors


def test_the_ledger_shows_a_killed_actor_and_a_nan_result_retried(local_ray, cluster_plan, local_image):
    rows = []
    faults = {("chess", 1), ("chess", 2, "nan")}
    run = run_cluster(cluster_plan, workers=2, faults=faults, record=rows.append)
    assert torch.equal(run.result.image, local_image)
    chess = {r["task"]: r for r in rows if r["kind"] == "task" and r["stage"] == "chess"}
    assert len(chess) == len(cluster_plan.even_batches) + len(cluster_plan.odd_batches)
    assert chess[1]["attempts"] == 2 and chess[1]["outcome"] == "retried" and "died" in chess[1]["error"]
    # batch 2 may have been queued behind batch 1 on the killed actor (cluster.scheduler.DEPTH): it then died with
    # it once, and its NaN came on the next try
    died = chess[2]["error"].count("died")
    assert died <= 1 and chess[2]["attempts"] == 2 + died
    assert chess[2]["outcome"] == "retried" and chess[2]["error"].count("NaN/Inf") == 1
    assert {r["worker"] for r in chess.values()} <= {"actor 0", "actor 1"}
    assert all(r["host"] and r["device"] == "cpu" for r in chess.values())
    assert [r["stage"] for r in rows if r["kind"] == "stage"][:2] == ["load", "load"]


def test_flux_top_down_with_a_lora_is_the_same_on_2_actors(local_ray, tiny_flux, flux_lora, tiny_upscaler):
    from pipeline.spec import RenderSpec

    spec = RenderSpec(
        model=str(tiny_flux),
        upscaler=str(tiny_upscaler),
        upscale_tile=128,
        lora=str(flux_lora),
        lora_strength=0.5,
        lora_text_strength=0.5,
        prompt="a lighthouse at dawn",
        width=512,
        height=512,
        seed=4,
        steps=1,
        base_steps=2,
        cfg=2.2,
        denoise=0.3,
        tile=256,
        tile_batch=2,
    )
    plan = prepare(spec)
    assert plan.model.family == "flux" and plan.k == 2 and len(plan.grid.tiles) == 9
    local = run_local(plan).result.image
    run = run_cluster(plan, workers=2)
    assert torch.equal(run.result.image, local)
    assert {d.actor for d in run.executor.scheduler.log if d.stage == "blend"} == {0, 1}


def test_a_batch_on_the_cluster_starts_its_actors_once(local_ray, tiny_sdxl, tmp_path, monkeypatch):
    import cluster.actor

    starts = []
    real = cluster.actor.start_actors
    monkeypatch.setattr(cluster.actor, "start_actors", lambda *a, **k: starts.append(a[1]) or real(*a, **k))
    table = tmp_path / "prompts.csv"
    table.write_text("prompt,seed\na,1\nb,2\n")
    args = ["batch", str(table), "--model", str(tiny_sdxl), "--workflow", "two-pass", "--base-size", "128x128"]
    args += ["--size", "256x256", "--pixel-upscale", "1", "--tile", "128", "--steps", "1", "--base-steps", "1"]
    assert main([*args, "--out-dir", str(tmp_path), "--cluster", "auto", "--workers", "2", "--quiet"]) == 0
    assert starts == [2] and len(list(tmp_path.glob("*.png"))) == 2


def test_a_cluster_batch_runs_renders_at_once_with_the_same_pixels(local_ray, tiny_sdxl, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    table = tmp_path / "prompts.csv"
    table.write_text("prompt,seed\na lighthouse,1\na harbour,2\na cliff,3\n")
    args = ["batch", str(table), "--model", str(tiny_sdxl), "--workflow", "two-pass", "--base-size", "128x128"]
    args += ["--size", "256x256", "--pixel-upscale", "1", "--tile", "128", "--steps", "2", "--base-steps", "2"]
    args += ["--tile-batch", "1", "--quiet"]
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    local.mkdir(), cluster.mkdir()
    assert main([*args, "--out-dir", str(local)]) == 0
    assert main([*args, "--out-dir", str(cluster), "--cluster", "auto", "--workers", "2", "--in-flight", "2"]) == 0
    rows = pq.read_table(str(cluster / "batch-ledger.parquet")).to_pylist()
    assert [r["outcome"] for r in rows] == ["ok"] * 3
    spans = sorted((r["start"], r["end"]) for r in rows)
    assert spans[1][0] < spans[0][1]  # the second render started before the first had finished

    def pixels(folder):
        return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"), key=lambda p: p.name.split("_")[1])]

    assert all(np.array_equal(a, b) for a, b in zip(pixels(local), pixels(cluster), strict=True))
