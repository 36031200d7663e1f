"""Convolutional recurrent layers (torch only): ConvLSTM/ConvGRU cells and sequence layers.

The README's "Layers" example, run as a doctest:

    >>> import torch
    >>> from clstm4d import ConvLSTM
    >>> lstm = ConvLSTM(spatial_dims=3, in_channels=1, hidden_channels=8, kernel_size=3,
    ...                 num_layers=2, bidirectional=True)
    >>> x = torch.randn(2, 5, 1, 8, 16, 16)                     # (N, T, C, D, H, W)
    >>> out, (h_n, c_n) = lstm(x, lengths=torch.tensor([5, 3]))  # padded batch, packed semantics
    >>> print(out.shape, h_n.shape)  # (2, 5, 16, 8, 16, 16) and (4, 2, 8, 8, 16, 16)
    torch.Size([2, 5, 16, 8, 16, 16]) torch.Size([4, 2, 8, 8, 16, 16])
"""

from clstm4d.nn.convrnn import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

__all__ = ["ConvGRU", "ConvGRUCell", "ConvLSTM", "ConvLSTMCell"]
