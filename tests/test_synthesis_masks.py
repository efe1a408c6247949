"""The mask sampler of `axf synthesize`: new shapes from real masks, seeded, on the object, in range."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from axf_pipeline.synthesis.masks import MaskSampler, contact_sheet, estimate_foreground

H = W = 96


def object_image(seed=0):
    """Dark background, a bright noisy disc (the object) off centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 55) ** 2 + (xx - 40) ** 2 < 28**2
    image = rng.integers(0, 15, (H, W, 3)).astype(np.uint8)
    image[disc] = rng.integers(150, 220, (int(disc.sum()), 3))
    return image, disc


def real_masks():
    a = np.zeros((H, W), bool)
    a[10:18, 20:44] = True  # a scratch
    b = np.zeros((2 * H, 2 * W), bool)  # another size: resized to the canvas by area fraction
    yy, xx = np.mgrid[: 2 * H, : 2 * W]
    b[(yy - 100) ** 2 + (xx - 60) ** 2 < 14**2] = True  # a blob
    return [a, b]


def test_foreground_rule_finds_the_object_and_falls_back_to_everything():
    image, disc = object_image()
    foreground = estimate_foreground(image)
    assert foreground.shape == (H, W)
    assert (foreground == disc).mean() > 0.98
    assert estimate_foreground(np.full((H, W, 3), 90, np.uint8)).all()  # uniform image: anywhere


def test_same_seed_same_mask_other_seed_new_shape():
    sampler = MaskSampler(real_masks())
    image, _ = object_image()
    fg = estimate_foreground(image)
    a, src_a = sampler.sample(np.random.default_rng(5), (H, W), fg)
    b, src_b = sampler.sample(np.random.default_rng(5), (H, W), fg)
    assert np.array_equal(a, b) and src_a == src_b
    others = [sampler.sample(np.random.default_rng(s), (H, W), fg)[0] for s in range(6, 12)]
    assert all(not np.array_equal(a, o) for o in others)
    # not a copy: the real masks never come back as they were
    reals = [m if m.shape == (H, W) else m[::2, ::2] for m in real_masks()]
    assert all(not np.array_equal(o, r) for o in others for r in reals)


def test_constraints_hold_and_object_masks_sit_on_the_object(tmp_path):
    sampler = MaskSampler(real_masks(), max_cut_off=0.1, area_margin=0.5)
    lo, hi = sampler.area_range
    image, disc = object_image()
    fg = estimate_foreground(image)
    masks = [sampler.sample(np.random.default_rng(s), (H, W), fg)[0] for s in range(60)]
    areas = [m.mean() for m in masks]
    assert all(m.any() for m in masks)
    assert all(lo <= a <= hi for a in areas)
    assert len({round(a, 4) for a in areas}) > 20  # scales and shapes vary
    # every mask's box centre lies on (or right next to) the object
    grown = np.zeros_like(disc)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            grown |= np.roll(np.roll(disc, dy, 0), dx, 1)
    for m in masks:
        ys, xs = np.nonzero(m)
        assert grown[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]
    # texture: anywhere, including the dark border
    texture = MaskSampler(real_masks(), texture=True)
    spread = [texture.sample(np.random.default_rng(s), (H, W), fg)[0] for s in range(60)]
    assert sum(m[~disc].sum() for m in spread) > 3 * sum(m[~disc].sum() for m in masks)
    # the picture: sampled masks (red) over the normals
    sheet = contact_sheet([image] * 8, masks[:8], columns=4)
    sheet.save(tmp_path / "contact_sheet.png")
    pixels = np.asarray(PIL.Image.open(tmp_path / "contact_sheet.png"))
    assert pixels.shape == (2 * H, 4 * W, 3)
    tile = pixels[H : 2 * H, W : 2 * W]  # row 1, column 1 = mask 5, tinted red, the rest untouched
    changed = (tile != image).any(axis=2)
    assert np.array_equal(changed, masks[5])
    assert (tile[masks[5]][:, 0] >= 153).all() and (tile[~masks[5]] == image[~masks[5]]).all()


