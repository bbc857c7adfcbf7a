"""model.py's Qwen3-VL family (dense) against transformers' Qwen3VLForConditionalGeneration (the oracle), on
tiny random configs, with the input kinds of test_model.py's Qwen2-VL tests (whose helpers it uses).

The tiny model: head_dim 32 (not hidden_size / heads = 16), mrope_section [6, 5, 5] (interleaved: pairs
t h w t h w ..., the 8B's pattern), 3 decoder layers of which DeepStack feeds the first 2 (from vision blocks
0 and 2 of 3), a learned 8 x 8 vision position table that the grids below interpolate both up and down.
A video is one "<t seconds>" text + block per frame group (make_seq). Tolerance: 1e-4 max abs, fp32.
"""
import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from model import ModelConfig, Qwen2VL, mrope_axes, rope_positions
from test_model import (IMG, TINY, TOL, VID, check_logits, check_packed, extended, hf_forward, hf_random, make_seq,
                        ours_forward, pack_prompts)

hf_logging.set_verbosity_error()
TINY3 = dict(TINY, model_type='qwen3_vl', head_dim=32, mrope_section=[6, 5, 5], num_hidden_layers=3,
             patch_size=16, vision_depth=3, vision_intermediate_size=48, num_position_embeddings=64,
             deepstack_visual_indexes=[0, 2])

TEXT = [20]
IMAGE = [5, ('image', (1, 8, 6)), 6]                          # 8 x 6 patches from an 8 x 8 table
VIDEO = [3, ('video', (3, 4, 12)), 5]                         # 3 frame groups, each with its timestamp text
IMAGE_VIDEO = [4, ('image', (1, 4, 6)), 3, ('video', (4, 10, 4)), 4]


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved, its dir)."""
    d = tmp_path_factory.mktemp('hf3')
    hf = hf_random(ModelConfig(**TINY3))
    hf.save_pretrained(d)
    return hf, Qwen2VL.from_pretrained(d), d


def seq(parts, seed):
    return make_seq(parts, seed, ModelConfig(**TINY3))


@pytest.mark.parametrize('parts', [TEXT, IMAGE, VIDEO, IMAGE_VIDEO], ids=['text', 'image', 'video', 'image+video'])
def test_logits_match_transformers(pair, parts):
    check_logits(pair, parts)


def test_packed_batch_matches_transformers(pair):
    check_packed(pair, [VIDEO, TEXT, IMAGE_VIDEO, IMAGE])


def test_vision_tower_and_deepstack_match_transformers(pair):
    """Merged features and the DeepStack features of blocks 0 and 2, for grids smaller and larger than the
    position table, two frames, in raster order."""
    hf, ours, _ = pair
    grid = torch.tensor([[2, 8, 6], [1, 4, 4], [1, 6, 12]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid)
        out, deep = ours.visual(pixels, grid)
    assert out.shape == (int(grid.prod(-1).sum()) // 4, 64) and (out - ref.pooler_output).abs().max() < TOL
    assert len(deep) == len(ref.deepstack_features) == 2
    assert all((a - b).abs().max() < TOL for a, b in zip(deep, ref.deepstack_features))
    assert (deep[0] - deep[1]).abs().max() > 0.1  # two different blocks' features


def hf_rope_index(hf, s):
    tt = torch.zeros_like(s['ids'])
    tt[s['ids'] == IMG], tt[s['ids'] == VID] = 1, 2
    vid = [i for i, k in enumerate(s['kinds']) if k == 'video']
    img = [i for i, k in enumerate(s['kinds']) if k == 'image']
    return hf.model.get_rope_index(s['ids'][None], tt[None], image_grid_thw=s['grid'][img] if img else None,
                                   video_grid_thw=s['grid'][vid] if vid else None)[0][:, 0]


@pytest.mark.parametrize('parts', [IMAGE, VIDEO, IMAGE_VIDEO, [2, ('video', (2, 4, 4)), ('image', (1, 6, 4)), 3]])
def test_positions_equal_get_rope_index(pair, parts):
    """Each frame group is numbered like a one-frame image (temporal id = its start), the text after it
    continues past its largest id: for Qwen3-VL's one-group blocks the released and the transformers 5 rule
    are the same, so every position must equal get_rope_index's."""
    hf, ours, _ = pair
    s = seq(parts, 1)
    pos, nxt = rope_positions(s['ids'], s['grid'], ours.config)
    assert torch.equal(pos, hf_rope_index(hf, s)) and nxt == int(pos.max()) + 1


