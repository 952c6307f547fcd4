"""Code that runs inside XTuner's trainer processes.

The rendered config names these modules (bench/recipe.py), so they are imported by
every rank of `tools/train.py`, never by the appliance itself; they may import XTuner,
mmengine and CUDA libraries, which the appliance's own modules do not need.
"""

# What ProjectorSnapshotHook saves in XTuner's work dir: the projector's weights before
# training and after the compared steps, and its gradient of the first backward pass.
PROJECTOR_SNAPSHOTS = {
    "before_train": "projector-initial.safetensors",
    "after_compared_steps": "projector-compared.safetensors",
    "first_gradient": "projector-first-gradient.safetensors",
}
# Optimizer steps after which the projector's weights are compared (`llava-bench perf`):
# on the reference schedule the LR has risen from 1e-8 to 1.25e-4 by the third step, so
# the projector has moved; and few enough for the float32 reference, the slowest run.
COMPARED_STEPS = 3
