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
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)
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


HF_CLASSES = {'qwen2_vl': (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
              'qwen2_5_vl': (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
              'qwen3_vl': (Qwen3VLConfig, Qwen3VLForConditionalGeneration)}


def hf_random(cfg, seed=0):
    config_cls, model_cls = HF_CLASSES[cfg.model_type]
    hf = model_cls(config_cls(**cfg.to_hf())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = p.ndim == 1 and ('norm' in name or 'ln_q' in name)
            p.copy_(1 + 0.2 * torch.rand(p.shape, generator=g) - 0.1 if is_norm
                    else 0.1 * torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """(transformers model, our model loaded from the checkpoint transformers saved, its dir)."""
    d = tmp_path_factory.mktemp('hf')
    hf = hf_random(ModelConfig(**TINY))
    hf.save_pretrained(d)
    return hf, Qwen2VL.from_pretrained(d), d


def make_seq(parts, seed, cfg=None):
    """parts: ints (that many random text tokens) or (kind, (t, h, w)[, second_per_grid_t]) visual blocks
    (seconds default 1.0; Qwen2-VL ignores them). A Qwen3-VL cfg: 16-pixel patches, and a video is laid
    out as its processor writes it, one "<t seconds>" text (3 random tokens here) + block per frame group."""
    g = torch.Generator().manual_seed(seed)
    qwen3 = cfg is not None and cfg.qwen3
    ids, grids, pixels, kinds, secs = [], [], [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, 150, (p,), generator=g).tolist()
        else:
            kind, (t, h, w), *sec = p
            if qwen3 and kind == 'video':
                for _ in range(t):
                    ids += torch.randint(0, 150, (3,), generator=g).tolist() + [VS] + [VID] * (h * w // 4) + [VE]
            else:
                ids += [VS] + [IMG if kind == 'image' else VID] * (t * h * w // 4) + [VE]
            grids.append([t, h, w]); kinds.append(kind); secs.append(sec[0] if sec else 1.0)
            pixels.append(torch.randn(t * h * w, 3 * 2 * 16 * 16 if qwen3 else PATCH, generator=g))
    return dict(ids=torch.tensor(ids), grid=torch.tensor(grids, dtype=torch.long).view(-1, 3), kinds=kinds,
                pixels=torch.cat(pixels) if pixels else None, secs=secs)


def positions(model, s):
    return rope_positions(s['ids'], s['grid'], model.config, s['secs'])


def hf_forward(hf, s, pos):
    kw, sizes = {}, s['grid'].prod(-1).tolist()
    chunks = s['pixels'].split(sizes) if sizes else []
    for kind, pv, gk in (('image', 'pixel_values', 'image_grid_thw'),
                         ('video', 'pixel_values_videos', 'video_grid_thw')):
        sel = [i for i, k in enumerate(s['kinds']) if k == kind]
        if sel:
            kw[pv], kw[gk] = torch.cat([chunks[i] for i in sel]), s['grid'][sel]
    with torch.no_grad():
        return hf(input_ids=s['ids'][None], position_ids=pos[:, None], **kw).logits[0]


def ours_forward(model, seqs):
    """Pack the sequences and run our model once."""
    pos = [positions(model, s)[0] for s in seqs]
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


def check_logits(pair, parts):
    """One sequence of `parts` through both models: logits within TOL (and not trivially small)."""
    hf, ours, _ = pair
    s = make_seq(parts, seed=len(parts), cfg=ours.config)
    (out,), (pos,) = ours_forward(ours, [s])
    ref = hf_forward(hf, s, pos)
    assert ref.abs().max() > 1 and (out - ref).abs().max() < TOL


def check_packed(pair, kinds):
    """Sequences of `kinds` packed into one batch of ours, each against transformers alone: within TOL."""
    hf, ours, _ = pair
    seqs = [make_seq(p, seed=i, cfg=ours.config) for i, p in enumerate(kinds)]
    assert len({len(s['ids']) for s in seqs}) == len(seqs)  # different lengths: the packing is exercised
    outs, pos = ours_forward(ours, seqs)
    for s, o, p in zip(seqs, outs, pos):
        assert (o - hf_forward(hf, s, p)).abs().max() < TOL


@pytest.mark.parametrize('parts', [TEXT, IMAGE, VIDEO, IMAGE_VIDEO], ids=['text', 'image', 'video', 'image+video'])
def test_logits_match_transformers(pair, parts):
    check_logits(pair, parts)


def test_packed_batch_matches_transformers(pair):
    check_packed(pair, [VIDEO, TEXT, IMAGE_VIDEO, IMAGE])


def test_save_load_round_trip_both_ways(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path / 'ours')
    hf2 = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / 'ours').eval()
    s = make_seq(IMAGE_VIDEO, seed=7)
    (out,), (pos,) = ours_forward(ours, [s])
    assert (hf_forward(hf2, s, pos) - out).abs().max() < TOL
    (again,), _ = ours_forward(Qwen2VL.from_pretrained(tmp_path / 'ours'), [s])
    assert torch.equal(again, out)


def test_hf_nested_config_read_back(pair):
    _, ours, d = pair
    assert json.loads((d / 'config.json').read_text())['text_config']['hidden_size'] == 64  # nested layout
    assert ours.config == ModelConfig(**TINY)


RELEASED_7B_CONFIG = {  # config.json of Qwen/Qwen2-VL-7B-Instruct (flat layout)
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}


def test_config_released_flat_layout_and_round_trip():
    cfg = ModelConfig.from_hf(RELEASED_7B_CONFIG)
    assert cfg == ModelConfig()  # our defaults are the 7B release
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    hc = Qwen2VLConfig(**cfg.to_hf())  # transformers reads what we write
    assert hc.text_config.rope_parameters['mrope_section'] == [16, 24, 24] and hc.vision_config.embed_dim == 1280
    with pytest.raises(KeyError, match='vision_config.depth'):
        ModelConfig.from_hf({**RELEASED_7B_CONFIG, 'vision_config': {'embed_dim': 1280}})
    with pytest.raises(ValueError, match="model_type 'glm4v' is not supported"):
        ModelConfig.from_hf({**RELEASED_7B_CONFIG, 'model_type': 'glm4v'})


# ----- the M-RoPE position rule -----

def test_rope_positions_match_transformers_where_rules_agree(pair):
    hf, _, _ = pair
    s = make_seq([2, ('image', (1, 4, 6)), 3, ('video', (3, 4, 6)), 2], seed=1)  # t <= max(h, w) / 2
    tt = torch.zeros_like(s['ids'])
    tt[s['ids'] == IMG], tt[s['ids'] == VID] = 1, 2
    ref, _ = hf.model.get_rope_index(s['ids'][None], tt[None], image_grid_thw=s['grid'][:1],
                                     video_grid_thw=s['grid'][1:])
    pos, nxt = rope_positions(s['ids'], s['grid'], ModelConfig(**TINY))
    assert torch.equal(pos, ref[:, 0]) and nxt == int(pos.max()) + 1


def test_rope_rule_released_vs_transformers5(pair):
    """Text after a video continues at max(video positions) + 1 = start + max(t, h/2, w/2) (released
    Qwen2-VL, transformers 4.4x, vLLM). transformers 5.x advances by max(h, w)/2 only, ignoring t."""
    hf, _, _ = pair
    ids = torch.tensor([7, 8, VS, VID, VID, VE, 9])  # video grid (2, 2, 2): 2 frames of 1 merged token
    pos, nxt = rope_positions(ids, torch.tensor([[2, 2, 2]]), ModelConfig(**TINY))
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 3, 5, 6]] and nxt == 7
    tt = (ids == VID).long() * 2
    ref, _ = hf.model.get_rope_index(ids[None], tt[None], video_grid_thw=torch.tensor([[2, 2, 2]]))
    assert torch.equal(ref[:, 0, :5], pos[:, :5])              # the blocks themselves agree
    assert ref[:, 0, 5:].tolist() == [[4, 5]] * 3              # transformers 5.x: start + 1, overlapping t=4


def test_rope_positions_bad_input():
    cfg = ModelConfig(**TINY)
    ids = torch.tensor([7, VS, VID, VID, VID, VE])
    with pytest.raises(ValueError, match='3 pad tokens.*needs 2'):
        rope_positions(ids, torch.tensor([[2, 2, 2]]), cfg)
    with pytest.raises(ValueError, match='only 0 grid_thw rows'):
        rope_positions(ids, None, cfg)
    with pytest.raises(ValueError, match='2 grid_thw rows but 1 visual blocks'):
        rope_positions(torch.tensor([7, VS, VID, VE]), torch.tensor([[1, 2, 2], [1, 2, 2]]), cfg)


def test_forward_bad_input(pair):
    _, ours, _ = pair
    s = make_seq(IMAGE, seed=0)
    pos, _ = rope_positions(s['ids'], s['grid'], ours.config)
    cu = torch.tensor([0, len(s['ids'])], dtype=torch.int32)
    with pytest.raises(ValueError, match='pixel_values'):
        ours(s['ids'], pos, cu, s['pixels'][:-1], s['grid'])
    with pytest.raises(ValueError, match='no pixel_values'):
        ours(s['ids'], pos, cu)
    with pytest.raises(ValueError, match='cu_seqlens'):
        ours(s['ids'], pos, cu - 1, s['pixels'], s['grid'])


# ----- KV cache and generation -----

def extended(model, s, new):
    """The prompt plus `new` text tokens, as one packed sequence for a full forward."""
    pos, nxt = positions(model, s)
    pos = torch.cat([pos, torch.arange(nxt, nxt + len(new)).expand(3, -1)], 1)
    ids = torch.cat([s['ids'], torch.as_tensor(new, dtype=torch.long)])
    with torch.no_grad():
        return model(ids, pos, torch.tensor([0, len(ids)], dtype=torch.int32), s['pixels'],
                     s['grid'] if len(s['grid']) else None)


def banned(model, logits):
    """What generate samples from: the logits with the visual tokens at -inf (config.visual_token_ids)."""
    return logits.index_fill(-1, torch.tensor(model.config.visual_token_ids), float('-inf'))


def pack_prompts(model, seqs):
    pos = torch.cat([positions(model, s)[0] for s in seqs], 1)
    cu = torch.tensor([0] + [len(s['ids']) for s in seqs]).cumsum(0).to(torch.int32)
    pix = [s['pixels'] for s in seqs if s['pixels'] is not None]
    return (torch.cat([s['ids'] for s in seqs]), pos, cu, torch.cat(pix) if pix else None,
            torch.cat([s['grid'] for s in seqs]) if pix else None)


def test_kv_cache_decode_matches_full_forward(pair):
    _, ours, _ = pair
    seqs = [make_seq(VIDEO, 0), make_seq(TEXT, 1)]
    cache, logits, pos = ours.prefill(*pack_prompts(ours, seqs), max_new_tokens=4)
    cache, logits, pos = cache.repeat(2), logits.repeat_interleave(2, 0), pos.repeat_interleave(2)  # 2 rows per prompt
    new = torch.randint(0, 150, (4, 4), generator=torch.Generator().manual_seed(0))
    steps = [logits]
    for i in range(3):
        steps.append(ours.decode_step(new[:, i], pos + i, cache))
    for r in range(4):
        full = extended(ours, seqs[r // 2], new[r, :3])
        n = len(seqs[r // 2]['ids'])
        assert (torch.stack([st[r] for st in steps]) - full[n - 1:]).abs().max() < TOL


def test_decode_attention_groups_query_heads_on_their_kv_head():
    """KVCache.attend (each KV head's 7 query heads as one group of queries, the 7B's 28 / 4 ratio) equals
    attention over the cache copied out to every query head with each row's own length, and max_len follows
    the rows' lengths on the host through repeat and steps."""
    from model import KVCache
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D, lens = 3, 28, 4, 12, 8, [3, 9, 5]
    k, v = torch.randn(1, B, Hkv, S, D, generator=g), torch.randn(1, B, Hkv, S, D, generator=g)
    cache = KVCache(k.clone(), v.clone(), torch.tensor(lens), max(lens))
    q = torch.randn(B, H, D, generator=g)
    kn, vn = torch.randn(B, Hkv, D, generator=g), torch.randn(B, Hkv, D, generator=g)
    cache.start_step()
    y = cache.attend(0, q, kn, vn)
    for b, n in enumerate(lens):
        keys = torch.cat([k[0, b, :, :n], kn[b, :, None]], 1).repeat_interleave(H // Hkv, 0)  # (H, n + 1, D)
        vals = torch.cat([v[0, b, :, :n], vn[b, :, None]], 1).repeat_interleave(H // Hkv, 0)
        att = torch.softmax((keys @ q[b, :, :, None])[..., 0] / D ** 0.5, -1)
        assert (y[b] - (att[:, None] @ vals)[:, 0]).abs().max() < 1e-5
    cache.end_step()
    two = cache.repeat(2)
    assert cache.lens.tolist() == [4, 10, 6] and cache.max_len == 10 and two.max_len == 10


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    seqs = [make_seq(VIDEO, 3), make_seq(TEXT, 4)]  # video rule-agnostic: t <= max(h, w) / 2
    tokens, logprobs, lengths = ours.generate(*pack_prompts(ours, seqs), max_new_tokens=20)
    assert tokens.shape == (2, 20) and lengths.tolist() == [20, 20]
    for s, row in zip(seqs, tokens):
        kw = {}
        if s['pixels'] is not None:
            kw = dict(pixel_values_videos=s['pixels'], video_grid_thw=s['grid'],
                      mm_token_type_ids=(s['ids'] == VID).long()[None] * 2)
        ref = hf.generate(input_ids=s['ids'][None], attention_mask=torch.ones(1, len(s['ids']), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, suppress_tokens=list(ours.config.visual_token_ids),
                          **kw)[0, len(s['ids']):]  # the same policy: visual tokens never generated
        assert torch.equal(row, ref) and len(set(ref.tolist())) > 3
    full = banned(ours, extended(ours, seqs[0], tokens[0, :-1])[len(seqs[0]['ids']) - 1:]).log_softmax(-1)
    assert (full.gather(1, tokens[0, :, None])[:, 0] - logprobs[0]).abs().max() < TOL  # greedy: untempered


def test_sampling_logprobs_stops_and_filters(pair):
    _, ours, _ = pair
    seqs = [make_seq(TEXT, 5), make_seq(VIDEO, 6)]
    stop = list(range(0, 160, 9)) + list(range(150, 160))  # many stops so some rows end early
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, stop_tokens=stop, num_samples=3,
              pad_token_id=159)
    tokens, logprobs, lengths = ours.generate(*pack_prompts(ours, seqs), generator=torch.Generator().manual_seed(0),
                                              **kw)
    again = ours.generate(*pack_prompts(ours, seqs), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(tokens, again[0]) and tokens.shape[0] == 6
    assert (lengths < 12).any() and (lengths > 1).any()
    for r in range(6):
        n, gen = int(lengths[r]), tokens[r].tolist()
        assert all(t not in stop for t in gen[:n - 1]) and (n == 12 or gen[n - 1] in stop)
        assert all(t == 159 for t in gen[n:]) and (logprobs[r, n:] == 0).all()
        s = seqs[r // 3]
        logits = banned(ours, extended(ours, s, gen[:n - 1])[len(s['ids']) - 1:]) / 0.8
        ref = logits.log_softmax(-1).gather(1, torch.tensor(gen[:n])[:, None])[:, 0]
        assert (ref - logprobs[r, :n]).abs().max() < TOL  # tempered distribution, before top-k/top-p
        assert (filter_logits(logits, 20, 0.9).gather(1, torch.tensor(gen[:n])[:, None]) > float('-inf')).all()


def test_filter_logits_hand_case():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda **kw: (filter_logits(logits, **kw) > float('-inf'))[0].tolist()
    assert keep(top_p=0.7) == [True, True, False, False]   # 0.5 < 0.7 <= 0.5 + 0.3
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(top_k=3) == [True, True, True, False]
    assert keep(top_k=3, top_p=0.99) == [True, True, True, False]


# ----- checkpoints -----

def test_sharded_save_loads_in_both(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path, max_shard_size=100_000)
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
    files = sorted(set(index['weight_map'].values()))
    assert (len(files) > 2 and not (tmp_path / 'model.safetensors').exists()
            and files[0].endswith('-of-%05d.safetensors' % len(files)))
    s = make_seq(IMAGE_VIDEO, 2)
    (ref,), (pos,) = ours_forward(ours, [s])
    (out,), _ = ours_forward(Qwen2VL.from_pretrained(tmp_path), [s])
    assert torch.equal(out, ref)
    assert (hf_forward(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval(), s, pos)
            - ref).abs().max() < TOL


def test_strict_key_map(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path / 'good')
    good = load_file(tmp_path / 'good' / 'model.safetensors')

    def broken(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / 'config.json').write_text((tmp_path / 'good' / 'config.json').read_text())
        save_file(tensors, d / 'model.safetensors')
        return d

    missing = {k: v for k, v in good.items() if k != 'model.layers.1.mlp.up_proj.weight'}
    with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]; unexpected: \[\]"):
        Qwen2VL.from_pretrained(broken('missing', missing))
    renamed = {k.replace('blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv_w.weight'): v for k, v in good.items()}
    with pytest.raises(ValueError, match=r"missing: \['visual.blocks.0.attn.qkv.weight'\].*qkv_w"):
        Qwen2VL.from_pretrained(broken('renamed', renamed))
    with pytest.raises(ValueError, match=r"wrong shape: \['model.norm.weight \(63,\) != \(64,\)'\]"):
        Qwen2VL.from_pretrained(broken('shape', {**good, 'model.norm.weight': good['model.norm.weight'][:63]}))


def test_tied_embeddings_round_trip(tmp_path):
    cfg = ModelConfig(**{**TINY, 'tie_word_embeddings': True})
    torch.manual_seed(0)
    ours = Qwen2VL(cfg)
    assert ours.lm_head is None
    ours.save_pretrained(tmp_path)
    assert 'lm_head.weight' not in load_file(tmp_path / 'model.safetensors')
    s = make_seq(IMAGE, 3)
    (out,), (pos,) = ours_forward(ours, [s])
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (hf_forward(hf, s, pos) - out).abs().max() < TOL


def test_meta_construction_dtype_and_device(pair, monkeypatch):
    _, ours, d = pair
    built_on = []
    monkeypatch.setattr(Qwen2VL, '_init_weights',
                        staticmethod(lambda m: built_on.extend(p.device.type for p in m.parameters(recurse=False))))
    model = Qwen2VL.from_pretrained(d, dtype=torch.bfloat16, device='cpu')
    assert set(built_on) == {'meta'}  # no throwaway random init of a 7B
    assert all(p.dtype == torch.bfloat16 and p.device.type == 'cpu' for p in model.parameters())
    s = make_seq(IMAGE_VIDEO, 4)
    (out,), _ = ours_forward(model, [s])
    (ref,), _ = ours_forward(ours, [s])
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_gradient_checkpointing_and_autocast(pair):
    _, ours, _ = pair
    model = Qwen2VL(ours.config)
    model.load_state_dict(ours.state_dict())
    model.train()
    ids, pos, cu, pix, grid = pack_prompts(model, [make_seq(IMAGE_VIDEO, 5), make_seq(TEXT, 6)])
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(ids, pos, cu, pix, grid).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert len(calls) == 3  # 1 without checkpointing, 2 with (forward + recompute in backward)
    assert (grads[0] - grads[1]).abs().max() < 1e-6 and grads[0].abs().max() > 0
    with torch.no_grad():
        ref = model(ids, pos, cu, pix, grid)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(ids, pos, cu, pix, grid)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cache, logits, _ = model.prefill(ids, pos, cu, pix, grid, max_new_tokens=2)
        tokens, _, lengths = model.generate(ids, pos, cu, pix, grid, max_new_tokens=3)
    assert cache.k.dtype == torch.bfloat16 and (logits - ref[cu[1:].long() - 1]).abs().max() < 0.1 * ref.abs().max()
    assert tokens.shape == (2, 3) and lengths.tolist() == [3, 3]


# equal segments (one view), unequal (padded batch, causal and with a key mask), very unequal (per-segment loop)
@pytest.mark.parametrize('lens,causal', [([5, 9, 2], True), ([4, 4, 4], False), ([7], True), ([5, 9, 6], False),
                                         ([1, 1, 20], True), ([1, 1, 20], False)])
def test_attention_is_block_diagonal(lens, causal):
    """Every CPU path equals one SDPA with the dense block-diagonal mask, values and gradients."""
    from model import attention
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = torch.randn(T, 4, 8, generator=g), torch.randn(T, 2, 8, generator=g), torch.randn(T, 2, 8, generator=g)
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                                           v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    out = attention(q, k, v, cu, max(lens), causal)
    assert (out - ref.transpose(0, 1)).abs().max() < 1e-5
    w = torch.randn(out.shape, generator=g)
    g_ours = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref.transpose(0, 1) * w).sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(g_ours, g_ref))


def test_varlen_attn_called_right_for_either_torch_signature():
    """model.attention's call of torch's varlen_attn binds to both signatures it has had (is_causal, no GQA;
    keyword-only window_size and enable_gqa), passes the causal choice in each one's terms, and repeats KV
    heads only where the kernel cannot group query heads itself."""
    import inspect
    from model import varlen_kwargs

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        pass

    for f in (old, new):
        params = inspect.signature(f).parameters
        for causal in (True, False):
            for groups in (1, 7):
                kw, rep = varlen_kwargs(params, causal, groups)
                bound = inspect.signature(f).bind(*range(7), **kw)  # a keyword it lacks would raise here
                bound.apply_defaults()
                args = bound.arguments
                got = args['is_causal'] if f is old else args['window_size'] == (-1, 0)
                assert got == causal
                assert rep == (groups if f is old else 1)
                assert f is old or args['enable_gqa'] == (groups > 1)
