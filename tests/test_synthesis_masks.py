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
    assert mask.all()
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
