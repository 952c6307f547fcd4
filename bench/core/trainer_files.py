"""The files the trainer processes write into XTuner's work dir for the appliance to
read: declared here, in the shared words, because the appliance never imports the
trainer processes' code (bench/trainer/) and the trainer imports nothing else of it."""

STARTUP_EVENTS_NAME = "startup-events.json"  # rank 0's start-up notes (bench/verdict/startup.py)
# The note of a trainer started early (bench/trainer/gate.py): its imports were done.
IMPORTS_DONE_EVENT = "imports_done"
RANK_TIMES_FOLDER = "rank-times"  # rank-<global rank>.json, one per rank (bench/verdict/ranks.py)
# The projector snapshots for perf's math check (bench/verdict/perf_compare.py): the
# projector's weights before training and after the compared steps, and its gradient
# of the first backward pass.
PROJECTOR_SNAPSHOTS = {
    "before_train": "projector-initial.safetensors",
    "after_compared_steps": "projector-compared.safetensors",
    "first_gradient": "projector-first-gradient.safetensors",
}
# Optimizer steps after which the projector's weights are compared (`llava-bench perf`):
# on the reference schedule the LR has risen from 1e-8 to 1.25e-4 by the third step, so
# the projector has moved; and few enough for the float32 reference, the slowest run.
COMPARED_STEPS = 3
# `run --profile`: rank 0's kernel time by kind over PROFILED_ITERATIONS (0-based
# iteration indices, mmengine's runner.iter), before perf's measured window (steps
# 11-20) so that the profiler's overhead and its export stay out of the timed steps.
PROFILE_NAME = "profile.json"
PROFILE_TRACE_NAME = "profile-trace.json.gz"
PROFILED_ITERATIONS = (5, 6)
