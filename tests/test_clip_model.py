"""CLIP loading by clip-retrieval name, preprocessing without weights, exact trimmed text encoding."""

from __future__ import annotations

import open_clip
import pytest
import torch

from retrieval.clip_model import ClipEncoder, ClipSpec, encode_text_trimmed, load_transforms


def test_parse_names():
    assert ClipSpec.parse("open_clip:ViT-B-32/openai") == ClipSpec("ViT-B-32", "openai")
    assert ClipSpec.parse("open_clip:ViT-S-32//tmp/x/ckpt.pt") == ClipSpec("ViT-S-32", "/tmp/x/ckpt.pt")
    assert ClipSpec.parse("open_clip:/cfg/tiny.json//ck.pt") == ClipSpec("/cfg/tiny.json", "/ck.pt")
    with pytest.raises(ValueError, match="names no weights"):
        ClipSpec.parse("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="only open_clip"):
        ClipSpec.parse("ViT-B/32")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipEncoder(f"open_clip:ViT-S-32/{tmp_path}/nope.pt")


def test_transforms_without_weights_match_open_clip(tiny_clip):
    transform, _ = load_transforms(tiny_clip)
    assert str(transform) == str(ClipEncoder(tiny_clip, precision="fp32").preprocess)
    # a pretrained tag's own preprocessing (no download needed to derive it)
    tag_transform, _ = load_transforms("open_clip:ViT-B-16/laion2b_s34b_b88k")
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")
    normalize = tag_transform.transforms[-1]
    assert tuple(normalize.mean) == tuple(cfg["mean"]) and tuple(normalize.std) == tuple(cfg["std"])


def test_trimmed_text_encoding_is_exact():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32").eval()
    tokens = open_clip.get_tokenizer("ViT-S-32")(
        ["a cat", "a small red triangle on a striped green background", ""]
    )
    with torch.inference_mode():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5, rtol=1e-4)


def test_encoder_outputs_unit_vectors(tiny_clip):
    enc = ClipEncoder(tiny_clip)
    emb = enc.encode_texts(["a red square", "a blue circle"])
    assert emb.shape == (2, enc.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
