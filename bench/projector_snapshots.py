"""The projector snapshots a run saves for perf's math check (bench/perf_compare.py):
ProjectorSnapshotHook (bench/trainer/hooks.py) writes them into XTuner's work dir,
and the appliance reads them there. Declared here, outside bench/trainer/, because the
appliance never imports the trainer processes' code."""

# The files: the projector's weights before training and after the compared steps,
# and its gradient of the first backward pass.
PROJECTOR_SNAPSHOTS = {
    "before_train": "projector-initial.safetensors",
    "after_compared_steps": "projector-compared.safetensors",
    "first_gradient": "projector-first-gradient.safetensors",
}
# Optimizer steps after which the projector's weights are compared (`llava-bench perf`):
# on the reference schedule the LR has risen from 1e-8 to 1.25e-4 by the third step, so
# the projector has moved; and few enough for the float32 reference, the slowest run.
COMPARED_STEPS = 3
