"""The semantic detailer: crop geometry, crop noise, mask compositing, SAM3 through our loader, the stage."""

import pytest
import torch

from farm.executor import LocalExecutor, prepare, run_local
from pipeline.detail.detailer import detail, plan_jobs
from pipeline.detail.detection import Concept, Detection, choose, select
from pipeline.detail.sam3 import Sam3Detector, inspect_detector
from pipeline.errors import ModelFileError
from pipeline.geometry.crop import Crop, crop_for, crop_mask, crop_noise, crop_sides, feather_detection, upsample_noise
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.sampling.chess_pass import RefineSettings


def _det(box, concept="face", layer=0, score=0.9, mask=None, size=64) -> Detection:
    """A detection whose mask is its box (or `mask`) on a size x size detection image."""
    if mask is None:
        mask = torch.zeros(size, size)
        x0, y0, x1, y1 = (round(v * size) for v in box)
        mask[y0:y1, x0:x1] = 1
    return Detection(concept, layer, box, mask, score)


class FixedDetector:
    """A detector that finds what it is told to: known boxes and masks through the Detector interface."""

    def __init__(self, found: list[Detection]):
        self.found = found

    def detect(self, image, concepts):
        return [d for d in self.found if d.concept in {c.name for c in concepts}]


# --- crop geometry ---------------------------------------------------------------------------


def test_a_box_on_the_canvas_edge_gives_the_same_crop_shifted_inside():
    centred = crop_for(_det((0.45, 0.45, 0.55, 0.55)), 0, 64, 64, native=16, padding=0.25)
    corner = crop_for(_det((0.9, 0.9, 1.0, 1.0)), 1, 64, 64, native=16, padding=0.25)
    left = crop_for(_det((0.0, 0.3, 0.1, 0.4)), 2, 64, 64, native=16, padding=0.25)
    assert centred.side == corner.side == left.side == 16
    assert (corner.y, corner.x) == (48, 48)  # shifted in by the part that would hang over the edge
    assert left.x == 0 and left.y == round(0.35 * 64 - 8)
    for crop in (centred, corner, left):
        assert 0 <= crop.y <= 64 - crop.side and 0 <= crop.x <= 64 - crop.side


@pytest.mark.parametrize("seed", range(5))
def test_crops_are_squares_with_an_integer_factor_to_native_that_hold_their_box(seed):
    g = torch.Generator().manual_seed(seed)
    latent_h, latent_w, native = 96, 160, 32
    for i in range(40):
        w, h = (torch.rand(2, generator=g) * 0.5 + 0.02).tolist()
        x0, y0 = torch.rand(1, generator=g).item() * (1 - w), torch.rand(1, generator=g).item() * (1 - h)
        det = _det((x0, y0, x0 + w, y0 + h))
        crop = crop_for(det, i, latent_h, latent_w, native, padding=0.25)
        ratio = crop.side / native if not crop.enlarged else native / crop.side
        assert ratio == crop.factor and crop.factor >= 1  # whole factor: the noise keeps unit variance
        assert 0 <= crop.y <= latent_h - crop.side and 0 <= crop.x <= latent_w - crop.side
        if crop.side >= max(w * latent_w, h * latent_h) * 1.5:  # the box (with padding) fits: it is inside
            assert crop.x <= x0 * latent_w + 1e-6 and (x0 + w) * latent_w <= crop.x + crop.side + 1e-6
            assert crop.y <= y0 * latent_h + 1e-6 and (y0 + h) * latent_h <= crop.y + crop.side + 1e-6


def test_crop_sides_are_native_over_or_times_a_whole_number():
    assert [s[0] for s in crop_sides(128, 400)] == [32, 64, 128, 256, 384]
    assert [s[0] for s in crop_sides(16, 64)] == [8, 16, 32, 48, 64]  # 16/4 = 4 is below the minimum side


def test_small_objects_are_enlarged_and_large_ones_pooled():
    small = crop_for(_det((0.5, 0.5, 0.52, 0.52)), 0, 512, 512, native=128, padding=0.25)
    large = crop_for(_det((0.1, 0.1, 0.6, 0.6)), 1, 512, 512, native=128, padding=0.25)
    assert (small.side, small.enlarged, small.factor) == (32, True, 4)
    assert (large.side, large.enlarged, large.factor) == (384, False, 3)


# --- crop noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [16, 32, 64, 128, 256])
def test_crop_noise_has_unit_variance_for_crops_smaller_and_larger_than_native(side):
    scaffold = make_scaffold(3, 4, 512, 512)
    native = 64
    factor = side // native if side >= native else native // side
    crop = Crop(0, 100, 37, side, factor, enlarged=side < native)
    noise = crop_noise(scaffold, crop, seed=3)
    assert noise.shape == (1, 4, native, native)
    assert abs(noise.std().item() - 1) < 0.03 and abs(noise.mean().item()) < 0.03
    # neighbours are uncorrelated (bilinear upsampling would correlate them strongly)
    lag = torch.corrcoef(torch.stack([noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()]))[0, 1]
    assert abs(lag.item()) < 0.03
    assert torch.equal(noise, crop_noise(scaffold, crop, seed=3))  # depends only on seed and box


