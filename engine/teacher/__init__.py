"""The ReFT teacher: the refusal feature, the build config, its losses, training, calibration and
training data (rephrasings, harmless templates, refusals)."""
