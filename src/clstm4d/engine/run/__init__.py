"""The on-disk contract: configuration, checkpoints, run and output folders, devices and
precision."""
