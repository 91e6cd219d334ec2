"""Stage 2 with a saved structural mask (mode 3), e.g. `mask/structural_mask.npy` of an earlier run.

    autostructn2v train --config configs/stage2_mask_file.py \
        --config.input_dir=my_tiffs --config.output_dir=runs/s2 \
        --config.stage2.mask_file_path=runs/old/mask/structural_mask.npy
"""

from autostructn2v_jax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.run_stage1 = False
    config.run_stage2 = True
    config.stage2.mask_source = "file"
    return config
