"""model.py's Qwen2.5-VL family against transformers' Qwen2_5_VLForConditionalGeneration (the oracle), on
tiny random configs, with the input kinds of test_model.py's Qwen2-VL tests (whose helpers it uses).

The tiny tower has 3 blocks, full attention in block 1 only, and windows of 2 x 2 merged tokens, so the
grids below have whole windows and windows cut at the frame's edge. Videos carry second_per_grid_ts that
are not whole numbers of seconds, so temporal ids are floored products (the time rule in rope_positions).
Tolerance: 1e-4 max abs, fp32.
"""
import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging
from transformers.vision_utils import get_vision_window_index

from model import ModelConfig, Qwen2VL, rope_positions, window_order
from test_model import (TINY, TOL, VE, VID, VS, check_logits, check_packed, extended, hf_forward, hf_random, make_seq,
                        ours_forward, pack_prompts)

hf_logging.set_verbosity_error()
TINY25 = dict(TINY, model_type='qwen2_5_vl', vision_depth=3, vision_intermediate_size=48, window_size=56,
              fullatt_block_indexes=[1], tokens_per_second=2)

TEXT = [20]
IMAGE = [5, ('image', (1, 8, 6)), 6]                                   # 4 x 3 merged: 2 whole windows, 2 cut
VIDEO = [3, ('video', (3, 4, 6), 0.75), 5]                             # grid_t >= 2, non-square; ids 0, 1, 3
IMAGE_VIDEO = [4, ('image', (1, 4, 6)), 3, ('video', (4, 6, 4), 1.25), 4]  # ids 0, 2, 5, 7: the rules differ


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved, its dir)."""
    d = tmp_path_factory.mktemp('hf25')
    hf = hf_random(ModelConfig(**TINY25))
    hf.save_pretrained(d)
    return hf, Qwen2VL.from_pretrained(d), d


@pytest.mark.parametrize('parts', [TEXT, IMAGE, VIDEO, IMAGE_VIDEO], ids=['text', 'image', 'video', 'image+video'])
def test_logits_match_transformers(pair, parts):
    check_logits(pair, parts)


def test_packed_batch_matches_transformers(pair):
    check_packed(pair, [VIDEO, TEXT, IMAGE_VIDEO, IMAGE])


def test_vision_tower_matches_transformers(pair):
    """Features of a batch of grids (several windows per frame, cut windows, 2 frames) in raster order."""
    hf, ours, _ = pair
    grid = torch.tensor([[2, 8, 6], [1, 4, 4], [1, 6, 10]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid).pooler_output
        out, deep = ours.visual(pixels, grid)
    assert out.shape == (int(grid.prod(-1).sum()) // 4, 64) and (out - ref).abs().max() < TOL and deep == []


def test_window_order_hand_case_and_transformers():
    """One frame of 3 x 3 merged tokens, windows of 2 x 2: [0 1 3 4], [2 5], [6 7], [8] in raster order."""
    cfg = ModelConfig(**TINY25)
    order, lens = window_order(torch.tensor([[1, 6, 6]]), cfg)
    assert order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8] and lens.tolist() == [16, 8, 8, 4]
    grid = torch.tensor([[2, 8, 6], [1, 4, 4], [3, 6, 10]])
    ref_order, ref_cu = get_vision_window_index(grid, 2, 56, 14)
    order, lens = window_order(grid, cfg)
    assert torch.equal(order, ref_order) and torch.equal(torch.cat([torch.zeros(1), lens.cumsum(0)]).int(), ref_cu)


def test_save_load_round_trip_both_ways(pair, tmp_path):
    hf, ours, d = pair
    assert json.loads((d / 'config.json').read_text())['model_type'] == 'qwen2_5_vl'
    assert ours.config == ModelConfig(**TINY25)  # transformers' nested layout read back
    ours.save_pretrained(tmp_path / 'ours')
    hf2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / 'ours').eval()
    assert type(hf2.model.visual.blocks[0].norm1).__name__ == 'Qwen2_5_VLRMSNorm'
    s = make_seq(IMAGE_VIDEO, seed=7)
    (out,), (pos,) = ours_forward(ours, [s])
    assert (hf_forward(hf2, s, pos) - out).abs().max() < TOL
    (again,), _ = ours_forward(Qwen2VL.from_pretrained(tmp_path / 'ours'), [s])
    assert torch.equal(again, out)


RELEASED_25_7B_CONFIG = {  # config.json of Qwen/Qwen2.5-VL-7B-Instruct (flat layout)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}


def test_config_released_flat_layout_and_round_trip():
    cfg = ModelConfig.from_hf(RELEASED_25_7B_CONFIG)
    assert cfg == ModelConfig(model_type='qwen2_5_vl', max_position_embeddings=128000)  # the 7B's tower: defaults
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    hc = Qwen2_5_VLConfig(**cfg.to_hf())  # transformers reads what we write
    assert (hc.vision_config.hidden_size, hc.vision_config.out_hidden_size, hc.vision_config.tokens_per_second,
            list(hc.vision_config.fullatt_block_indexes)) == (1280, 3584, 2, [7, 15, 23, 31])
    v = RELEASED_25_7B_CONFIG['vision_config']
    with pytest.raises(KeyError, match='vision_config.tokens_per_second'):  # no silent time base
        ModelConfig.from_hf({**RELEASED_25_7B_CONFIG, 'vision_config': {k: x for k, x in v.items()
                                                                         if k != 'tokens_per_second'}})
    with pytest.raises(ValueError, match='out_hidden_size 2048 != hidden_size 3584'):
        ModelConfig.from_hf({**RELEASED_25_7B_CONFIG, 'vision_config': {**v, 'out_hidden_size': 2048}})
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        ModelConfig.from_hf({**RELEASED_25_7B_CONFIG, 'vision_config': {**v, 'hidden_act': 'quick_gelu'}})


# ----- the M-RoPE time rule -----

def hf_rope_index(hf, s):
    tt = torch.zeros_like(s['ids'])
    tt[s['ids'] == 150], tt[s['ids'] == VID] = 1, 2
    vid = [i for i, k in enumerate(s['kinds']) if k == 'video']
    img = [i for i, k in enumerate(s['kinds']) if k == 'image']
    return hf.model.get_rope_index(s['ids'][None], tt[None], image_grid_thw=s['grid'][img] if img else None,
                                   video_grid_thw=s['grid'][vid], second_per_grid_ts=torch.tensor(
                                       [s['secs'][i] for i in vid]))[0][:, 0]


def test_time_rule_hand_values_and_transformers(pair):
    """Frame group k of a video: temporal id start + floor(k * tokens_per_second * second_per_grid_t).
    2 fps sampled, 2 frames a group: 1 s a group -> ids 0, 2, 4 (one id = 0.5 s); 0.75 s -> 0, 1, 3; the
    same frames as Qwen2-VL would number them 0, 1, 2. Equal to transformers where the text rules agree."""
    hf, _, _ = pair
    cfg = ModelConfig(**TINY25)
    ids = torch.tensor([7, VS] + [VID] * 3 + [VE, 9])  # grid (3, 2, 2): 3 groups of one merged token
    for secs, t_ids in ((1.0, [2, 4, 6]), (0.75, [2, 3, 5]), (0.5, [2, 3, 4]), (0.3, [2, 2, 3])):
        pos, nxt = rope_positions(ids, torch.tensor([[3, 2, 2]]), cfg, [secs])
        assert pos[0, 2:5].tolist() == t_ids and pos[1:, 2:5].tolist() == [[2, 2, 2]] * 2
        assert pos[:, 5:].tolist() == [[t_ids[-1] + 1, t_ids[-1] + 2]] * 3 and nxt == t_ids[-1] + 3
    qwen2 = ModelConfig(**TINY)
    assert rope_positions(ids, torch.tensor([[3, 2, 2]]), qwen2, [1.0])[0][0, 2:5].tolist() == [2, 3, 4]
    s = make_seq([2, ('image', (1, 4, 6)), 3, ('video', (3, 8, 12), 0.75), 2], seed=1)  # last id 3 < 12 / 2
    pos, _ = rope_positions(s['ids'], s['grid'], cfg, s['secs'])
    assert torch.equal(pos, hf_rope_index(hf, s))


def test_time_rule_released_vs_transformers5(pair):
    """Text after a video continues at max(video positions) + 1 (released Qwen2.5-VL, transformers 4.49,
    vLLM); transformers 5.x advances by max(h, w) / 2 only, so with time-scaled ids (0, 2, 5, 7 here) its
    text overlaps the video's last frames. The blocks themselves agree."""
    hf, _, _ = pair
    s = make_seq(IMAGE_VIDEO, seed=3)
    pos, nxt = rope_positions(s['ids'], s['grid'], ModelConfig(**TINY25), s['secs'])
    ref = hf_rope_index(hf, s)
    video = (s['ids'] == VID).nonzero()[:, 0]
    start = int(pos[0, video[0]])
    assert sorted(set((pos[0, video] - start).tolist())) == [0, 2, 5, 7]  # floor(k * 2 * 1.25)
    assert torch.equal(pos[:, :video[0]], ref[:, :video[0]])
    assert torch.equal(pos[:, video] - pos[:, video[:1]], ref[:, video] - ref[:, video[:1]])
    after = int(video[-1]) + 2  # past the vision_end token
    assert pos[0, after] == start + 7 + 2 and ref[0, after] == int(ref[0, video[0]]) + 3 + 1


