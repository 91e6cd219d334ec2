"""Peak memory of streamed prediction on large TIFFs (issue: images larger than memory).

    python benchmarks/large_predict.py            # 4096x4096 uint16 image and a 100x512x512 stack

Each case runs in its own process; it reports the peak RSS (ru_maxrss) before prediction
(after imports and compiling on a small image) and after, next to the image's own size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time, pathlib
import numpy as np, tifffile
from autostructn2v_jax import models, stream
case, folder = sys.argv[1], pathlib.Path(sys.argv[2])
rng = np.random.default_rng(0)
shape = (4096, 4096) if case == "image_4096" else (100, 512, 512)
if not (folder / f"{case}.tif").exists():
    with tifffile.TiffWriter(folder / f"{case}.tif", imagej=True) as tw:
        if len(shape) == 2:
            tw.write((rng.random(shape) * 4000).astype(np.uint16))
        else:
            tw.write(shape=shape, dtype=np.uint16, data=((rng.random(shape[1:]) * 4000).astype(np.uint16) for _ in range(shape[0])))
variables = models.init_variables(32, 2, 64, 0)
apply_fn = models.make_apply_fn(32, 2)
small = folder / "small.tif"
tifffile.imwrite(small, (rng.random((600, 600)) * 4000).astype(np.uint16))
stream.denoise_tiff(variables, small, folder / "small_out.tif", apply_fn=apply_fn, num_layers=2, tile_size=304, overwrite=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
stream.denoise_tiff(variables, folder / f"{case}.tif", folder / f"{case}_out.tif", apply_fn=apply_fn, num_layers=2, tile_size=304, overwrite=True)
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
npx = int(np.prod(shape))
print("RESULT" + json.dumps(dict(case=case, shape=shape, image_MiB=npx * 2 / 2**20, image_float32_MiB=npx * 4 / 2**20,
      rss_before_MiB=round(before, 1), rss_peak_MiB=round(peak, 1), seconds=round(secs, 1), mpix_per_s=round(npx / secs / 1e6, 2))))
"""


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in ("image_4096", "stack_100x512"):
            proc = subprocess.run([sys.executable, "-c", CHILD, case, folder], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            rows.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[6:]))
    print("| case | image (uint16) | as float32 | RSS before | peak RSS | growth | time | MPix/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} {tuple(r['shape'])} | {r['image_MiB']:.0f} MiB | {r['image_float32_MiB']:.0f} MiB | "
              f"{r['rss_before_MiB']:.0f} MiB | {r['rss_peak_MiB']:.0f} MiB | {r['rss_peak_MiB'] - r['rss_before_MiB']:.0f} MiB | "
              f"{r['seconds']:.0f} s | {r['mpix_per_s']:.2f} |")


if __name__ == "__main__":
    main()