def test_video_groups_hand_positions():
    """Video (2, 4, 4) after 1 text token: groups of 2 x 2 merged tokens, each after 3 timestamp tokens + <vs>.
    Group 0 at 5: t ids 5, h/w ids 5-6; <ve> at 7, the next timestamp and <vs> 8-11; group 1 at 12."""
    cfg = ModelConfig(**TINY3)
    s = make_seq([1, ('video', (2, 4, 4))], 0, cfg)
    pos, nxt = rope_positions(s['ids'], s['grid'], cfg)
    assert pos[:, 5:9].tolist() == [[5] * 4, [5, 5, 6, 6], [5, 6, 5, 6]]
    assert pos[0, 9:14].tolist() == [7, 8, 9, 10, 11] and pos[:, 14:18].tolist() == [[12] * 4, [12, 12, 13, 13],
                                                                                          [12, 13, 12, 13]]
    assert nxt == 15  # <ve> at 14
    with pytest.raises(ValueError, match=r'grid_thw row 0 \[3, 4, 4\]: 3 frame groups, input_ids hold 2'):
        rope_positions(s['ids'], torch.tensor([[3, 4, 4]]), cfg)


def test_interleaved_mrope_axes_hand_case():
    """The 8B's [24, 20, 20]: t h w repeated for 60 pairs, then 4 more t; Qwen2.5's chunks for contrast."""
    cfg = ModelConfig(**dict(TINY3, hidden_size=64, head_dim=128, mrope_section=[24, 20, 20]))
    axes = mrope_axes(cfg).tolist()
    assert axes[:6] == [0, 1, 2, 0, 1, 2] and axes[57:] == [0, 1, 2, 0, 0, 0, 0]
    assert [axes.count(a) for a in range(3)] == [24, 20, 20]
    q25 = ModelConfig(**dict(TINY, hidden_size=128, num_attention_heads=1, mrope_section=[24, 20, 20]))
    assert mrope_axes(q25).tolist() == [0] * 24 + [1] * 20 + [2] * 20


def test_save_load_round_trip_both_ways(pair, tmp_path):
    hf, ours, d = pair
    assert json.loads((d / 'config.json').read_text())['model_type'] == 'qwen3_vl'
    assert ours.config == ModelConfig(**TINY3)  # transformers' nested layout read back
    ours.save_pretrained(tmp_path / 'ours')
    from safetensors import safe_open
    with safe_open(tmp_path / 'ours' / 'model.safetensors', 'pt') as f:  # the released Qwen3-VL names
        names = set(f.keys())
    assert {'model.language_model.layers.0.self_attn.q_norm.weight', 'model.visual.pos_embed.weight',
            'model.visual.deepstack_merger_list.1.norm.weight', 'lm_head.weight'} <= names
    hf2 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / 'ours').eval()
    s = seq(IMAGE_VIDEO, 7)
    (out,), (pos,) = ours_forward(ours, [s])
    assert (hf_forward(hf2, s, pos) - out).abs().max() < TOL
    (again,), _ = ours_forward(Qwen2VL.from_pretrained(tmp_path / 'ours'), [s])
    assert torch.equal(again, out)


RELEASED_3_8B_CONFIG = {  # config.json of Qwen/Qwen3-VL-8B-Instruct as released (from memory; see README)
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652}


