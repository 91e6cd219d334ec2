"""Peak memory of streamed prediction on large TIFFs (issue: images larger than memory).

    python benchmarks/large_predict.py            # 4096x4096 image and a 100x512x512 stack

Memory bounded "by the tile batch, not the image" means: a 16x larger input of the same kind
raises the peak by (almost) nothing. So each large case runs next to a small one of the same kind
(1024x1024 vs 4096x4096; 10 vs 100 planes of 512x512), each in its own process: the process
compiles on a 600x600 image first (`RSS before`), then streams the case (`stream.denoise_tiff`,
U-Net features 32, depth 2, tile 304) and reports its own peak (VmHWM). The TIFFs (uint16,
uncompressed, ImageJ) are written by this script's parent process beforehand.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

CASES = {  # name: (shape, kind)
    "image_1024": ((1024, 1024), "image"),
    "image_4096": ((4096, 4096), "image"),
    "stack_10x512": ((10, 512, 512), "stack"),
    "stack_100x512": ((100, 512, 512), "stack"),
}

CHILD = r"""
import json, sys, time, pathlib
import numpy as np, tifffile
from autostructn2v_jax import models, stream

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

case, folder = sys.argv[1], pathlib.Path(sys.argv[2])
variables = models.init_variables(32, 2, 64, 0)
apply_fn = models.make_apply_fn(32, 2)
small = folder / "warmup.tif"
stream.denoise_tiff(variables, small, folder / f"warmup_{case}.tif", apply_fn=apply_fn, num_layers=2,
                    tile_size=304, overwrite=True)
before = hwm_mib()
t0 = time.perf_counter()
stream.denoise_tiff(variables, folder / f"{case}.tif", folder / f"{case}_out.tif", apply_fn=apply_fn,
                    num_layers=2, tile_size=304, overwrite=True)
secs = time.perf_counter() - t0
print("RESULT" + json.dumps(dict(case=case, before=before, peak=hwm_mib(), seconds=secs)))
"""


def write_inputs(folder: pathlib.Path) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "warmup.tif", (rng.random((600, 600)) * 4000).astype(np.uint16))
    for name, (shape, _) in CASES.items():
        with tifffile.TiffWriter(folder / f"{name}.tif", imagej=True) as tw:
            if len(shape) == 2:
                tw.write((rng.random(shape) * 4000).astype(np.uint16))
            else:
                planes = ((rng.random(shape[1:]) * 4000).astype(np.uint16) for _ in range(shape[0]))
                tw.write(shape=shape, dtype=np.uint16, data=planes)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        write_inputs(folder)
        for name in CASES:
            proc = subprocess.run([sys.executable, "-c", CHILD, name, str(folder)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            rows.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[6:]))
    print("| case | pixels | as float32 | RSS after warm-up | peak RSS | growth | time | MPix/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        npx = int(np.prod(CASES[r["case"]][0]))
        print(f"| {r['case']} | {npx / 1e6:.1f} M | {npx * 4 / 2**20:.0f} MiB | {r['before']:.0f} MiB | "
              f"{r['peak']:.0f} MiB | {r['peak'] - r['before']:.0f} MiB | {r['seconds']:.0f} s | "
              f"{npx / r['seconds'] / 1e6:.2f} |")
    by = {r["case"]: r for r in rows}
    for small, large in (("image_1024", "image_4096"), ("stack_10x512", "stack_100x512")):
        grow = {k: by[k]["peak"] - by[k]["before"] for k in (small, large)}
        print(f"\n{large} vs {small}: growth over the warm-up {grow[large]:.0f} vs {grow[small]:.0f} MiB "
              "(peaks across processes differ by ~200 MiB on their own)")


if __name__ == "__main__":
    main()
