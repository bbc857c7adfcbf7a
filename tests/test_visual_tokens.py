"""Visual special tokens (a visual block's start, end and pads) only come from the processor:
- a model made to prefer them (+50 on their logits, far above every other token) never emits one, in
  model.generate (greedy and sampled), grpo.rollout and bench's greedy decode: the ban comes from the
  model's config, no caller passes it; the training forward gives them no mass either (sampler = trainer);
- a completion that holds one anyway is named (sample, completion, token) before the training forward;
- a question or a target text that holds one is a DataError naming the sample, and bench counts it as a
  bad sample and goes on.
"""
import dataclasses
import os

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch

import bench
import data
import grpo
from conftest import make_tiny_world
from model import Qwen2VL

torch.set_num_threads(1)
SETTINGS = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp('visual'), 'train', 0, 2)


def biased(world, bias=50.0):
    """The tiny model with +bias on the logits of its visual tokens: they are the argmax everywhere."""
    tok, model = data.Tokenizer(str(world / 'tiny')), Qwen2VL.from_pretrained(str(world / 'tiny')).eval()
    visual = torch.tensor(model.config.visual_token_ids)
    plain, extra = model.logits, torch.zeros(model.config.vocab_size).index_fill(0, visual, bias)
    model.logits = lambda h: plain(h) + extra
    return tok, model, visual


def prompts(world, tok, model, n=2):
    samples = data.read_samples(str(world / 'train' / 'st_r1_cot.jsonl'))[:n]
    return samples, [data.encode(s, tok, SETTINGS, None, model.config) for s in samples]


def test_a_model_that_prefers_visual_tokens_never_emits_one(world):
    tok, model, visual = biased(world)
    assert visual.tolist() == [tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id]
    samples, enc = prompts(world, tok, model)
    b = data.pack(enc)
    h = model(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'], return_hidden=True)
    assert bool(torch.isin(model.logits(h).argmax(-1), visual).all())  # the bias works: unbanned, they would win
    args = (b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
    greedy, _, _ = model.generate(*args, max_new_tokens=12)
    sampled, _, _ = model.generate(*args, max_new_tokens=12, temperature=1.0, num_samples=4,
                                   generator=torch.Generator().manual_seed(0))
    G = 4
    seeds = [grpo.row_seed(0, 0, i, g) for i in range(2) for g in range(G)]
    rolled, logps, lengths, _ = grpo.rollout(model, b, G, seeds, 12, pad_id=tok.pad_id)
    for out in (greedy, sampled, rolled):
        assert out.shape[1] == 12 and not torch.isin(out, visual).any()
    # the trained log-probs are the sampler's: the ban is part of the policy on both sides
    batch = grpo.group_batch([(p, [rolled[j, :int(lengths[j])] for j in range(i * G, (i + 1) * G)])
                              for i, p in enumerate(enc)])
    flat, _ = grpo.completion_logps(model, batch, 1.0, 'cpu')
    padded, mask = grpo.pad_rows(flat, lengths)
    assert (padded[mask] - logps[mask]).abs().max() < 1e-5
    # bench's greedy decode: the texts hold no visual token either
    answers = bench.make_generate_fn(model, tok, 12)(samples, enc)
    assert len(answers) == 2 and not any(t in a for a in answers for t in data.VISUAL_SPECIAL_TOKENS)


def test_a_completion_holding_a_visual_token_is_named(world):
    tok, model = data.Tokenizer(str(world / 'tiny')), Qwen2VL.from_pretrained(str(world / 'tiny'))
    samples, enc = prompts(world, tok, model, 1)
    text = torch.tensor(tok.encode('turn left'))
    bad = torch.cat([text, torch.tensor([tok.video_pad_id, tok.im_end_id])])
    batch = grpo.group_batch([(enc[0], [text, bad])])
    with pytest.raises(ValueError, match=f'completion 1 of sample {samples[0].id} holds the visual token '
                                         f'{tok.video_pad_id} at position {len(text)}'):
        grpo.completion_logps(model, batch, 1.0, 'cpu')


def test_visual_tokens_in_a_text_are_a_data_error_and_a_bad_bench_sample(world, tmp_path):
    tok = data.Tokenizer(str(world / 'tiny'))
    samples = data.read_samples(str(world / 'train' / 'st_r1_cot.jsonl'))[:3]
    s = samples[1]
    bad_question = dataclasses.replace(s, question=s.question + ' <|video_pad|>')
    with pytest.raises(data.DataError, match=rf"{s.id}\): the question holds <\|video_pad\|>"):
        data.encode(bad_question, tok, SETTINGS)
    with pytest.raises(data.DataError, match=rf"{s.id}\): the target holds <\|vision_start\|>"):
        data.encode(s, tok, SETTINGS, target='<think><|vision_start|></think><answer>A</answer>')
    prepare = lambda x: bench.prepare_sample(tok, SETTINGS, None, x)
    answer = lambda ss, xs: [f'<think>.</think><answer>{x.answer}</answer>' for x in ss]
    summ = bench.evaluate([samples[0], bad_question, samples[2]], answer, str(tmp_path / 'o'), dict(mode='generate'),
                          prepare=prepare, progress=False)
    assert summ['evaluated'] == 2 and summ['bad'] == 1
    assert 'the question holds <|video_pad|>' in summ['bad_samples'][0]['error']