def test_video_needs_second_per_grid_ts():
    cfg = ModelConfig(**TINY25)
    ids = torch.tensor([7, VS, VID, VID, VE])
    for bad in (None, [], [0.0], [float('nan')]):
        with pytest.raises(ValueError, match=r'needs second_per_grid_ts\[0\] > 0 seconds'):
            rope_positions(ids, torch.tensor([[2, 2, 4]]), cfg, bad)
    rope_positions(torch.tensor([7, VS, 150, VE]), torch.tensor([[1, 2, 2]]), cfg)  # images need no time


# ----- KV cache and generation -----

def test_kv_cache_decode_matches_full_forward(pair):
    _, ours, _ = pair
    seqs = [make_seq(VIDEO, 0), make_seq(IMAGE_VIDEO, 1)]
    cache, logits, pos = ours.prefill(*pack_prompts(ours, seqs), max_new_tokens=4)
    new = torch.randint(0, 150, (2, 3), generator=torch.Generator().manual_seed(0))
    steps = [logits] + [ours.decode_step(new[:, i], pos + i, cache) for i in range(3)]
    for r in range(2):
        full = extended(ours, seqs[r], new[r])
        n = len(seqs[r]['ids'])
        assert (torch.stack([st[r] for st in steps]) - full[n - 1:]).abs().max() < TOL


