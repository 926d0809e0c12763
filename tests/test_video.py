"""Video: SmolVLM2's and LLaVA-OneVision's video prompts and rows as transformers computes them (frames given, and a
file decoded with PyAV and sampled as each processor samples), LLaVA-Mini with one token per frame against its
PyTorch module, frames cached by content, and the limits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgevlm
from conftest import SPECS, scene
from edgevlm import video as video_mod

QUESTION = "what color is the circle?"


def clip(n: int = 5, size=(96, 72)) -> list[np.ndarray]:
    """Frames of a small changing scene (each frame differs from the one before)."""
    return [np.array(scene(k % 4, size=size)) for k in range(n)]


def hf_model(ckpt):
    from edgevlm.export.adapters import adapter_for

    adapter = adapter_for(json.loads((ckpt / "config.json").read_text())["model_type"])
    return adapter.load_model(ckpt).eval(), adapter.load_processor(ckpt)


def hf_video_inputs(processor, frames, seconds, rate: float, total: int, image=None):
    """transformers' inputs for [image?, video, question]: the frames as sampled, their metadata as a decoder gives
    it."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": "image"}] if image is not None else []
    content += [{"type": "video"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    meta = VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate,
                         frames_indices=[int(round(s * rate)) for s in seconds])
    extra = {"images": [image]} if image is not None else {}
    return processor(text=text, videos=[np.stack(frames)], video_metadata=[meta], do_sample_frames=False,
                     return_tensors="pt", **extra)


@torch.no_grad()
def hf_answer(model, inputs, n: int = 24):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits[0][0].float().numpy()


@pytest.mark.parametrize("name", ["smolvlm-llama", "onevision-qwen2"])
def test_video_frames_match_transformers(name, checkpoint, bundle):
    model, processor = hf_model(checkpoint(name))
    vlm = edgevlm.load(bundle(name), threads=1)
    answers = set()
    for n in (3, 6):
        frames = clip(n)
        video = edgevlm.Video(frames, frame_rate=1.0)
        inputs = hf_video_inputs(processor, frames, list(range(n)), 1.0, n)
        ref, ref_logits = hf_answer(model, inputs)
        rs = list(vlm.stream(None, QUESTION, video=video, max_tokens=24))
        maxdiff = float(np.abs(vlm.prompt_logits(None, [video, QUESTION]) - ref_logits).max())
        print(f"{name}, {n} frames: {rs[-1].prompt_tokens} prompt tokens, logits maxdiff = {maxdiff:.3g}, greedy "
              f"{len(ref)} tokens {'match' if [r.token for r in rs] == ref else 'DIFFER'}")
        assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1]
        assert maxdiff <= 1e-4 and [r.token for r in rs] == ref
        answers.add(tuple(ref))
    assert len(answers) == 2  # the frames decide the answer
    if name == "onevision-qwen2":  # an image and a video in one message
        frames, image = clip(4), scene(3, (120, 80))
        inputs = hf_video_inputs(processor, frames, list(range(4)), 1.0, 4, image=image)
        ref, _ = hf_answer(model, inputs)
        rs = list(vlm.stream(None, [image, edgevlm.Video(frames, frame_rate=1.0), QUESTION], max_tokens=24))
        print(f"{name}, an image and 4 frames: {rs[-1].prompt_tokens} prompt tokens")
        assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1] and [r.token for r in rs] == ref


@pytest.mark.parametrize("name,frames,rate", [("smolvlm-llama", 40, 4.0), ("onevision-qwen2", 40, 8.0),
                                              ("smolvlm-llama", 7, 2.0)])
