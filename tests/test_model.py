"""model.py against transformers' Qwen2VLForConditionalGeneration (the oracle), on tiny random configs.

Weights: a transformers model with every parameter re-randomised (so a missing bias or a norm
weight left at 1 would show), saved with its own save_pretrained and loaded by ours. Positions
come from our rope_positions and are passed to transformers explicitly, because transformers 5.x
uses a different text-after-video rule (see test_rope_rule_*). Tolerance: 1e-4 max abs, fp32.
"""
import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from model import ModelConfig, Qwen2VL, filter_logits, rope_positions

hf_logging.set_verbosity_error()
torch.set_num_threads(2)
TOL = 1e-4
IMG, VID, VS, VE = 150, 151, 152, 153
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=10000.0, rms_norm_eps=1e-6,
            image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
            bos_token_id=154, eos_token_id=155, vision_depth=2, vision_embed_dim=32, vision_num_heads=2)
PATCH = 3 * 2 * 14 * 14


def hf_random(cfg, seed=0):
    hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = p.ndim == 1 and ('norm' in name or 'ln_q' in name)
            p.copy_(1 + 0.2 * torch.rand(p.shape, generator=g) - 0.1 if is_norm else 0.1 * torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved)."""
    d = tmp_path_factory.mktemp('hf')
    hf = hf_random(ModelConfig(**TINY))
    hf.save_pretrained(d)
    return hf, Qwen2VL.from_pretrained(d)


def make_seq(parts, seed):
    """parts: ints (that many random text tokens) or (kind, (t, h, w)) visual blocks."""
    g = torch.Generator().manual_seed(seed)
    ids, grids, pixels, kinds = [], [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, 150, (p,), generator=g).tolist()
        else:
            kind, (t, h, w) = p
            ids += [VS] + [IMG if kind == 'image' else VID] * (t * h * w // 4) + [VE]
            grids.append([t, h, w]); kinds.append(kind)
            pixels.append(torch.randn(t * h * w, PATCH, generator=g))
    return dict(ids=torch.tensor(ids), grid=torch.tensor(grids, dtype=torch.long).view(-1, 3), kinds=kinds,
                pixels=torch.cat(pixels) if pixels else None)


def hf_forward(hf, s, pos):
    kw, sizes = {}, s['grid'].prod(-1).tolist()
    chunks = s['pixels'].split(sizes) if sizes else []
    for kind, pv, gk in (('image', 'pixel_values', 'image_grid_thw'), ('video', 'pixel_values_videos', 'video_grid_thw')):
        sel = [i for i, k in enumerate(s['kinds']) if k == kind]
        if sel:
            kw[pv], kw[gk] = torch.cat([chunks[i] for i in sel]), s['grid'][sel]
    with torch.no_grad():
        return hf(input_ids=s['ids'][None], position_ids=pos[:, None], **kw).logits[0]


def ours_forward(model, seqs):
    """Pack the sequences and run our model once."""
    pos = [rope_positions(s['ids'], s['grid'], model.config)[0] for s in seqs]
    lens = [len(s['ids']) for s in seqs]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pixels = [s['pixels'] for s in seqs if s['pixels'] is not None]
    with torch.no_grad():
        out = model(torch.cat([s['ids'] for s in seqs]), torch.cat(pos, 1), cu,
                    torch.cat(pixels) if pixels else None, torch.cat([s['grid'] for s in seqs]) if pixels else None)
    return out.split(lens), pos


TEXT = [20]
IMAGE = [5, ('image', (1, 4, 4)), 6]
VIDEO = [3, ('video', (3, 4, 6)), 5]                               # grid_t >= 2, non-square
IMAGE_VIDEO = [4, ('image', (1, 4, 6)), 3, ('video', (4, 2, 4)), 4]  # t=4 > max(h,w)/2: the rules differ


@pytest.mark.parametrize('parts', [TEXT, IMAGE, VIDEO, IMAGE_VIDEO], ids=['text', 'image', 'video', 'image+video'])
def test_logits_match_transformers(pair, parts):
    hf, ours = pair
    s = make_seq(parts, seed=len(parts))
    (out,), (pos,) = ours_forward(ours, [s])
    ref = hf_forward(hf, s, pos)
    assert ref.abs().max() > 1 and (out - ref).abs().max() < TOL


def test_packed_batch_matches_transformers(pair):
    hf, ours = pair
    seqs = [make_seq(p, seed=i) for i, p in enumerate([VIDEO, TEXT, IMAGE_VIDEO, IMAGE])]
    outs, pos = ours_forward(ours, seqs)
    for s, o, p in zip(seqs, outs, pos):
        assert (o - hf_forward(hf, s, p)).abs().max() < TOL


def test_save_load_round_trip_both_ways(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(tmp_path / 'ours')
    hf2 = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / 'ours').eval()
    s = make_seq(IMAGE_VIDEO, seed=7)
    (out,), (pos,) = ours_forward(ours, [s])
    assert (hf_forward(hf2, s, pos) - out).abs().max() < TOL
    (again,), _ = ours_forward(Qwen2VL.from_pretrained(tmp_path / 'ours'), [s])
    assert torch.equal(again, out)
