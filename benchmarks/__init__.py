"""Benchmarks and the device check (installed as `resnet_jax.benchmarks`): `speed` (per-example
gradients, Grad-CAM, training, HVPs against their baselines), `audit` (against cleanlab), `explain`
(the counterfactual test), `precision` (bf16 against fp32) and `device_check` (`bin/device-check`).
Only the command line's `bench` group and `bin/device-check` import them; the library never does.
"""