def test_video_file_is_decoded_and_sampled_as_transformers_does(name, frames, rate, checkpoint, bundle, tmp_path):
    from transformers.video_utils import load_video

    model, processor = hf_model(checkpoint(name))
    vlm = edgevlm.load(bundle(name), threads=1)
    path = tmp_path / "clip.mp4"
    video_mod.write(path, clip(frames), fps=rate)
    v = vlm.manifest.video
    ours = video_mod.read(edgevlm.Video(str(path)), v.sampling, v.fps, v.max_frames)
    hf_frames, meta = load_video(str(path), backend="pyav", sample_indices_fn=processor.video_processor.sample_frames)
    print(f"{name}, {frames} frames at {rate:g} fps: kept {len(ours.frames)} (transformers {len(hf_frames)}) at "
          f"{[round(s, 2) for s in ours.seconds]}")
    assert [round(s * rate) for s in ours.seconds] == list(meta.frames_indices)
    assert all(np.array_equal(a, b) for a, b in zip(ours.frames, hf_frames))
    inputs = hf_video_inputs(processor, list(hf_frames), meta.timestamps, meta.fps, meta.total_num_frames)
    ref, _ = hf_answer(model, inputs)
    rs = list(vlm.stream(None, QUESTION, video=str(path), max_tokens=24))
    assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1] and [r.token for r in rs] == ref


def test_asking_again_about_a_clip_skips_the_encoder(bundle, tmp_path):
    vlm = edgevlm.load(bundle("smolvlm-llama"), threads=1)
    path = tmp_path / "clip.mp4"
    video_mod.write(path, clip(12), fps=2.0)
    first = list(vlm.stream(None, QUESTION, video=str(path), max_tokens=4))[-1]
    again = list(vlm.stream(None, "how many frames?", video=str(path), max_tokens=4))[-1]
    print(f"first ask: encode {first.stages['encode'] * 1000:.1f} ms; again: {sorted(again.stages)}")
    assert first.image_cache_hits == 0 and first.stages["encode"] > 0
    assert again.image_cache_hits == 1 and "encode" not in again.stages
    chat = vlm.chat()  # a follow-up in a chat: the video stays in the conversation, encoded once
    chat.send(QUESTION, video=str(path), max_tokens=4)
    follow = list(chat.stream("and then?", max_tokens=4))[-1]
    assert follow.prefilled_tokens < follow.prompt_tokens and "encode" not in follow.stages


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from edgevlm.export.dev.builders import build_mini_checkpoint
    from edgevlm.export.exporter import export

    root = tmp_path_factory.mktemp("mini-video")
    ckpt = build_mini_checkpoint(SPECS["fastvlm-qwen2-gqa"], root / "hf")
    export(ckpt, root / "bundle", progress=False, parity_tokens=4)
    return ckpt, root / "bundle"


def test_llava_mini_takes_one_token_per_frame(mini):
    from transformers import AutoProcessor

    from edgevlm.export.llava_mini import MiniVLM, reference_video_tokens

    ckpt, bundle = mini
    model, processor = MiniVLM.load(ckpt), AutoProcessor.from_pretrained(ckpt)
    vlm = edgevlm.load(bundle, threads=1)
    eos, image_id = set(vlm.manifest.generation.eos_token_ids), vlm.manifest.image_token_id
    outs, tokens = set(), {}
    for n in (2, 4, 8):
        frames = clip(n, size=(128, 128))
        content = [{"type": "image"}] * n + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=frames, text=text, return_tensors="pt")
        ref, first = reference_video_tokens(model, inputs["pixel_values"], inputs["input_ids"], image_id, eos, 16)
        video = edgevlm.Video(frames, frame_rate=1.0)
        rs = list(vlm.stream(None, QUESTION, video=video, max_tokens=16))
        maxdiff = float(np.abs(vlm.prompt_logits(None, [video, QUESTION]) - first.numpy()).max())
        print(f"LLaVA-Mini, {n} frames: {rs[-1].prompt_tokens} prompt tokens, logits maxdiff = {maxdiff:.3g}, "
              f"greedy {'match' if [r.token for r in rs] == ref else 'DIFFER'}")
        assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1]
        assert int((inputs["input_ids"] == image_id).sum()) == n  # one vision token per frame
        assert maxdiff <= 1e-4 and [r.token for r in rs] == ref
        outs.add(tuple(ref))
        tokens[n] = rs[-1].prompt_tokens
    assert len(outs) >= 2
    per_frame = (tokens[4] - tokens[2]) / 2  # the vision token and what the template writes around it
    assert tokens[8] - tokens[2] == 6 * per_frame and per_frame <= 2
    with pytest.raises(edgevlm.EdgeVLMError, match="one image per conversation, or one video"):
        vlm.generate(None, [frames[0], frames[1], QUESTION])  # two images are not a video


