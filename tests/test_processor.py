"""Processor: anyres grids (expected values derived by hand), tiles, pixels, hashes, template, bad images."""
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unimlm_engine.config import CLIP_MEAN, CLIP_STD, VisionConfig
from unimlm_engine.inputs.processor import (VICUNA_SYSTEM, InvalidImageError, Processor, chat_prompt, image_hash,
                                     load_image, pixel_values, select_grid, tile_image)
from unimlm_engine.inputs.tokenizer import ByteTokenizer

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")

# (width, height, max_tiles, tile) -> (cols, rows). Worked by hand from find_closest_aspect_ratio:
# candidates by tile count (1,1) (1,2) (2,1) (1,3) (3,1) (1,4) (2,2) (4,1) ...; the closest cols/rows to
# w/h wins; an exact tie moves to the later grid only if w*h > 0.5 * tile^2 * cols * rows.
GRIDS = {
    # r=1: (1,1) diff 0; (2,2) ties, 336*336=112896 <= 0.5*336^2*4=225792 -> stay (1,1)
    "square_336": (336, 336, 4, 336, (1, 1)),
    # r=1: tie with (2,2), 475^2=225625 <= 225792 -> (1,1)
    "square_475_below_area": (475, 475, 4, 336, (1, 1)),
    # r=1: tie with (2,2), 476^2=226576 > 225792 -> (2,2)
    "square_476_above_area": (476, 476, 4, 336, (2, 2)),
    "square_1000": (1000, 1000, 4, 336, (2, 2)),
    # r=3: only (3,1) has diff 0
    "wide_3to1": (900, 300, 4, 336, (3, 1)),
    "tall_1to3": (300, 900, 4, 336, (1, 3)),
    # r=1, area 100: no tie passes the area test
    "tiny_10x10": (10, 10, 4, 336, (1, 1)),
    # r=4/3: (1,1) diff 1/3; (2,2) ties exactly, 48e6 > 225792 -> (2,2)
    "huge_8000x6000": (8000, 6000, 4, 336, (2, 2)),
    # r=4/3 with 12 tiles: (4,3) has diff 0
    "huge_8000x6000_max12": (8000, 6000, 12, 336, (4, 3)),
    "wide_2to1": (800, 400, 4, 336, (2, 1)),
    "tall_1to2": (400, 800, 4, 336, (1, 2)),
    # r=2 exact even for a tiny image: the first diff-0 grid wins
    "tiny_2to1": (20, 10, 4, 336, (2, 1)),
    # r=1.5: (1,1) .5; (2,1) ties: 60000 <= 112896 stay; (2,2) ties: 60000 <= 225792 stay
    "r1.5_300x200": (300, 200, 4, 336, (1, 1)),
    # r=1.5: (2,1) tie passes (135000 > 112896); (2,2) tie fails (135000 <= 225792)
    "r1.5_450x300": (450, 300, 4, 336, (2, 1)),
    # r=1.5: both ties pass (240000 > 225792)
    "r1.5_600x400": (600, 400, 4, 336, (2, 2)),
    # r=1.5: (3,2) has diff 0 once 6 tiles are allowed
    "r1.5_600x400_max6": (600, 400, 6, 336, (3, 2)),
    # r=1.5033: (2,1) diff .4967 beats (1,1) .5033; (2,2) .5033 is worse
    "chelsea_451x300": (451, 300, 4, 336, (2, 1)),
    "max_tiles_1": (900, 300, 1, 336, (1, 1)),
    # tiny preset tile 56: 300*200=60000 > 0.5*56^2*4=6272 -> (2,2)
    "tile56_300x200": (300, 200, 4, 56, (2, 2)),
}


@pytest.mark.parametrize("case", list(GRIDS), ids=list(GRIDS))
def test_select_grid(case):
    w, h, max_tiles, tile, expected = GRIDS[case]
    assert select_grid(w, h, max_tiles, tile) == expected


def test_select_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        select_grid(0, 10, 4, 336)


def _cfg(size=56, max_tiles=4, thumb=True):
    return VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        image_size=size, patch_size=14, max_tiles=max_tiles, use_thumbnail=thumb)


@pytest.mark.parametrize("size,thumb,expected", [
    ((900, 300), True, 3 + 1), ((900, 300), False, 3), ((336, 336), True, 1), ((1000, 1000), True, 4 + 1),
    ((400, 800), True, 2 + 1),
], ids=["3x1_thumb", "3x1_nothumb", "1x1_no_thumb", "2x2_thumb", "1x2_thumb"])
def test_tile_count_and_size(size, thumb, expected):
    cfg = _cfg(336, thumb=thumb)
    tiles = tile_image(Image.new("RGB", size, (10, 20, 30)), cfg)
    assert len(tiles) == expected
    assert all(t.size == (336, 336) for t in tiles)


