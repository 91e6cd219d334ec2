"""Small full pipeline for `make demo`: finishes in a few minutes on 2 CPU cores.

    autostructn2v demo-data demo_data
    autostructn2v train --config configs/demo.py \
        --config.input_dir=demo_data/noisy --config.output_dir=demo_run
"""

from autostructn2v_jax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.experiment_name = "demo"
    config.num_epochs = 6
    config.early_stopping_patience = 4
    for stage in (config.stage1, config.stage2):
        stage.features = 16
        stage.batch_size = 16
        stage.num_val_patches = 64
    config.stage1.patch_size = 64
    config.stage1.patches_per_image = 200
    config.stage1.learning_rate = 1e-3
    config.stage2.patch_size = 64
    config.stage2.patches_per_image = 200
    config.stage2.learning_rate = 1e-3
    config.stage2.extractor.num_patches = 500
    return config
