"""Markdown tables of bench/gpu_render.py: per-render stages, summary against targets, seams, optimisations."""

from __future__ import annotations

GIB = 2**30
REFINE_STAGES = ("encode", "refine", "decode")  # what the USDU baseline replaces: pixels in, pixels out


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_render(r: dict, peak_flops: float) -> None:
    print(
        f"\n### {r['size']} px, {r['grid']} grid: {r['tiles']} tiles of {r['tile_px']} px, work x{r['work']:.2f}, "
        f"{r['batches']} batches\n"
    )
    print("| stage | seconds | model calls | model s | isolated model s | UNet TFLOP/s | % of matmul peak | peak GiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for stage, s in r["stages"].items():
        calls = ", ".join(f"{m} {n}" for m, n in sorted(s["calls"].items())) or "-"
        share = s["unet_tflops"] * 1e12 / peak_flops if s["unet_tflops"] else None
        print(
            f"| {stage} | {s['seconds']:.3f} | {calls} | {s['model_seconds']:.3f} | {s['isolated_seconds']:.3f} | "
            f"{fmt(s['unet_tflops'], '.1f' if s['unet_tflops'] and s['unet_tflops'] > 1 else '.4f')} | "
            f"{fmt(share, '.0%')} | {fmt(s['peak_gib'], '.2f')} |"
        )
    print(
        f"| **wall** | {r['wall']:.3f} | | {r['in_render_model_seconds']:.3f} | {r['isolated_seconds']:.3f} | | | "
        f"{fmt(r['peak_gib'], '.2f')} |"
    )


def print_summary(renders: list[dict], baselines: dict) -> None:
    print("\n### Summary\n")
    print(
        "| size | grid | tiles | work | wall s | isolated model s | wall / isolated (target <= 1.15) | "
        "refine s (encode+chess+decode) | USDU s | speedup vs USDU (target >= 1.3) | peak GiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in renders:
        refine_s = sum(r["stages"][s]["seconds"] for s in REFINE_STAGES)
        b = baselines.get(r["size"])
        print(
            f"| {r['size']} | {r['grid']} | {r['tiles']} | {r['work']:.2f} | {r['wall']:.3f} | "
            f"{r['isolated_seconds']:.3f} | {r['wall'] / r['isolated_seconds']:.3f} | {refine_s:.3f} | "
            f"{fmt(b and b['seconds'])} | {fmt(b and b['seconds'] / refine_s, '.2f')} | {fmt(r['peak_gib'], '.2f')} |"
        )
    print("\n### Seams (mean |step| across tile boundaries / across all rows or columns; 1.0 = invisible)\n")
    print("| size | tiling | tiles | seam ratio | upscaled input at the same boundaries |")
    print("|---:|---|---:|---:|---:|")
    rows = [(r["size"], f"farm {r['grid']}", r) for r in renders] + [
        (n, "USDU per-tile", b) for n, b in baselines.items()
    ]
    for size, name, r in rows:
        print(f"| {size} | {name} | {r['tiles']} | {r['seam_ratio']:.3f} | {r['input_seam_ratio']:.3f} |")
    if baselines:
        print("\n### USDU baseline model calls\n")
        print("| size | tiles | seconds | model calls | model s | peak GiB |")
        print("|---:|---:|---:|---|---:|---:|")
        for size, b in baselines.items():
            calls = ", ".join(f"{m} {n}" for m, n in sorted(b["calls"].items()))
            print(
                f"| {size} | {b['tiles']} | {b['seconds']:.3f} | {calls} | {sum(b['model_seconds'].values()):.3f} | "
                f"{fmt(b['peak_gib'], '.2f')} |"
            )


def print_optimisations(toggles: list, sweep: list, chosen: int, host_share: float) -> None:
    print("\n### Optimisations (before / after on the call they change)\n")
    print("| optimisation | unit | before | after | gain | note |")
    print("|---|---|---:|---:|---:|---|")
    for t in toggles:
        print(
            f"| {t.name} | {t.unit} | {fmt(t.before, '.4f', 'pending')} | {fmt(t.after, '.4f', 'pending')} | "
            f"{fmt(t.gain, '.2f')}x | {t.note} |"
        )
    print(
        f"| overlap host work with GPU work | share of wall outside model calls | {host_share:.1%} | pending | - | "
        "not implemented: this share is the most it could hide |"
    )
    print(f"\n### Tile batch sweep (one sampler step; chosen from free memory: batch {chosen})\n")
    print("| tile batch | s per tile | GPU memory above weights GiB |")
    print("|---:|---:|---:|")
    for p in sweep:
        print(f"| {p.batch} | {p.seconds_per_tile:.4f} | {fmt(p.extra_bytes and p.extra_bytes / GIB, '.2f')} |")
