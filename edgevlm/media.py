"""A turn's images and videos: what the caller gave -> content parts in order -> media items, each with its cached
state and the text that fills its marker in the prompt.

An image item's state comes from `VLM.image_state`. A video is read (edgevlm/video.py), its frames encoded one at
a time and cached by content like images, then composed: with the manifest's video layout (SmolVLM2, OneVision)
its rows follow each other under one video marker; without one, the frames are images of the message in turn,
each under its own marker (LLaVA-Mini: one token per frame, the text fused with every frame and averaged).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from . import template, video as video_mod
from .errors import ArgumentError, ImageError


ONE_FOR_PREFUSION = ("a pre-fusion (LLaVA-Mini) bundle takes one image per conversation, or one video (its frames): "
                     "start a new chat for another")


@dataclass
class Item:
    kind: str  # "image" | "video"
    source: object  # as the caller gave it: an image re-encodes when the multi-image layout starts to apply
    key: str
    state: dict
    budget: int | None = None  # its max_image_tokens
    multi: bool = False  # encoded as one image of several (ImageLayout.multi)
    content: list[dict] = field(default_factory=list)  # its parts of the message the template renders


def parts_of(text, image=None, images=None, video=None) -> list[tuple[str, object]]:
    """The turn in order, as (kind, value): "text", "image" or "video". `text` is a string (the images and the
    video then come first) or a list of parts: strings, images, edgevlm.Video, or dicts {"type": "text", "text"},
    {"type": "image", "image"}, {"type": "video", "video"}."""
    given = ([image] if image is not None else []) + list(images or [])
    if isinstance(text, str):
        return [("image", x) for x in given] + ([("video", video)] if video is not None else []) + [("text", text)]
    if not isinstance(text, (list, tuple)):
        raise ArgumentError("a message is a string or a list of parts (strings, images, edgevlm.Video)")
    if given or video is not None:
        raise ArgumentError("give the images either as parts of the message or as image= / images= / video=, not both")
    out = []
    for p in text:
        if isinstance(p, str):
            out.append(("text", p))
        elif isinstance(p, video_mod.Video):
            out.append(("video", p))
        elif isinstance(p, dict) and p.get("type") in ("text", "image", "video") and p["type"] in p:
            out.append((p["type"], p[p["type"]]))
        elif isinstance(p, dict):
            raise ArgumentError("a message part dict is {'type': 'text'|'image'|'video', <that type>: value}")
        else:
            out.append(("image", p))
    return out


def multi(vlm, n_images: int) -> bool:
    """Do the images of a prompt holding n_images take the layout of several (LLaVA-OneVision: one tile each)?"""
    lay = vlm.manifest.image_layout
    return n_images > 1 and lay is not None and lay.multi != "same"


def image_item(vlm, source, budget: int | None, is_multi: bool, spend, stages: dict) -> tuple[Item, str]:
    key, state, where, took = vlm.image_state(source, budget, multi=is_multi, spend=spend)
    for k, v in took.items():
        stages[k] = stages.get(k, 0.0) + v
    return Item("image", source, key, state, budget, is_multi, [{"type": "image"}]), where


def video_item(vlm, value, budget: int | None, spend, stages: dict) -> tuple[Item, str]:
    """A video's item: its kept frames encoded (each cached by content) and composed."""
    m, v = vlm.manifest, vlm.manifest.video
    video = video_mod.as_video(value)
    clip = video_mod.read(video, v.sampling if v else "uniform", v.fps if v else 1.0,
                          v.max_frames if v else vlm.limits.video_frames, vlm.limits, spend)
    spend = spend if isinstance(video.source, (list, tuple)) else None  # a file's frames were counted before decoding
    keys, states, where = [], [], set()
    for frame in clip.frames:
        if v is None:
            key, state, found, took = vlm.image_state(frame, budget, spend=spend)
        else:
            key, state, found, took = vlm.frame_state(frame, spend)
        for k, t in took.items():
            stages[k] = stages.get(k, 0.0) + t
        keys.append(key)
        states.append(state)
        where.add(found)
    key = hashlib.sha256(("video " + " ".join(keys)).encode()).hexdigest()
    if v is None:  # each frame an image of the message
        state = {"rows": np.concatenate([s["rows"] for s in states]), "kv": None,
                 "fills": [(m.image_token, vlm._placeholder(s)) for s in states]}
        if m.fusion == "prefusion":
            state["frames_kv"] = [s["kv"] for s in states]
        content = [{"type": "image"} for _ in states]
    else:
        rows = [s["rows"] for s in states] + ([states[0]["row_end"][None]] if v.row_end else [])
        text = template.render(v.prompt, [], add_generation_prompt=False, limits=vlm.limits, image=v.token,
                               frames=len(states), tokens=states[0]["rows"].shape[0], seconds=clip.seconds,
                               duration=clip.duration)
        state = {"rows": np.concatenate(rows), "kv": None, "fills": [(v.marker, text)]}
        content = [{"type": "video"}]
    found = "ram" if where == {"ram"} else "disk" if where <= {"ram", "disk"} else ""
    return Item("video", value, key, state, budget, False, content), found


def fills(vlm, state: dict) -> list[tuple[str, str]]:
    """The (marker, text) pairs of one item's state, in the order of its markers."""
    return state.get("fills") or [(vlm.manifest.image_token, vlm._placeholder(state))]


class PixelBudget:
    """The decoded pixels of one request's images and frames, at most limits.request_pixels."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def __call__(self, w: int, h: int) -> None:
        self.used += w * h
        if self.used > self.limit:
            raise ImageError(f"the images and video frames of this message hold over {self.limit} pixels "
                             "(edgevlm.Limits.request_pixels): send fewer or smaller ones")
