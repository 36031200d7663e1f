"""PatchDataset, normalisation and augmentation."""

import numpy as np
import pytest
import torch

from clstm4d.data import Augment, CaseData, Geometry, PatchDataset, normalize_intensity


def _coded_case(t=5, shape=(12, 10), name="coded"):
    """image value = 1000 t + 10 y + x (decodable position), label = (y + x) % 3."""
    grids = np.indices((t, *shape))
    code = 1000 * grids[0] + sum(10 ** (len(shape) - 1 - i) * grids[1 + i]
                                 for i in range(len(shape)))
    image = code[:, None].astype(np.float32)
    label = (grids[1:].sum(0) % 3).astype(np.int64)
    geom = Geometry.default("nifti", shape, t)
    return CaseData(image, label, geom, {"degraded": [2]}, name)


def test_same_crop_for_every_frame_and_label_matches_image():
    ds = PatchDataset([_coded_case()], window=3, roi=(4, 5), normalize=None, seed=1,
                      samples_per_case=8)
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"].numpy()[:, 0], item["label"].numpy()
        assert img.shape == (3, 4, 5) and lab.shape == (3, 4, 5)
        frame = (img // 1000).astype(int)
        assert (frame == item["start"] + np.arange(3)[:, None, None]).all()
        pos = img % 1000
        assert (pos == pos[0]).all()  # the same spatial crop in every frame
        y, x = pos[0] // 10, pos[0] % 10
        assert (lab == ((y + x) % 3)).all()  # the label is cropped where the image is
        assert item["degraded"].tolist() == [item["start"] + k == 2 for k in range(3)]


def test_augment_is_identical_across_frames_and_for_the_label():
    ds = PatchDataset([_coded_case(shape=(8, 8))], window=4, roi=8, normalize=None, seed=0,
                      augment=Augment(flip=0.5, rotate90=1.0, scale=0, shift=0),
                      samples_per_case=12)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"].numpy()[:, 0], item["label"].numpy()
        pos = img % 1000
        assert (pos == pos[0]).all()
        assert (lab == (pos // 10 + pos % 10) % 3).all()
        seen.add(tuple(pos[0, 0, :2]))
    assert len(seen) > 3  # several different flips/rotations were drawn


def test_short_sequences_are_padded_and_report_their_length():
    ds = PatchDataset([_coded_case(t=3)], window=5, roi=(12, 10), normalize=None)
    item = ds[0]
    assert item["length"] == 3 and item["start"] == 0
    assert (item["image"][3:] == 0).all() and (item["label"][3:] == 0).all()
    assert (item["image"][:3, 0] // 1000 == torch.arange(3)[:, None, None]).all()
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["image"].shape == (2, 5, 1, 12, 10) and batch["length"].tolist() == [3, 3]


@pytest.mark.parametrize("foreground_prob", [0.0, 1.0])
def test_roi_larger_than_case_is_zero_padded(foreground_prob):
    ds = PatchDataset([_coded_case(t=2, shape=(4, 3))], window=2, roi=(6, 5), normalize=None,
                      foreground_prob=foreground_prob)
    img = ds[0]["image"][0, 0]
    assert img.shape == (6, 5)
    assert (img[1:5, 1:4] == torch.tensor([[10 * y + x for x in range(3)]
                                           for y in range(4)])).all()
    assert img[0].eq(0).all() and img[:, 0].eq(0).all()


def test_foreground_sampling_hits_small_objects():
    label = np.zeros((4, 40, 40), np.int64)
    label[:, 30:33, 5:8] = 1
    case = CaseData(np.zeros((4, 1, 40, 40), np.float32), label,
                    Geometry.default("nifti", (40, 40), 4), {}, "tiny")
    fg = PatchDataset([case], window=2, roi=8, foreground_prob=1.0, samples_per_case=20)
    uniform = PatchDataset([case], window=2, roi=8, foreground_prob=0.0, samples_per_case=20)
    hits_fg = sum(bool(fg[i]["label"].any()) for i in range(20))
    hits_uniform = sum(bool(uniform[i]["label"].any()) for i in range(20))
    assert hits_fg == 20 and hits_uniform < 10


def test_deterministic_per_index_and_epoch():
    ds = PatchDataset([_coded_case()], window=2, roi=4, normalize=None, seed=3,
                      samples_per_case=4, augment=True)
    a = [ds[i]["image"] for i in range(4)]
    assert all(torch.equal(x, ds[i]["image"]) for i, x in enumerate(a))
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i]["image"]) for i, x in enumerate(a))


def test_normalize_intensity_matches_numpy_reference():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 3.0, size=(4, 2, 9, 7)).astype(np.float32)
    image[:, 1] += 100
    out = normalize_intensity(image, "percentile", 1, 99)
    for c in range(2):
        lo, hi = np.percentile(image[:, c], [1, 99])
        np.testing.assert_allclose(out[:, c], (image[:, c] - lo) / (hi - lo), rtol=1e-5,
                                   atol=1e-6)
    z = normalize_intensity(image, "zscore")
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)
    # one set of statistics for the whole case: frame differences are preserved up to scale
    ratio = (z[1, 0] - z[0, 0]) / (image[1, 0] - image[0, 0])
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-3)
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_intensity(image, "minmax")


