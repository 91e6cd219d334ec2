"""Stage 1 only (mode 2): Noise2Void for pixel-independent noise (shot, read, thermal).

    autostructn2v train --config configs/stage1_only.py \
        --config.input_dir=my_tiffs --config.output_dir=runs/n2v
"""

from autostructn2v_jax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.run_stage1 = True
    config.run_stage2 = False
    return config