def test_cut_off_limit_and_fallback():
    big = np.zeros((H, W), bool)
    big[:, :] = True  # a mask covering everything cannot move: every draw is cut off, the fallback holds
    sampler = MaskSampler([big], max_tries=3)
    mask, _ = sampler.sample(np.random.default_rng(0), (H, W), None)
    assert mask.all() and sampler.is_fallback(mask, 0)


def test_is_fallback_tells_the_real_mask_resized_from_a_new_shape():
    sampler = MaskSampler(real_masks(), max_tries=0)  # every sample falls back
    for source in (0, 1):  # mask 1 is twice the canvas: its fallback is resized
        mask, _ = sampler.sample(np.random.default_rng(0), (H, W), None, source)
        assert sampler.is_fallback(mask, source) and not sampler.is_fallback(mask, 1 - source)
    drawn, source = MaskSampler(real_masks()).sample(np.random.default_rng(1), (H, W), None)
    assert drawn.any() and not sampler.is_fallback(drawn, source)
    with pytest.raises(ValueError, match="real mask 0 is empty"):
        MaskSampler([np.zeros((4, 4), bool)])


def _shape_measures(mask: np.ndarray) -> tuple[float, float, float]:
    """Principal-axis angle (degrees, mod 180), elongation (major / minor axis) and handedness (±1: the sign
    of the third moments along both axes times the frame's orientation; a mirror flips it, a rotation not)."""
    ys, xs = np.nonzero(mask)
    p = np.stack([ys, xs], 1).astype(float)
    p -= p.mean(0)
    eigenvalues, vectors = np.linalg.eigh(p.T @ p / len(p))
    major, minor = vectors[:, 1], vectors[:, 0]
    angle = np.degrees(np.arctan2(major[0], major[1])) % 180
    skew = ((p @ major) ** 3).mean() * ((p @ minor) ** 3).mean()
    handedness = np.sign(skew * np.linalg.det(np.stack([major, minor], 1)))
    return angle, np.sqrt(eigenvalues[1] / eigenvalues[0]), handedness


def test_sampled_masks_are_rotated_flipped_scaled_and_mildly_warped_as_documented():
    """README: a real mask "rotated, flipped, scaled by 0.75-1.25 and mildly warped", its size relative to the
    canvas kept. An L-shaped real mask at twice the canvas size; 200 samples, measured."""
    side = 128
    letter_l = np.zeros((side, side), bool)
    letter_l[60:66, 40:88] = True  # long leg
    letter_l[44:60, 40:46] = True  # short leg: not symmetric, so a mirror image is told apart
    real = np.kron(letter_l, np.ones((2, 2), bool))  # 256 x 256: resized to the canvas by area fraction
    _, real_elongation, real_hand = _shape_measures(letter_l)
    sampler = MaskSampler([real], texture=True, area_margin=1.0)  # margin: keep all of 0.75^2 .. 1.25^2
    samples = [sampler.sample(np.random.default_rng(s), (side, side))[0] for s in range(200)]
    angles, elongations, hands = np.array([_shape_measures(m) for m in samples]).T
    # rotation: any angle, so the principal axis falls in every 45-degree sector about equally often
    counts = np.histogram(angles, bins=[0, 45, 90, 135, 180])[0]
    assert counts.min() >= 30, counts
    # flip: half the samples are mirror images of the real mask
    assert 60 <= (hands != real_hand).sum() <= 140
    # scale 0.75-1.25 of the real mask's area fraction: area ratio s^2 in 0.56-1.56, spread over the range
    ratio = np.array([m.mean() for m in samples]) / real.mean()
    assert np.percentile(ratio, 5) < 0.7 and np.percentile(ratio, 95) > 1.4
    assert 0.85 < np.median(ratio) < 1.2
    assert ratio.min() > 0.45 and ratio.max() < 1.8  # the warp moves the area only a little beyond s^2
    # warp: mild (the L stays about as elongated), but there: the elongation varies beyond pixel rounding
    assert (elongations > 0.6 * real_elongation).all() and (elongations < 1.5 * real_elongation).all()
    spread = (np.percentile(elongations, 95) - np.percentile(elongations, 5)) / np.median(elongations)
    assert spread > 0.15


