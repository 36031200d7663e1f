"""Convolutional recurrent layers (torch only): ConvLSTM/ConvGRU cells and sequence layers."""

from clstm4d.nn.convrnn import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

__all__ = ["ConvGRU", "ConvGRUCell", "ConvLSTM", "ConvLSTMCell"]
