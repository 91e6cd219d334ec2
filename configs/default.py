"""Full two-stage pipeline (mode 1): Noise2Void, then structured Noise2Void with an automatic mask.

    autostructn2v train --config configs/default.py \
        --config.input_dir=my_tiffs --config.output_dir=runs/my_run
"""

from autostructn2v_jax.config import base_config


def get_config(arg=None):
    del arg
    return base_config()