def test_video_limits_and_unreadable_videos(bundle, tmp_path):
    limits = edgevlm.Limits(video_frames=4, video_decoded_frames=30)
    vlm = edgevlm.load(bundle("smolvlm-llama"), threads=1, limits=limits)
    path = tmp_path / "long.mp4"
    video_mod.write(path, clip(40), fps=10.0)
    with pytest.raises(edgevlm.VideoError, match="40 frames; at most 30 are decoded"):
        vlm.generate(None, QUESTION, video=str(path))
    with pytest.raises(edgevlm.VideoError, match="6 frames asked; the limit is 4"):
        vlm.generate(None, QUESTION, video=edgevlm.Video(clip(8), frames=6))
    r = list(vlm.stream(None, QUESTION, video=edgevlm.Video(clip(8), frame_rate=1.0), max_tokens=1))[-1]
    assert r.prompt_tokens == list(vlm.stream(None, QUESTION, video=edgevlm.Video(clip(8), frames=4),
                                              max_tokens=1))[-1].prompt_tokens  # 8 frames kept to 4
    for bad, says in [(b"\x00\x00\x00\x18ftypmp42" + bytes(200), "cannot be decoded"),
                      (b"not a video at all", "cannot be decoded"), ([], "no frames"), (3.5, "unsupported video")]:
        with pytest.raises(edgevlm.VideoError, match=says):
            vlm.generate(None, QUESTION, video=bad)
    (tmp_path / "text.mp4").write_text("hello")
    with pytest.raises(edgevlm.VideoError, match="cannot be decoded"):
        vlm.generate(None, QUESTION, video=str(tmp_path / "text.mp4"))
    with pytest.raises(edgevlm.VideoError, match="cannot read video"):
        vlm.generate(None, QUESTION, video=str(tmp_path / "missing.mp4"))
    small = edgevlm.load(bundle("smolvlm-llama"), threads=1, limits=edgevlm.Limits(request_pixels=20_000))
    with pytest.raises(edgevlm.ImageError, match="request_pixels"):  # 8 frames of 96 x 72
        small.generate(None, QUESTION, video=edgevlm.Video(clip(8), frame_rate=1.0))
    with pytest.raises(edgevlm.ImageError, match="request_pixels"):  # a file (4 frames kept): before decoding
        small.generate(None, QUESTION, video=str(tmp_path / "long.mp4"))


def test_a_missing_pyav_is_named_with_its_extra(tmp_path):
    path = tmp_path / "clip.mp4"
    video_mod.write(path, clip(3), fps=1.0)
    code = ("import sys; sys.modules['av'] = None\n"  # PyAV absent (an import of it fails)
            "from edgevlm import video, Video, DependencyError\n"
            f"try:\n    video.read(Video({str(path)!r}), 'uniform', 1.0, 8)\n"
            "except DependencyError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'edgevlm[video]'" in out.stdout, out.stderr


def test_cli_takes_a_video(bundle, tmp_path, capsys):
    from edgevlm.apps.chat import main

    b, path = bundle("smolvlm-llama"), tmp_path / "clip.mp4"
    video_mod.write(path, clip(10), fps=2.0)
    assert main(["--bundle", str(b), "--video", str(path), "--frames", "3", "--prompt", QUESTION,
                 "--max-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    vlm = edgevlm.load(b, threads=1)
    want = list(vlm.stream(None, QUESTION, video=edgevlm.Video(str(path), frames=3), max_tokens=8))
    assert out["answer"] == "".join(r.text for r in want) and out["prompt_tokens"] == want[-1].prompt_tokens
