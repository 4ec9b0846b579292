"""The renders: one function per workflow, each reading top to bottom: the serial stages, then the
tiled stages as one task graph (pipeline.graph.stream), then the exact size.

top-down (seed 002): scaffold -> pooled native noise -> base -> [model upscale (tiles) -> encode
(tiles) -> refine (blended steps) -> decode (tiles)] -> exact size. With concepts, the semantic
detailer (detections on the base, crops) runs between the upscale and the encode, as a stage.
two-pass (seeds 000, 003): scaffold -> pooled noise -> base latents -> latent upscale 2x ->
[refine -> decode (tiles) -> optional pixel upscale (tiles)] -> exact size (crop reported).
enhance (seed 001): input image -> [model upscale (tiles) -> encode -> refine -> decode].

A bracket is one graph when the refine is blended (the default): each task waits only for the tiles
it reads. The chess passes (and an upscale followed by a resize) run stage by stage instead. The base
is a graph of its own: with CFG, each step's two guidance branches are two tasks (pipeline.sampling.guidance).

Every pass takes its noise from the one scaffold (pooled x k for a smaller pass, sliced for tiles),
so a render is deterministic and independent of the executor.

Every stage hands its work to an executor (local: one device in-process; cluster: Ray actors)
as worker calls and task graphs fixed by the plan, so both executors produce the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.detail.detailer import detail, plan_jobs
from pipeline.detail.detection import choose
from pipeline.geometry.chess import cover_grid, fitted_cover_grid
from pipeline.geometry.resize import IMAGE, PIXELS, describe_fit, doubling_factor, eight_bit_image, fit_exact, resize
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.geometry.tiling import run_tiled, run_tiled_exact_norm, run_tiled_shared_norm
from pipeline.graph.canvas import AssembledCanvas
from pipeline.graph.clock import Clock
from pipeline.graph.progress import Progress, no_progress, stage_bar, task_progress  # noqa: F401 (re-exported)
from pipeline.graph.stream import (
    Enlarged,
    Fixed,
    Graph,
    Resized,
    Source,
    add_tiled,
    add_tiled_exact_norm,
    add_tiled_shared_norm,
)
from pipeline.graph.taskgraph import Executor
from pipeline.inputs import load_input_image
from pipeline.plan import LATENT_UPSCALE, RenderPlan
from pipeline.sampling.blend import CanvasStepper, add_blend
from pipeline.sampling.chess_pass import RefineSettings, chess_refine
from pipeline.sampling.guidance import guided_base, splits

UPSCALE_OVERLAP = 32  # px of input shared by neighbouring upscaler tiles
MIN_ENCODE_TILE = 16  # latents: tiny VAEs' sample sizes would otherwise cut thousands of tiles
# tiles per encode task (and per statistics task): each tile is computed as its own task would be, so the image
# does not change; at 8K the render's front is bound by the driver's per-task work (Ray calls, shared reads), and
# pairs halve it there (BENCHMARKS.md "Eighth round")
ENCODE_TILES_PER_TASK = 2


@dataclass
class RenderResult:
    """The final image ([1, 3, H, W] 8-bit levels, uint8 (IMAGE), CPU), the latent canvas it was decoded from,
    and the detailer's refinement mask (latent resolution; all zero without detections)."""

    image: torch.Tensor
    canvas: torch.Tensor
    refined_mask: torch.Tensor | None = None
    notes: tuple[str, ...] = ()


def upscale_pixels(plan: RenderPlan, ex: Executor, image: torch.Tensor, scale: int, height: int, width: int):
    """Pixels -> height x width: the upscale model over tiles (when there is one and the image is smaller),
    then an exact resize if its scale differs."""
    if scale and image.shape[-2] < height:
        tile = plan.spec.upscale_tile
        image = run_tiled(ex, "upscale", "upscale_tile", image, tile, UPSCALE_OVERLAP, scale, 3, fitted=True)
    return resize(image, height, width)


def upscale_to_target(plan: RenderPlan, ex: Executor, base: torch.Tensor, scale: int) -> torch.Tensor:
    """Base pixels -> target pixels (top-down)."""
    return upscale_pixels(plan, ex, base, scale, plan.spec.height, plan.spec.width)


