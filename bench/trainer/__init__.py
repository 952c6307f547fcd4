"""Code that runs inside XTuner's trainer processes.

The rendered config names these modules (bench/recipe/render.py), so they are imported by
every rank of `tools/train.py`, never by the appliance itself; they may import XTuner,
mmengine and CUDA libraries, which the appliance's own modules do not need.
"""
