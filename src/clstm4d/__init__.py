"""clstm4d: convolutional recurrent networks for 1D/2D/3D maps over time.

Importing the package loads torch (and numpy) only; I/O, training and plotting
dependencies are imported where they are used.
"""

from clstm4d.models import TimeAsChannelsUNet, TimeResolvedUNet, create_model, list_models
from clstm4d.nn import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

__version__ = "0.1.0"

__all__ = [
    "ConvGRU", "ConvGRUCell", "ConvLSTM", "ConvLSTMCell", "__version__",
    "TimeAsChannelsUNet", "TimeResolvedUNet", "create_model", "list_models",
]
