"""Code that runs inside XTuner's trainer processes.

The rendered config names these modules (bench/recipe.py), so they are imported by
every rank of `tools/train.py`, never by the appliance itself; they may import XTuner,
mmengine and CUDA libraries, which the appliance's own modules do not need.
"""

# What ProjectorSnapshotHook saves in XTuner's work dir: the projector's weights before
# and after training, and its gradient of the first backward pass.
PROJECTOR_SNAPSHOTS = {
    "before_train": "projector-initial.safetensors",
    "after_train": "projector-final.safetensors",
    "first_gradient": "projector-first-gradient.safetensors",
}
