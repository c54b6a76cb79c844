"""Prompt text with `<image k>` placeholders -> OpenAI chat messages (FlagEvalMM `HttpClient` rules, §0.2).

The text is split on `(<image \\d+>)`; each placeholder becomes an `image_url` part holding image k (1-based
into the item's image list), text pieces stay unstripped, whitespace-only pieces are dropped.  Without any
placeholder all images follow the text.  Every image is sent as RGB JPEG quality 95 in a data URL, so both
backends receive byte-identical requests.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from ..errors import UserError

PLACEHOLDER = re.compile(r"(<image \d+>)")
JPEG_QUALITY = 95


def to_pil(value: Any, base_dir: Optional[Path] = None) -> Image.Image:
    """An image from whatever a loader row holds: PIL image, HF `{bytes, path}` dict, raw bytes, a file path
    (relative to `base_dir`) or a base64 string (VLMEvalKit TSV)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return to_pil(value.get("path"), base_dir)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        if len(value) < 1024:
            path = Path(value) if base_dir is None else base_dir / value
            if path.is_file():
                return Image.open(path)
        try:
            return Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        except (binascii.Error, ValueError, OSError):
            raise ValueError(f"neither an image file nor base64 image data: {value[:40]!r}") from None
    raise ValueError(f"cannot read an image from {type(value).__name__}")


def downscale(image: Image.Image, max_pixels: Optional[int]) -> Image.Image:
    """Shrink (aspect kept, bicubic) so width*height <= max_pixels; smaller images are left alone."""
    width, height = image.size
    if not max_pixels or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(size, Image.BICUBIC)


def image_data_url(image: Image.Image, max_pixels: Optional[int] = None) -> str:
    buffer = io.BytesIO()
    downscale(image.convert("RGB"), max_pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(text: str, images: Sequence[Any] = (), system: str = "", max_image_pixels: Optional[int] = None,
                   where: str = "", base_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    """Chat messages for one item.  `images[k-1]` is image k (None = an absent image column); `where` names the
    task and item in errors.  A text-only item gets a plain string `content`."""
    encoded: dict[int, dict[str, Any]] = {}

    def part(k: int) -> dict[str, Any]:
        if k not in encoded:
            try:
                url = image_data_url(to_pil(images[k - 1], base_dir), max_image_pixels)
            except (ValueError, OSError) as exc:
                raise UserError(f"{where}: image {k}: {exc}") from None
            encoded[k] = {"type": "image_url", "image_url": {"url": url}}
        return encoded[k]

    present = [k for k, image in enumerate(images, start=1) if image is not None]
    pieces = PLACEHOLDER.split(text)
    content: list[dict[str, Any]] = []
    if len(pieces) == 1:
        if text.strip():
            content.append({"type": "text", "text": text})
        content.extend(part(k) for k in present)
    else:
        for piece in pieces:
            if PLACEHOLDER.fullmatch(piece):
                k = int(piece[7:-1])
                if k not in present:
                    raise UserError(f"{where}: prompt refers to {piece} but the item has {len(present)} image(s)"
                                    + (f" (image {k} is empty)" if 1 <= k <= len(images) else ""))
                content.append(part(k))
            elif piece.strip():
                content.append({"type": "text", "text": piece})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    has_images = any(p["type"] == "image_url" for p in content)
    messages.append({"role": "user", "content": content if has_images else text})
    return messages
