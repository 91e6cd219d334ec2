"""A self-contained HTML report of a run folder (see README "The run folder").

``write_report(run_dir)`` writes ``RUN/report/report.html`` (every image embedded as a base64 PNG
data URI) and the PNGs it shows. Missing optional pieces (a stage, the mask, clean references) are
left out of the report; only a folder without ``config.json`` is an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import pathlib

import numpy as np

from .errors import UserInputError
from .files import atomic_write, atomic_write_text

CROP = 256
_STAGES = ("stage1", "stage2")
_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        "figure{display:inline-block;margin:0 8px 8px 0}figcaption{font-size:12px}"
        ".px{image-rendering:pixelated}pre{background:#f6f6f6;padding:1em;overflow:auto}")


def _read_json(path: pathlib.Path, default=None):
    """Parsed JSON of ``path``, or ``default`` when the file is missing."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def _read_metrics(path: pathlib.Path) -> list[dict]:
    """Epoch records of a ``metrics.jsonl`` (last record wins per epoch, as after a resume)."""
    if not path.is_file():
        return []
    by_epoch = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_epoch[rec.get("epoch", len(by_epoch) + 1)] = rec
    return [by_epoch[k] for k in sorted(by_epoch)]


def _figure(rows: int, cols: int, figsize: tuple[float, float]):
    """A matplotlib ``(figure, axes[rows][cols])`` drawn with the Agg canvas, without pyplot: the
    caller's backend (e.g. a notebook's inline figures) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png_bytes(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _img(out: pathlib.Path, name: str, payload: bytes, caption: str = "", pixelated=False) -> str:
    """Save ``payload`` as ``out/name``; return an HTML figure embedding it as a data URI."""
    atomic_write(out / name, lambda f: f.write(payload), ".png")
    uri = "data:image/png;base64," + base64.b64encode(payload).decode("ascii")
    cls = ' class="px"' if pixelated else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img{cls} src="{uri}" alt="{html.escape(name)}">{cap}</figure>'


def _centre_crop(plane: np.ndarray) -> np.ndarray:
    """The central crop of at most CROP x CROP pixels (the whole plane if smaller)."""
    h, w = plane.shape
    y, x = max((h - CROP) // 2, 0), max((w - CROP) // 2, 0)
    return plane[y:y + CROP, x:x + CROP]


def _gray_png(a: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A 1:1 grey PNG of ``a`` displayed in ``[vmin, vmax]`` (the data itself is not changed)."""
    import matplotlib.image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, np.asarray(a, np.float64), vmin=vmin, vmax=vmax, cmap="gray", format="png")
    return buf.getvalue()


def _sources(run: pathlib.Path, cfg: dict, clean: pathlib.Path | None) -> list[tuple[str, pathlib.Path]]:
    """(label, folder) of every image set present: noisy, each stage's output, clean."""
    found = [("noisy", pathlib.Path(cfg["input_dir"]) if cfg.get("input_dir") else None)]
    found += [(s, run / s / "denoised") for s in _STAGES] + [("clean", clean)]
    return [(label, d) for label, d in found if d is not None and d.is_dir()]


