"""Train one stage of the default pipeline on a quality case with a time budget (for
`benchmarks/posterior_runs.py` and other studies of a finished run).

    PYTHONPATH=. .venv/bin/python benchmarks/train_case.py /tmp/mw1 5 --case white --set run_stage2=false
    PYTHONPATH=. .venv/bin/python benchmarks/train_case.py /tmp/mi1 6 --case hcorr --set run_stage1=false

Writes the case's 54 photo crops (`quality.write_case`: `noisy/`, `clean/`) into the folder and
trains `configs/default.py` into `run/` for the given minutes (whole run), with its own patches
per image and no early stopping; `--set KEY=VALUE` overrides config keys.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import quality  # noqa: E402

from autostructn2v_jax import api  # noqa: E402


def _value(text: str):
    try:
        return ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("minutes", type=float)
    parser.add_argument("--case", default="hcorr", choices=quality.CASES)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = pathlib.Path(args.folder)
    quality.write_case(args.case, out)
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = api.load_config("configs/default.py", input_dir=str(out / "noisy"), output_dir=str(out / "run"),
                          clean_dir=str(out / "clean"), time_budget_minutes=args.minutes,
                          num_epochs=100000, early_stopping=False, **overrides)
    t0 = time.perf_counter()
    summary = api.run(cfg)
    print(f"{time.perf_counter() - t0:.0f} s; PSNR {summary.get('psnr', {}).get('mean')}; "
          f"mask {summary['stages'].get('stage2', {}).get('mask', '-')}")


if __name__ == "__main__":
    main()
