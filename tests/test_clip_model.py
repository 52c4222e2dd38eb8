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


@pytest.mark.slow
def test_int8_towers_agree_with_fp32_and_are_cached(tiny_clip, tmp_path, monkeypatch):
    import onnx

    import retrieval.clip_model as cm

    monkeypatch.setenv("KNN_DIFFUSION_CACHE", str(tmp_path))
    fp32 = ClipEncoder(tiny_clip, precision="fp32")
    int8 = ClipEncoder(tiny_clip, precision="int8")
    torch.manual_seed(1)
    side = fp32.model.visual.image_size[0]
    pixels = torch.randn(6, 3, side, side)
    a, b = fp32.encode_images(pixels), int8.encode_images(pixels)
    assert b.shape == a.shape and b.dtype == torch.float32
    assert torch.allclose(b.norm(dim=-1), torch.ones(6), atol=1e-4)
    cos = (a * b).sum(-1)
    assert cos.min() > 0.999 and not torch.allclose(a, b, atol=1e-6)  # close, and really quantised
    # captions of several lengths: trimmed, padded to their length bucket, each bucket exported once
    texts = ["a red square", "a large blue circle in the top left corner on a plain green background", "x"]
    t32, t8 = fp32.encode_texts(texts), int8.encode_texts(texts)
    # (0.998 for captions: on CPUs without VNNI the weights keep 7 bits, cm.needs_reduced_range; 0.9985 measured)
    assert (t32 * t8).sum(-1).min() > 0.998 and not torch.allclose(t32, t8, atol=1e-6)
    short = int8.encode_texts(texts[:1])  # 5 tokens: the 8-token bucket
    assert (short * t32[:1]).sum() > 0.998
    cached = {p.name.rsplit("-", 1)[-1]: p for p in (tmp_path / "clip-int8").glob("*.onnx")}
    assert set(cached) == {"image.onnx", "text8.onnx", "text16.onnx"}
    for name, layers in (("image.onnx", 12), ("text16.onnx", 12)):
        graph = onnx.load(str(cached[name])).graph
        weights = {init.name for init in graph.initializer}
        assert sum(node.op_type == "MatMulInteger" for node in graph.node) >= 4 * layers, name
        # every product with a weight is an integer one; only attention's activation x activation stays float
        assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]

    # a second encoder of the same checkpoint reads the cached models instead of quantising again
    def no_requantising(module, example):
        raise AssertionError("quantised again despite the cache")

    monkeypatch.setattr(cm, "quantise_tower", no_requantising)
    again = ClipEncoder(tiny_clip, precision="int8")
    assert torch.allclose(again.encode_images(pixels), b, atol=1e-6)
    assert torch.allclose(again.encode_texts(texts), t8, atol=1e-6)
    assert torch.allclose(again.encode_texts(texts[:1]), short, atol=1e-6)


def test_int8_is_a_cpu_path():
    from retrieval.clip_model import pick_device_and_precision

    assert pick_device_and_precision("cpu", "int8") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="int8 is the CPU path"):
        pick_device_and_precision("cuda", "int8")


def test_int8_weights_keep_seven_bits_only_on_x86_without_vnni(monkeypatch):
    """u8 x s8 products saturate in int16 without VNNI (cosine 0.985-0.99 to fp32 measured on an AVX2-only
    EPYC), so such CPUs quantise to 7 bits, and their cached towers are kept apart from full-range ones."""
    import retrieval.clip_model as cm

    spec = ClipSpec.parse("open_clip:ViT-B-32/openai")
    keys = {}
    for flags, reduced in (
        ({"avx2"}, True),
        ({"avx2", "avx512f", "avx512_vnni"}, False),
        ({"avx2", "avx_vnni"}, False),
        (set(), False),  # not x86 (e.g. ARM's dot-product kernels)
    ):
        monkeypatch.setattr(cm, "cpu_flags", lambda flags=flags: flags)
        assert cm.needs_reduced_range() is reduced, flags
        keys.setdefault(reduced, set()).add(cm._int8_cache_key(spec))
    assert len(keys[True]) == 1 and len(keys[False]) == 1 and keys[True] != keys[False]


def test_encoder_takes_a_timm_image_tower(tmp_path):
    """open_clip's timm towers (its ConvNeXt CLIPs, a ResNet from timm) have no output_dim: the width comes
    from the config."""
    import json

    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "timm_model_name": "resnet10t", "timm_model_pretrained": False},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "RN10t-tiny.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("RN10t-tiny").state_dict(), tmp_path / "clip.pt")
    enc = ClipEncoder(f"open_clip:{path}/{tmp_path / 'clip.pt'}", precision="fp32")
    assert enc.dim == 24
    images = enc.encode_images(torch.randn(3, 3, 32, 32))
    assert images.shape == (3, 24) and torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert enc.encode_texts(["a red square"]).shape == (1, 24)


def test_split_transform_equals_the_whole_transform(tiny_clip):
    """Decoding tasks send uint8 (resized, cropped) and the actor normalises: the pixels must be the same."""
    import pickle
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from retrieval.clip_model import SplitTransform

    transform, _ = load_transforms(tiny_clip)
    split = SplitTransform.of(transform)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 64), (90, 40)]
    ]
    # other modes are converted to RGB inside, as the transform does
    images += [images[0].convert("L"), images[1].convert("RGBA")]
    small = np.stack([split.geometry(im) for im in images])
    assert small.dtype == np.uint8 and small.shape[1] == 3
    assert torch.equal(split.to_float(torch.from_numpy(small)), torch.stack([transform(im) for im in images]))
    with pytest.raises(TypeError, match="uint8"):
        split.to_float(torch.zeros(1, 3, 2, 2))
    with pytest.raises(TypeError, match="SplitTransform"):
        ClipEncoder(tiny_clip, precision="fp32").encode_images(torch.from_numpy(small))
    # the decoding tasks receive it pickled: reading it must not import open_clip (10-16 s per process)
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('open_clip' in sys.modules)"
    read = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(split), capture_output=True, check=True
    )
    assert read.stdout.strip() == b"False"
    # a transform that does not end in ToTensor, Normalize has no uint8 half
    assert SplitTransform.of(transform.transforms[0]) is None
