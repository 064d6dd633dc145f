"""dataset/randaugment.py against the original's RandAugment: random-number order and each operation
on small hand-computed arrays, AutoContrast's original (default) and PIL modes included."""
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from dataset import randaugment as ra
from dataset.randaugment import (OPS, RandomAugment, autocontrast_func, brightness_func, equalize_func,
                                 rotate_func, sharpness_func, shear_x_func, shear_y_func, translate_x_func,
                                 translate_y_func)

AUGS = ['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
        'TranslateX', 'TranslateY', 'Rotate']
FILL = (128, 128, 128)


def rgb(channel):
    """An HWC image whose three channels all equal `channel` (2-D)."""
    return np.repeat(np.asarray(channel, dtype=np.uint8)[..., None], 3, axis=2)


# ---- random-number order ---------------------------------------------------------------------

def expected_draws(seed, augs, n=2, level=7):
    """Hand re-implementation of the original's draw sequence (one choice of N names; per name a
    skip draw and, for an applied signed operation, a sign draw): [(name, args)] of applied ops and
    the next random number after the call."""
    rng = np.random.RandomState(seed)
    names = rng.choice(augs, n)
    applied = []
    for name in names:
        if rng.random_sample() > 0.5:
            continue
        if name in ('ShearX', 'ShearY'):
            args = (-0.21 if rng.random_sample() > 0.5 else 0.21, FILL)
        elif name in ('TranslateX', 'TranslateY'):
            args = (-7.0 if rng.random_sample() > 0.5 else 7.0, FILL)
        elif name == 'Rotate':
            args = (-21.0 if rng.random_sample() < 0.5 else 21.0, FILL)
        elif name in ('Brightness', 'Sharpness'):
            args = (1.36,)
        else:
            args = ()
        applied.append((str(name), args))
    return applied, rng.random_sample()


def test_level_arguments():
    assert ra._enhance_args(7) == (7 / 10 * 1.8 + 0.1,) and abs(ra._enhance_args(7)[0] - 1.36) < 1e-12
    np.random.seed(0)  # first random() is 0.5488 > 0.5: shear/translate flip, rotate keeps its sign
    assert ra._shear_args(7) == (-0.7 * 0.3, FILL)
    np.random.seed(0)
    assert ra._translate_args(7) == (-7.0, FILL)
    np.random.seed(0)
    assert ra._rotate_args(7) == (21.0, FILL)


@pytest.mark.parametrize('seed', range(40))
def test_random_order_matches_hand_sequence(seed, monkeypatch):
    calls = []

    def recorder(name):
        def op(img, *args):
            calls.append((name, args))
            return img
        return op

    for name, (func, level_to_args) in list(OPS.items()):
        monkeypatch.setitem(OPS, name, (recorder(name), level_to_args))
    img = np.zeros((4, 4, 3), np.uint8)
    np.random.seed(seed)
    RandomAugment(2, 7, augs=AUGS)(img)
    after = np.random.random()
    applied, next_draw = expected_draws(seed, AUGS)
    assert [(n, tuple(round(a, 12) if isinstance(a, float) else a for a in args)) for n, args in calls] == \
        [(n, tuple(round(a, 12) if isinstance(a, float) else a for a in args)) for n, args in applied]
    assert after == next_draw  # the call consumed exactly the draws of the hand sequence