def _image_section(out, run, cfg, clean, max_images) -> str:
    """Before/after panels at 1:1 for up to ``max_images`` images (plane 0 of stacks)."""
    from . import tiffio

    sources = _sources(run, cfg, clean)
    if not sources or max_images <= 0:
        return ""
    names = sorted(p.name for p in sources[0][1].iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    axes = cfg.get("axes") or None
    parts = []
    for i, name in enumerate(names[:max_images]):
        planes = {lab: tiffio.read_image(d / name, axes=axes)[0][0].astype(np.float64)
                  for lab, d in sources if (d / name).is_file()}
        first = _centre_crop(planes.get("noisy", next(iter(planes.values()))))
        vmin, vmax = (float(v) for v in np.percentile(first, (1, 99)))
        vmax = vmax if vmax > vmin else vmin + 1.0
        figs = [_img(out, f"image{i:02d}_{lab}.png", _gray_png(_centre_crop(p), vmin, vmax),
                     lab, pixelated=True) for lab, p in planes.items()]
        h, w = first.shape
        parts.append(f"<h3>{html.escape(name)}</h3><p>centre crop {h}x{w}, 1:1, display range "
                     f"[{vmin:.4g}, {vmax:.4g}] (noisy 1st-99th percentile)</p>" + "".join(figs))
    return "<h2>Before / after</h2>" + "".join(parts)


def _mask_section(out, run, summary) -> str:
    """The mask figure: ``mask/mask.png`` when present, else drawn from the ``.npy`` files."""
    mdir = run / "mask"
    text = ((summary.get("stages") or {}).get("stage2") or {}).get("mask")
    if (mdir / "mask.png").is_file():
        payload = (mdir / "mask.png").read_bytes()
    elif (mdir / "structural_mask.npy").is_file():
        panels = [("structural mask", np.load(mdir / "structural_mask.npy").astype(float), "gray")]
        if (mdir / "autocorrelation.npy").is_file():
            acf = np.load(mdir / "autocorrelation.npy")
            if acf.ndim == 2 and acf.size:
                panels.insert(0, ("autocorrelation", acf.astype(float), "magma"))
        fig, axs = _figure(1, len(panels), (4 * len(panels), 4))
        for ax, (title, a, cmap) in zip(axs[0], panels):
            im = ax.imshow(a, cmap=cmap, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(title)
        fig.tight_layout()
        payload = _png_bytes(fig)
    else:
        return ""
    note = f"<p>{html.escape(str(text))}</p>" if text else ""
    return "<h2>Autocorrelation and structural mask</h2>" + note + _img(out, "mask.png", payload)


def _curves_section(out, metrics: dict[str, list[dict]]) -> str:
    """Train/val loss (log y) and learning rate vs epoch, one row per stage with metrics."""
    stages = [s for s in _STAGES if metrics.get(s)]
    if not stages:
        return ""
    from matplotlib.ticker import MaxNLocator

    def col(recs, key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in recs])

    fig, axs = _figure(len(stages), 2, (11, 3.2 * len(stages)))
    for row, stage in zip(axs, stages):
        recs = metrics[stage]
        ep = col(recs, "epoch")
        for key in ("train_loss", "val_loss"):
            v = col(recs, key)
            row[0].plot(ep, np.where(v > 0, v, np.nan), marker=".", label=key)
        row[0].set_yscale("log")
        row[0].set(title=f"{stage}: loss", xlabel="epoch")
        row[0].legend()
        row[1].plot(ep, col(recs, "learning_rate"), marker=".", color="tab:green")
        row[1].set(title=f"{stage}: learning rate", xlabel="epoch")
        for ax in row:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return "<h2>Training curves</h2>" + _img(out, "curves.png", _png_bytes(fig))


def _table(header: list[str], rows: list[list]) -> str:
    """An HTML table; floats get 4 significant digits, everything is escaped."""
    def cell(v):
        return html.escape(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _timings_section(metrics: dict[str, list[dict]]) -> str:
    """Per stage: epochs, total seconds, mean patches/s."""
    rows = []
    for stage, recs in metrics.items():
        if recs:
            pps = [float(r["patches_per_second"]) for r in recs if r.get("patches_per_second") is not None]
            left = recs[-1].get("time_left_seconds")
            stop = "-" if left is None else ("budget used" if left <= 0 else f"{left:.0f} s of budget left")
            rows.append([stage, len(recs), float(sum(float(r.get("seconds") or 0) for r in recs)),
                         float(np.mean(pps)) if pps else None, stop])
    header = ["stage", "epochs", "total s", "mean patches/s", "time budget"]
    return "<h2>Timings</h2>" + _table(header, rows) if rows else ""


def compute_psnr(run: pathlib.Path, cfg: dict, clean: pathlib.Path) -> dict | None:
    """PSNR (dB) of the noisy inputs and each stage's outputs against ``clean`` (same file names)."""
    from . import synth, tiffio

    sources = _sources(run, cfg, None)
    axes = cfg.get("axes") or None

    def read(path: pathlib.Path) -> np.ndarray:
        return tiffio.read_image(path, axes=axes)[0].astype(np.float32)

    return synth.psnr_table(
        (ref_path.name, read(ref_path),
         {label: read(folder / ref_path.name) for label, folder in sources
          if (folder / ref_path.name).is_file()})
        for ref_path in tiffio.list_tiffs(clean))


def _psnr_section(psnr: dict | None) -> str:
    """The PSNR table (per image and mean), or nothing."""
    if not psnr or not psnr.get("per_image"):
        return ""
    per = psnr["per_image"]
    keys = list(dict.fromkeys(k for r in per.values() for k in r))
    rows = [[n] + [r.get(k) for k in keys] for n, r in per.items()]
    rows.append(["mean"] + [(psnr.get("mean") or {}).get(k) for k in keys])
    return "<h2>PSNR (dB)</h2>" + _table(["image"] + keys, rows)


def write_report(run_dir, *, clean_dir=None, max_images: int = 3) -> pathlib.Path:
    """Write ``RUN/report/report.html`` (+ its PNGs) for the run folder ``run_dir``; return its path.

    PSNR comes from ``clean_dir`` when given, else from ``summary.json``. Raises
    ``UserInputError`` when ``run_dir`` has no ``config.json``.
    """
    run = pathlib.Path(run_dir)
    if not (run / "config.json").is_file():
        raise UserInputError(f"{run}: not a run folder (no config.json)")
    cfg = _read_json(run / "config.json")
    summary = _read_json(run / "summary.json", {}) or {}
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg_clean = pathlib.Path(cfg["clean_dir"]) if cfg.get("clean_dir") else None
    clean = pathlib.Path(clean_dir) if clean_dir else (cfg_clean if cfg_clean and cfg_clean.is_dir() else None)
    psnr = summary.get("psnr") if clean_dir is None else None
    psnr = psnr if psnr or clean is None else compute_psnr(run, cfg, clean)
    metrics = {s: _read_metrics(run / s / "metrics.jsonl") for s in _STAGES}
    stages = ", ".join(s for s in _STAGES if (run / s).is_dir()) or "none"
    body = [f"<h1>autostructn2v run: {html.escape(run.resolve().name)}</h1>",
            f"<p>folder: {html.escape(str(run.resolve()))}<br>stages: {html.escape(stages)}; "
            f"final: {html.escape(str(summary.get('final', '-')))}</p>",
            _psnr_section(psnr), _image_section(out, run, cfg, clean, max_images),
            _mask_section(out, run, summary), _curves_section(out, metrics), _timings_section(metrics),
            "<h2>Resolved config</h2><pre>" + html.escape(json.dumps(cfg, indent=2, sort_keys=True)) + "</pre>"]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>autostructn2v report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(b for b in body if b) + "</body></html>")
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def plot_mask_figure(info: dict, mask, tiled_mask, path: str | os.PathLike) -> None:
    """``mask/mask.png``: what the extractor measured and what it decided (atomic write).

    Panels: the correlation per lag after the high-pass (what the significance test sees), the
    noise correlation recovered before the high-pass (``deconvolved`` method only), the mask with
    the lags that passed outlined, and one random tiling of the mask over a training patch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .files import atomic_write
    from .maskshape import mask_summary

    m = np.asarray(mask, dtype=bool)
    rho = np.asarray(info.get("rho", info.get("acf_crop", np.zeros(m.shape))), dtype=float)
    panels = [(f"correlation after high-pass ({info.get('method', '?')})", rho, "RdBu_r", True)]
    if info.get("noise_acf") is not None:
        panels.append(("recovered noise correlation", np.asarray(info["noise_acf"], float), "RdBu_r", True))
    panels.append((f"mask: {info.get('summary') or mask_summary(m)}", m.astype(float), "gray", False))
    fig = Figure(figsize=(4 * (len(panels) + 1), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (title, a, cmap, bar) in zip(axes, panels):
        hy, hx = a.shape[0] // 2, a.shape[1] // 2  # a mask file need not be square
        ext = (-hx - 0.5, hx + 0.5, hy + 0.5, -hy - 0.5)
        off = np.abs(a).copy()
        off[hy, hx] = 0.0  # scale by the off-centre lags (the centre is 1 and saturates)
        lim = max(float(off.max()), 1e-6) if bar else 1.0
        im = ax.imshow(a, cmap=cmap, vmin=-lim if bar else 0, vmax=lim, extent=ext, interpolation="nearest")
        if bar:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            if a.shape == m.shape:  # outline the kept lags on the correlation maps
                ax.contour(np.arange(-hx, hx + 1), np.arange(-hy, hy + 1), m.astype(float), levels=[0.5],
                           colors="k", linewidths=1)
        ax.set_title("\n".join(title[i:i + 48] for i in range(0, len(title), 48)), fontsize=8)
        ax.set_xlabel("dx")
        ax.set_ylabel("dy")
    axes[-1].imshow(np.asarray(tiled_mask, dtype=bool), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[-1].set_title("tiled mask (one patch)", fontsize=8)
    fig.tight_layout()
    atomic_write(os.fspath(path), lambda f: fig.savefig(f, format="png"), ".png")
