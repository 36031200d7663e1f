"""Training, inference, evaluation and the demo (needs the ``train`` extra: MONAI, PyYAML,
safetensors, tqdm; plots need the ``plot`` extra).

Import the submodules directly (``clstm4d.engine.train``, ``.predict``, ``.evaluate``, ...);
this package itself imports nothing heavy.
"""

from .errors import CheckpointError, ConfigError, UserError

__all__ = ["CheckpointError", "ConfigError", "UserError"]
