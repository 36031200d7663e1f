"""ConvLSTM/ConvGRU against an independent float64 reference written from the equations.

The reference shares no code with clstm4d: it loops over samples and frames one at a time,
pads each convolution itself ("same" for odd and even kernels, extra voxel at the end), adds
both biases, applies the gate equations of issue 2 (LSTM i, f, g, o with optional peepholes;
GRU r, z, n with n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), honours `lengths` by
running each sample only over its valid frames (reverse direction starting at its last valid
frame, zero outputs past it). Outputs, final states and parameter gradients of the float32
layer must match it, with and without `recompute`.
"""

import pytest
import torch
import torch.nn.functional as F

from clstm4d import ConvGRU, ConvLSTM

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _same_conv(x, w, dilation):
    pads = []
    for k, d in zip(reversed(w.shape[2:]), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return _CONV[x.dim() - 2](F.pad(x, pads), w, dilation=dilation)


def _reference(mod, x, lengths, gru):
    """Returns output (n, t, D*h, *s), h_n and c_n (L*D, n, h, *s), float64 params."""
    params = {k: v.detach().double().requires_grad_(True) for k, v in mod.named_parameters()}
    n, t = x.shape[:2]
    hid, dirs = mod.hidden_channels, 2 if mod.bidirectional else 1
    per_channel = (1, -1) + (1,) * (x.dim() - 3)  # broadcast a (h,) vector over (1, h, *s)
    inp, h_fin, c_fin = x.double(), [], []
    for layer in range(mod.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
            b_ih, b_hh = params.get("bias_ih" + sfx), params.get("bias_hh" + sfx)
            peep = params.get("weight_peephole" + sfx)
            samples, hs, cs = [], [], []
            for b in range(n):
                valid = int(lengths[b]) if lengths is not None else t
                h = torch.zeros((1, hid, *x.shape[3:]), dtype=torch.float64)
                c = torch.zeros_like(h)
                frames = [torch.zeros_like(h) for _ in range(t)]
                for s in (range(valid - 1, -1, -1) if d else range(valid)):
                    gx = _same_conv(inp[b : b + 1, s], w_ih, mod.dilation)
                    gh = _same_conv(h, w_hh, mod.dilation)
                    if b_ih is not None:
                        gx, gh = gx + b_ih.view(per_channel), gh + b_hh.view(per_channel)
                    if gru:
                        xr, xz, xn = gx.chunk(3, 1)
                        hr, hz, hn = gh.chunk(3, 1)
                        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                        h = (1 - z) * torch.tanh(xn + r * hn) + z * h
                    else:
                        i, f, g, o = (gx + gh).chunk(4, 1)
                        if peep is not None:
                            w_ci, w_cf, w_co = (w.view(per_channel) for w in peep.chunk(3))
                            i, f = i + w_ci * c, f + w_cf * c
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        if peep is not None:
                            o = o + w_co * c
                        h = torch.sigmoid(o) * torch.tanh(c)
                    frames[s] = h
                samples.append(torch.cat(frames, 0))  # (t, h, *s)
                hs.append(h)
                cs.append(c)
            outs.append(torch.stack(samples, 0))  # (n, t, h, *s)
            h_fin.append(torch.cat(hs, 0))
            c_fin.append(torch.cat(cs, 0))
        inp = torch.cat(outs, 2)  # (n, t, D*h, *s)
    return inp, torch.stack(h_fin), torch.stack(c_fin), params


CASES = {
    "3d-lstm-bi-peephole-even-k-lengths": (3, False, True, True, 2, 1, True),
    "3d-gru-bi-lengths": (3, True, True, False, 3, 1, True),
    "2d-lstm-anisotropic-k-dilation": (2, False, False, False, (3, 4), (2, 1), False),
    "1d-gru-k5-lengths": (1, True, False, False, 5, 1, True),
    "3d-lstm-uni": (3, False, False, False, 3, 1, False),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, recompute):
    spatial_dims, gru, bidirectional, peephole, kernel, dilation, use_lengths = CASES[case]
    torch.manual_seed(0)
    kw = dict(spatial_dims=spatial_dims, in_channels=3, hidden_channels=4, kernel_size=kernel,
              num_layers=2, bidirectional=bidirectional, dilation=dilation,
              recompute=recompute)
    mod = ConvGRU(**kw) if gru else ConvLSTM(**kw, peephole=peephole)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.3)  # every parameter (biases, peepholes too) non-trivial
    x = torch.randn(3, 5, 3, *{1: (7,), 2: (6, 5), 3: (4, 5, 3)}[spatial_dims])
    lengths = torch.tensor([5, 2, 4]) if use_lengths else None

    out, state = mod(x, lengths=lengths)
    h_n = state if gru else state[0]
    ref_out, ref_h, ref_c, ref_params = _reference(mod, x, lengths, gru)

    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_n.double(), ref_h, rtol=1e-4, atol=1e-5)
    if not gru:
        torch.testing.assert_close(state[1].double(), ref_c, rtol=1e-4, atol=1e-5)

    w_out, w_h = torch.randn_like(out), torch.randn_like(h_n)
    ((out * w_out).sum() + (h_n * w_h).sum()).backward()
    ((ref_out * w_out.double()).sum() + (ref_h * w_h.double()).sum()).backward()
    for name, p in mod.named_parameters():
        ref_grad = ref_params[name].grad
        torch.testing.assert_close(p.grad.double(), ref_grad, rtol=1e-3,
                                   atol=1e-4 * ref_grad.abs().max().item(), msg=name)
