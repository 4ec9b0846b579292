"""Actor calls with tile-sized payloads: inside the call (Ray's inline path) or through the object store.

One actor echoes a float32 array back; each size is timed one call at a time (round trip) and with all
calls in flight at once, with Ray's inline limit (RAY_max_direct_call_object_size) at its default,
100 KiB, at tilefarm's (cluster.inline.INLINE_BYTES) and at 8 MiB (every size inline). Each limit runs in
a fresh local Ray in its own process, since Ray reads the limit as it starts. Driver CPU is the driver
process's user + system time per call.

    python bench/inline_payloads.py
    python bench/inline_payloads.py --sizes 128,512,2048 --calls 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from cluster.inline import INLINE_BYTES, INLINE_VAR  # noqa: E402

RAY_DEFAULT = 100 * 1024
EVERYTHING = 8 * 1024 * 1024  # every size here inline: where inlining stops paying


def measure(sizes_kib: list[int], calls: int) -> list[dict]:
    """In this process (its Ray started here with the environment's limit): per size, the timings."""
    import numpy as np
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote
    class Echo:
        def echo(self, x):
            return x.copy()

    actor = Echo.remote()
    ray.get(actor.echo.remote(np.zeros(1)))
    rows = []
    for kib in sizes_kib:
        x = np.ones(kib * 256, dtype=np.float32)
        ray.get([actor.echo.remote(x) for _ in range(10)])  # warm
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(calls):
            ray.get(actor.echo.remote(x))
        one, cpu = (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls
        start = time.perf_counter()
        ray.get([actor.echo.remote(x) for _ in range(calls)])
        rows.append({"kib": kib, "round_trip": one, "cpu": cpu, "in_flight": (time.perf_counter() - start) / calls})
    ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="payloads in KiB, comma-separated")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    if args.child:
        print(json.dumps(measure(sizes, args.calls)))
        return
    results = {}
    for limit in (RAY_DEFAULT, INLINE_BYTES, EVERYTHING):
        env = os.environ | {INLINE_VAR: str(limit), "RAY_USAGE_STATS_ENABLED": "0"}
        command = [sys.executable, __file__, "--child", "--sizes", args.sizes, "--calls", str(args.calls)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results[limit] = {r["kib"]: r for r in json.loads(out.strip().splitlines()[-1])}
    print(
        "| payload KiB (argument and result) | limit | one call at a time, ms | driver CPU ms per call "
        f"| {args.calls} in flight, ms per call |"
    )
    print("|---:|---:|---:|---:|---:|")
    for kib in sizes:
        for limit, rows in results.items():
            r = rows[kib]
            way = "inline" if kib * 1024 < limit else "object store"
            print(
                f"| {kib} | {limit // 1024} KiB ({way}) | {1e3 * r['round_trip']:.2f} | {1e3 * r['cpu']:.2f} | "
                f"{1e3 * r['in_flight']:.2f} |"
            )


if __name__ == "__main__":
    main()
