"""dataset/randaugment.py against the original's RandAugment: random-number order and each operation
on small hand-computed arrays, AutoContrast's original (default) and PIL modes included."""
import numpy as np
import pytest
from PIL import Image

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


def test_output_dtype_and_shape():
    np.random.seed(3)
    image = Image.fromarray((np.random.rand(17, 23, 3) * 255).astype(np.uint8))
    aug = RandomAugment(2, 7, isPIL=True, augs=AUGS)
    for _ in range(30):
        out = aug(image)
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (17, 23, 3)


def test_every_op_keeps_dtype_and_shape():
    np.random.seed(1)
    img = (np.random.rand(9, 11, 3) * 255).astype(np.uint8)
    for name, (func, level_to_args) in OPS.items():
        out = func(img, *level_to_args(7))
        assert out.dtype == np.uint8 and out.shape == img.shape, name


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
