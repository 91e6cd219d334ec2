"""autostructn2v-jax: self-supervised two-stage denoising (Noise2Void + structured Noise2Void)."""

from autostructn2v_jax.api import denoise, extract_mask, history, load_config, run, tiled_mask, write_report

__version__ = "0.1.0"
__all__ = ["load_config", "run", "denoise", "extract_mask", "history", "tiled_mask", "write_report", "__version__"]
