"""Video input: a file (decoded with PyAV, the `video` extra) or a list of frames -> the frames a prompt keeps.

Frames are chosen as the checkpoint's processor chooses them (the manifest's video.sampling): "uniform" is
transformers' default (n frames at i * total // n), "spread" SmolVLM's (a linspace over the video, one second
kept off each end of a long one). Every cap is checked from the container's header before a frame is decoded:
the file's bytes, a frame's pixels, the frames to decode and the frames kept (edgevlm.Limits).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArgumentError, DependencyError, VideoError
from .limits import DEFAULT, Limits


@dataclass(frozen=True)
class Video:
    """A video for a prompt: `source` is a file path, the file's bytes, or a list of frames (each anything an image
    may be). `fps`: frames kept per second of video (default: the bundle's); `frames`: exactly this many, spread
    over the video (instead of fps); `frame_rate`: a list's frames per second of video (default: fps, so that
    every frame of a short list is kept)."""

    source: Any
    fps: float | None = None
    frames: int | None = None
    frame_rate: float | None = None


@dataclass(frozen=True)
class Clip:
    frames: list  # the kept frames: HxWx3 uint8 arrays (decoded files) or the list's own items
    seconds: list[float]  # each kept frame's time in the video
    duration: float  # seconds


def as_video(value) -> Video:
    return value if isinstance(value, Video) else Video(value)


def uniform(total: int, rate: float, fps: float | None, count: int | None) -> np.ndarray:
    """transformers' default: `count` frames (else total / rate * fps of them) at i * total // n."""
    n = count if count is not None else max(1, int(total / rate * fps))
    n = min(n, total)
    return np.arange(n, dtype=np.int64) * total // n


def spread(total: int, rate: float, fps: float, most: int, skip: float = 1.0) -> np.ndarray:
    """SmolVLM's: round(fps * duration) frames (at most `most`) over the video, `skip` seconds kept off each end
    when the video is long enough."""
    duration = total / rate
    n = max(1, min(int(round(fps * duration)), most))
    start, end = 0, total - 1
    if skip > 0 and duration - 2 * skip > most * fps:
        start, end = int(skip * rate), int(total - skip * rate)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, n).astype(np.int64))


def pick(total: int, rate: float, video: Video, method: str, fps: float, most: int, limits: Limits) -> np.ndarray:
    """Indices of the frames to keep, at most min(most, limits.video_frames) of them."""
    if video.frames is not None and (not isinstance(video.frames, int) or video.frames < 1):
        raise ArgumentError("a video's frames must be a positive integer")
    if video.fps is not None and not (isinstance(video.fps, (int, float)) and 0 < video.fps <= 1000):
        raise ArgumentError("a video's fps must be a number in (0, 1000]")
    if video.frames is not None and video.frames > limits.video_frames:
        raise VideoError(f"{video.frames} frames asked; the limit is {limits.video_frames} per request "
                         "(edgevlm.Limits.video_frames)")
    most = min(most, limits.video_frames)
    fps = video.fps or fps
    if method == "spread":
        return spread(total, rate, 1e9 if video.frames else fps, video.frames or most)
    idx = uniform(total, rate, fps, video.frames)
    return idx if len(idx) <= most else idx[np.linspace(0, len(idx) - 1, most).astype(np.int64)]


def read(video: Video, method: str, fps: float, most: int, limits: Limits = DEFAULT, spend=None) -> Clip:
    """The frames to keep of a video (a file is decoded up to its last kept frame only; spend(w, h) is called for
    each of them first)."""
    src = video.source
    if isinstance(src, (list, tuple)):
        if not src:
            raise VideoError("the video has no frames (an empty list)")
        rate = video.frame_rate or video.fps or fps
        if not (isinstance(rate, (int, float)) and rate > 0):
            raise ArgumentError("a video's frame_rate must be a positive number")
        idx = pick(len(src), float(rate), video, method, fps, most, limits)
        return Clip([src[i] for i in idx], [i / rate for i in idx], len(src) / rate)
    if isinstance(src, (str, os.PathLike)):
        data = _read_file(src, limits.video_bytes)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise VideoError(f"unsupported video type {type(src).__name__}: pass a file path, its bytes, or a list of "
                         "frames")
    if len(data) > limits.video_bytes:
        raise VideoError(f"the video is {len(data)} bytes; the limit is {limits.video_bytes}")
    return _decode(data, video, method, fps, most, limits, spend)


def _read_file(path, limit: int) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise VideoError(f"video file {os.fspath(path)!r} is {size} bytes; the limit is {limit}")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except (OSError, ValueError) as e:
        raise VideoError(f"cannot read video {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None


def _av():
    try:
        import av
    except ImportError:
        raise DependencyError("reading a video file needs PyAV: pip install 'edgevlm[video]' (or pass the video as "
                              "a list of frames)") from None
    return av


def _decode(data: bytes, video: Video, method: str, fps: float, most: int, limits: Limits, spend) -> Clip:
    av = _av()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoError("the file holds no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or float(stream.guessed_rate or 0)
            total = int(stream.frames or 0) or sum(1 for p in container.demux(stream) if p.size)
            _check_stream(stream, total, rate, limits)
            idx = pick(total, rate, video, method, fps, most, limits)
            for _ in idx if spend else ():
                spend(int(stream.width), int(stream.height))
            container.seek(0)
            frames, want = [], set(idx.tolist())
            for i, frame in enumerate(container.decode(stream)):
                if i > idx[-1]:
                    break
                if i in want:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise VideoError(f"the video cannot be decoded: {str(e)[:200]}") from None
    if len(frames) != len(idx):
        raise VideoError(f"the video ended after {len(frames)} of the {len(idx)} frames its header promised")
    return Clip(frames, [i / rate for i in idx], total / rate)


def _check_stream(stream, total: int, rate: float, limits: Limits) -> None:
    w, h = int(stream.width or 0), int(stream.height or 0)
    if total < 1 or rate <= 0 or w < 1 or h < 1:
        raise VideoError(f"the video stream declares {total} frames at {rate:g} fps of {w}x{h} pixels: nothing to read")
    if w * h > limits.image_pixels:
        raise VideoError(f"the video's frames are {w}x{h} pixels; the limit is {limits.image_pixels} per frame")
    if total > limits.video_decoded_frames:
        raise VideoError(f"the video has {total} frames; at most {limits.video_decoded_frames} are decoded "
                         "(edgevlm.Limits.video_decoded_frames): cut it shorter")


def write(path, frames: list, fps: float = 1.0, codec: str = "mpeg4") -> None:
    """Frames (HxWx3 uint8, even sides) -> a video file at fps (examples and tests; PyAV)."""
    from fractions import Fraction

    av = _av()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f, np.uint8), format="rgb24")))
        container.mux(stream.encode())
