"""Prompt text with `<image k>` (and `<audio k>`, `<video k>`) placeholders -> OpenAI chat messages (FlagEvalMM
`HttpClient` rules, §0.2; audio and video parts as `media.py` builds them).

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
from . import media as media_parts

PLACEHOLDER = re.compile(r"(<(?:image|audio|video) \d+>)")
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
                   where: str = "", base_dir: Optional[Path] = None, audios: Sequence[Any] = (),
                   videos: Sequence[Any] = (), audio_part: str = "input_audio") -> list[dict[str, Any]]:
    """Chat messages for one item.  `images[k-1]` is image k (None = an absent image column), likewise `audios` for
    `<audio k>` and `videos` for `<video k>`; `where` names the task and item in errors.  Without placeholders the
    images, then the audios, then the videos follow the text.  A text-only item gets a plain string `content`."""
    media = {"image": images, "audio": audios, "video": videos}
    encoded: dict[tuple[str, int], dict[str, Any]] = {}

    def frame_url(frame: Any) -> str:
        return image_data_url(to_pil(frame, base_dir), max_image_pixels)

    def encode(kind: str, value: Any) -> dict[str, Any]:
        if kind == "image":
            return {"type": "image_url", "image_url": {"url": frame_url(value)}}
        if kind == "audio":
            return media_parts.audio_part(value, audio_part, base_dir)
        return media_parts.video_part(value, frame_url, base_dir)

    def part(kind: str, k: int) -> dict[str, Any]:
        if (kind, k) not in encoded:
            try:
                encoded[kind, k] = encode(kind, media[kind][k - 1])
            except (ValueError, OSError) as exc:
                raise UserError(f"{where}: {kind} {k}: {exc}") from None
        return encoded[kind, k]

    present = {kind: [k for k, value in enumerate(values, start=1) if value is not None]
               for kind, values in media.items()}
    pieces = PLACEHOLDER.split(text)
    content: list[dict[str, Any]] = []
    if len(pieces) == 1:
        if text.strip():
            content.append({"type": "text", "text": text})
        content.extend(part(kind, k) for kind in media for k in present[kind])
    else:
        for piece in pieces:
            if PLACEHOLDER.fullmatch(piece):
                kind, number = piece[1:-1].split(" ")
                k = int(number)
                if k not in present[kind]:
                    raise UserError(f"{where}: prompt refers to {piece} but the item has {len(present[kind])} "
                                    f"{kind}(s)" + (f" ({kind} {k} is empty)" if 1 <= k <= len(media[kind]) else ""))
                content.append(part(kind, k))
            elif piece.strip():
                content.append({"type": "text", "text": piece})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    has_media = any(p["type"] != "text" for p in content)
    messages.append({"role": "user", "content": content if has_media else text})
    return messages
