"""Command line: `autostructn2v {train,predict,extract-mask,report,demo-data}`.

Config overrides use the ml_collections flag syntax: `--config.stage1.patch_size=64`.
Every user error is printed as one line (`autostructn2v: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

log = logging.getLogger("autostructn2v_jax")


def _setup_jax() -> None:
    """A persistent compile cache: the second run of a command skips most compilation."""
    import jax

    cache = os.environ.get("AUTOSTRUCTN2V_CACHE_DIR") or str(pathlib.Path.home() / ".cache" / "autostructn2v_jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from autostructn2v_jax import compile_options, parallel

    compile_options.check_environment()  # a bad AUTOSTRUCTN2V_CPU_CONV fails before any output
    parallel.initialize_distributed()


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            item = arg[len("--config."):]
            if "=" not in item and i + 1 < len(argv):
                item = f"{item}={argv[i + 1]}"
                i += 1
            overrides.append(item)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autostructn2v",
        description="Self-supervised denoising of microscopy TIFFs: Noise2Void (stage 1) and "
                    "structured Noise2Void with an automatically found structural mask (stage 2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a run (stage 1, stage 2 or both) and denoise its input",
                       description="Train on a folder of noisy TIFFs. Override any config key with "
                                   "--config.KEY=VALUE, e.g. --config.input_dir=DIR --config.output_dir=RUN.")
    p.add_argument("--config", default=None,
                   help="config file (PATH[:ARG]) with get_config(); default: the built-in full "
                        "pipeline (configs/default.py)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("predict", help="denoise TIFFs with a trained run")
    p.add_argument("--run", required=True, help="run folder written by `train`")
    p.add_argument("--input", required=True, help="a TIFF file or a folder of TIFFs")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--stage", choices=("stage1", "stage2"), default=None,
                   help="which stage to apply (default: the last one trained)")
    p.add_argument("--axes", default="", help="axes of the input, e.g. YX, SYX, ZYX, TYX")
    p.add_argument("--float32", action="store_true", help="write float32 instead of the input dtype")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation (mean over 8 flips/rotations); default: as the run "
                        "was configured (config key tta)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = sub.add_parser("extract-mask", help="find the structural mask of a folder of noisy TIFFs")
    p.add_argument("--input", required=True, help="folder of noisy TIFFs")
    p.add_argument("--output", required=True, help="where to write the mask (.npy)")
    p.add_argument("--config", default=None,
                   help="config file; uses stage2.extractor (default: the built-in defaults)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing mask file")

    p = sub.add_parser("report", help="write RUN/report/report.html for a run folder")
    p.add_argument("--run", required=True, help="run folder written by `train`")
    p.add_argument("--clean", default=None, help="folder of clean references (same file names): PSNR")

    p = sub.add_parser("demo-data", help="write a small synthetic noisy/clean TIFF dataset")
    p.add_argument("output", help="folder to create (noisy/ and clean/ inside)")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--noise", default="hcorr", choices=("white", "hcorr", "vcorr", "corr2d"))
    p.add_argument("--seed", type=int, default=0)
    return parser


def _minutes_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """A tqdm bar per stage showing epoch, losses and patches/s."""

    def __init__(self, total_epochs: int, enabled: bool):
        self.total, self.enabled, self.bars = total_epochs, enabled, {}

    def __call__(self, stage: str, record: dict) -> None:
        if not self.enabled:
            left = record.get("time_left_seconds")
            log.info("%s epoch %d: loss %.5g val %.5g lr %.3g %.0f patches/s%s", stage, record["epoch"],
                     record["train_loss"], record["val_loss"], record["learning_rate"],
                     record["patches_per_second"],
                     "" if left is None else f", {_minutes_seconds(left)} left")
            return
        from tqdm import tqdm

        if stage not in self.bars:
            for bar in self.bars.values():
                bar.close()
            self.bars[stage] = tqdm(total=self.total, desc=stage, unit="epoch", initial=record["epoch"] - 1)
        bar = self.bars[stage]
        extra = {}
        if "time_left_seconds" in record:
            extra["left"] = _minutes_seconds(record["time_left_seconds"])
        bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{record['val_loss']:.4g}",
                        pps=f"{record['patches_per_second']:.0f}", **extra)
        bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _load_config(spec: str | None):
    """`--config` file, or the built-in defaults (= configs/default.py) from any working directory."""
    from autostructn2v_jax import config as config_lib

    return config_lib.load_config(spec) if spec else config_lib.base_config()


def split_cpu_for_config(cfg) -> None:
    """One JAX device per core for large CPU runs (config ``cpu_devices``), before JAX starts.
    (Public for scripts that run the pipeline in-process as `train` would, e.g. benchmarks/quality.py.)"""
    from autostructn2v_jax import compile_options, parallel

    try:
        stages = [(int(st.batch_size), int(st.patch_size), int(st.features))
                  for run, st in ((cfg.run_stage1, cfg.stage1), (cfg.run_stage2, cfg.stage2)) if run]
        requested = max(int(cfg.cpu_devices), 0)
    except (TypeError, ValueError):
        return  # a bad value: the config check that follows names the key
    cores = parallel.available_cores()
    libraries = ([compile_options.stage_library(features) for _, _, features in stages]
                 if requested == 0 and cores > 1 else None)
    parallel.split_cpu(parallel.cpu_device_count(requested, stages, cores, libraries))


def _cmd_train(args, overrides) -> int:
    from autostructn2v_jax import config as config_lib

    cfg = _load_config(args.config)
    config_lib.apply_overrides(cfg, overrides)
    if args.print_config:
        print(config_lib.to_json(cfg))
        return 0
    from autostructn2v_jax import pipeline  # imports JAX: a bad config file is reported without it

    split_cpu_for_config(cfg)
    progress = _Progress(int(cfg.num_epochs), enabled=not args.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    try:
        summary = pipeline.run_pipeline(cfg, progress=progress)
    finally:
        progress.close()
    final = summary["outputs"][summary["final"]]
    print(f"denoised images: {final}  ({time.perf_counter() - t0:.0f} s)")
    if summary.get("stages", {}).get("stage2", {}).get("mask"):
        print(f"structural mask: {summary['stages']['stage2']['mask']}")
    if summary.get("psnr"):
        mean = summary["psnr"]["mean"]
        print("PSNR vs clean (dB): " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    return 0


def _cmd_predict(args) -> int:
    from autostructn2v_jax import inference

    written = inference.predict_files(args.run, args.input, args.output, overwrite=args.overwrite,
                                     axes=args.axes, output_dtype="float32" if args.float32 else "input",
                                     tta=args.tta, stage=args.stage)
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0


def _cmd_extract_mask(args, overrides) -> int:
    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import extraction, maskfile, pipeline
    from autostructn2v_jax.errors import UserInputError

    out = pathlib.Path(args.output)
    if out.is_dir():
        raise UserInputError(f"{out}: is a folder; --output needs a .npy file path")
    if out.exists() and not args.overwrite:
        raise UserInputError(f"{out}: exists; pass --overwrite to replace it")
    cfg = _load_config(args.config)
    config_lib.apply_overrides(cfg, overrides)
    config_lib.validate_extractor_config(cfg.stage2.extractor, prefix="stage2.extractor")
    ds = pipeline.load_dataset(args.input, cfg.axes)
    # The very call the pipeline makes for mask_source="extractor" (same patches, pixel count, cap).
    mask, info = extraction.mask_from_planes(ds.flat(), cfg.stage2.extractor, int(cfg.random_seed),
                                             patch_size=int(cfg.stage2.patch_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    maskfile.save_mask(out, mask)
    print(f"{out}: {info['summary']}")
    return 0


def _cmd_report(args) -> int:
    from autostructn2v_jax import report

    path = report.write_report(args.run, clean_dir=args.clean)
    print(f"wrote {path}")
    return 0


def _cmd_demo_data(args) -> int:
    from autostructn2v_jax import synth
    from autostructn2v_jax.errors import UserInputError

    if args.count < 1:
        raise UserInputError(f"--count must be >= 1, got {args.count}")
    if args.size < 16:
        raise UserInputError(f"--size must be >= 16, got {args.size}")
    out = synth.write_demo_data(args.output, count=args.count, size=args.size, case=args.noise, seed=args.seed)
    print(f"wrote {args.count} noisy/clean pairs ({args.noise} noise) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_config_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if overrides and args.command not in ("train", "extract-mask"):
        parser.error(f"--config.* overrides are only for train and extract-mask, got {overrides[0]!r}")
    from autostructn2v_jax.errors import TrainingDivergedError, UserInputError

    try:
        _setup_jax()
        if args.command == "train":
            return _cmd_train(args, overrides)
        if args.command == "predict":
            return _cmd_predict(args)
        if args.command == "extract-mask":
            return _cmd_extract_mask(args, overrides)
        if args.command == "report":
            return _cmd_report(args)
        return _cmd_demo_data(args)
    except (UserInputError, TrainingDivergedError) as err:
        print(f"autostructn2v: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autostructn2v: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