def test_tiles_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    s = 56
    img = Image.new("RGB", (3 * s, 2 * s))
    for k, c in enumerate(colours):
        img.paste(c, (k % 3 * s, k // 3 * s, (k % 3 + 1) * s, (k // 3 + 1) * s))
    tiles = tile_image(img, _cfg(s, max_tiles=6))
    assert len(tiles) == 7
    for k, c in enumerate(colours):
        assert tiles[k].getpixel((s // 2, s // 2)) == c
    assert tiles[6].getpixel((s // 6, s // 4)) == colours[0]
    assert tiles[6].getpixel((5 * s // 6, 3 * s // 4)) == colours[5]


@pytest.mark.parametrize("rgb", [(0, 0, 0), (255, 255, 255), (13, 128, 250)], ids=["black", "white", "odd"])
def test_constant_colour_normalisation(rgb):
    cfg = _cfg(56)
    px = pixel_values(tile_image(Image.new("RGB", (171, 57), rgb), cfg), cfg)
    assert px.shape == (3 + 1, 3, 56, 56) and px.dtype == torch.float32
    expected = (np.array(rgb, dtype=np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    want = torch.tensor(expected).view(1, 3, 1, 1).expand(4, 3, 56, 56)
    torch.testing.assert_close(px.double(), want, atol=1e-6, rtol=0)


def test_pixel_values_match_fp64_reference():
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    cfg = _cfg(56)
    px = pixel_values(tiles, cfg)
    arr = np.stack([np.asarray(t, dtype=np.float64) for t in tiles]).transpose(0, 3, 1, 2) / 255
    ref = (arr - np.array(CLIP_MEAN).reshape(1, 3, 1, 1)) / np.array(CLIP_STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(px.double(), torch.from_numpy(ref), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- load_image / hashes

def test_load_image_sources_agree():
    path = IMAGES / "chelsea.png"
    from_path = load_image(path)
    assert from_path.mode == "RGB" and from_path.size == (451, 300)
    same = [load_image(str(path)), load_image(path.read_bytes()), load_image(Image.open(path)),
            load_image(np.asarray(from_path))]
    assert all(image_hash(im) == image_hash(from_path) for im in same)
    want = hashlib.sha256(b"RGB451x300:" + from_path.tobytes()).hexdigest()
    assert image_hash(from_path) == want
    assert image_hash(load_image(IMAGES / "coffee.png")) != want


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (7, 5), (1, 2, 3, 4)), lambda: Image.new("L", (7, 5), 9),
    lambda: Image.new("P", (7, 5)), lambda: np.zeros((5, 7), np.uint8), lambda: np.ones((5, 7, 1), np.float32),
    lambda: np.zeros((5, 7, 4), np.uint8), lambda: np.ones((5, 7), bool),
], ids=["rgba", "gray", "palette", "np_gray", "np_float", "np_rgba", "np_bool"])
def test_load_image_converts_to_rgb(make):
    img = load_image(make())
    assert img.mode == "RGB" and img.size == (7, 5)


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["text_file", "empty_file", "missing_file", "truncated_png", "empty_bytes",
                                  "garbage_bytes", "zero_size_pil", "zero_size_array", "bad_array_shape",
                                  "float_out_of_range"])
def test_bad_images_raise(tmp_path, kind):
    sources = {
        "text_file": lambda: _write(tmp_path, "notes.png", b"this is not an image\n"),
        "empty_file": lambda: _write(tmp_path, "empty.jpg", b""),
        "missing_file": lambda: tmp_path / "nope.png",
        "truncated_png": lambda: _write(tmp_path, "cut.png", _png_bytes()[:60]),
        "empty_bytes": lambda: b"",
        "garbage_bytes": lambda: b"\x00\x01garbage" * 10,
        "zero_size_pil": lambda: Image.new("RGB", (0, 5)),
        "zero_size_array": lambda: np.zeros((0, 4, 3), np.uint8),
        "bad_array_shape": lambda: np.zeros((4, 4, 2), np.uint8),
        "float_out_of_range": lambda: np.full((4, 4, 3), 2.0),
    }
    src = sources[kind]()
    with pytest.raises(InvalidImageError) as err:
        load_image(src)
    if isinstance(src, Path):
        assert str(src) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_huge_image_is_fine():
    cfg = _cfg(56)
    img = load_image(Image.new("RGB", (8000, 6000), (200, 100, 50)))
    px = pixel_values(tile_image(img, cfg), cfg)
    assert px.shape == (5, 3, 56, 56) and torch.isfinite(px).all()


# ---------------------------------------------------------------- template and processor

def test_system_prompt_text():
    assert VICUNA_SYSTEM == SYS


def test_template_single_turn():
    assert chat_prompt("What is this?") == SYS + " USER: What is this? ASSISTANT:"


def test_template_multi_turn():
    turns = [("user", "hi"), ("assistant", "hello"), {"role": "user", "content": "box the cat"}]
    assert chat_prompt(turns) == SYS + " USER: hi ASSISTANT: hello</s>USER: box the cat ASSISTANT:"


@pytest.mark.parametrize("turns", [[("assistant", "x")], [("user", "a"), ("user", "b")],
                                   [("user", "a"), ("assistant", "b")]],
                         ids=["starts_assistant", "two_users", "ends_assistant"])
def test_template_rejects_bad_turns(turns):
    with pytest.raises(ValueError):
        chat_prompt(turns)


@pytest.fixture(scope="module")
def proc():
    return Processor(_cfg(56), ByteTokenizer())


def test_processor_text_only(proc):
    out = proc("hello")
    tok = proc.tokenizer
    assert out.prompt == SYS + " USER: hello ASSISTANT:"
    assert out.input_ids.tolist() == tok.encode(out.prompt, add_bos=True)
    assert out.num_image_tokens == 0 and out.pixel_values == [] and out.image_spans == []


def test_processor_prepends_image_and_expands(proc):
    out = proc("What is this?", images=[IMAGES / "coffee.png"])
    assert out.prompt == SYS + " USER: <image>\nWhat is this? ASSISTANT:"
    assert out.num_tiles == [5]
    per_tile = (56 // 14) ** 2
    start, end = out.image_spans[0]
    assert end - start == out.num_image_tokens == 5 * per_tile
    assert out.image_mask[start:end].all() and out.image_mask.sum() == end - start
    assert out.pixel_values[0].shape == (5, 3, 56, 56)
    tok = proc.tokenizer
    assert tok.special_ids["<image>"] not in out.input_ids.tolist()
    text_ids = torch.cat([out.input_ids[:start], out.input_ids[end:]]).tolist()
    assert tok.decode(text_ids, skip_special=False) == "<s>" + out.prompt.replace("<image>", "")


def test_processor_multiple_images_in_order(proc):
    prompt = "Compare <image> with <image>."
    out = proc(prompt, images=[IMAGES / "chelsea.png", IMAGES / "astronaut.png"])
    assert out.prompt == SYS + " USER: " + prompt + " ASSISTANT:"
    assert out.num_tiles == [3, 5]
    (s0, e0), (s1, e1) = out.image_spans
    assert e0 - s0 == 3 * 16 and e1 - s1 == 5 * 16 and e0 < s1
    assert out.image_hashes[0] == image_hash(load_image(IMAGES / "chelsea.png"))
    assert out.image_hashes[0] != out.image_hashes[1]


def test_processor_no_chat(proc):
    out = proc("raw text", images=[np.zeros((10, 10, 3), np.uint8)], chat=False)
    assert out.prompt == "<image>\nraw text"
    assert out.input_ids[0] == proc.tokenizer.bos_id and out.num_image_tokens == 16


@pytest.mark.parametrize("prompt,n_images,match", [
    ("one <image> two <image>", 1, "placeholders"), ("<image>", 0, "placeholders"),
    ("sneaky <im_patch>", 0, "reserved"),
], ids=["too_few_images", "no_images", "patch_in_prompt"])
def test_processor_rejects_mismatch(proc, prompt, n_images, match):
    with pytest.raises(ValueError, match=match):
        proc(prompt, images=[np.zeros((8, 8, 3), np.uint8)] * n_images)


def test_processor_multi_turn_image_goes_to_first_user_turn(proc):
    turns = [("user", "what is it?"), ("assistant", "a cat"), ("user", "box it")]
    out = proc(turns, images=[IMAGES / "rocket.jpg"])
    assert out.prompt == SYS + " USER: <image>\nwhat is it? ASSISTANT: a cat</s>USER: box it ASSISTANT:"
    assert out.num_tiles == [5] and out.input_ids.tolist().count(proc.tokenizer.eos_id) == 1


def test_processor_real_shapes_2880_tokens():
    out = Processor(VisionConfig(), ByteTokenizer())("describe", images=[IMAGES / "astronaut.png"])
    assert out.num_tiles == [5] and out.num_image_tokens == 5 * 576 == 2880
    assert out.pixel_values[0].shape == (5, 3, 336, 336)