def test_random_augment_applies_the_drawn_operations_in_order():
    np.random.seed(3)
    array = (np.random.rand(17, 23, 3) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    aug = RandomAugment(2, 7, isPIL=True, augs=AUGS)
    changed = 0
    for seed in range(30):
        np.random.seed(seed)
        out = aug(image)
        # the PIL image as its HWC array, through the hand sequence's operations, one after the other
        expected = array
        for name, args in expected_draws(seed, AUGS)[0]:
            expected = OPS[name][0](expected, *args)
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8
        assert np.array_equal(out, expected), seed
        changed += not np.array_equal(out, array)
    assert changed >= 10  # most seeds apply an operation that changes the image


def _warp_reference(img, forward, fill):
    """cv2.warpAffine(img, forward) from scratch: each output pixel (x, y) samples the input at
    forward^-1 (x, y) bilinearly, `fill` outside, rounded to the nearest integer."""
    h, w = img.shape[:2]
    inverse = np.linalg.inv(np.vstack([np.asarray(forward, np.float64), [0, 0, 1]]))
    padded = np.empty((h + 4, w + 4, 3))
    padded[:] = fill
    padded[2:-2, 2:-2] = img
    ys, xs = np.mgrid[:h, :w]
    sx, sy, _ = np.einsum('ij,jhw->ihw', inverse, np.stack([xs, ys, np.ones_like(xs)]))
    sx, sy = sx.clip(-1, w), sy.clip(-1, h)  # anything further out reads only the fill as well
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(x, y):
        return padded[y + 2, x + 2]
    out = ((1 - fx) * (1 - fy) * at(x0, y0) + fx * (1 - fy) * at(x0 + 1, y0)
           + (1 - fx) * fy * at(x0, y0 + 1) + fx * fy * at(x0 + 1, y0 + 1))
    return np.floor(out + 0.5)


def _rotation(degree, w, h):
    """Counter-clockwise (y down) rotation about (w / 2, h / 2) as a 2x3 forward matrix."""
    c, s = np.cos(np.radians(degree)), np.sin(np.radians(degree))
    return [[c, s, (1 - c) * w / 2 - s * h / 2], [-s, c, s * w / 2 + (1 - c) * h / 2]]


def test_every_op_matches_pil_or_a_numpy_reference():
    """Every operation of OPS at the configs' magnitude 7 on small synthetic images, against PIL
    (ImageOps, ImageEnhance) or a from-scratch numpy computation written here."""
    rng = np.random.RandomState(1)
    img = (1 + rng.rand(24, 30, 3) * 254).astype(np.uint8)  # 720 pixels: Equalize's step is 2
    img[0, 0, 0] = 0  # R has minimum 0, G and B above 0
    pil = Image.fromarray(img)
    mild = (60 + rng.rand(9, 11, 3) * 130).astype(np.uint8)  # sharpened at 1.36 it stays within [0, 255]
    yy, xx = np.mgrid[:12, :15]
    smooth = (30 + 8 * xx[..., None] + 6 * yy[..., None] + 10 * np.arange(3)).astype(np.uint8)
    factor = 7 / 10 * 1.8 + 0.1  # 1.36

    def stretched(channel):  # PIL's autocontrast of one channel
        return np.asarray(ImageOps.autocontrast(Image.fromarray(channel)))
    checks = {
        'Identity': [(OPS['Identity'][0](img), img)],
        # the original's: R (minimum 0) stretched as PIL does, G and B (minimum above 0) saturated
        'AutoContrast': [(autocontrast_func(img), np.stack([stretched(img[..., 0]), np.full((24, 30), 255),
                                                            np.full((24, 30), 255)], axis=2)),
                         (ra.pil_autocontrast_func(img), np.asarray(ImageOps.autocontrast(pil)))],
        'Equalize': [(equalize_func(img), np.asarray(ImageOps.equalize(pil)))],
        'Brightness': [(brightness_func(img, factor), np.asarray(ImageEnhance.Brightness(pil).enhance(factor)))],
        'Sharpness': [(sharpness_func(mild, factor),
                       np.asarray(ImageEnhance.Sharpness(Image.fromarray(mild)).enhance(factor)))],
        'Solarize': [(ra.solarize_func(img, *ra._solarize_args(7)), np.asarray(ImageOps.solarize(pil, 179)))],
        'Posterize': [(ra.posterize_func(img, *ra._posterize_args(7)), np.asarray(ImageOps.posterize(pil, 2)))],
        'TranslateX': [(translate_x_func(smooth, v, FILL), _warp_reference(smooth, [[1, 0, -v], [0, 1, 0]], FILL))
                       for v in (7.0, -7.0)],
        'TranslateY': [(translate_y_func(smooth, v, FILL), _warp_reference(smooth, [[1, 0, 0], [0, 1, -v]], FILL))
                       for v in (7.0, -7.0)],
        'ShearX': [(shear_x_func(smooth, v, FILL), _warp_reference(smooth, [[1, v, 0], [0, 1, 0]], FILL))
                   for v in (0.21, -0.21)],
        'ShearY': [(shear_y_func(smooth, v, FILL), _warp_reference(smooth, [[1, 0, 0], [v, 1, 0]], FILL))
                   for v in (0.21, -0.21)],
        'Rotate': [(rotate_func(smooth, v, FILL), _warp_reference(smooth, _rotation(v, 15, 12), FILL))
                   for v in (21.0, -21.0)],
    }
    # PIL rounds the grey image (Color) and its mean (Contrast) to integers, we do not: at most 1 apart
    close = {'Color': [(ra.color_func(img, factor), np.asarray(ImageEnhance.Color(pil).enhance(factor)))],
             'Contrast': [(ra.contrast_func(img, factor), np.asarray(ImageEnhance.Contrast(pil).enhance(factor)))]}
    np.random.seed(5)
    rel_y, rel_x = np.random.random(2)
    cy, cx = int(rel_y * 24), int(rel_x * 30)
    cut = img.copy()
    cut[max(cy - 14, 0):cy + 14, max(cx - 14, 0):cx + 14] = FILL  # side int(0.7 * 40) = 28, clipped
    np.random.seed(5)
    checks['Cutout'] = [(ra.cutout_func(img, *ra._cutout_args(7)), cut)]
    assert set(checks) | set(close) == set(OPS)  # a new operation needs a reference here
    for name, pairs in checks.items():
        for out, expected in pairs:
            assert out.dtype == np.uint8 and out.shape == expected.shape, name
            # OpenCV before 4.11 warps on a 1/32-pixel grid: up to 2 levels off on this smooth image
            tolerance = 2 if name in ('ShearX', 'ShearY', 'Rotate') else 0
            diff = np.abs(out.astype(int) - expected)
            assert diff.max() <= tolerance and diff.mean() <= 0.3, (name, diff.max())
            source = smooth if tolerance or name.startswith('Translate') else mild if name == 'Sharpness' else img
            assert name == 'Identity' or not np.array_equal(out, source), name  # and it does something
    for name, pairs in close.items():
        for out, expected in pairs:
            assert out.dtype == np.uint8 and np.abs(out.astype(int) - expected).max() <= 1, name
            assert np.abs(out.astype(int) - img).max() > 10, name  # and the operation does something


def test_empty_augs_means_all_and_unknown_rejected():
    assert RandomAugment().augs == list(OPS)
    with pytest.raises(ValueError, match='Blur'):
        RandomAugment(augs=['Blur'])


# ---- colour operations -----------------------------------------------------------------------

def test_autocontrast_stretches_channel_with_zero_minimum():
    out = autocontrast_func(rgb([[0, 50, 100]]))
    # scale 255/100 = 2.5499999999999998: 50 -> 127.49999 and 100 -> 254.99999, truncated
    assert out[0, :, 0].tolist() == [0, 127, 254]
    out = autocontrast_func(rgb([[0, 20, 51]]))  # scale exactly 5
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_autocontrast_faithful_wrap_and_intended_stretch():
    img = np.stack([np.array([[5, 25, 56]]), np.array([[0, 50, 100]]), np.array([[7, 7, 7]])],
                   axis=2).astype(np.uint8)
    out = autocontrast_func(img, faithful=True)
    # the original's -low wraps for a uint8 minimum above 0, so the whole channel saturates to 255
    assert out[0, :, 0].tolist() == [255, 255, 255]
    assert out[0, :, 1].tolist() == [0, 127, 254]
    assert out[0, :, 2].tolist() == [7, 7, 7]  # max <= min: identity table
    assert (autocontrast_func(img) == out).all()  # the original's behaviour is the default
    intended = autocontrast_func(img, faithful=False)  # PIL's: v * scale - low * scale, scale 5
    assert intended[0, :, 0].tolist() == [0, 100, 255]
    assert (intended[..., 1:] == out[..., 1:]).all()


# R: minimum 5, G: minimum 0 and maximum 100, B: constant
AUTOCONTRAST_IMAGE = np.stack([np.array([[5, 25, 56], [30, 40, 50]]), np.array([[0, 50, 100], [10, 20, 30]]),
                               np.full((2, 3), 7)], axis=2).astype(np.uint8)


def test_random_augment_default_autocontrast_is_the_originals():
    # seed 1: the first of the two draws applies AutoContrast, the second skips
    np.random.seed(1)
    out = RandomAugment(2, 7, augs=['AutoContrast'])(AUTOCONTRAST_IMAGE)
    assert out[..., 0].tolist() == [[255, 255, 255], [255, 255, 255]]  # saturated: minimum above 0
    # scale 255 / 100 = 2.5499999999999998 in float64, then truncated: 50 -> 127.49999, 100 -> 254.99999,
    # 10 -> 25.499999, but 20 -> 51.0 exactly (the product rounds up)
    assert out[..., 1].tolist() == [[0, 127, 254], [25, 51, 76]]
    assert out[..., 2].tolist() == [[7, 7, 7], [7, 7, 7]]
    np.random.seed(1)
    pil = RandomAugment(2, 7, augs=['AutoContrast'], autocontrast='pil')(AUTOCONTRAST_IMAGE)
    assert pil[..., 0].tolist() == [[0, 100, 255], [125, 175, 225]]  # (v - 5) * 5
    assert (pil[..., 1:] == out[..., 1:]).all()
    assert repr(RandomAugment()).endswith("autocontrast='original')")
    with pytest.raises(ValueError, match="autocontrast must be one of original, pil, got 'PIL'"):
        RandomAugment(autocontrast='PIL')


def test_every_augmenting_transform_takes_the_autocontrast_mode(tmp_path):
    import json

    import dataset
    from dataset import create_dataset
    for kind in ('pretrain', 'train', 'grounding_train'):
        assert dataset.build_transform(kind, 16).transforms[2].autocontrast == 'original'
        assert dataset.build_transform(kind, 16, 'pil').transforms[2].autocontrast == 'pil'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.jpg')
    (tmp_path / 'ann.json').write_text(json.dumps([{'image': str(tmp_path / 'a.jpg'), 'caption': 'a b'}]))
    config = {'train_file': [str(tmp_path / 'ann.json')], 'image_res': 16}
    assert create_dataset('pretrain', config).transform.transforms[2].autocontrast == 'original'
    config['randaugment_autocontrast'] = 'pil'
    assert create_dataset('pretrain', config).transform.transforms[2].autocontrast == 'pil'
    config['randaugment_autocontrast'] = 'stretch'
    with pytest.raises(dataset.DataError, match="^config randaugment_autocontrast must be one of original, pil, "
                                                "got 'stretch'$"):
        create_dataset('pretrain', config)


def test_equalize_excludes_the_last_non_zero_bin():
    # 100 pixels of 0, 300 of 1, 200 of 2 (bins 3..255 empty)
    channel = np.array([0] * 100 + [1] * 300 + [2] * 200).reshape(20, 30)
    out = equalize_func(rgb(channel))
    # step = (100 + 300) // 255 = 1 (the last non-zero bin, 2, is left out; 600 // 255 would be 2)
    # LUT[0] = 0, LUT[1] = (0 + 100) // 1 = 100, LUT[2] = min(400, 255)
    lut = {0: 0, 1: 100, 2: 255}
    assert (out[..., 1] == np.vectorize(lut.get)(channel)).all()


def test_equalize_larger_step():
    # 300 x 10, 300 x 20, 50 x 30: step = 600 // 255 = 2; LUT[v] = (1 + sum below) // 2
    channel = np.array([10] * 300 + [20] * 300 + [30] * 50).reshape(26, 25)
    out = equalize_func(rgb(channel))
    lut = {10: 0, 20: 150, 30: 255}
    assert (out[..., 0] == np.vectorize(lut.get)(channel)).all()


def test_equalize_step_zero_leaves_channel_unchanged():
    channel = np.array([5] * 100 + [9] * 200).reshape(10, 30)  # step = 100 // 255 = 0
    img = rgb(channel)
    img[..., 2] = np.array([0] * 150 + [1] * 150).reshape(10, 30)
    out = equalize_func(img)
    assert (out == img).all()


def test_brightness_lut():
    values = np.array([[0, 1, 25, 50, 100, 187, 188, 255]])
    out = brightness_func(rgb(values), 7 / 10 * 1.8 + 0.1)
    assert out[0, :, 0].tolist() == [0, 1, 34, 68, 136, 254, 255, 255]


def test_wrap_to_uint8_truncates_then_wraps():
    assert ra._wrap_to_uint8(np.array([-7.2, 311.5, 255.9, -0.5, 0.0])).tolist() == [249, 55, 255, 0, 0]


def test_sharpness_wraps_instead_of_saturating():
    bright = rgb([[0, 0, 0], [0, 255, 0], [0, 0, 0]])
    # smoothed centre = round(5 * 255 / 13) = 98; 98 + 1.36 * (255 - 98) = 311.52 -> 311 -> 55
    out = sharpness_func(bright, 1.36)
    assert out[1, 1].tolist() == [55, 55, 55]
    dark = rgb([[255, 255, 255], [255, 0, 255], [255, 255, 255]])
    # smoothed centre = round(8 * 255 / 13) = 157; 157 - 1.36 * 157 = -56.52 -> -56 -> 200
    out = sharpness_func(dark, 1.36)
    assert out[1, 1].tolist() == [200, 200, 200]
    border = np.ones((3, 3), bool)
    border[1, 1] = False
    assert (out[border] == dark[border]).all()  # border pixels keep the original values


def test_sharpness_factor_zero_and_one():
    img = rgb([[0, 0, 0], [0, 255, 0], [0, 0, 0]])
    assert sharpness_func(img, 1.0) is img
    assert sharpness_func(img, 0.0)[1, 1, 0] == 98


# ---- geometric operations --------------------------------------------------------------------

ROW = rgb([[10, 20, 30, 40]])
GRID = rgb(np.arange(1, 17).reshape(4, 4) * 10)


def test_translate_x_moves_content_left_for_positive_offset():
    # matrix [[1, 0, -1], [0, 1, 0]]: dst(x - 1) = src(x)
    assert translate_x_func(ROW, 1.0, FILL)[0, :, 0].tolist() == [20, 30, 40, 128]
    assert translate_x_func(ROW, -1.0, FILL)[0, :, 0].tolist() == [128, 10, 20, 30]


def test_translate_y():
    out = translate_y_func(GRID, 1.0, FILL)[..., 0]
    assert (out[:3] == GRID[1:, :, 0]).all() and (out[3] == 128).all()


def test_shear_x_matrix():
    # [[1, f, 0], [0, 1, 0]] with f = 1: row y moves right by y pixels
    out = shear_x_func(GRID, 1.0, FILL)[..., 0]
    assert out[0].tolist() == GRID[0, :, 0].tolist()
    assert out[1].tolist() == [128] + GRID[1, :3, 0].tolist()
    assert out[2].tolist() == [128, 128] + GRID[2, :2, 0].tolist()


def test_shear_y_matrix():
    # [[1, 0, 0], [f, 1, 0]] with f = 1: column x moves down by x pixels
    out = shear_y_func(GRID, 1.0, FILL)[..., 0]
    assert out[:, 0].tolist() == GRID[:, 0, 0].tolist()
    assert out[:, 1].tolist() == [128] + GRID[:3, 1, 0].tolist()


def test_rotate_about_w2_h2_counter_clockwise():
    out = rotate_func(GRID, 90.0, FILL)[..., 0]
    # about (2, 2): x' = y, y' = 4 - x; a counter-clockwise quarter turn shifted down by one row
    assert (out[0] == 128).all()
    assert (out[1:] == np.rot90(GRID[..., 0])[:3]).all()


def test_fill_value_is_per_channel():
    out = translate_x_func(ROW, 1.0, (1, 2, 3))
    assert out[0, 3].tolist() == [1, 2, 3]
