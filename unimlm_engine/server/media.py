"""Image URLs of a request -> decoded RGB images, with the server's limits (runs on a worker thread).

- `data:image/...;base64,...`: decoded from the request body.
- `file:///abs/path`: only when the server has `--allowed-local-media-path DIR`, and only for files whose
  real path (symlinks and `..` resolved) lies inside DIR's real path; otherwise 403.
- `http(s)://`: refused (this server fetches nothing from the network).

The pixel limit is checked on the image header (PIL reads only the header on `Image.open`) before any
pixel is decoded, so a small file declaring a huge image (a decompression bomb) costs nothing.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
from typing import Optional

from PIL import Image, UnidentifiedImageError

from ..inputs.processor import InvalidImageError, load_image
from .errors import APIError, bad_request


def resolve_local(url: str, allowed_dir: Optional[str]) -> str:
    """file:// URL -> a real path inside allowed_dir (APIError 403 otherwise, 400 if it is no file)."""
    if allowed_dir is None:
        raise APIError(403, "file:// image URLs are disabled; start the server with --allowed-local-media-path DIR",
                       type="permission_error", code="local_media_forbidden")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(403, f"file:// URL with a host ({parsed.netloc!r}) is not allowed", type="permission_error",
                       code="local_media_forbidden")
    path = urllib.parse.unquote(parsed.path)
    if "\x00" in path:
        raise bad_request("a file:// URL must not contain a NUL byte", param="image_url")
    if not os.path.isabs(path):
        raise bad_request("a file:// URL needs an absolute path", param="image_url")
    real = os.path.realpath(path)
    root = os.path.realpath(allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise APIError(403, "the file is outside the allowed local media folder", type="permission_error",
                       code="local_media_forbidden")
    if not os.path.isfile(real):
        raise bad_request("no such image file in the allowed local media folder", param="image_url")
    return real


def _data_url_bytes(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise bad_request("malformed data: URL (expected data:<mime>;base64,<data>)", param="image_url")
    if not head.endswith(";base64"):
        raise bad_request("data: URLs must be base64-encoded (data:<mime>;base64,...)", param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"data: URL is not valid base64: {e}", param="image_url") from None


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Read only the header: refuse an image larger than max_pixels before decoding it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise bad_request(f"image too large: {e}", param="image_url", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"undecodable image ({type(e).__name__}: {e})", param="image_url",
                          code="invalid_image") from None
    if w * h > max_pixels:
        raise bad_request(f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels}",
                          param="image_url", code="image_too_large")


def load_image_url(url: str, allowed_dir: Optional[str], max_pixels: int,
                   max_file_bytes: Optional[int] = None) -> Image.Image:
    if url.startswith("data:"):
        data = _data_url_bytes(url)
    elif url.startswith("file:"):
        path = resolve_local(url, allowed_dir)
        if max_file_bytes is not None and os.path.getsize(path) > max_file_bytes:
            raise APIError(413, f"local image file over {max_file_bytes} bytes", type="invalid_request_error",
                           code="file_too_large")
        with open(path, "rb") as f:
            data = f.read()
    elif url.startswith(("http://", "https://")):
        raise bad_request("remote image URLs are not fetched; send the image as a data: URL", param="image_url",
                          code="remote_media_unsupported")
    else:
        raise bad_request("image_url must be a data: or file:// URL", param="image_url")
    if not data:
        raise bad_request("empty image data", param="image_url", code="invalid_image")
    check_pixels(data, max_pixels)
    try:
        return load_image(data)
    except InvalidImageError as e:
        raise bad_request(f"undecodable image: {e}", param="image_url", code="invalid_image") from None
