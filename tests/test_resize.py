"""The runtime's resize is bit-exact with the kernel the manifest names, at sizes up and down on each axis."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevlm.image import resize

import torch  # (the dev extra installs both: missing, the tests fail)
import torchvision.transforms.v2.functional as F

# (in h, in w) -> (out h, out w): both down, both up, one up one down each way (Pillow then runs the vertical
# pass first), a large reduction, odd sizes, and a camera frame to FastVLM's 1024 px shortest edge (both passes
# big enough to be split between two threads).
CASES = [((301, 199), (128, 128)), ((37, 251), (64, 512)), ((1216, 343), (179, 1017)), ((542, 811), (700, 96)),
         ((1131, 491), (61, 25)), ((90, 70), (1024, 1024)), ((2001, 1500), (384, 512)), ((480, 640), (1024, 1365))]
MODES = {"bicubic": (Image.Resampling.BICUBIC, "BICUBIC"), "bilinear": (Image.Resampling.BILINEAR, "BILINEAR")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("src,dst", CASES)
def test_resize_matches_torchvision_and_pillow(src, dst, mode):
    img = np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    pil_filter, tv_mode = MODES[mode]
    tv = F.resize(torch.from_numpy(img).permute(2, 0, 1), list(dst), antialias=True,
                  interpolation=getattr(F.InterpolationMode, tv_mode)).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(img).resize(dst[::-1], pil_filter))
    ours_tv, ours_pil = resize(img, *dst, mode, "torchvision"), resize(img, *dst, mode, "pil")
    d_tv = int(np.abs(ours_tv.astype(int) - tv).max())
    d_pil = int(np.abs(ours_pil.astype(int) - pil).max())
    print(f"{src}->{dst} {mode}: max|diff| torchvision {d_tv}, pil {d_pil}")
    assert ours_tv.shape == (*dst, 3) and d_tv == 0
    assert ours_pil.shape == (*dst, 3) and d_pil == 0


def test_resize_on_one_thread_is_the_same():
    """threads=1 (what `edgevlm.load(threads=1)` asks of the preprocess) runs the same blocks on one thread."""
    img = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    one, two = resize(img, 1024, 1365, "bicubic", "torchvision", threads=1), resize(img, 1024, 1365, "bicubic")
    assert one.shape == (1024, 1365, 3) and np.array_equal(one, two)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_a_window_is_the_same_as_cropping_the_full_resize(mode):
    """resize(window=...) computes only the rows/columns a center crop keeps: the same pixels as the full
    resize cut afterwards, on both axes, down and up."""
    rng = np.random.default_rng(11)
    for (h, w), (oh, ow), (top, left, wh, ww) in [((480, 640), (1024, 1365), (0, 170, 1024, 1024)),
                                                  ((640, 480), (1365, 1024), (170, 0, 1024, 1024)),
                                                  ((333, 517), (97, 151), (13, 29, 41, 77)),
                                                  ((90, 70), (90, 211), (5, 3, 80, 200))]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        full = resize(img, oh, ow, mode)
        part = resize(img, oh, ow, mode, window=(top, left, wh, ww))
        assert part.shape == (wh, ww, 3) and np.array_equal(part, full[top:top + wh, left:left + ww]), (h, w, oh, ow)


def test_preprocess_with_a_center_crop_matches_torchvision():
    """FastVLM's processor: shortest edge to 1024, center crop 1024 x 1024 (the crop now steers the resize)."""
    from edgevlm.image import preprocess
    from edgevlm.manifest import Preprocess

    img = np.random.default_rng(12).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    cfg = Preprocess(resample="bicubic", shortest_edge=1024, crop=(1024, 1024), rescale=1 / 255,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_kernel="torchvision")
    t = F.resize(torch.from_numpy(img).permute(2, 0, 1), [1024], antialias=True,
                 interpolation=F.InterpolationMode.BICUBIC)
    ref = F.center_crop(t, [1024, 1024]).numpy().astype(np.float32)[None] / np.float32(255)
    for threads in (1, 2):
        got = preprocess(img, cfg, threads)
        assert got.shape == (1, 3, 1024, 1024) and float(np.abs(got - ref).max()) < 1e-6
