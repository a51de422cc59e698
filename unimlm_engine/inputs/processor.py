"""Images -> anyres tiles -> normalised pixels; prompts -> vicuna_v1 chat text -> token ids.

Tiling follows the official InternVL / VisionLLM v2 `dynamic_preprocess`: the grid (cols, rows)
with 1 <= cols * rows <= max_tiles whose aspect ratio is closest to the image's, bicubic resize
to (tile * cols, tile * rows), row-major crops, and a whole-image thumbnail when there is more
than one tile. Pixels are ToTensor (/255) then (x - mean) / std with the config's mean/std.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import VisionConfig
from .tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
PATCH_TOKEN = "<im_patch>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
Message = Union[tuple[str, str], dict[str, str]]


class InvalidImageError(ValueError):
    """The image source cannot be decoded into a non-empty RGB image."""


def _image_from_array(arr: np.ndarray, name: str) -> Image.Image:
    """arr: [H, W] or [H, W, C] with C in (1, 3, 4); uint8, bool, or float in [0, 1]."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidImageError(f"{name}: array of shape {arr.shape} is not [H, W] or [H, W, 1|3|4]")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise InvalidImageError(f"{name}: float arrays must hold finite values in [0, 1]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InvalidImageError(f"{name}: unsupported array dtype {arr.dtype} (use uint8, bool or float)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"{name}: zero-size image {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _decode_file(fp: Any, name: str) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidImageError(f"{name}: not a decodable image ({type(e).__name__}: {e})") from e


def load_image(src: ImageSource) -> Image.Image:
    """A path, encoded bytes, PIL image or numpy array -> RGB PIL image (InvalidImageError if unusable).

    Huge images are accepted (tiling downsizes them) up to PIL's decompression-bomb guard. EXIF
    orientation is not applied, as in the official preprocessing.
    """
    if isinstance(src, Image.Image):
        name = f"PIL image {src.mode} {src.size}"
        img = src.convert("RGB")
    elif isinstance(src, np.ndarray):
        img = _image_from_array(src, f"numpy array {src.shape}").convert("RGB")
        name = "numpy array"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = f"<{len(src)} bytes>"
        if len(src) == 0:
            raise InvalidImageError(f"{name}: empty image data")
        img = _decode_file(io.BytesIO(bytes(src)), name)
    elif isinstance(src, (str, os.PathLike)):
        name = f"image file {os.fspath(src)!r}"
        if not os.path.isfile(src):
            raise InvalidImageError(f"{name} does not exist or is not a file")
        if os.path.getsize(src) == 0:
            raise InvalidImageError(f"{name} is empty")
        img = _decode_file(src, name)
    else:
        raise TypeError(f"load_image: unsupported source type {type(src).__name__}")
    if img.width == 0 or img.height == 0:
        raise InvalidImageError(f"{name}: zero-size image {img.size}")
    return img


def select_grid(width: int, height: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(cols, rows) of the official find_closest_aspect_ratio over grids with 1 <= cols*rows <= max_tiles.

    Candidates go by tile count; the closest cols/rows to width/height wins; on an exact tie the later
    (larger) grid wins only if width*height > 0.5 * tile_size^2 * cols * rows. Within one tile count the
    order cannot matter: two grids of equal count never tie for closest while (1, 1) is a candidate.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"select_grid: image size must be positive, got {width}x{height}")
    if max_tiles < 1 or tile_size < 1:
        raise ValueError(f"select_grid: max_tiles and tile_size must be >= 1, got {max_tiles}, {tile_size}")
    candidates = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                         if c * r <= max_tiles), key=lambda g: (g[0] * g[1], g[0]))
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, vision_cfg: VisionConfig) -> list[Image.Image]:
    """RGB image -> cols*rows tiles of image_size^2 in row-major order (+ thumbnail when > 1 tile)."""
    size = vision_cfg.image_size
    cols, rows = select_grid(image.width, image.height, vision_cfg.max_tiles, size)
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if vision_cfg.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def pixel_values(tiles: Sequence[Image.Image], vision_cfg: VisionConfig) -> torch.Tensor:
    """tiles (RGB, image_size^2) -> [N, 3, S, S] float32: x / 255 then (x - mean) / std."""
    arr = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiles])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(vision_cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(vision_cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def image_hash(image: Image.Image) -> str:
    """sha256 hex of the decoded RGB pixels and their size (the engine's prefix-sharing key)."""
    h = hashlib.sha256(f"RGB{image.width}x{image.height}:".encode())
    h.update(image.convert("RGB").tobytes())
    return h.hexdigest()


def _normalise_messages(messages: Union[str, Sequence[Message]]) -> list[tuple[str, str]]:
    if isinstance(messages, str):
        return [("user", messages)]
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append((str(role).lower(), content))
    for i, (role, _) in enumerate(out):
        if role != ("user", "assistant")[i % 2]:
            raise ValueError(f"chat turns must alternate user/assistant starting with user; turn {i} is {role!r}")
    if not out or out[-1][0] != "user":
        raise ValueError("a chat prompt must end with a user turn")
    return out


def chat_prompt(messages: Union[str, Sequence[Message]], system: str = VICUNA_SYSTEM) -> str:
    """vicuna_v1: '{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:'."""
    text = system + " "
    for role, content in _normalise_messages(messages):
        text += f"USER: {content} " if role == "user" else f"ASSISTANT: {content}</s>"
    return text + "ASSISTANT:"


@dataclass(slots=True)
class ProcessedInput:
    """One request's model input.

    input_ids: [T] int64, each <image> expanded to num_tiles * tokens_per_tile <im_patch> ids.
    image_mask: [T] bool, True at <im_patch> positions. image_spans[k] = (start, end) of image k.
    pixel_values[k]: [num_tiles[k], 3, S, S] float32. image_hashes[k]: sha256 hex of image k's pixels.
    """

    input_ids: torch.Tensor
    image_mask: torch.Tensor
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    num_tiles: list[int] = field(default_factory=list)
    image_hashes: list[str] = field(default_factory=list)
    prompt: str = ""

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())


class Processor:
    """Turns (prompt, images) into a ProcessedInput for one vision config and tokenizer."""

    def __init__(self, vision_cfg: VisionConfig, tokenizer: Tokenizer, system: str = VICUNA_SYSTEM) -> None:
        self.vision_cfg = vision_cfg
        self.tokenizer = tokenizer
        self.system = system
        self.image_id = tokenizer.special_ids[IMAGE_TOKEN]
        self.patch_id = tokenizer.special_ids[PATCH_TOKEN]

    def __call__(self, prompt: Union[str, Sequence[Message]], images: Optional[Sequence[ImageSource]] = None,
                 chat: bool = True) -> ProcessedInput:
        """prompt: user text, or alternating user/assistant turns (chat=True only); images: in <image> order."""
        loaded = [load_image(src) for src in (images or [])]
        text = self._prompt_text(prompt, len(loaded), chat)
        n_placeholders = text.count(IMAGE_TOKEN)
        if n_placeholders != len(loaded):
            raise ValueError(f"prompt has {n_placeholders} {IMAGE_TOKEN} placeholders but {len(loaded)} images")
        pixels = [pixel_values(tile_image(img, self.vision_cfg), self.vision_cfg) for img in loaded]
        num_tiles = [p.shape[0] for p in pixels]
        ids, spans = self._expand(self.tokenizer.encode(text, add_bos=True), num_tiles)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        return ProcessedInput(input_ids=input_ids, image_mask=input_ids == self.patch_id, image_spans=spans,
                              pixel_values=pixels, num_tiles=num_tiles,
                              image_hashes=[image_hash(img) for img in loaded], prompt=text)

    def _prompt_text(self, prompt: Union[str, Sequence[Message]], n_images: int, chat: bool) -> str:
        if not chat and not isinstance(prompt, str):
            raise ValueError("chat=False takes a plain string prompt")
        turns = _normalise_messages(prompt)
        if any(PATCH_TOKEN in content for _, content in turns):
            raise ValueError(f"{PATCH_TOKEN} is reserved for image features and cannot appear in a prompt")
        if n_images and not any(IMAGE_TOKEN in content for _, content in turns):
            turns[0] = ("user", (IMAGE_TOKEN + "\n") * n_images + turns[0][1])
        return chat_prompt(turns, self.system) if chat else turns[0][1]

    def _expand(self, ids: list[int], num_tiles: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Replace the k-th <image> id by num_tiles[k] * tokens_per_tile <im_patch> ids."""
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        per_tile = self.vision_cfg.tokens_per_tile
        for tid in ids:
            if tid != self.image_id:
                out.append(tid)
                continue
            n = num_tiles[len(spans)] * per_tile
            spans.append((len(out), len(out) + n))
            out.extend([self.patch_id] * n)
        return out, spans