def test_config_released_8b_round_trip_and_errors():
    cfg = ModelConfig.from_hf(RELEASED_3_8B_CONFIG)
    assert (cfg.model_type, cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta,
            cfg.vision_embed_dim, cfg.vision_depth, cfg.patch_size, cfg.deepstack_visual_indexes,
            cfg.vocab_size) == ('qwen3_vl', 4096, 128, 8, 5000000, 1152, 27, 16, [8, 16, 24], 151936)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    hc = Qwen3VLConfig(**cfg.to_hf())  # transformers reads what we write
    assert (hc.text_config.head_dim, hc.text_config.rope_parameters['rope_theta'],
            hc.text_config.rope_parameters['mrope_section'], hc.vision_config.deepstack_visual_indexes,
            hc.vision_config.num_position_embeddings) == (128, 5000000, [24, 20, 20], [8, 16, 24], 2304)
    with torch.device('meta'):  # the 8B's size: 8.77B parameters (the model card says 8B; 9B on the Hub)
        n = sum(p.numel() for p in Qwen2VL(cfg).parameters())
    assert 8.7e9 < n < 8.8e9
    with pytest.raises(ValueError, match='qwen3_vl_moe.*out of scope'):
        ModelConfig.from_hf({**RELEASED_3_8B_CONFIG, 'model_type': 'qwen3_vl_moe'}, 'x/config.json')
    v, t = RELEASED_3_8B_CONFIG['vision_config'], RELEASED_3_8B_CONFIG['text_config']
    with pytest.raises(KeyError, match='x/config.json: missing vision_config.deepstack_visual_indexes'):
        ModelConfig.from_hf({**RELEASED_3_8B_CONFIG, 'vision_config': {k: x for k, x in v.items()
                                                                         if k != 'deepstack_visual_indexes'}},
                            'x/config.json')
    with pytest.raises(KeyError, match='missing text_config.head_dim'):
        ModelConfig.from_hf({**RELEASED_3_8B_CONFIG, 'text_config': {k: x for k, x in t.items() if k != 'head_dim'}})
    with pytest.raises(ValueError, match='attention_bias=True'):
        ModelConfig.from_hf({**RELEASED_3_8B_CONFIG, 'text_config': {**t, 'attention_bias': True}})
    with pytest.raises(ValueError, match="hidden_act 'silu'"):
        ModelConfig.from_hf({**RELEASED_3_8B_CONFIG, 'vision_config': {**v, 'hidden_act': 'silu'}})


def test_gradient_checkpointing_and_deepstack_gradients(pair):
    """Checkpointed blocks give the plain gradients; the DeepStack mergers and the position table get them too."""
    _, ours, _ = pair
    model = Qwen2VL(ours.config)
    model.load_state_dict(ours.state_dict())
    model.train()
    args = pack_prompts(model, [seq(IMAGE_VIDEO, 5), seq(TEXT, 6)])
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(*args).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert all(float(m.linear_fc2.weight.grad.abs().max()) > 0 for m in model.visual.deepstack_merger_list)
        assert float(model.visual.pos_embed.weight.grad.abs().max()) > 0
    assert (grads[0] - grads[1]).abs().max() < 1e-6 and grads[0].abs().max() > 0


# ----- KV cache and generation -----

def test_kv_cache_decode_matches_full_forward(pair):
    _, ours, _ = pair
    seqs = [seq(VIDEO, 0), seq(IMAGE_VIDEO, 1)]
    cache, logits, pos = ours.prefill(*pack_prompts(ours, seqs), max_new_tokens=4)
    new = torch.randint(0, 150, (2, 3), generator=torch.Generator().manual_seed(0))
    steps = [logits] + [ours.decode_step(new[:, i], pos + i, cache) for i in range(3)]
    for r in range(2):
        full = extended(ours, seqs[r], new[r])
        n = len(seqs[r]['ids'])
        assert (torch.stack([st[r] for st in steps]) - full[n - 1:]).abs().max() < TOL


def test_greedy_generate_matches_transformers(pair):
    """transformers computes its own positions here (get_rope_index from mm_token_type_ids) and feeds DeepStack
    itself: the continuations must match token for token."""
    hf, ours, _ = pair
    seqs = [seq(VIDEO, 3), seq(TEXT, 4), seq(IMAGE, 5)]
    tokens, _, lengths = ours.generate(*pack_prompts(ours, seqs), max_new_tokens=20)
    assert tokens.shape == (3, 20) and lengths.tolist() == [20, 20, 20]
    for s, row in zip(seqs, tokens):
        kw = {}
        if s['pixels'] is not None:
            video = s['kinds'] == ['video']
            kw = {('pixel_values_videos' if video else 'pixel_values'): s['pixels'],
                  ('video_grid_thw' if video else 'image_grid_thw'): s['grid'],
                  'mm_token_type_ids': (s['ids'] == VID).long()[None] * 2 + (s['ids'] == IMG).long()[None]}
        ref = hf.generate(input_ids=s['ids'][None], attention_mask=torch.ones(1, len(s['ids']), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, suppress_tokens=list(ours.config.visual_token_ids),
                          **kw)[0, len(s['ids']):]  # the same policy: visual tokens never generated
        assert torch.equal(row, ref) and len(set(ref.tolist())) >= 3  # not one token repeated
