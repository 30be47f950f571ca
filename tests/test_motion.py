"""engine/motion.py: per-cell affine warps, flow warps and the video blend (pure JAX)."""
import numpy as np
import pytest

from dreamjax.engine import motion

cv2 = pytest.importorskip("cv2")


def _smooth(b=2, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(b):
        f = rng.uniform(0.05, 0.2, 3)
        out.append(np.stack([np.sin(xx * f[0] + yy * f[1] + c) for c in range(3)], -1) * (1 + f[2]))
    return np.asarray(out, np.float32)


def test_identity_is_exact():
    x = _smooth()
    tr = motion.Affine(np.ones(2), np.zeros(2), np.zeros((2, 2)))
    for mode in motion.MODES:
        np.testing.assert_allclose(np.asarray(motion.affine_warp(x, tr, mode)), x, atol=1e-6)


@pytest.mark.parametrize("zoom,angle,shift", [(1.1, 0.0, (0, 0)), (1.0, 12.0, (0, 0)), (1.05, -7.0, (2.5, -3.0))])
def test_affine_matches_opencv(zoom, angle, shift):
    """Same transform as OpenCV's getRotationMatrix2D + warpAffine (pytorch-deepdream's
    Ouroboros), border reflected (BORDER_REFLECT = symmetric)."""
    x = _smooth(1)
    h, w = x.shape[1:3]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
    m[:, 2] += shift
    ref = cv2.warpAffine(x[0], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    got = np.asarray(motion.affine_warp(x, motion.Affine([zoom], [angle], [shift]), "reflect"))[0]
    # OpenCV quantises bilinear weights to 1/32 of a pixel: allow that much of the local slope.
    assert np.abs(got - ref).max() < 0.03, np.abs(got - ref).max()


def test_each_cell_gets_its_own_transform():
    x = _smooth(3)
    tr = motion.Affine(np.array([1.0, 1.08, 0.95]), np.array([0.0, 5.0, -3.0]), np.array([[0, 0], [1, 2], [-2, 0.5]]))
    batched = np.asarray(motion.affine_warp(x, tr))
    for i in range(3):
        alone = np.asarray(motion.affine_warp(x[i:i + 1], motion.Affine(tr.zoom[i:i + 1], tr.angle[i:i + 1],
                                                                       tr.shift[i:i + 1])))
        np.testing.assert_array_equal(batched[i], alone[0])
    assert not np.allclose(batched[1], x[1])


def test_zoom_magnifies_about_the_centre():
    x = np.zeros((1, 41, 41, 3), np.float32)
    x[0, 20, 25] = 1.0  # 5 px right of the centre
    out = np.asarray(motion.affine_warp(x, motion.Affine([2.0], [0.0], [[0, 0]]), "zeros"))[0, ..., 0]
    ys, xs = np.nonzero(out > 0.2)  # magnified 2x: a blob of ~3x3 pixels
    assert abs(ys.mean() - 20) < 0.1 and abs(xs.mean() - 30) < 0.6  # ~10 px right of the centre


def test_flow_warp_with_a_constant_flow_is_a_shift():
    x = _smooth(1)
    flow = np.zeros((1,) + x.shape[1:3] + (2,), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -2.0  # pixel (y, x) comes from (y - 2, x + 3)
    out = np.asarray(motion.flow_warp(x, flow))[0]
    np.testing.assert_allclose(out[2:, :-3], x[0, :-2, 3:], atol=1e-6)


def test_flow_warp_aligns_the_previous_frame():
    from dreamjax.outputs import video

    frames = video.synthetic_frames(2, 64, 80, speed=4)
    f = video.optical_flow(frames[1], frames[0], "dis")
    prev = frames[0][None].astype(np.float32)
    cur = frames[1][None].astype(np.float32)
    warped_err = float(motion.temporal_difference(cur, prev, f[None])[0])
    plain_err = float(motion.temporal_difference(cur, prev)[0])
    assert warped_err < 0.6 * plain_err, (warped_err, plain_err)


def test_blend_weights_per_cell():
    src = np.ones((2, 4, 4, 3), np.float32)
    prev = np.zeros_like(src)
    out = np.asarray(motion.video_start(src, prev, np.zeros((2, 4, 4, 2)), np.array([1.0, 0.25]), use_flow=True))
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 0.25)


def test_bad_border_mode():
    with pytest.raises(ValueError, match="motion.border"):
        motion.affine_warp(_smooth(1), motion.Affine([1.0], [0.0], [[0, 0]]), "wrap")
