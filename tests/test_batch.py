"""`farm batch`: a table of prompts or a folder of images, one output and one ledger row per item."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from farm.batch import read_items
from farm.cli import main
from pipeline.errors import UserError
from pipeline.spec import DRAWN_SEEDS

# a two-pass render from a 128 px base to 256 px: the cheapest whole render
TINY_TWO_PASS = ["--workflow", "two-pass", "--base-size", "128x128", "--size", "256x256", "--pixel-upscale", "1"]
TINY_TWO_PASS += ["--tile", "256", "--steps", "1", "--base-steps", "1", "--quiet"]


def _ledger(folder):
    return pq.read_table(str(folder / "batch-ledger.parquet")).to_pylist()


def test_five_prompts_from_a_csv_give_five_outputs_and_five_ledger_rows(tiny_sdxl, tmp_path):
    table = tmp_path / "prompts.csv"
    rows = ["prompt,seed,denoise"] + [f"a castle number {i},{i or ''},{0.3 + i / 10}" for i in range(5)]
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["batch", str(table), "--model", str(tiny_sdxl), *TINY_TWO_PASS, "--out-dir", str(out)]) == 0
    outputs = sorted(out.glob("*.png"))
    assert len(outputs) == 5
    ledger = _ledger(out)
    assert [r["outcome"] for r in ledger] == ["ok"] * 5
    assert sorted(r["output"] for r in ledger) == [str(p) for p in outputs]
    assert all(r["seconds"] > 0 and r["error"] == "" for r in ledger)
    seeds = {}
    for path in outputs:
        with Image.open(path) as image:
            assert image.size == (256, 256)
            seeds[str(path)] = json.loads(image.info["tilefarm"])["spec"]["seed"]
    drawn = seeds.pop(ledger[0]["output"])  # the row without a seed gets a drawn one, recorded in PNG and ledger
    assert sorted(seeds.values()) == [1, 2, 3, 4] and 0 <= drawn < DRAWN_SEEDS
    assert [r["seed"] for r in ledger] == [drawn, 1, 2, 3, 4]


def test_a_corrupt_image_in_a_folder_is_reported_and_skipped(tiny_flux, tmp_path, capsys):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(inputs / f"photo{i}.png")
    (inputs / "photo2b.png").write_bytes((inputs / "photo2.png").read_bytes()[:60])  # cut off mid-file
    (inputs / "notes.txt").write_text("not an image")
    args = ["batch", str(inputs), "--preset", "upscale-enhance", "--model", str(tiny_flux), "--steps", "1"]
    assert main([*args, "--tile", "256", "--out-dir", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"skipped {inputs / 'photo2b.png'}" in err and "damaged" in err and "Traceback" not in err
    assert "1 file(s)" in err and "ignored" in err  # notes.txt
    outputs = sorted(out.glob("*.png"))
    assert len(outputs) == 4 and all(p.name.startswith("upscale_enhanced_photo") for p in outputs)
    for path in outputs:
        with Image.open(path) as image:
            assert image.size == (128, 96)
    ledger = _ledger(out)
    assert len(ledger) == 5
    (bad,) = [r for r in ledger if r["outcome"] != "ok"]
    assert bad["outcome"] == "skipped" and bad["input"].endswith("photo2b.png") and "damaged" in bad["error"]
    assert bad["output"] == ""


def test_tables_are_checked_before_any_render(tiny_sdxl, tmp_path, capsys):
    table = tmp_path / "bad.csv"
    table.write_text("prompt,sead\nx,1\n")
    assert main(["batch", str(table), "--model", str(tiny_sdxl), "--out-dir", str(tmp_path)]) == 2
    assert "unknown column(s) sead" in capsys.readouterr().err
    assert main(["batch", str(table), "--model", str(tiny_sdxl), "--out", str(tmp_path / "a.png")]) == 2
    assert "--out-dir" in capsys.readouterr().err
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "seed": [1, 2], "input": ["in.png", None]}), str(parquet))
    items = read_items(str(parquet))
    assert [i.values for i in items] == [
        {"prompt": "a", "seed": 1, "input": str(tmp_path / "in.png")},
        {"prompt": "b", "seed": 2},
    ]
    with pytest.raises(UserError, match="does not exist"):
        read_items(str(tmp_path / "missing"))


def test_a_cell_of_the_wrong_type_skips_only_its_row(tmp_path):
    table = tmp_path / "rows.csv"
    table.write_text("prompt,seed\na,1\nb,many\n")
    good, bad = read_items(str(table))
    assert good.values == {"prompt": "a", "seed": 1} and not good.problem
    assert "rows.csv row 2: seed must be a whole number" in bad.problem
