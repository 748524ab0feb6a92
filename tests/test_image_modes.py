"""Tests for vision.py's image modes and LLaDAV.encode_image_crops: LLaDA-V's image modes and their visual token counts
(ML-GSAI/LLaDA-V train/llava/mm_utils.py::process_anyres_image,
train/llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal): 729 (square 384), 1485 (384x384 anyres), 2929
(640x480 anyres), 730 (pad mode).

    python -m pytest -q tests/test_image_modes.py
"""

import pytest
import torch

torch.set_num_threads(1)
from PIL import Image

import vision as anyres
from conftest import narrow_llada_v


def noise_image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("mode,merge,size,expected", [("square", "flat", (384, 384), 729),
                                                      ("anyres_max_4", "spatial_unpad", (384, 384), 1485),
                                                      ("anyres_max_4", "spatial_unpad", (640, 480), 2929),
                                                      ("pad", "spatial_unpad", (300, 200), 730)])
def test_visual_token_counts(mode, merge, size, expected):
    m = narrow_llada_v(image_aspect_ratio=mode, mm_patch_merge_type=merge)  # the real 384 px geometry
    crops, image_size = anyres.process_image(noise_image(*size), mode)
    with torch.no_grad():
        feats = m.encode_image_crops(crops, image_size)
    assert feats.shape == (expected, 16)
    assert anyres.num_tokens(size, mode, newline=merge == "spatial_unpad") == expected
    if mode == "anyres_max_4":  # every row of the crop map ends with the image_newline vector
        grid = feats[729:]
        rows = {(384, 384): 27, (640, 480): 40}[size]
        per_row = grid.shape[0] // rows
        ends = grid.view(rows, per_row, 16)[:, -1]
        assert torch.equal(ends, m.image_newline.expand(rows, 16))
        assert not torch.equal(grid.view(rows, per_row, 16)[:, -2], m.image_newline.expand(rows, 16))


def test_grid_choice_and_downsample_cap():
    """640x480 -> a 2x2 grid of 384; 384x384 -> 1x1; a 1536x1536 image gets a 4x4 grid (108x108 features)
    that is bilinearly shrunk by 2 to 54x54: 729 + 54*55 tokens, about 4 crops' worth."""
    grid = anyres.grid_pinpoints()
    assert len(grid) == 36 and grid[0] == (384, 384) and grid[1] == (384, 768) and grid[-1] == (2304, 2304)
    assert anyres.select_best_resolution((640, 480), grid) == (768, 768)
    assert anyres.select_best_resolution((384, 384), grid) == (384, 384)
    assert anyres.select_best_resolution((1000, 200), grid) == (1152, 384)
    assert anyres.num_tokens((1536, 1536), "anyres_max_4", True) == 729 + 54 * 55
    # 768x700 on a 2x2 grid: the image covers int(700 * 54 / 768) = 49 of 54 rows; unpad cuts (54-49)//2 = 2
    # from each side, so 50 rows stay (the official rounding), and 50*54 is under the cap
    assert anyres.num_tokens((768, 700), "anyres_max_4", True) == 729 + 50 * 55


def test_resize_pad_and_crop_order():
    """Aspect-keeping resize centred on black; crops row by row after the base image."""
    img = Image.new("RGB", (640, 480), (255, 255, 255))
    canvas = anyres.resize_and_pad(img, (768, 768))
    assert canvas.getpixel((10, 10)) == (0, 0, 0) and canvas.getpixel((10, 95)) == (0, 0, 0)
    assert canvas.getpixel((10, 96)) == (255, 255, 255) and canvas.getpixel((700, 671)) == (255, 255, 255)
    assert canvas.getpixel((10, 672)) == (0, 0, 0)  # 480 * 1.2 = 576 rows of image, 96 black above and below
    quad = Image.new("RGB", (768, 768))
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        quad.paste(c, ((i % 2) * 384, (i // 2) * 384, (i % 2) * 384 + 384, (i // 2) * 384 + 384))
    crops, size = anyres.process_image(quad, "anyres_max_4")
    assert crops.shape == (5, 3, 384, 384) and size == (768, 768)
    means = crops[1:].mean(dim=(2, 3))  # in [-1, 1]: red, green, blue, yellow
    assert torch.allclose(means, torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]]), atol=1e-3)
    assert torch.allclose(crops[0].mean(dim=(1, 2)), means.mean(0), atol=0.02)  # base = the whole image


def test_pad_mode_uses_grey():
    sq = anyres.expand_to_square(Image.new("RGB", (4, 2), (255, 255, 255)))
    assert sq.size == (4, 4) and sq.getpixel((0, 0)) == (127, 127, 127) and sq.getpixel((0, 1)) == (255, 255, 255)


def test_toy_path_has_no_newline_and_bad_mode_errors():
    m = narrow_llada_v(image_aspect_ratio="square", mm_patch_merge_type="flat")
    assert not hasattr(m, "image_newline") and "image_newline" not in m.state_dict()
    with pytest.raises(ValueError, match="anyres_max_4"):
        anyres.process_image(noise_image(8, 8), "anyres")