def test_upsampled_noise_pools_back_to_its_parent():
    parent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    child = upsample_noise(parent, 4, torch.Generator().manual_seed(1))
    assert child.shape == (1, 4, 64, 64)
    assert torch.allclose(pool_noise(child, 4), parent, atol=1e-5)


# --- masks -----------------------------------------------------------------------------------


def test_the_mask_is_cropped_to_the_box_not_resized_whole():
    mask = torch.zeros(64, 64)  # detection image 64 px, canvas 256 px (4x), f = 8 -> latent 32
    mask[16:32, 40:56] = 1
    crop = Crop(0, 4, 16, 8, 1, False)  # latent box y 4..12, x 16..24 -> pixels y 32..96, x 128..192
    m = crop_mask(mask, crop, 8, (256, 256))[0, 0]
    # the object covers canvas pixels y 64..128, x 160..224: inside the crop that is rows 32.., cols 32..
    assert m[40:, 40:].min() == 1 and m[:28].max() == 0 and m[:, :28].max() == 0


def test_feathered_mask_keeps_the_object_whole_and_fades_to_zero_away_from_it():
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 48:80, 48:80] = 1
    soft = feather_detection(mask, Crop(0, 8, 8, 16, 1, False), (64, 64))
    assert soft[..., 48:80, 48:80].min() == 1
    r = 128 // 32
    assert soft[..., : 48 - 2 * r, :].max() == 0 and soft[..., 80 + 2 * r :, :].max() == 0
    assert 0 < soft[..., 48 - r, 64].item() < 1  # a ramp, not a step


# --- detection selection ---------------------------------------------------------------------


def test_selection_modes():
    big, small, edge = (
        _det((0.1, 0.1, 0.6, 0.6), score=0.5),
        _det((0.45, 0.45, 0.55, 0.55), score=0.6),
        _det((0.0, 0.0, 0.2, 0.2), score=0.9),
    )
    found = [edge, small, big]  # most confident first, as a detector returns them
    pick = lambda **kw: select(found, Concept("face", **kw))  # noqa: E731
    assert pick(selection="largest") == [big]
    assert pick(selection="center") == [small]
    assert pick(selection="first") == [edge]
    assert pick(selection="all", max_objects=1) == found
    assert pick(selection="largest", max_objects=2) == [big, edge]
    assert pick(selection="all", threshold=0.55) == [edge, small]


def test_detections_are_ordered_by_layer_through_the_detector_interface():
    eyes, face = _det((0.3, 0.3, 0.4, 0.4), "eyes", 1), _det((0.2, 0.2, 0.6, 0.6), "face", 0)
    concepts = (Concept("eyes", layer=1), Concept("face", layer=0))
    detector = FixedDetector([eyes, face])
    assert choose(detector.detect(None, concepts), concepts) == [face, eyes]


# --- SAM3 through our loader ---------------------------------------------------------------


def test_tiny_sam3_loads_through_our_loader_and_detects(tiny_sam3):
    detector = Sam3Detector(tiny_sam3, torch.device("cpu"))
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    found = detector.detect(image, [Concept("face", threshold=0.0, selection="all"), Concept("eyes", layer=2)])
    faces = [d for d in found if d.concept == "face"]
    assert faces and all(d.layer == 0 for d in faces)
    assert [d.score for d in faces] == sorted((d.score for d in faces), reverse=True)
    for d in found:
        assert d.mask.shape == (96, 128) and set(d.mask.unique().tolist()) <= {0.0, 1.0}
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
    again = detector.detect(image, [Concept("face", threshold=0.0, selection="all")])
    assert [d.box for d in again] == [d.box for d in faces]


def test_a_folder_that_is_not_sam3_is_refused(tiny_sdxl, tmp_path):
    with pytest.raises(ModelFileError, match="not SAM3"):
        inspect_detector(tiny_sdxl / "text_encoder")
    with pytest.raises(ModelFileError, match="no config.json"):
        inspect_detector(tiny_sdxl)


# --- the stage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_inputs(tiny_worker):
    """A 512 px canvas (latent 64, native 16 latent px) and its scaffold."""
    pixels = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    scaffold = make_scaffold(5, 4, 64, 64)
    cond = tiny_worker.encode_prompt("a portrait", "blurry", 3.0)
    return pixels, scaffold, {"": cond, "a detailed face": tiny_worker.encode_prompt("a detailed face", "", 3.0)}


def _run_stage(tiny_worker, stage_inputs, detections, concepts):
    pixels, scaffold, conds = stage_inputs
    jobs = plan_jobs(detections, concepts, (64, 64), 16, 0.25)
    notes = []
    out, refined = detail(
        LocalExecutor(tiny_worker),
        pixels,
        jobs,
        scaffold,
        conds,
        RefineSettings(3.0, 2, 0.5, "euler"),
        5,
        128,
        8,
        2,
        notes.append,
    )
    return jobs, out, refined, notes