# ---------------------------------------------------------------- the transform, parameter by parameter
class ScriptedRng:
    """Stands in for ``numpy.random.Generator`` with chosen draws: each call takes the next fraction u in
    [0, 1] (a number, or an array for ``size``) and returns ``low + u * (high - low)`` (floored for
    ``integers``), so the bounds the sampler passes still decide the value."""

    def __init__(self, *fractions):
        self.fractions = list(fractions)
        self.calls = []

    def _next(self, low, high, size):
        self.calls.append((low, high, size))
        u = np.asarray(self.fractions.pop(0), dtype=float)
        value = low + u * (high - low)
        return np.broadcast_to(value, size).copy() if size is not None else float(value)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._next(low, high, size)

    def integers(self, low, high=None, size=None):
        low, high = (0, low) if high is None else (low, high)
        return np.floor(self._next(low, high, size)).astype(np.int64)


NO_WARP = (0.5, 0.5)  # displacement control points in the middle of [-slack, slack]: zero


def draws(scale=0.5, angle=0.0, flips=(0.9, 0.9), warp=NO_WARP, centre=None, canvas=(40, 40)):
    """The fractions of one draw: scale (0.5 -> x1), angle (fraction of a turn), flips (>= 0.5: none),
    warp, then the centre pixel (y, x) on a canvas of ``canvas``."""
    fractions = [scale, angle, np.array(flips), warp[0], warp[1]]
    if centre is not None:
        fractions += [(centre[0] + 0.5) / canvas[0], (centre[1] + 0.5) / canvas[1]]
    return fractions


def letter_l_crop():
    """An asymmetric 5 x 7 shape (odd sides: its centre is a pixel, so flips and quarter turns are exact)."""
    crop = np.zeros((5, 7), bool)
    crop[3:5, :] = True
    crop[:3, :2] = True
    crop[0, 4] = True
    return crop


def paste(crop, centre, size=(40, 40)):
    out = np.zeros(size, bool)
    y0, x0 = centre[0] - crop.shape[0] // 2, centre[1] - crop.shape[1] // 2
    out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