def test_bad_arguments_are_named():
    case = _coded_case()
    with pytest.raises(ValueError, match="window must be >= 1"):
        PatchDataset([case], window=0)
    with pytest.raises(ValueError, match="foreground_prob must be in"):
        PatchDataset([case], foreground_prob=2)
    with pytest.raises(ValueError, match="roi must be a positive int or 2"):
        PatchDataset([case], roi=(4, 4, 4))[0]
    with pytest.raises(TypeError, match="cases must be Case or CaseData"):
        PatchDataset([np.zeros(3)])
    with pytest.raises(ValueError, match="Augment: flip must be a probability"):
        Augment(flip=1.5)


def test_lazy_cases_from_a_datalist_and_whole_sequences(tmp_path):
    pytest.importorskip("nibabel")
    from clstm4d.data import load_datalist, make_synthetic_case, write_synthetic_dataset

    dl = load_datalist(write_synthetic_dataset(tmp_path, cases=2, frames=6, size=20,
                                               validation=0))
    ds = PatchDataset(dl.training, window=None, roi=None, normalize=None)
    item = ds[1]
    ref = make_synthetic_case((0, 1), 6, 20, 2)
    np.testing.assert_allclose(item["image"].numpy(), ref.image, rtol=1e-6)
    np.testing.assert_array_equal(item["label"].numpy(), ref.label)
    assert item["case"] == "case_001" and item["length"] == 6
    assert np.flatnonzero(item["degraded"].numpy()).tolist() == ref.meta["degraded"]


@pytest.mark.parametrize("window", [1, 3, 7])  # one frame, within the sequence, padded
def test_a_window_played_backwards_is_the_forward_window_reversed(window):
    """reverse_time=1 gives the forward item's frames, labels, annotated and degraded flags
    in reverse order (the padding stays at the end); the image's frame code proves the order."""
    case = _coded_case(t=5)
    case = CaseData(case.image, case.label, case.geometry, case.meta, case.name,
                    np.array([True, False, True, True, False]))
    kw = dict(window=window, roi=(4, 5), normalize=None, seed=3, samples_per_case=6)
    forward, backward = PatchDataset([case], **kw), PatchDataset([case], reverse_time=1.0, **kw)
    for i in range(len(forward)):
        f, b = forward[i], backward[i]
        n = f["length"]
        assert b["start"] == f["start"] and b["length"] == n
        frames = (b["image"].numpy()[:n, 0, 0, 0] // 1000).astype(int)
        assert frames.tolist() == list(range(f["start"] + n - 1, f["start"] - 1, -1))
        for key in ("image", "label", "labelled", "degraded"):
            assert torch.equal(b[key][:n], f[key][:n].flip(0)), key
            assert torch.equal(b[key][n:], f[key][n:]), key  # padding
        assert b["degraded"][:n].tolist() == [f["start"] + n - 1 - k == 2 for k in range(n)]


def test_reverse_time_plays_about_that_share_backwards_and_zero_changes_nothing():
    kw = dict(window=3, roi=(4, 5), normalize=None, seed=0, samples_per_case=200)
    case = _coded_case()
    half = PatchDataset([case], reverse_time=0.5, **kw)
    backwards = [half[i]["image"][0, 0, 0, 0] > half[i]["image"][1, 0, 0, 0]
                 for i in range(len(half))]
    assert 0.4 < np.mean(backwards) < 0.6
    plain, zero = PatchDataset([case], **kw), PatchDataset([case], reverse_time=0.0, **kw)
    assert all(torch.equal(plain[i]["image"], zero[i]["image"]) for i in range(20))
    with pytest.raises(ValueError, match=r"reverse_time must be in \[0, 1\], got 1.5"):
        PatchDataset([case], reverse_time=1.5, **kw)


def test_prepare_holds_an_in_memory_case_once_normalised():
    """After ``prepare`` the dataset holds the normalised copy only: the raw image of a case
    given in memory is freed once the caller lets go of it (train holds data once, as the
    process model counts it), and the items are those of lazy normalisation."""
    import gc
    import weakref

    case = _coded_case()
    raw = weakref.ref(case.image)
    expected = PatchDataset([_coded_case()], window=3, roi=(4, 5), seed=2)[0]
    ds = PatchDataset([case], window=3, roi=(4, 5), seed=2)
    del case
    ds.prepare()
    gc.collect()
    assert raw() is None
    item = ds[0]
    assert all(torch.equal(item[k], expected[k]) for k in ("image", "label", "labelled"))


def test_a_flipped_one_voxel_patch_is_a_tensor():
    """A roi of 1 voxel flipped (found by tests/test_fuzz_inputs.py): numpy keeps a negative
    stride on a size-1 axis and calls the array contiguous; the item must still convert."""
    ds = PatchDataset([_coded_case()], window=2, roi=1, normalize=None, samples_per_case=4,
                      augment=Augment(flip=1.0, rotate90=0, scale=0, shift=0))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (2, 1, 1, 1) and item["label"].shape == (2, 1, 1)
        y, x = divmod(int(item["image"][0, 0, 0, 0]) % 1000, 10)
        assert int(item["label"][0, 0, 0]) == (y + x) % 3  # the label of the image's voxel
