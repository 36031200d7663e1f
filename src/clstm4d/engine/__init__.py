"""Training, inference, evaluation, planning and the commands that compose them (needs the
``train`` extra: MONAI, PyYAML, safetensors, tqdm; plots need the ``plot`` extra).

Subpackages, each one concern, each importing only from the ones listed before it:

- :mod:`~clstm4d.engine.run`: the on-disk contract: configuration, checkpoints, run and
  output folders, devices and precision;
- :mod:`~clstm4d.engine.inference`: sliding windows and time chunks, the :class:`Predictor`;
- :mod:`~clstm4d.engine.evaluation`: metrics, per-frame evaluation, plots;
- :mod:`~clstm4d.engine.planning`: fingerprint, topology, memory model, planner;
- :mod:`~clstm4d.engine.training`: losses, sampling, faults, the loop, ``train``;
- :mod:`~clstm4d.engine.apps`: the commands that compose them (demo, plan, evaluate, synth).

Import the modules directly (``clstm4d.engine.training.train``, ...); this package imports
nothing.
"""
