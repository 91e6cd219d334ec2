"""Stage 2 with a mask extracted directly from the raw noisy images (mode 4); no stage 1.

    autostructn2v train --config configs/stage2_extract.py \
        --config.input_dir=my_tiffs --config.output_dir=runs/s2x
"""

from autostructn2v_jax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.run_stage1 = False
    config.run_stage2 = True
    config.stage2.mask_source = "extractor"
    return config
