"""Audio and video cells -> OpenAI chat content parts in the form vLLM's OpenAI server takes them.

Audio: `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}` (OpenAI's own part; vLLM
decodes any container librosa reads) or `{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}`.
Video: `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`, or for a list of frames vLLM's
frame form `data:video/jpeg;base64,<frame 1>,<frame 2>,...` (each frame a base64 JPEG).

The file's own bytes are sent (no re-encoding: there is no audio/video codec in the dependencies), so both
backends get byte-identical requests.  A decoded `datasets` audio cell (`{array, sampling_rate}`) becomes 16-bit
PCM WAV.  An animated GIF (or a list of images) is sent as frames.
"""
from __future__ import annotations

import base64
import io
import wave
from pathlib import Path
from typing import Any, Optional

AUDIO_PARTS = ("input_audio", "audio_url")
AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}
VIDEO_MIME = {"mp4": "video/mp4", "webm": "video/webm", "avi": "video/x-msvideo", "mkv": "video/x-matroska"}
# Names longer than this are not taken for file paths (a base64 cell is much longer).
MAX_PATH_CHARS = 1024


def _raw_bytes(value: Any, base_dir: Optional[Path], what: str) -> bytes:
    """Bytes of a cell holding a HF `{bytes, path}` dict, raw bytes, a file path or base64 text."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _raw_bytes(str(value["path"]), base_dir, what)
        raise ValueError(f"{what} cell has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if len(value) < MAX_PATH_CHARS:
            path = Path(value) if base_dir is None else base_dir / value
            if path.is_file():
                return path.read_bytes()
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError(f"neither a {what} file nor base64 {what} data: {value[:40]!r}") from None
    raise ValueError(f"cannot read {what} from {type(value).__name__}")


def audio_format(data: bytes) -> str:
    """The container of audio bytes, by magic number: wav | mp3 | flac | ogg."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    raise ValueError(f"unknown audio container (first bytes {data[:12]!r}); expected wav, mp3, flac or ogg")


def pcm16_wav(samples: Any, sampling_rate: int) -> bytes:
    """Mono float samples in [-1, 1] (any sequence) as 16-bit PCM WAV bytes."""
    import numpy as np

    array = np.asarray(samples, dtype=np.float64)
    if array.ndim == 2:  # (channels, samples) as datasets decodes stereo: mixed down, as vLLM does
        array = array.mean(axis=0)
    pcm = (np.clip(array, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sampling_rate))
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def audio_bytes(value: Any, base_dir: Optional[Path] = None) -> bytes:
    if isinstance(value, dict) and value.get("array") is not None:
        return pcm16_wav(value["array"], value["sampling_rate"])
    return _raw_bytes(value, base_dir, "audio")


def audio_part(value: Any, kind: str = "input_audio", base_dir: Optional[Path] = None) -> dict[str, Any]:
    """One audio content part; `kind` is `input_audio` (base64 + format) or `audio_url` (a data URL)."""
    data = audio_bytes(value, base_dir)
    fmt = audio_format(data)
    encoded = base64.b64encode(data).decode("ascii")
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": {"data": encoded, "format": fmt}}
    if kind == "audio_url":
        return {"type": "audio_url", "audio_url": {"url": f"data:{AUDIO_MIME[fmt]};base64,{encoded}"}}
    raise ValueError(f"unknown audio part {kind!r} (expected one of {', '.join(AUDIO_PARTS)})")


def video_format(data: bytes) -> str:
    """The container of video bytes, by magic number: mp4 | webm/mkv | avi | gif."""
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:64] else "mkv"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[:4] == b"GIF8":
        return "gif"
    raise ValueError(f"unknown video container (first bytes {data[:12]!r}); expected mp4, webm, mkv, avi or gif")


def gif_frames(data: bytes) -> list[Any]:
    """Every frame of an animated GIF as an RGB PIL image."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as animation:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(animation)]


def frames_url(frame_urls: list[str]) -> str:
    """vLLM's frame form from JPEG image data URLs: `data:video/jpeg;base64,<f1>,<f2>,...`."""
    payloads = []
    for url in frame_urls:
        head, _, payload = url.partition(";base64,")
        if head != "data:image/jpeg":
            raise ValueError(f"a video frame must be a JPEG data URL, got {head[:40]!r}")
        payloads.append(payload)
    return "data:video/jpeg;base64," + ",".join(payloads)


def video_part(value: Any, encode_frame, base_dir: Optional[Path] = None) -> dict[str, Any]:
    """One `video_url` part.  `value` is a video file (bytes/path/dict) or a list of frames (any image cell);
    `encode_frame(frame) -> JPEG data URL` encodes a frame exactly as an image of the prompt would be."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("a video given as frames needs at least one frame")
        url = frames_url([encode_frame(frame) for frame in value])
    else:
        data = _raw_bytes(value, base_dir, "video")
        fmt = video_format(data)
        if fmt == "gif":
            url = frames_url([encode_frame(frame) for frame in gif_frames(data)])
        else:
            url = f"data:{VIDEO_MIME[fmt]};base64," + base64.b64encode(data).decode("ascii")
    return {"type": "video_url", "video_url": {"url": url}}
