"""Compile time of one train step per convolution implementation (no persistent cache).

    JAX_COMPILATION_CACHE_DIR= .venv/bin/python benchmarks/compile_time.py edges
    JAX_COMPILATION_CACHE_DIR= .venv/bin/python benchmarks/compile_time.py xla

Tiny U-Net (features 8, depth 2, patch 32, batch 4): where compilation, not stepping, is the cost
(the test suite, short runs). Prints init time, first step (compile + run) and a second step.
"""
import sys, time, jax, jax.numpy as jnp, numpy as np
from autostructn2v_jax import config as C, masking, models, preprocess, sampling, train
impl = sys.argv[1]
cfg = C.base_config(); s = cfg.stage1
s.patch_size, s.batch_size, s.features, s.steps_per_dispatch = 32, 4, 8, 1
spec = train.StageSpec.from_config("stage1", s, masking.stage1_kernel(1))
rng = np.random.default_rng(0)
bank = jax.device_put(sampling.make_bank([preprocess.normalize(rng.random((64, 64)).astype(np.float32))[0]], 32))
apply_fn = models.make_apply_fn(8, 2, impl)
t0 = time.perf_counter()
state = train.init_state(spec, 0, 1e-3)
t1 = time.perf_counter()
fn = train.make_train_fn(spec, apply_fn)
state, l = fn(state, bank, jax.random.key(0)); jax.block_until_ready(l)
t2 = time.perf_counter()
state, l = fn(state, bank, jax.random.key(0)); jax.block_until_ready(l)
t3 = time.perf_counter()
print(impl, f"init {t1-t0:.1f}s first step {t2-t1:.1f}s second {t3-t2:.3f}s")
