"""Resampling to a target spacing and back: the geometry follows the interpolation exactly,
frames stay apart, labels go class by class."""

import numpy as np
import pytest

from clstm4d.data import (
    CaseData,
    Geometry,
    make_synthetic_case,
    resample_case,
    resample_image,
    resample_label,
    resampled_geometry,
    target_shape,
)


def _world(geometry):
    """World coordinates ``(3, *s)`` of every voxel centre of ``geometry``."""
    idx = np.indices(geometry.spatial_shape, dtype=np.float64).reshape(geometry.spatial_dims, -1)
    idx = np.concatenate([idx, np.zeros((3 - geometry.spatial_dims, idx.shape[1])),
                          np.ones((1, idx.shape[1]))])
    return (geometry.affine @ idx)[:3].reshape(3, *geometry.spatial_shape)


def test_resampled_values_lie_where_the_new_geometry_says():
    """A linear function of world position, sampled on a rotated anisotropic grid, resampled:
    the new values equal the function at the world positions of the new geometry (linear
    interpolation is exact for it away from the border)."""
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.1, 3.5])
    affine[:3, 3] = [10.0, -4.0, 2.5]
    g = Geometry("nifti", (12, 10, 6), frames=2, affine=affine)
    coef = np.array([0.3, -1.2, 0.7])
    world = _world(g)
    image = np.stack([np.tensordot(coef, world, 1) + f for f in (0.0, 5.0)])[:, None]
    shape = target_shape(g.spatial_shape, g.spacing, [1.0, 1.0, 1.0])
    assert shape == (10, 11, 21)
    new = resampled_geometry(g, shape)
    out = resample_image(image.astype(np.float32), shape)
    expected = np.stack([np.tensordot(coef, _world(new), 1) + f for f in (0.0, 5.0)])
    inner = (slice(None), 0, slice(1, -1), slice(1, -1), slice(2, -2))
    np.testing.assert_allclose(out[inner], expected[(slice(None), *inner[2:])], rtol=0, atol=1e-4)
    # same extent and directions; voxel size n * h / m
    np.testing.assert_allclose(new.direction, g.direction, atol=1e-12)
    np.testing.assert_allclose(new.spacing, np.array([9.6, 11.0, 21.0]) / shape, atol=1e-12)


def test_frames_never_mix_and_labels_keep_their_classes():
    rng = np.random.default_rng(1)
    image = rng.random((3, 2, 9, 7)).astype(np.float32)
    one = resample_image(image[1:2], (18, 5))
    np.testing.assert_array_equal(resample_image(image, (18, 5))[1:2], one)
    label = np.zeros((2, 20, 20), np.int64)
    label[0, 4:12, 5:15] = 2  # class 2 next to class 1: no class 1.5 in between
    label[0, 12:16, 5:15] = 1
    label[1, 2:6, 2:6] = 3
    up = resample_label(label, (40, 40))
    assert up.dtype == np.int64 and set(np.unique(up[0])) == {0, 1, 2}
    assert set(np.unique(up[1])) == {0, 3}
    np.testing.assert_array_equal(resample_label(up, (20, 20)), label)


def test_resample_case_and_back_keeps_a_smooth_object():
    case = make_synthetic_case(seed=2, frames=3, size=32, spatial_dims=3, spacing=(1, 1, 4))
    iso = resample_case(case, [1.0])
    assert iso.image.shape == (3, 1, 32, 32, 32) and iso.geometry.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(_world(iso.geometry)[:, 0, 0, :4],
                               _world(case.geometry)[:, 0, 0, :1] + [[0], [0], [-1.5]]
                               + np.arange(4) * [[0], [0], [1]], atol=1e-12)
    back = resample_case(iso, case.geometry.spacing)
    np.testing.assert_allclose(back.geometry.affine, case.geometry.affine, atol=1e-12)
    for k in (1, 2):
        a, b = back.label == k, case.label == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    assert resample_case(case, case.geometry.spacing) is case  # already there: untouched


def test_bad_target_spacing_names_the_key():
    g = Geometry.default("nifti", (8, 8, 3), frames=1)
    with pytest.raises(ValueError, match=r"data.spacing must be one positive number or 3"):
        target_shape(g.spatial_shape, g.spacing, [1.0, 2.0])
    case = CaseData(np.zeros((1, 1, 8, 8, 3), np.float32), None, g, name="c")
    with pytest.raises(ValueError, match="got \\[0.0\\]"):
        resample_case(case, [0.0])