def test_greedy_generate_matches_transformers_with_time(pair):
    """transformers' generate is given second_per_grid_ts; the video (ids 0, 3 at 1.5 s a group; its default
    of 1 s would give 0, 2) is one where the text rules agree, so the continuation must match token for token."""
    hf, ours, _ = pair
    seqs = [make_seq([3, ('video', (2, 4, 8), 1.5), 5], 3), make_seq(TEXT, 4)]
    assert rope_positions(seqs[0]['ids'], seqs[0]['grid'], ours.config, seqs[0]['secs'])[1] == 3 + 1 + 4 + 1 + 5
    tokens, _, lengths = ours.generate(*pack_prompts(ours, seqs), max_new_tokens=20)
    assert tokens.shape == (2, 20) and lengths.tolist() == [20, 20]
    for s, row in zip(seqs, tokens):
        kw = {}
        if s['pixels'] is not None:
            kw = dict(pixel_values_videos=s['pixels'], video_grid_thw=s['grid'], second_per_grid_ts=torch.tensor(
                s['secs']), mm_token_type_ids=(s['ids'] == VID).long()[None] * 2)
        ref = hf.generate(input_ids=s['ids'][None], attention_mask=torch.ones(1, len(s['ids']), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, suppress_tokens=list(ours.config.visual_token_ids),
                          **kw)[0, len(s['ids']):]  # the same policy: visual tokens never generated
        assert torch.equal(row, ref) and len(set(ref.tolist())) > 3