def test_pixels_outside_every_feathered_mask_are_unchanged(tiny_worker, stage_inputs):
    concepts = (Concept("face", prompt="a detailed face"), Concept("hand", layer=1, denoise=0.3))
    blob = torch.zeros(128, 128)
    blob[10:40, 100:128] = 1  # an irregular mask touching the right edge
    blob[20:30, 90:100] = 1
    detections = [
        _det((0.3, 0.3, 0.5, 0.55), "face", 0, size=128),
        _det((0.7, 0.078, 1.0, 0.3125), "hand", 1, mask=blob),
        _det((0.05, 0.6, 0.2, 0.7), "face", 0, size=128),
    ]
    jobs, out, refined, notes = _run_stage(tiny_worker, stage_inputs, detections, concepts)
    pixels = stage_inputs[0]
    assert out.shape == pixels.shape and len(jobs) == 3
    weight = refined.repeat_interleave(8, -2).repeat_interleave(8, -1)[0, 0]
    changed = (out != pixels).any(1)[0]
    assert changed.any() and not (changed & (weight == 0)).any()  # exactly unchanged where no mask reaches
    for job in jobs:  # every crop changed something inside its box, nothing beyond it
        c = job.crop
        assert changed[c.y * 8 : (c.y + c.side) * 8, c.x * 8 : (c.x + c.side) * 8].any()
    box_union = torch.zeros(512, 512, dtype=torch.bool)
    for job in jobs:
        c = job.crop
        box_union[c.y * 8 : (c.y + c.side) * 8, c.x * 8 : (c.x + c.side) * 8] = True
    assert not (changed & ~box_union).any()
    assert any("layer 1" in n for n in notes)
    # the same inputs give the same pixels
    assert torch.equal(out, _run_stage(tiny_worker, stage_inputs, detections, concepts)[1])


def test_zero_detections_change_nothing_and_say_so(tiny_worker, stage_inputs):
    _, out, refined, notes = _run_stage(tiny_worker, stage_inputs, [], (Concept("face"),))
    assert torch.equal(out, stage_inputs[0]) and refined.abs().sum() == 0
    assert notes == ["detail: no detections, the stage changes nothing"]


def test_render_with_tiny_sam3_runs_the_detail_stage(small_spec, tiny_sam3):
    from dataclasses import replace

    spec = replace(
        small_spec,
        detector=str(tiny_sam3),
        concepts=(Concept("face", threshold=0.0), Concept("eyes", layer=1, threshold=0.0, prompt="an eye")),
    )
    plan = prepare(spec)
    assert "detail layer 0: 'face'" in plan.describe()
    notes = []
    run = run_local(plan, log=notes.append)
    assert "detail" in run.clock.stages and run.result.image.shape == (1, 3, 512, 512)
    assert any(n.startswith("detect 'face' (layer 0): kept 1 of") for n in notes)
    assert run.result.refined_mask.max() > 0
    none = run_local(prepare(replace(spec, concepts=(Concept("face", threshold=1.0),))), log=notes.append)
    assert "detail: no detections, the stage changes nothing" in notes
    assert none.result.refined_mask.abs().sum() == 0
    # the chess pass refines detailed areas at a lower denoise when asked
    lower = run_local(prepare(replace(spec, detail_chess_denoise=0.2))).result
    assert torch.equal(lower.refined_mask, run.result.refined_mask)
    assert not torch.equal(lower.canvas, run.result.canvas) and torch.isfinite(lower.canvas).all()


def test_concepts_come_from_toml_flags_and_png_metadata(tmp_path, tiny_sam3):
    import json

    from farm.specfile import build_spec, read_toml
    from pipeline.detail.detection import parse_concept
    from pipeline.spec import RenderSpec

    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(
        f'model = "m"\ndetector = "{tiny_sam3}"\n[[concepts]]\nname = "face"\nlayer = 0\ndenoise = 0.5\n'
        '[[concepts]]\nname = "eyes"\nlayer = 1\nselection = "all"\n'
    )
    data, _ = read_toml(spec_file)
    spec = build_spec([(data, str(spec_file))])
    assert [(c.name, c.layer, c.selection, c.denoise) for c in spec.concepts] == [
        ("face", 0, "largest", 0.5),
        ("eyes", 1, "all", 0.45),
    ]
    assert RenderSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "png") == spec
    flags = [parse_concept("hand; layer=2; max-objects=3; prompt=a hand, five fingers")]
    assert build_spec([(data, "f"), ({"concepts": flags}, "flags")]).concepts == (
        Concept("hand", prompt="a hand, five fingers", layer=2, max_objects=3),
    )


def test_box_mean_is_a_replicate_padded_average_and_zero_where_the_window_is_zero():
    import torch.nn.functional as F

    from pipeline.geometry.crop import box_mean

    x = torch.zeros(1, 1, 50, 70)
    x[..., 10:20, 30:41] = torch.rand(10, 11, generator=torch.Generator().manual_seed(0))
    for r in (1, 4, 9):
        pooled = F.avg_pool2d(F.pad(x, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1)
        assert torch.allclose(box_mean(x, r), pooled, atol=1e-6)
        assert (box_mean(x, r)[..., 20 + r :, :] == 0).all()  # exactly zero beyond the window's reach