def test_untransformed_draw_is_the_real_mask_and_each_parameter_does_what_it_says():
    crop = letter_l_crop()
    real = paste(crop, (12, 20))
    sampler = MaskSampler([real], texture=True, area_margin=2.0)

    def sample(**kw):
        rng = ScriptedRng(*draws(**kw))
        mask, source = sampler.sample(rng, (40, 40), source=0)
        assert source == 0 and not rng.fractions  # one draw, every scripted value used
        return mask, rng

    # scale 1, angle 0, no flip, no warp, centred where the real mask is: the real mask itself
    mask, rng = sample(centre=(12, 20))
    assert np.array_equal(mask, real)
    assert rng.calls[:3] == [(0.75, 1.25, None), (0, 2 * np.pi, None), (0, 2, 2)]  # documented ranges
    # placed elsewhere: the same shape, centred on the drawn pixel
    assert np.array_equal(sample(centre=(30, 9))[0], paste(crop, (30, 9)))
    # flips (fraction < 0.5 draws 0: flipped), each axis on its own
    assert np.array_equal(sample(flips=(0.1, 0.9), centre=(20, 20))[0], paste(crop[::-1], (20, 20)))
    assert np.array_equal(sample(flips=(0.9, 0.1), centre=(20, 20))[0], paste(crop[:, ::-1], (20, 20)))
    assert np.array_equal(sample(flips=(0.1, 0.1), centre=(20, 20))[0], paste(crop[::-1, ::-1], (20, 20)))
    # a quarter turn is a rotation (not a mirror image), a half turn the shape upside down
    quarter = sample(angle=0.25, centre=(20, 20))[0]
    assert any(np.array_equal(quarter, paste(np.rot90(crop, k), (20, 20))) for k in (1, 3))
    assert np.array_equal(sample(angle=0.5, centre=(20, 20))[0], paste(crop[::-1, ::-1], (20, 20)))
    # the largest scale, 1.25: a box 1.25 times as large, about 1.56 times the area, same centre
    big_crop = np.kron(crop, np.ones((3, 3), bool))  # 15 x 21: large enough for whole pixels not to matter
    big_sampler = MaskSampler([paste(big_crop, (20, 20))], texture=True, area_margin=2.0)
    for angle in (0.0, 0.25):
        big = big_sampler.sample(
            ScriptedRng(*draws(scale=1.0, angle=angle, centre=(20, 20))), (40, 40), source=0
        )[0]
        ys, xs = np.nonzero(big)
        box = sorted((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
        assert box[0] in (18, 19) and box[1] in (26, 27), box  # 18.75 x 26.25
        assert 1.4 < big.sum() / big_crop.sum() < 1.75
        assert abs((ys.min() + ys.max()) / 2 - 20) <= 1 and abs((xs.min() + xs.max()) / 2 - 20) <= 1
    # the smallest, 0.75: 0.56 times the area
    small = big_sampler.sample(ScriptedRng(*draws(scale=0.0, centre=(20, 20))), (40, 40), source=0)[0]
    assert 0.45 < small.sum() / big_crop.sum() < 0.7


def test_warp_moves_pixels_by_at_most_the_documented_slack():
    """A constant displacement of the full slack (``ELASTIC`` = 6 % of the transformed extent) shifts the
    whole shape by that much; the extent of a 5 x 7 box at scale 1 is its diagonal, sqrt(74) = 8.6 pixels."""
    from axf_pipeline.synthesis.masks import ELASTIC

    crop = np.ones((21, 29), bool)  # diagonal 35.8: slack 2.15 pixels
    crop[:4, :6] = False
    real = paste(crop, (30, 30), (60, 60))
    sampler = MaskSampler([real], texture=True, area_margin=2.0)
    slack = ELASTIC * np.hypot(*crop.shape)
    assert 2 < slack < 3
    for fraction, shift in ((1.0, -2), (0.0, 2)):  # sample point moved by +slack: the shape moves by -slack
        rng = ScriptedRng(*draws(warp=(fraction, fraction), centre=(30, 30), canvas=(60, 60)))
        mask = sampler.sample(rng, (60, 60), source=0)[0]
        assert np.array_equal(mask, paste(crop, (30 + shift, 30 + shift), (60, 60)))
    # warping y only moves rows only
    rng = ScriptedRng(*draws(warp=(1.0, 0.5), centre=(30, 30), canvas=(60, 60)))
    assert np.array_equal(sampler.sample(rng, (60, 60), source=0)[0], paste(crop, (28, 30), (60, 60)))


def test_cut_off_and_area_limits_are_inclusive():
    line = np.zeros((40, 40), bool)
    line[20, 15:25] = True  # 10 pixels; centred at column 20 (a 1 x 10 crop: centre column 5)
    # exactly 1 of 10 pixels (10 %) outside the left border: accepted; 2 of 10: rejected -> next draw
    sampler = MaskSampler([line], texture=True, max_cut_off=0.1, area_margin=0.125)
    assert sampler.area_range == (10 / 1600 / 1.125, 10 / 1600 * 1.125)
    one_out = np.zeros((40, 40), bool)
    one_out[5, 0:9] = True
    assert np.array_equal(sampler.sample(ScriptedRng(*draws(centre=(5, 4))), (40, 40), source=0)[0], one_out)
    two_out = ScriptedRng(*draws(centre=(5, 3)), *draws(centre=(30, 20)))
    assert np.array_equal(sampler.sample(two_out, (40, 40), source=0)[0], paste(line[20:21, 15:25], (30, 20)))
    # area: with margin 0 only the real area passes (both ends inclusive); 9 pixels is rejected
    strict = MaskSampler([line], texture=True, max_cut_off=0.1, area_margin=0.0)
    assert strict.area_range == (10 / 1600, 10 / 1600)
    rng = ScriptedRng(*draws(centre=(5, 4)), *draws(centre=(30, 20)))
    assert np.array_equal(strict.sample(rng, (40, 40), source=0)[0], paste(line[20:21, 15:25], (30, 20)))
    # a single pixel is a mask too
    dot = np.zeros((40, 40), bool)
    dot[3, 3] = True
    single = MaskSampler([dot], texture=True, area_margin=0.0)
    assert np.array_equal(single.sample(ScriptedRng(*draws(centre=(30, 20))), (40, 40), source=0)[0],
                          paste(np.ones((1, 1), bool), (30, 20)))  # fmt: skip


def test_defaults_and_the_fallback_after_max_tries():
    real = np.zeros((40, 80), bool)
    real[10:20, 30:52] = True
    real[10, 60] = True
    sampler = MaskSampler([real, real[:, :40]])
    areas = [real.mean(), real[:, :40].mean()]
    assert sampler.area_range == (min(areas) / 1.5, max(areas) * 1.5)  # margin 50 %
    assert (sampler.max_tries, sampler.max_cut_off, sampler.texture) == (20, 0.1, False)
    # every draw rejected (centred on the corner: 3/4 cut off): 20 draws, then the real mask resized
    counting = ScriptedRng(*[f for _ in range(20) for f in draws(centre=(0, 0), canvas=(20, 40))])
    fallback, source = MaskSampler([real]).sample(counting, (20, 40), source=0)
    assert source == 0 and not counting.fractions  # exactly 20 draws were used
    assert np.array_equal(fallback, real[::2, ::2])
    assert np.array_equal(
        MaskSampler([real], max_tries=0).sample(None, (20, 40), source=0)[0], real[::2, ::2]
    )
    # a mask thinner than a canvas pixel falls back to its centre pixel, at the bottom right too
    for y, x, expected in ((37, 101, (7, 20)), (59, 119, (11, 23))):
        dot = np.zeros((60, 120), bool)
        dot[y, x] = True
        thin = MaskSampler([dot], max_tries=0).sample(None, (12, 24), source=0)[0]
        assert thin.dtype == bool and list(zip(*np.nonzero(thin), strict=True)) == [expected]
    with pytest.raises(ValueError, match="^MaskSampler needs at least one real mask$"):
        MaskSampler([])
    # the source index is drawn when not given
    rng = ScriptedRng(0.7, *draws(centre=(10, 10)))
    assert MaskSampler([real, real], texture=True).sample(rng, (40, 80))[1] == 1


def test_object_masks_are_centred_on_a_foreground_cell_of_a_coarser_map():
    crop = letter_l_crop()
    real = paste(crop, (20, 20))
    sampler = MaskSampler([real], area_margin=2.0)
    foreground = np.zeros((4, 5), bool)
    foreground[1, 2] = True  # one cell: centre (1.5 * 40 / 4, 2.5 * 40 / 5) = (15, 20)
    foreground[3, 4] = True  # (35, 36)
    for pick, centre in ((0.1, (15, 20)), (0.9, (35, 36))):
        rng = ScriptedRng(*draws(), pick)
        assert np.array_equal(sampler.sample(rng, (40, 40), foreground, source=0)[0], paste(crop, centre))
        assert rng.calls[-1] == (0, 2, None)  # drawn among the 2 foreground cells
    # another map of the same size is not mistaken for the cached one
    other = np.zeros((4, 5), bool)
    other[0, 0] = True  # (5, 4)
    rng = ScriptedRng(*draws(), 0.5)
    assert np.array_equal(sampler.sample(rng, (40, 40), other, source=0)[0], paste(crop, (5, 4)))


def test_foreground_rule_edges_threshold_border_grid_and_gray():
    # a 100-pixel image: outer ring 0, rings 2-4 grey 60, inside 120, so the 4 % frame's median is 60
    image = np.full((100, 100), 120, np.uint8)
    image[:4], image[-4:], image[:, :4], image[:, -4:] = 60, 60, 60, 60
    image[0], image[-1], image[:, 0], image[:, -1] = 0, 0, 0, 0
    ring = np.zeros((100, 100), bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    inside = np.zeros((100, 100), bool)
    inside[4:-4, 4:-4] = True
    gray = estimate_foreground(image)
    assert gray.dtype == bool and np.array_equal(gray, ring | inside)  # the gray image is read too
    rgb = np.stack([image, image // 2, image // 3], axis=2)  # channels differ; the largest difference counts
    assert np.array_equal(estimate_foreground(rgb), ring | inside)
    # threshold: a difference of exactly 25 is background, 26 foreground
    flat = np.full((100, 100, 3), 100, np.uint8)
    flat[40:60, 40:60, 1] = 125
    flat[40:60, 40:50, 1] = 126
    edge = np.zeros((100, 100), bool)
    edge[40:60, 40:50] = True
    assert np.array_equal(estimate_foreground(flat), edge)
    # exactly 1 % foreground is kept; less falls back to everything
    one_percent = np.full((100, 100), 50, np.uint8)
    one_percent[50:60, 50:60] = 200
    fg = estimate_foreground(one_percent)
    assert fg.mean() == 0.01 and fg[50:60, 50:60].all()
    tiny = estimate_foreground(
        np.pad(np.full((9, 9), 200, np.uint8), ((45, 46), (45, 46)), constant_values=50)
    )
    assert tiny.all() and tiny.dtype == bool
    # the frame is at least one pixel wide: on a 24-pixel image (4 % = 0.96) it is the outer ring only,
    # whose median (48 of its 92 pixels are 0) is 0; the second ring (200) would have tipped it to 200
    small = np.zeros((24, 24), np.uint8)
    small[:, [0, -1]] = 200
    small[[0, -1], :] = 0
    small[1, 1:-1] = small[-2, 1:-1] = small[1:-1, 1] = small[1:-1, -2] = 200
    assert np.array_equal(estimate_foreground(small), small == 200)
    # a grid of at most 128 per side: 129 pixels -> every 2nd pixel
    assert estimate_foreground(np.zeros((129, 100, 3), np.uint8)).shape == (65, 50)


def test_contact_sheet_tints_masks_on_gray_rgb_and_rgba_normals_four_per_row():
    normals = [np.full((10, 14), 102, np.uint8), np.full((10, 14, 3), 50, np.uint8)]
    normals += [np.full((10, 14, 4), 200, np.uint8)] + [np.full((10, 14), 10 * i, np.uint8) for i in range(2)]
    masks = [np.zeros((10, 14), bool) for _ in normals]
    for m in masks:
        m[2:4, 3:9] = True
    sheet = np.asarray(contact_sheet(normals, masks))  # default: 4 columns
    assert sheet.shape == (20, 56, 3)
    tile = sheet[:10, :14]
    assert (tile[2:4, 3:9] == [193, 40, 40]).all()  # 0.4 * grey + 0.6 * pure red: 193.8, 40.8, 40.8
    assert (tile[~masks[0]] == 102).all()
    assert (sheet[:10, 28:42][2:4, 3:9] == [233, 80, 80]).all()  # the RGBA normal, alpha dropped
    assert (sheet[10:20, :14][~masks[4]] == 10).all() and (
        sheet[10:20, 14:] == 255
    ).all()  # empty cells white
    with pytest.raises(ValueError):
        contact_sheet(normals, masks[:-1])  # a mask for every normal


def test_a_long_thin_mask_is_never_cut_by_the_sampling_window():
    """The transformed mask is drawn in a window that must hold it whole at any scale and under the full
    warp: a 41-pixel line (as long as its box's diagonal, the window's radius) at scale 1.25 is 51 pixels
    long, and moved by the full slack (2.46 pixels) it keeps all 41 pixels."""
    line = np.zeros((100, 100), bool)
    line[30:71, 50] = True
    sampler = MaskSampler([line], texture=True, area_margin=2.0)
    big = sampler.sample(
        ScriptedRng(*draws(scale=1.0, centre=(50, 50), canvas=(100, 100))), (100, 100), source=0
    )[0]
    assert np.array_equal(big, paste(np.ones((51, 1), bool), (50, 50), (100, 100)))
    for fraction, shift in ((0.0, 2), (1.0, -2)):
        rng = ScriptedRng(*draws(warp=(fraction, 0.5), centre=(50, 50), canvas=(100, 100)))
        moved = sampler.sample(rng, (100, 100), source=0)[0]
        assert np.array_equal(moved, paste(np.ones((41, 1), bool), (50 + shift, 50), (100, 100))), fraction
