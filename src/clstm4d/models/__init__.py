"""Time-resolved segmentation networks (torch only): the UNet with ConvLSTM/ConvGRU memory,
the time-as-channels baseline, and named presets."""

from clstm4d.models.presets import create_model, list_models
from clstm4d.models.protocol import SequenceModel
from clstm4d.models.tac import TimeAsChannelsUNet
from clstm4d.models.unet import TimeResolvedUNet

__all__ = ["SequenceModel", "TimeAsChannelsUNet", "TimeResolvedUNet", "create_model",
           "list_models"]