def upscale_latents(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """Enlarge latents by a whole factor with nearest-exact (each latent pixel becomes factor x factor),
    ComfyUI's Upscale Latent default; the refine pass that follows re-samples the detail."""
    return F.interpolate(latents, scale_factor=factor, mode="nearest-exact")


def decode_canvas(plan: RenderPlan, ex: Executor, canvas: torch.Tensor, tile: int) -> torch.Tensor:
    """Latent canvas -> pixels, decoded in overlapping latent tiles the VAE handles in one call (smaller ones
    where the memory pre-flight chose them), blended with feather weights.

    With decode_norm "exact" every decode tile normalises with the image's own GroupNorm
    statistics, found layer by layer over all
    tiles (pipeline.geometry.tiling.run_tiled_exact_norm: one statistics graph per GroupNorm layer, each tile
    stopping at that layer). Per-tile statistics gave tiles textures 0.86-2.27x an untiled decode's on a
    chess-original latent; the one-barrier pooled statistics the encode uses missed by 8-23% (and more
    when iterated, or started from a downsampled whole-latent decode), as did statistics estimated from
    a downsampled decode alone (4-7%); layer by layer stays within 3% on every tile (BENCHMARKS.md "Seams").
    With "tile" (the default) each tile uses its own statistics: one pass; on a blended latent its tiles stay
    within 0.96-1.10 of an untiled decode's texture. "exact" costs a partial decode per tile and layer: 2.75x
    the decode on the tiny VAE, several decodes' worth on SDXL, whose GroupNorms sit mostly at full size."""
    if plan.vae_tile:
        tile = min(tile, max(1, plan.vae_tile // plan.f))
    if plan.spec.decode_norm == "tile":
        return run_tiled(ex, "decode", "decode_tile", canvas, tile, max(1, tile // 4), plan.f, 3)
    return run_tiled_exact_norm(
        ex, "decode", "decode_stats", "decode_tile", canvas, tile, max(1, tile // 4), 1, plan.f, 3
    )


def encode_canvas(plan: RenderPlan, ex: Executor, pixels: torch.Tensor, tile_px: int | None = None) -> torch.Tensor:
    """Pixels -> latent canvas, encoded in overlapping tiles of `tile_px` (the VAE's sample size; by default
    the model's native size; smaller where the memory pre-flight chose; at least MIN_ENCODE_TILE latents)
    with GroupNorm statistics pooled over all tiles (pipeline.geometry.tiling.run_tiled_shared_norm)."""
    tile_px = tile_px or plan.model.native_px
    if plan.vae_tile:
        tile_px = min(tile_px, plan.vae_tile)
    tile = max(tile_px // plan.f, MIN_ENCODE_TILE)
    channels = plan.model.latent_channels
    return run_tiled_shared_norm(
        ex, "encode", "encode_stats", "encode_tile", pixels, tile, max(1, tile // 4), plan.f, 1, channels
    )


def upscale_graph(
    plan: RenderPlan,
    graph: Graph,
    image: Source,
    size: tuple[int, int],
    scale: int,
    height: int,
    width: int,
    held: bool = False,
) -> Source | None:
    """`image` (h, w = size) made height x width in the graph: the upscale model's tiles (when there is one
    and the image is smaller), then, where those fall short by a power of two, a resize block by block as
    the encode reads it (Resized: bit-equal to resizing the whole image). None when the graph cannot make
    it exactly: the caller runs upscale_pixels as a stage (its resize reads the whole image). With `held` the
    model's tiles stay on the workers and the encode composites the boxes it reads (HeldCanvas): for a graph
    whose only reader is the encode."""
    h, w = size
    if scale and h < height:
        grid = fitted_cover_grid(h, w, plan.spec.upscale_tile, UPSCALE_OVERLAP)
        image = add_tiled(graph, "upscale", "upscale_tile", image, grid, 1, scale, 3, PIXELS, (PIXELS,), held=held)
        h, w = h * scale, w * scale
    if (h, w) == (height, width):
        return image
    k = doubling_factor(h, height)
    return Resized(image, (h, w), k, 3) if k and k == doubling_factor(w, width) else None


def encode_graph(
    plan: RenderPlan, graph: Graph, pixels: Source, height: int, width: int, tile_px: int | None, share=None
):
    """encode_canvas's tiles and pooled statistics, added to the graph; with `share` (Executor.share) each
    tile's pixels travel once for its statistics task and its encode task."""
    tile_px = tile_px or plan.model.native_px
    if plan.vae_tile:
        tile_px = min(tile_px, plan.vae_tile)
    tile = max(tile_px // plan.f, MIN_ENCODE_TILE)
    grid = cover_grid(height // plan.f, width // plan.f, tile, max(1, tile // 4))
    channels = plan.model.latent_channels
    if isinstance(pixels, Resized):  # the workers enlarge their own boxes: a quarter of the bytes, no driver resize
        pixels = Enlarged(pixels)
    return add_tiled_shared_norm(
        graph, "encode", "encode_stats", "encode_tile", pixels, grid, plan.f, 1, channels, share=share,
        tiles_per_task=ENCODE_TILES_PER_TASK,
    )  # fmt: skip


def decode_graph(
    plan: RenderPlan, ex: Executor, graph: Graph, latents: Source, tile: int, dtype: torch.dtype = PIXELS
) -> AssembledCanvas:
    """decode_canvas's tiles (and its layer-by-layer statistics), added to the graph, into a canvas of `dtype`
    (IMAGE where it is the final image: the workers convert their blocks to 8 bits). The tiles are blended on the
    workers (AssembledCanvas): at 8K the decode's 121 tiles are 761 MB of float16 pixels, which the driver would
    otherwise composite one after another, after the last refine step."""
    if plan.vae_tile:
        tile = min(tile, max(1, plan.vae_tile // plan.f))
    grid = cover_grid(plan.latent_h, plan.latent_w, tile, max(1, tile // 4))
    if plan.spec.decode_norm == "tile":
        args = (graph, "decode", "decode_tile", latents, grid, 1, plan.f, 3, dtype, (None, PIXELS))
        return add_tiled(*args, on_workers=True)
    # the decoder's GroupNorm layers, named by one call on a 2 x 2 latent (run_tiled_exact_norm's probe)
    probe = torch.zeros(1, plan.model.latent_channels, 2, 2)
    layers = list(ex.call("decode stats", "decode_stats", probe, (0.0, 1.0, 0.0, 1.0)))
    args = (graph, "decode", "decode_stats", "decode_tile", latents, grid, 1, plan.f, 3, layers, dtype, (PIXELS,))
    return add_tiled_exact_norm(*args, on_workers=True)


def blend_graph(plan: RenderPlan, graph: Graph, s: Start, latents: Source, mask=None, bar=None) -> CanvasStepper:
    """The blended refine's steps, added to the graph."""
    spec = plan.spec
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler, spec.detail_chess_denoise)
    family, config = s.facts.family, s.facts.scheduler_config
    return add_blend(
        graph, plan.grid, plan.blend_batches, latents, s.scaffold, s.cond, settings, family, config, mask, bar
    )


def run_graph(plan: RenderPlan, ex: Executor, graph: Graph, stepper: CanvasStepper, bar: list) -> None:
    """Run the render's graph, with the blended refine's bar (its tasks report per tile-step)."""
    tiles = sum(len(b) for b in plan.blend_batches) * len(stepper.timesteps)
    with stage_bar(ex, "refine blend", tiles) as stage:
        bar.append(stage)
        graph.run(ex)


def detail_stage(plan: RenderPlan, ex: Executor, base, pixels, scaffold, cond, log) -> tuple:
    """Detect the spec's concepts on the base image and refine each selection's crop on the target pixels."""
    spec = plan.spec
    candidates = ex.call("detect", "detect", base, spec.concepts)
    detections = choose(candidates, spec.concepts)
    for c in spec.concepts:
        kept, found = (sum(d.concept == c.name for d in ds) for ds in (detections, candidates))
        log(f"detect {c.name!r} (layer {c.layer}): kept {kept} of {found} candidate(s) at threshold {c.threshold}")
    jobs = plan_jobs(detections, spec.concepts, (plan.latent_h, plan.latent_w), plan.native_latent, spec.detail_padding)
    conds = {"": cond}
    for prompt in sorted({job.prompt for job in jobs} - {""}):
        conds[prompt] = ex.call("prompt", "encode_prompt", prompt, spec.negative, spec.cfg, spec.prompt_style)
        for text in conds[prompt].notes:
            log(f"detail {text}")
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler)
    return detail(
        ex,
        pixels,
        jobs,
        scaffold,
        conds,
        settings,
        spec.seed,
        plan.native_latent * plan.f,
        plan.f,
        spec.tile_batch,
        log,
    )


@dataclass
class Start:
    """What every workflow begins with: the models' facts, the prompt conditioning and the scaffold."""

    facts: object  # pipeline.graph.worker.WorkerFacts
    cond_value: object  # PromptEmbeds
    cond: object  # the same, shared with the workers
    scaffold: torch.Tensor
    shared_scaffold: object


def start(plan: RenderPlan, ex: Executor, clock: Clock, note=lambda text: None) -> Start:
    spec = plan.spec
    with clock.stage("load"):
        facts = ex.call("load", "facts")  # on a cluster this waits for the actors' models

    with clock.stage("prompt"):
        # the base may guide with CFG while the refine does not: encode the negative whenever either does
        cfg = max(spec.cfg, spec.base_cfg)
        cond_value = ex.call("prompt", "encode_prompt", spec.prompt, spec.negative, cfg, spec.prompt_style)
        for text in cond_value.notes:
            note(text)
        cond = ex.share(cond_value)

    with clock.stage("scaffold"):
        scaffold = make_scaffold(spec.seed, plan.model.latent_channels, plan.latent_h, plan.latent_w)
        shared_scaffold = ex.share(scaffold.numpy())
    return Start(facts, cond_value, cond, scaffold, shared_scaffold)


def base_stage(plan: RenderPlan, ex: Executor, s: Start, noise: torch.Tensor, cfg: float, decode: bool):
    """txt2img at native size: its guidance branches as tasks over the workers where it has them (SDXL with
    CFG), else one call; the image with `decode`, else the latents."""
    spec = plan.spec
    if splits(s.facts.family, cfg):
        then = ("decode", plan.vae_tile) if decode else ()
        config = s.facts.scheduler_config
        return guided_base(ex, noise, s.cond_value, cfg, spec.base_steps, spec.sampler, config, *then)
    if decode:
        return ex.call("base", "base", noise, s.cond, cfg, spec.base_steps, spec.sampler, plan.vae_tile)
    return ex.call("base", "base_latents", noise, s.cond, cfg, spec.base_steps, spec.sampler)


def chess_stage(plan: RenderPlan, ex: Executor, s: Start, canvas: torch.Tensor, mask=None) -> torch.Tensor:
    """The refine over tiles in seed 002's chess passes (pinned or original); the blended refine is a graph
    stage (blend_graph)."""
    spec = plan.spec
    if spec.tiling not in ("chess", "chess-original"):
        raise ValueError(f"chess_stage runs the chess tilings, not {spec.tiling!r} (blend: blend_graph)")
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler, spec.detail_chess_denoise)
    grid, even, odd = plan.grid, plan.even_batches, plan.odd_batches
    pinned = spec.tiling == "chess"
    return chess_refine(ex, grid, even, odd, canvas, s.shared_scaffold, s.cond, settings, mask, pinned)


def render(plan: RenderPlan, ex: Executor, clock: Clock | None = None, log=lambda text: None) -> RenderResult:
    """Run the plan's workflow; `log(text)` receives notes on what a stage found."""
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log(text)

    workflow = {"top-down": render_top_down, "two-pass": render_two_pass, "enhance": render_enhance}
    result = workflow[plan.spec.workflow](plan, ex, clock or Clock(), note)
    result.image = eight_bit_image(result.image)  # where the workers did not make the 8-bit image themselves
    result.notes = tuple(notes)
    return result


def render_top_down(plan: RenderPlan, ex: Executor, clock: Clock, note) -> RenderResult:
    """Seed 002: plan at the target size, sample at native size."""
    spec = plan.spec
    s = start(plan, ex, clock, note)

    with clock.stage("base"):
        native_noise = pool_noise(s.scaffold, plan.k)
        cfg = spec.base_cfg or spec.cfg
        base = base_stage(plan, ex, s, native_noise, cfg, decode=True)

    graph = Graph()
    # the detailer reads the whole upscaled image, and the chess passes wait on their neighbours anyway
    streamed = spec.tiling == "blend" and not spec.concepts
    size, scale = base.shape[-2:], s.facts.upscale
    pixels = None
    if streamed:
        pixels = upscale_graph(plan, graph, Fixed(base), size, scale, spec.height, spec.width, held=True)
    refined_mask = None
    if pixels is None:
        with clock.stage("upscale"):
            pixels = upscale_to_target(plan, ex, base, s.facts.upscale)
        if spec.concepts:
            with clock.stage("detail"):
                pixels, refined_mask = detail_stage(plan, ex, base, pixels, s.scaffold, s.cond_value, note)
        pixels = Fixed(pixels)
    mask = refined_mask if spec.detail_chess_denoise and refined_mask is not None else None
    return refine_and_decode(plan, ex, clock, s, graph, pixels, mask, refined_mask)


def refine_and_decode(plan, ex, clock, s: Start, graph: Graph, pixels: Source, mask, refined_mask=None):
    """Encode, refine and decode: one graph with whatever `graph` already holds (the blended refine), or
    stage by stage (the chess passes)."""
    spec = plan.spec
    if spec.tiling == "blend":
        latents = encode_graph(plan, graph, pixels, spec.height, spec.width, s.facts.encode_tile, ex.share)
        bar: list = []
        stepper = blend_graph(plan, graph, s, latents, mask, bar)
        final = plan.canvas_px == (spec.height, spec.width)  # the decode is the image, with no resize to come
        image = decode_graph(plan, ex, graph, stepper, s.facts.decode_tile, IMAGE if final else PIXELS)
        with clock.stage("tiles"):
            run_graph(plan, ex, graph, stepper, bar)
        return RenderResult(fit_exact(image.canvas, spec.height, spec.width), stepper.latents, refined_mask)

    with clock.stage("encode"):
        canvas = encode_canvas(plan, ex, pixels.canvas, s.facts.encode_tile)
    del pixels

    with clock.stage("refine"):
        canvas = chess_stage(plan, ex, s, canvas, mask)

    with clock.stage("decode"):
        image = decode_canvas(plan, ex, canvas, s.facts.decode_tile)
    return RenderResult(fit_exact(image, spec.height, spec.width), canvas, refined_mask)


def render_two_pass(plan: RenderPlan, ex: Executor, clock: Clock, note) -> RenderResult:
    """Seeds 000 and 003: base, latent upscale 2x, refine the whole latent, decode, pixel upscale, exact size."""
    spec = plan.spec
    s = start(plan, ex, clock, note)

    with clock.stage("base"):
        noise = pool_noise(s.scaffold, plan.k)
        cfg = spec.base_cfg or spec.cfg
        latents = base_stage(plan, ex, s, noise, cfg, decode=False)

    with clock.stage("latent upscale"):
        canvas = upscale_latents(latents, LATENT_UPSCALE)

    if spec.tiling == "blend":
        graph, bar = Graph(), []
        stepper = blend_graph(plan, graph, s, Fixed(canvas), None, bar)
        decoded = decode_graph(plan, ex, graph, stepper, s.facts.decode_tile)
        upscaled = None
        if spec.pixel_upscale > 1:
            ph, pw = plan.pixel_upscaled
            upscaled = upscale_graph(plan, graph, decoded, decoded.canvas.shape[-2:], s.facts.upscale, ph, pw)
        with clock.stage("tiles"):
            run_graph(plan, ex, graph, stepper, bar)
        out = upscaled or decoded  # a Resized upscale resizes its blocks as the whole image is read
        canvas, image = stepper.latents, out.read((0, 0, *out.canvas.shape[-2:])).float()
    else:
        with clock.stage("refine"):  # over tiles; one tile when the canvas fits in one
            canvas = chess_stage(plan, ex, s, canvas)
        with clock.stage("decode"):
            image = decode_canvas(plan, ex, canvas, s.facts.decode_tile)
        upscaled = None

    if spec.pixel_upscale > 1 and upscaled is None:
        with clock.stage("upscale"):
            ph, pw = plan.pixel_upscaled
            image = upscale_pixels(plan, ex, image, s.facts.upscale, ph, pw)

    note(f"exact size: {describe_fit(*image.shape[-2:], spec.height, spec.width)}")
    return RenderResult(fit_exact(image, spec.height, spec.width), canvas)


def render_enhance(plan: RenderPlan, ex: Executor, clock: Clock, note) -> RenderResult:
    """Seed 001: an input image, upscaled by the model in tiles to the target, encoded, refined, decoded."""
    spec = plan.spec
    s = start(plan, ex, clock, note)
    image = load_input_image(spec.input, max(spec.width, spec.height))
    graph = Graph()
    pixels = None
    if spec.tiling == "blend":
        pixels = upscale_graph(
            plan, graph, Fixed(image), image.shape[-2:], s.facts.upscale, spec.height, spec.width, held=True
        )
    if pixels is None:
        with clock.stage("upscale"):
            pixels = Fixed(upscale_pixels(plan, ex, image, s.facts.upscale, spec.height, spec.width))
    return refine_and_decode(plan, ex, clock, s, graph, pixels, None)
