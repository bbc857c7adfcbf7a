"""data.py: pixels and ids against transformers' Qwen2-VL processors, readers on fixtures that
reproduce the release's quirks, bad input, packing against the model, the loader.

The oracle for video pixels is transformers' own code: the PIL image processor's resize / rescale /
normalize per frame (torchvision is not installed, so the video processor class cannot be built)
followed by Qwen2VLVideoProcessor.patchify, taken from its source file and run as-is. Tolerance
1e-5 after normalisation (observed: 0, both sides do the same float32 arithmetic).
"""
import ast
import importlib.util
import json
import os
import re
import sys

os.environ['HF_HUB_OFFLINE'] = '1'
import av
import numpy as np
import pytest
import torch

import data
from model import ModelConfig, Qwen2VL, rope_positions

torch.set_num_threads(2)
SMALL = data.VisionSettings(nframes=4, min_pixels=56 * 56, max_pixels=56 * 56)  # 2x2 merged tokens per frame pair


def write_video(path, n=16, h=64, w=64, fps=8):
    """h264 clip whose frame i is grey level 10 + 15 i (so decoded frames tell their index)."""
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
        for i in range(n):
            img = np.full((h, w, 3), (10 + 15 * i) % 256, np.uint8)  # past 16 frames the levels wrap
            img[: h // 2, : w // 2, 0] = (255 - 15 * i) % 256  # some structure so resizing is not trivial
            for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope='module')
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp('vids')
    return {'a': write_video(d / 'a.mp4'), 'b': write_video(d / 'b.mp4', n=11, h=48, w=80), 'dir': str(d)}


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    texts = [data.build_user_text(data.Sample('x', 'v', 'landmark', 'forward', 'which landmarks did you pass?',
                                              ['a tree', 'a door'])),
             "<think>Let's start by thinking reverse. Hence, the correct answer is A</think> <answer>A</answer>",
             'You are a helpful assistant. Turn left, go straight, turn right. Describe the route.'] * 20
    return data.build_tokenizer(texts, 400, str(tmp_path_factory.mktemp('tok')))


@pytest.fixture(scope='module')
def phrase_tok(tmp_path_factory):
    """The phrase tokenizer (EgoWorld's tiny model uses it) on text of the same shape."""
    texts = [data.build_user_text(data.Sample('x', 'v', 'direction', 'forward', 'which way did you go?', o, 'A'))
             for o in (['turn left, turn right', 'turn right'], ['turn right, turn left', 'turn left, turn left'])]
    texts += ["<think>Headings: east, south. Turns: east to south clockwise. Hence, the correct answer is A</think> "
              "<answer>A</answer>"]
    return data.build_tokenizer(texts * 20, 600, str(tmp_path_factory.mktemp('ptok')), phrases=True)


def mcq(video, sol="<think>go left</think><answer>B</answer>"):
    return data.Sample(id='s1', video=video, task='direction', direction='forward', question='Which way, A or B?',
                       options=['left', 'right, then left'], answer='B', answer_text='right, then left', solution=sol,
                       source='t:1')

# ----------------------------------------------------------------------------- transformers oracle

def hf_patchify():
    """Qwen2VLVideoProcessor.patchify from transformers' source (its module imports torchvision)."""
    origin = importlib.util.find_spec('transformers.models.qwen2_vl.video_processing_qwen2_vl').origin
    tree = ast.parse(open(origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'Qwen2VLVideoProcessor')
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == 'patchify')
    ns = {'torch': torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), origin, 'exec'), ns)
    return ns['patchify']


def hf_video(frames, settings):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    ip = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    size = SizeDict(shortest_edge=settings.min_pixels, longest_edge=settings.max_pixels)
    out = []
    for f in frames:
        x = ip.resize(np.moveaxis(f, -1, 0), size=size, resample=PILImageResampling.BICUBIC, factor=28)
        out.append(ip.normalize(ip.rescale(x, 1 / 255), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    patches, t, h, w = hf_patchify()(None, torch.from_numpy(np.stack(out)).float()[None], 14, 2, 2)
    return patches[0], torch.tensor([[t, h, w]])


EXACT = data.VisionSettings(nframes=2, min_pixels=56 * 56, max_pixels=56 * 84)  # 56x84 frames are kept as they are


@pytest.mark.parametrize('n,h,w,settings', [(5, 64, 64, data.VisionSettings()), (4, 480, 854, data.VisionSettings()),
                                            (3, 50, 90, SMALL), (2, 56, 84, EXACT)])
def test_pixels_match_transformers(n, h, w, settings):
    frames = np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    pv, grid = data.preprocess_frames(frames, settings)
    ref_pv, ref_grid = hf_video(frames, settings)
    assert grid.tolist() == ref_grid.tolist() and grid[0, 0] == (n + 1) // 2
    assert pv.shape == ref_pv.shape == (int(grid.prod()), 1176) and pv.dtype == torch.float32
    assert (pv - ref_pv).abs().max() <= 1e-5
    assert 100352 <= grid[0, 1] * grid[0, 2] * 196 <= 151200 or settings in (SMALL, EXACT)
    assert settings is not EXACT or grid[0, 1:].tolist() == [h // 14, w // 14]  # the no-resize path ran


def test_still_image_matches_image_processor(tmp_path):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    img = np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / 'x.png')
    s = data.VisionSettings()
    pv, grid = data.preprocess_frames(data.load_image(str(tmp_path / 'x.png')), s)
    ref = Qwen2VLImageProcessorPil(min_pixels=s.min_pixels, max_pixels=s.max_pixels)(images=[img], return_tensors='pt')
    assert grid.tolist() == ref['image_grid_thw'].tolist()
    assert (pv - ref['pixel_values']).abs().max() <= 1e-5


def test_frames_rounded_linspace_and_only_those_decoded(vids, monkeypatch):
    assert data.frame_indices(16, 8).tolist() == [0, 2, 4, 6, 9, 11, 13, 15]  # truncation would give 8, 10, 12
    frames = data.load_frames(vids['a'], 8)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    got = np.round((frames[:, 40:, 40:].mean((1, 2, 3)) - 10) / 15).astype(int)
    assert got.tolist() == [0, 2, 4, 6, 9, 11, 13, 15]
    calls = []
    real = data.decord.VideoReader

    class Spy(real):
        def get_batch(self, idx):
            calls.append(list(idx))
            return super().get_batch(idx)

        def __getitem__(self, i):
            raise AssertionError('frames must come from one get_batch of the sampled indices')
    monkeypatch.setattr(data.decord, 'VideoReader', Spy)
    data.load_frames(vids['a'], 4)
    assert calls == [[0, 5, 10, 15]]


def test_tokenizer_dir_loads_in_transformers(tok):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    d = os.path.dirname(tok.path)
    hf = AutoTokenizer.from_pretrained(d)
    assert ([hf.convert_tokens_to_ids(t) for t in data.SPECIAL_TOKENS]
            == list(range(tok.vocab_size - 14, tok.vocab_size)))
    text = 'Turn left, then <think>x</think><|im_end|>'
    assert hf(text, add_special_tokens=False)['input_ids'] == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    ip = Qwen2VLImageProcessorPil.from_pretrained(d)
    assert (ip.size['shortest_edge'], ip.size['longest_edge']) == (128 * 28 * 28, 360 * 420)
    chat = hf.apply_chat_template([{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': 'Q'}]}],
                                  tokenize=False, add_generation_prompt=True)
    assert chat == ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
                    '<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n')

# ----------------------------------------------------------------------------- ids against the processor

def test_phrase_tokenizer_merges_phrases_and_loads_in_transformers(phrase_tok, tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(phrase_tok.path))
    text = data.build_user_text(data.Sample('x', 'v', 'direction', 'forward', 'which way did you go?',
                                            ['turn right', 'turn left, turn right'], 'B'))
    text += "<think>Headings: east, south. Hence, the correct answer is B</think> <answer>B</answer><|im_end|>\n"
    assert hf(text, add_special_tokens=False)['input_ids'] == phrase_tok.encode(text)
    assert phrase_tok.decode(phrase_tok.encode(text)) == text
    pieces = [phrase_tok.decode([i]) for i in phrase_tok.encode(text)]
    assert ' turn right' in pieces and ' east' in pieces and '<think>' in pieces   # whole phrases, tags alone
    assert all(p == ',' or ',' not in p for p in pieces)   # never across a comma
    split = [w for w, _ in phrase_tok.tk.pre_tokenizer.pre_tokenize_str('turn left And then, go<think>x')]
    assert split == ['turnĠleft', 'ĠAndĠthen', ',', 'Ġgo', '<think>', 'x']   # a capitalised word starts a piece
    split = [w for w, _ in phrase_tok.tk.pre_tokenizer.pre_tokenize_str('A: turn left = turn right (no)')]
    # cot_check's pairs stay two items
    assert split == ['A', ':', 'ĠturnĠleftĠ', '=', 'ĠturnĠrightĠ', '(', 'no', ')']
    assert len(pieces) < len(tok.encode(text)) / 2


@pytest.fixture(params=['words', 'phrases'])
def processor(request, tok, phrase_tok, monkeypatch):
    """transformers' Qwen2VLProcessor; its video processor needs torchvision, so a stand-in runs the
    oracle pipeline above (the processor's own code expands the placeholders and tokenises).
    Parametrised over both of data.build_tokenizer's splits; the tests take our tokenizer from `processor.ours`."""
    tok = phrase_tok if request.param == 'phrases' else tok
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    monkeypatch.setattr(ProcessorMixin, 'check_argument_for_proper_class', lambda self, name, arg: type(arg))
    s = data.VisionSettings()

    class Video:
        merge_size = 2

        def __call__(self, videos, **kwargs):
            pv, grid = hf_video(np.asarray(videos[0]), s)
            return {'pixel_values_videos': pv, 'video_grid_thw': grid}
    d = os.path.dirname(tok.path)
    p = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(d),
                         tokenizer=AutoTokenizer.from_pretrained(d),
                         video_processor=Video(), chat_template=data.CHAT_TEMPLATE)
    p.ours = tok
    return p


@pytest.mark.parametrize('target', ["<think>Turn back, then go\nstraight.</think> <answer>B</answer>", None])
def test_ids_match_transformers_processor(vids, processor, target):
    s, tok = mcq(vids['a']), processor.ours
    conv = [{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': data.build_user_text(s)}]}]
    if target is not None:
        conv.append({'role': 'assistant', 'content': [{'type': 'text', 'text': target}]})
    text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=target is None)
    frames = data.load_frames(s.video, 8)
    ref = processor(text=[text], videos=[frames], return_tensors='pt')
    out = data.encode(s, tok, data.VisionSettings(), target)
    assert out['input_ids'].tolist() == ref['input_ids'][0].tolist()
    assert out['grid_thw'].tolist() == ref['video_grid_thw'].tolist() == [[4, 24, 24]]
    assert (out['pixel_values'] - ref['pixel_values_videos']).abs().max() <= 1e-5
    assert int((out['input_ids'] == tok.video_pad_id).sum()) == 4 * 24 * 24 // 4


def test_image_sample_ids_match_processor(processor, tmp_path):
    tok = processor.ours
    from PIL import Image
    img = np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / 'x.png')
    s = mcq(str(tmp_path / 'x.png'))
    conv = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': data.build_user_text(s)}]}]
    text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=[img], return_tensors='pt')
    out = data.encode(s, tok, data.VisionSettings())
    assert out['input_ids'].tolist() == ref['input_ids'][0].tolist()
    assert (out['pixel_values'] - ref['pixel_values']).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- Qwen2.5-VL's time base

def test_seconds_per_grid_from_the_frames_sampled():
    """temporal_patch_size * mean spacing of the sampled indices / fps, a float: 8 of 16 frames at 8 fps are
    15/7 frames apart -> 2 * 15/7 / 8 s a group (sampled fps 3.73, not the clip's 8, nor 8 / 16 * 8 = 4)."""
    assert data.seconds_per_grid(data.frame_indices(16, 8), 8.0) == pytest.approx(2 * 15 / 7 / 8, abs=1e-15)
    assert data.seconds_per_grid(data.frame_indices(16, 16), 8.0) == 0.25       # every frame: 2 frames / 8 fps
    assert data.seconds_per_grid(data.frame_indices(9, 4), 3.0) == 2 * (8 / 3) / 3  # 0, 3, 5, 8: never an int
    assert isinstance(data.seconds_per_grid(np.array([0, 4]), 8), float)
    assert data.seconds_per_grid(data.frame_indices(5, 8), 8.0) == 2 * (4 / 7) / 8  # a short clip repeats frames


def qwen25_cfg(tok):
    return ModelConfig(model_type='qwen2_5_vl', tokens_per_second=2, **tok.model_ids())


def test_encode_qwen25_time_ids_and_recorded(tok, vids):
    """Clip a: 16 frames at 8 fps; 4 sampled (0, 5, 10, 15) -> 2 * 5 / 8 = 1.25 s a group, temporal ids
    floor(k * 2 * 1.25) = 0, 2; the same item for Qwen2-VL numbers them 0, 1. The value travels with the
    item, the packed batch and settings.record."""
    s = mcq(vids['a'])
    out = data.encode(s, tok, SMALL, None, qwen25_cfg(tok))
    assert out['second_per_grid_ts'].tolist() == [1.25] and out['grid_thw'].tolist() == [[2, 4, 4]]
    video = out['input_ids'] == tok.video_pad_id
    t_ids = out['position_ids'][0, video]
    assert (t_ids - t_ids[0]).unique().tolist() == [0, 2]
    q2 = data.encode(s, tok, SMALL, None, ModelConfig(**tok.model_ids()))
    assert (q2['position_ids'][0, video] - t_ids[0]).unique().tolist() == [0, 1]
    r = data.Sample('r', vids['b'], 'route', 'reverse', 'Back?', answer='x', answer_text='x')
    b = data.encode(r, tok, SMALL, None, qwen25_cfg(tok))  # 11 frames at 8 fps, 4 sampled: 0, 3, 7, 10
    assert b['second_per_grid_ts'].tolist() == [2 * (10 / 3) / 8]
    assert data.pack([out, b])['second_per_grid_ts'].tolist() == [1.25, 2 * (10 / 3) / 8]
    assert SMALL.record([s, r]) == dict(SMALL.asdict(), second_per_grid_ts=[2 * (10 / 3) / 8, 1.25])
    assert data.VisionSettings(nframes=16).record([s])['second_per_grid_ts'] == [0.25, 0.25]
    with pytest.raises(ValueError, match='needs second_per_grid_ts'):  # a position rule without the time base
        rope_positions(out['input_ids'], out['grid_thw'], qwen25_cfg(tok))


def test_qwen25_processor_and_rope_index_match(tok, vids, tmp_path, monkeypatch):
    """transformers' Qwen2_5_VLProcessor (its video processor a stand-in running the oracle pipeline above, as
    for Qwen2-VL) and Qwen2_5_VLModel.get_rope_index on a clip of 29 frames at 6 fps with 8 sampled: frames
    0, 4, ..., 28, sampled at 1.5 fps, not the clip's 6. Ids, pixels, grid, second_per_grid_ts = 2 * 4 / 6 s
    and every position equal. transformers derives second_per_grid_ts from metadata as temporal_patch_size *
    total / (N * fps): given the 32 frames that the 8 tile at 4 apart it agrees; given the clip's true 29 it
    says 1.21 s although the frames are 4 / 6 s apart (pinned below; data.seconds_per_grid)."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_utils import VideoMetadata
    monkeypatch.setattr(ProcessorMixin, 'check_argument_for_proper_class', lambda self, name, arg: type(arg))
    clip, settings = write_video(tmp_path / 'c.mp4', n=29, fps=6), data.VisionSettings()
    assert data.frame_indices(29, 8).tolist() == list(range(0, 29, 4))

    class Video:
        merge_size, temporal_patch_size, total = 2, 2, 32

        def __call__(self, videos, **kwargs):
            pv, grid = hf_video(np.asarray(videos[0]), settings)
            meta = VideoMetadata(total_num_frames=self.total, fps=6.0, frames_indices=list(range(0, 29, 4)))
            return {'pixel_values_videos': pv, 'video_grid_thw': grid, 'video_metadata': [meta]}
    d = os.path.dirname(tok.path)
    p = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(d),
                            tokenizer=AutoTokenizer.from_pretrained(d), video_processor=Video(),
                            chat_template=data.CHAT_TEMPLATE)
    s = mcq(clip)
    conv = [{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': data.build_user_text(s)}]}]
    text = p.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    frames = data.load_frames(clip, 8)
    ref = p(text=[text], videos=[frames], return_tensors='pt')
    cfg = qwen25_cfg(tok)
    out = data.encode(s, tok, settings, None, cfg)
    assert out['input_ids'].tolist() == ref['input_ids'][0].tolist()
    assert out['grid_thw'].tolist() == ref['video_grid_thw'].tolist() == [[4, 24, 24]]
    assert (out['pixel_values'] - ref['pixel_values_videos']).abs().max() <= 1e-5
    assert out['second_per_grid_ts'].tolist() == [2 * 4 / 6]
    assert torch.equal(out['second_per_grid_ts'].float(), ref['second_per_grid_ts'])  # its float32
    small = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3], vision_depth=1,
                 vision_embed_dim=32, vision_num_heads=2, vision_intermediate_size=32)
    hf = Qwen2_5_VLModel(Qwen2_5_VLConfig(**ModelConfig(**{**cfg.__dict__, **small}).to_hf()))
    pos, _ = hf.get_rope_index(ref['input_ids'], ref['mm_token_type_ids'], video_grid_thw=ref['video_grid_thw'],
                               second_per_grid_ts=ref['second_per_grid_ts'])
    assert torch.equal(out['position_ids'], pos[:, 0])  # ids 0, 2, 5, 8 then text: both text rules agree here
    t_ids = out['position_ids'][0, out['input_ids'] == tok.video_pad_id]
    assert (t_ids - t_ids[0]).unique().tolist() == [0, 2, 5, 8]
    Video.total = 29  # the clip's true length: transformers' metadata rule
    assert p(text=[text], videos=[frames], return_tensors='pt')['second_per_grid_ts'].tolist() == [
        pytest.approx(2 * 29 / (8 * 6), rel=1e-6)]


# ----------------------------------------------------------------------------- Qwen3-VL's timestamps

def qwen3_cfg(tok):
    return ModelConfig(model_type='qwen3_vl', patch_size=16, **tok.model_ids())


def test_frame_timestamps_hand_values():
    """Group k's time is the mean of its two frames' index / fps: 8 of 16 frames at 8 fps (0, 2, 4, 6, 9, 11,
    13, 15) -> 0.125, 0.625, 1.25, 1.75 s; an odd count repeats the last frame, as the pixels do."""
    assert data.frame_timestamps(data.frame_indices(16, 8), 8.0) == [0.125, 0.625, 1.25, 1.75]
    assert data.frame_timestamps(np.array([0, 5, 10]), 4.0) == [0.625, 2.5]
    assert data.frame_timestamps(data.frame_indices(29, 8), 6.0) == pytest.approx([1 / 3, 5 / 3, 3, 13 / 3])


def qwen3_processor(tok, settings, monkeypatch):
    """transformers' Qwen3VLProcessor with its own Qwen3VLVideoProcessor (metadata, timestamps, rescale, patchify:
    its code as-is). torchvision is not installed, so two of its calls are stood in for: the resize is the PIL
    bicubic of the oracle above, to the sides of the video processor's own smart_resize (whose budget is per
    clip: our per-frame one x N frames), and the per-channel normalize is written out."""
    from PIL import Image
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    # its module loaded from its file: through the package, transformers swaps in a torchvision-requiring dummy
    origin = importlib.util.find_spec('transformers.models.qwen3_vl.video_processing_qwen3_vl').origin
    spec = importlib.util.spec_from_file_location('transformers.models.qwen3_vl._video_oracle', origin)
    vp = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, vp)
    spec.loader.exec_module(vp)
    monkeypatch.setattr(ProcessorMixin, 'check_argument_for_proper_class', lambda self, name, arg: type(arg))

    def pil_resize(self, videos, size, resample, factor, temporal_factor, **kwargs):
        h, w = vp.smart_resize(videos.shape[1], *videos.shape[-2:], temporal_factor, factor, size.shortest_edge,
                               size.longest_edge)
        frames = videos.permute(0, 1, 3, 4, 2).to(torch.uint8).numpy()
        out = [[np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in v] for v in frames]
        return torch.from_numpy(np.array(out)).permute(0, 1, 4, 2, 3)
    monkeypatch.setattr(vp.Qwen3VLVideoProcessor, 'resize', pil_resize)
    # torchvision's normalize, (x - mean) / std per channel, on the mean and std it fused with the rescale
    monkeypatch.setattr(vp.Qwen3VLVideoProcessor, 'normalize',
                        lambda self, x, mean, std, inplace=False: (x - mean[:, None, None]) / std[:, None, None])
    d = os.path.dirname(tok.path)
    n = settings.nframes
    video = vp.Qwen3VLVideoProcessor(size={'shortest_edge': settings.min_pixels * n,
                                           'longest_edge': settings.max_pixels * n}, cap_pixels_per_frame=False,
                                     do_sample_frames=False, do_convert_rgb=False)  # frames are RGB already
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3,
                                                                     image_std=[0.5] * 3),
                            tokenizer=AutoTokenizer.from_pretrained(d), video_processor=video,
                            chat_template=data.CHAT_TEMPLATE)


WRAPPED = '<|vision_start|><|video_pad|><|vision_end|>'


def test_qwen3_processor_parity_with_metadata(tok, tmp_path, monkeypatch):
    """A clip of 29 frames at 6 fps, 8 sampled (0, 4, ..., 28): transformers' Qwen3VLProcessor given the true
    video_metadata writes <0.3>, <1.7>, <3.0>, <4.3 seconds>; ids (timestamp text included), pixels, grid and
    every position (get_rope_index) equal ours, which reads the fps from the clip itself. The template's
    <|vision_start|><|video_pad|><|vision_end|> is handed over as the bare pad, which the release's processor
    replaced whole (transformers 4.57, vLLM); transformers 5 replaces only the pad and keeps the outer pair:
    then its ids are ours with those two tokens around the groups (pinned)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel
    clip, settings = write_video(tmp_path / 'c.mp4', n=29, fps=6), data.VisionSettings()
    p = qwen3_processor(tok, settings, monkeypatch)
    s, cfg = mcq(clip), qwen3_cfg(tok)
    conv = [{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': data.build_user_text(s)}]}]
    text = p.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    meta = dict(total_num_frames=29, fps=6.0, frames_indices=list(range(0, 29, 4)))
    frames = data.load_frames(clip, 8)
    ref = p(text=[text.replace(WRAPPED, '<|video_pad|>')], videos=[frames], video_metadata=[meta],
            return_tensors='pt')
    out = data.encode(s, tok, settings, None, cfg)
    assert out['input_ids'].tolist() == ref['input_ids'][0].tolist()
    prompt = tok.decode(out['input_ids'])
    assert all(f'<{t} seconds><|vision_start|><|video_pad|>' in prompt for t in ('0.3', '1.7', '3.0', '4.3'))
    assert prompt.count('<|vision_start|>') == 4 and out['timestamps'] == pytest.approx([1 / 3, 5 / 3, 3, 13 / 3])
    assert out['grid_thw'].tolist() == ref['video_grid_thw'].tolist() == [[4, 20, 20]]  # 64 x 64 up to 320 x 320
    assert out['pixel_values'].shape == ref['pixel_values_videos'].shape == (4 * 20 * 20, 3 * 2 * 16 * 16)
    assert (out['pixel_values'] - ref['pixel_values_videos']).abs().max() <= 1e-5
    small = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3], vision_depth=1,
                 vision_embed_dim=32, vision_num_heads=2, vision_intermediate_size=32, deepstack_visual_indexes=[0])
    hf = Qwen3VLModel(Qwen3VLConfig(**ModelConfig(**{**cfg.__dict__, **small}).to_hf()))
    pos, _ = hf.get_rope_index(ref['input_ids'], ref['mm_token_type_ids'], video_grid_thw=ref['video_grid_thw'])
    assert torch.equal(out['position_ids'], pos[:, 0])
    v5 = p(text=[text], videos=[frames], video_metadata=[meta], return_tensors='pt')['input_ids'][0].tolist()
    ids, vid = out['input_ids'].tolist(), out['input_ids'] == tok.video_pad_id
    first = ids.index(tok.video_pad_id) - 1 - len(tok.encode('<0.3 seconds>'))  # where the first group starts
    last = int(vid.nonzero().max()) + 2  # past the last group's <|vision_end|>
    assert v5 == ids[:first] + [tok.vision_start_id] + ids[first:last] + [tok.vision_end_id] + ids[last:]


def test_qwen3_processor_parity_ntsc_clip(tok, tmp_path, monkeypatch):
    """A 29.97 fps (30000/1001) clip of 61 frames, 8 sampled (0, 9, 17, 26, 34, 43, 51, 60): groups at 0.150,
    0.717, 1.285, 1.852 s. The processor given that metadata and ours write the same ids (<0.2>, <0.7>, <1.3>,
    <1.9 seconds>: the one-decimal rounding of non-round times)."""
    from fractions import Fraction
    clip, settings = write_video(tmp_path / 'n.mp4', n=61, fps=Fraction(30000, 1001)), data.VisionSettings()
    p = qwen3_processor(tok, settings, monkeypatch)
    s = data.Sample('n', clip, 'route', 'forward', 'Q', answer='x', answer_text='x')
    conv = [{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': data.build_user_text(s)}]}]
    text = p.apply_chat_template(conv, tokenize=False, add_generation_prompt=True).replace(WRAPPED, '<|video_pad|>')
    meta = dict(total_num_frames=61, fps=30000 / 1001, frames_indices=[0, 9, 17, 26, 34, 43, 51, 60])
    ref = p(text=[text], videos=[data.load_frames(clip, 8)], video_metadata=[meta], return_tensors='pt')
    out = data.encode(s, tok, settings, None, qwen3_cfg(tok))
    assert out['input_ids'].tolist() == ref['input_ids'][0].tolist()
    assert out['timestamps'] == pytest.approx([0.15015, 0.7173833, 1.2846167, 1.85185])
    prompt = tok.decode(out['input_ids'])
    assert [f'<{t} seconds>' in prompt for t in ('0.2', '0.7', '1.3', '1.9')] == [True] * 4


def test_qwen3_processor_without_metadata_goes_wrong_ours_does_not(tok, tmp_path, monkeypatch):
    """The peers' bug (EasyR1 #599, ms-swift #6523, LlamaFactory #10335): the processor given the sampled
    frames but no video_metadata takes them as frames 0..7 of a 24 fps clip and writes <0.0>, <0.1>, <0.2>,
    <0.3 seconds> for a clip whose groups are at 0.3, 1.7, 3.0, 4.3 s. encode takes no metadata: it reads the
    clip's fps and sampled indices itself, so it cannot make this mistake."""
    clip, settings = write_video(tmp_path / 'c.mp4', n=29, fps=6), data.VisionSettings()
    p = qwen3_processor(tok, settings, monkeypatch)
    text = p.apply_chat_template([{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': 'Q'}]}],
                                 tokenize=False, add_generation_prompt=True).replace(WRAPPED, '<|video_pad|>')
    frames = data.load_frames(clip, 8)
    wrong = tok.decode(p(text=[text], videos=[frames], return_tensors='pt')['input_ids'][0])
    assert [f'<{t} seconds>' in wrong for t in ('0.0', '0.1', '0.2', '0.3', '1.7')] == [True] * 4 + [False]
    ours = tok.decode(data.encode(mcq(clip), tok, settings, None, qwen3_cfg(tok))['input_ids'])
    assert [f'<{t} seconds>' in ours for t in ('0.0', '0.1', '0.2', '0.3', '1.7', '3.0', '4.3')] == [False] * 3 + [
        True] * 4


def test_qwen3_encode_lengths_record_and_still_images(tok, vids, tmp_path):
    """sample_length counts the timestamp text without decoding; settings.record carries the timestamps'
    range (clip a: 16 frames at 8 fps, 4 sampled: 0.3125 and 1.5625 s); a still image has no time text."""
    from PIL import Image
    cfg = qwen3_cfg(tok)
    s = mcq(vids['a'])
    out = data.encode(s, tok, SMALL, s.solution, cfg)
    assert out['timestamps'] == [5 / 16, 25 / 16] and out['grid_thw'].tolist() == [[2, 2, 2]]  # 56 -> 64 = 2 x 32
    assert data.sample_length(s, tok, SMALL, 'solution', cfg) == len(out['input_ids'])
    assert SMALL.record([s], cfg) == dict(SMALL.asdict(), second_per_grid_ts=[1.25, 1.25], timestamps=[5 / 16, 25 / 16])
    assert 'timestamps' not in SMALL.record([s])
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    pic = np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(pic).save(tmp_path / 'x.png')
    img = data.encode(mcq(str(tmp_path / 'x.png')), tok, SMALL, None, cfg)
    assert 'timestamps' not in img and 'seconds' not in tok.decode(img['input_ids'])
    # Qwen3-VL's image processor: Qwen2-VL's with 16-pixel patches and mean = std = 0.5
    ip = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  min_pixels=SMALL.min_pixels, max_pixels=SMALL.max_pixels)
    ref = ip(images=[pic], return_tensors='pt')
    assert img['grid_thw'].tolist() == ref['image_grid_thw'].tolist() and img['pixel_values'].shape[1] == 1536
    assert (img['pixel_values'] - ref['pixel_values']).abs().max() <= 1e-5


def test_labels_cover_answer_and_im_end_only(tok, vids):
    target = '<think>x</think> <answer>B</answer>'
    out = data.encode(mcq(vids['a']), tok, SMALL, target)
    ids, labels = out['input_ids'], out['labels']
    kept = labels != -100
    assert tok.decode(labels[kept]) == target + '<|im_end|>'
    assert (labels[kept] == ids[kept]).all()
    assert kept.nonzero().max() == len(ids) - 2 and tok.decode(ids[-1:]) == '\n'  # trailing "\n" unlabelled
    assert tok.decode(ids[:int(kept.nonzero().min())]).endswith(
        '<|vision_end|>' + data.build_user_text(mcq('v')) + '<|im_end|>\n<|im_start|>assistant\n')
    prompt = data.encode(mcq(vids['a']), tok, SMALL, None)
    assert (prompt['labels'] == -100).all() and torch.equal(prompt['input_ids'], ids[:len(prompt['input_ids'])])
    assert tok.decode(prompt['input_ids']).endswith('<|im_start|>assistant\n')
    pos, nxt = rope_positions(ids, out['grid_thw'], ModelConfig(**tok.model_ids()))
    assert torch.equal(out['position_ids'], pos) and out['next_position'] == nxt


def test_build_user_text():
    s = mcq('v')
    assert data.build_user_text(s) == (
        'Which way, A or B?\nOptions:\nA. left\nB. right, then left\nInstructions: Please select the most appropriate '
        'answer from the options above and return only the option number (e.g. A, B, C or D).\nOutput the thinking '
        'process in <think> </think> and final answer in <answer> </answer> tags, i.e., <think> reasoning process '
        'here </think><answer> answer here </answer>.')
    r = data.Sample('r', 'v', 'route', 'reverse', 'Describe the route back.', answer='Turn back.',
                    answer_text='Turn back.')
    assert data.build_user_text(r) == 'Describe the route back.\n' + data.THINK_INSTRUCTION

# ----------------------------------------------------------------------------- readers

PRE = 'Please take a egocentric view to understand the following questions.'
INSTR = ('\n\nInstructions: Please select the most appropriate answer from the options above and return only the '
         'option number (e.g. A, B, C or D).')
LM_F = 'which landmarks (objects or scenery changes) did you pass by to reach your destination?'
LM_R = 'which landmarks (objects or scenery changes) did you pass by to return to the starting point?'
DIR_F = 'what directions do you need to go through to get to your destination?'
DIR_R = 'what directions do you need to go through to get to starting point ?'
ACT_F = 'which actions did you perform to reach your destination?'
ACT_R = 'which actions did you perform to return to the starting point?'


def st_line(problem, answer, cot_dir, first, opp, then, video):
    sol = (f"<think>Let's start by thinking {cot_dir} {first}{opp} And then think about {then} "
           f"Hence, the correct answer is {answer}</think> <answer>{answer}</answer>")
    return json.dumps(dict(problem=problem + INSTR, solution=sol, video=f'/vi-lab/Ego-ST-bench/r1_video/{video}',
                           original_question=problem + INSTR, original_answer=answer))


def st_r1_lines():
    return [  # the release's quirks, one per line
        st_line(f'{PRE} Based on this video, {LM_F} Options: A. toy birdhouse, B. ornamental birdfeeder., '
                'C. two-story treehouse', 'A', 'reverse', LM_R, "['toy birdhouse']", LM_F, 'a.mp4'),
        st_line(f'{PRE}Based on this video, {LM_R} Options: A. rusty swingset, B. toy birdhouse', 'B', 'forward', LM_F,
                ' toy birdhouse', LM_R, 'a.mp4'),
        st_line(f'{PRE}{PRE}Based on this video, {DIR_R} Options: A. Turn back, go straight, turn right, '
                'B. go straight', 'A', 'forward', DIR_F, ' go straight, turn left', DIR_R, 'b.mp4'),
        # CoT with landmark stems, as released
        st_line(f'{PRE} Based on this video, {DIR_F} Options: A. a, B. b, C. c, D. go straight turn left',
                'D', 'reverse', LM_R, "['Turn back', 'go straight', 'Turn right']", LM_F, 'b.mp4'),
        st_line(f'{PRE} Based on this video, {LM_F} Options: A. Walk straight, pick up the toy.', 'A', 'reverse', ACT_R,
                "['Walk straight', 'pick up the toy']", ACT_F, 'a.mp4'),  # forward action item with the landmark stem
        st_line(f'Please take an egocentric view to understand the following question. Based on this video, '
                f'{ACT_R} Options: A. put down the toy walk back, B. walk straight pick up the toy',
                'A', 'forward', ACT_F, ' Walk straight, pick up the toy', ACT_R, 'a.mp4'),
    ]


def test_read_st_r1_jsonl_quirks(tmp_path, vids):
    p = tmp_path / 'st.jsonl'
    p.write_text('\n'.join(st_r1_lines()) + '\n\n')
    s = data.read_st_r1_jsonl(str(p), video_root=vids['dir'])
    assert [(x.task, x.direction) for x in s] == [('landmark', 'forward'), ('landmark', 'reverse'),
                                                  ('direction', 'reverse'), ('direction', 'forward'),
                                                  ('action', 'forward'), ('action', 'reverse')]
    assert [x.options for x in s] == [['toy birdhouse', 'ornamental birdfeeder', 'two-story treehouse'],
                                      ['rusty swingset', 'toy birdhouse'],
                                      ['Turn back, go straight, turn right', 'go straight'],
                                      ['a', 'b', 'c', 'go straight turn left'],
                                      ['Walk straight, pick up the toy'],
                                      ['put down the toy walk back', 'walk straight pick up the toy']]
    assert [x.answer for x in s] == ['A', 'B', 'A', 'D', 'A', 'A']
    assert s[0].question == 'Based on this video, ' + LM_F
    assert s[2].question == 'Based on this video, what directions do you need to go through to get to starting point?'
    assert s[4].question == 'Based on this video, ' + ACT_F
    assert [x.opposite for x in s] == ['toy birdhouse', 'toy birdhouse', 'go straight, turn left',
                                       'Turn back, go straight, Turn right', 'Walk straight, pick up the toy',
                                       'Walk straight, pick up the toy']
    assert s[0].solution == (f"<think>Let's start by thinking reverse {LM_R} toy birdhouse And then think about {LM_F} "
                             "Hence, the correct answer is A</think> <answer>A</answer>")
    assert s[0].video == os.path.join(vids['dir'], 'a.mp4') and s[3].source == f'{p}:4' and s[3].id == 'st.jsonl:4'


def test_read_benchmark_layout(tmp_path, vids):
    for part in ('part1', 'part3_clip'):
        os.makedirs(tmp_path / part)
        os.link(vids['a'], tmp_path / part / 'v.mp4')
    files = {
        'Part1_forward_qa.json': {'0': {'video': 'v.mp4', 'question': 'Describe the route to your destination ?',
                                        'forward_answer': 'Go straight, turn left.'}},
        'Part1_reverse_qa.json': {'0': {'video': 'v.mp4', 'question': 'Describe the route back.',
                                        'reverse_answer': ['Turn back', 'turn right.']}},
        'Part1_forward_mcq.json': {'0': {'video': 'v.mp4', 'forward_mcq': {
            'question': 'q', 'options': ['A. go left', 'B. go right'], 'answer': 'A'}}},
        'Part1_reverse_mcq.json': {'0': {'video': 'v.mp4', 'reverse_mcq': {
            'question': 'q', 'options': ['turn back', 'turn right.'], 'correct_answer': 'Turn right'}}},
        'Part3_forward_mcq_landmark.json': {'7': {'video': 'v.mp4', 'forward_mcq': {
            'question': 'q', 'options': ['a', 'b', 'c'], 'gt': 2}}},
        'Part3_reverse_mcq_landmark.json': {'7': {'video': 'v.mp4', 'reverse_mcq': {
            'question': 'q', 'options': ['a', 'c'], 'label': '(B)'}}},
    }
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    s = {x.id: x for x in data.read_samples(str(tmp_path))}
    assert sorted(s) == sorted(f'{n[:-5]}#{k}' for n, o in files.items() for k in o)
    f, r = s['Part1_forward_qa#0'], s['Part1_reverse_qa#0']
    assert ((f.task, f.direction, f.answer, f.opposite, f.options)
            == ('route', 'forward', 'Go straight, turn left.', 'Turn back, turn right.', []))
    assert f.question == 'Describe the route to your destination?' and r.opposite == 'Go straight, turn left.'
    m = s['Part1_reverse_mcq#0']
    assert ((m.task, m.options, m.answer, m.answer_text, m.opposite)
            == ('direction', ['turn back', 'turn right'], 'B', 'turn right', 'go left'))
    assert (s['Part1_forward_mcq#0'].options == ['go left', 'go right']
            and s['Part1_forward_mcq#0'].opposite == 'turn right')
    lf, lr = s['Part3_forward_mcq_landmark#7'], s['Part3_reverse_mcq_landmark#7']
    assert (lf.task, lf.answer, lr.answer, lf.opposite) == ('landmark', 'C', 'B', 'c')
    assert (lf.video == str(tmp_path / 'part3_clip' / 'v.mp4')
            and lf.source == f"{tmp_path / 'Part3_forward_mcq_landmark.json'}#7")

def test_cot_target_of_a_benchmark_sample_reads_back(tmp_path):
    """A benchmark-layout sample has no solution: cot_target writes the reverse-thinking CoT from the
    opposite direction's question and ground truth, in the template the JSONL reader parses back."""
    import egoworld
    from reward import COT
    egoworld.generate_split(str(tmp_path / 'split'), 0, 1)
    samples = data.read_samples(str(tmp_path / 'split'))
    assert len(samples) == 8 and all(s.solution is None for s in samples)
    for s in samples:
        cot = data.cot_target(s)
        m = COT.search(cot)
        other = 'reverse' if s.direction == 'forward' else 'forward'
        assert m.groups() == (other, s.opposite_question, s.opposite, s.question), cot
        assert cot.endswith(f'</think> <answer>{s.answer}</answer>')
    s.opposite = None
    with pytest.raises(data.DataError, match='--cot=False'):
        data.cot_target(s)

def test_forward_only_cot_reads_with_the_paired_opposite(tmp_path):
    """A thought that states the question's own route (egoworld's cot_reverse=False, the forward-only
    ablation) is read, and the sample's opposite comes from the paired opposite-direction question, not
    from the thought."""
    import egoworld
    from reward import COT
    egoworld.generate_split(str(tmp_path / 'split'), 0, 1, cot_opts=dict(cot_reverse=False))
    samples = data.read_samples(str(tmp_path / 'split' / 'st_r1_cot.jsonl'))
    by = {(s.task, s.direction): s for s in samples}
    for (task, d), s in by.items():
        other = by[task, 'reverse' if d == 'forward' else 'forward']
        stated = COT.search(s.solution).group(3)
        assert f"thinking {d} " in s.solution and stated == s.answer_text and s.opposite == other.answer_text

# ----------------------------------------------------------------------------- bad input

def good_line():
    return st_r1_lines()[0]


def bad_lines(vids, tmp_path):
    d = json.loads(good_line())
    corrupt = tmp_path / 'corrupt.mp4'
    corrupt.write_bytes(b'\x00\x00\x00\x18ftypmp42' + os.urandom(500))
    return {
        'malformed JSON': good_line()[:-5],
        "missing field(s) ['video']": json.dumps({k: v for k, v in d.items() if k != 'video'}),
        "answer 'D' is not among the options ABC": (
            good_line().replace('is A</think> <answer>A</answer>', 'is D</think> <answer>D</answer>')
                       .replace('"original_answer": "A"', '"original_answer": "D"')),
        'empty options': json.dumps({**d, 'problem': d['problem'].split(' Options:')[0] + ' Options: ' + INSTR}),
        'video not found': json.dumps({**d, 'video': '/x/missing.mp4'}),
        'cannot open video': json.dumps({**d, 'video': '/x/corrupt.mp4'}),
    }


def test_bad_jsonl_lines_named_and_collected(tmp_path, vids):
    os.link(vids['a'], tmp_path / 'a.mp4')
    for i, (what, line) in enumerate(bad_lines(vids, tmp_path).items()):
        p = tmp_path / f'f{i}.jsonl'
        p.write_text(good_line() + '\n' + line + '\n' + good_line() + '\n')
        with pytest.raises(data.DataError, match=re.escape(f'f{i}.jsonl:2: ') + '.*' + re.escape(what)):
            data.read_st_r1_jsonl(str(p), video_root=str(tmp_path))
        samples, errors = data.read_st_r1_jsonl(str(p), video_root=str(tmp_path), strict=False)
        assert [x.source for x in samples] == [f'{p}:1', f'{p}:3'] and len(errors) == 1 and what in errors[0]


def test_bad_benchmark_items(tmp_path, vids):
    os.makedirs(tmp_path / 'part2')
    os.link(vids['a'], tmp_path / 'part2' / 'v.mp4')
    good = {'video': 'v.mp4', 'forward_mcq': {'question': 'q', 'options': ['x', 'y'], 'answer': 'B'}}
    items = {'ok': good,
             'nokey': {'video': 'v.mp4', 'forward_mcq': {'question': 'q', 'options': ['x', 'y'], 'truth': 'B'}},
             'text': {'video': 'v.mp4', 'forward_mcq': {'question': 'q', 'options': ['x', 'y'], 'answer': 'z'}},
             'empty': {'video': 'v.mp4', 'forward_mcq': {'question': 'q', 'options': [], 'answer': 'A'}},
             'novideo': {**good, 'video': 'w.mp4'}}
    (tmp_path / 'Part2_forward_mcq.json').write_text(json.dumps(items))
    (tmp_path / 'Part2_reverse_mcq.json').write_text('{"0": {')
    samples, errors = data.read_benchmark(str(tmp_path), strict=False)
    assert [x.id for x in samples] == ['Part2_forward_mcq#ok'] and len(errors) == 5
    f = str(tmp_path / 'Part2_forward_mcq.json')
    assert errors[0].startswith(f"{tmp_path / 'Part2_reverse_mcq.json'}: malformed JSON") and 'line 1' in errors[0]
    assert (errors[1].startswith(f"{f}#nokey: no correct-option field")
            and "['options', 'question', 'truth']" in errors[1])
    assert errors[2].startswith(f'{f}#text: answer ') and errors[3] == f'{f}#empty: empty options'
    assert errors[4] == f"{f}#novideo: {tmp_path / 'part2' / 'w.mp4'}: video not found"
    with pytest.raises(data.DataError, match='Part2_reverse_mcq.json: malformed JSON'):
        data.read_benchmark(str(tmp_path))
    os.remove(tmp_path / 'Part2_reverse_mcq.json')
    with pytest.raises(data.DataError, match='nokey: no correct-option field'):
        data.read_benchmark(str(tmp_path))


def test_frame_cache_keeps_least_recently_used_within_bytes():
    loads = []

    def loader(key, nbytes):
        return lambda: loads.append(key) or np.zeros(nbytes, np.uint8)
    c = data.FrameCache(max_bytes=200)
    a = c.get('a', loader('a', 100))
    assert not a.flags.writeable  # shared between samples: nobody may write into it
    c.get('b', loader('b', 100))
    assert c.get('a', loader('a', 100)) is a  # a hit: no load, and 'a' is now the most recent
    c.get('c', loader('c', 100))  # over 200 bytes: 'b', the least recently used, goes
    c.get('a', loader('a', 100))
    c.get('b', loader('b', 100))
    assert loads == ['a', 'b', 'c', 'b'] and c.used == 200 and list(c.items) == ['a', 'b']
    c.get('big', loader('big', 300))  # larger than the whole cache: returned, not kept
    assert list(c.items) == ['a', 'b'] and c.used == 200
    c.get('big', loader('big', 300))
    assert loads[-2:] == ['big', 'big']


def test_encode_through_cache_is_the_same_and_decodes_once(tok, vids, monkeypatch):
    calls = []
    real = data.load_frames
    monkeypatch.setattr(data, 'load_frames', lambda path, n: calls.append((path, n)) or real(path, n))
    plain = data.encode(mcq(vids['a']), tok, SMALL, '<answer>B</answer>')
    cache = data.FrameCache(max_bytes=SMALL.nframes * 64 * 64 * 3)  # room for one 64x64 clip
    first = data.encode(mcq(vids['a']), tok, SMALL, '<answer>B</answer>', cache=cache)
    again = data.encode(mcq(vids['a']), tok, SMALL, '<answer>A</answer>', cache=cache)
    for k in ('input_ids', 'labels', 'position_ids', 'pixel_values', 'grid_thw'):
        assert torch.equal(first[k], plain[k])
    assert torch.equal(again['pixel_values'], plain['pixel_values'])
    assert calls == [(vids['a'], 4)] * 2  # the plain encode and the first cached one; the second was a hit
    data.encode(mcq(vids['b']), tok, SMALL, cache=cache)  # pushes clip a out
    data.encode(mcq(vids['a']), tok, SMALL, cache=cache)
    assert calls[2:] == [(vids['b'], 4), (vids['a'], 4)]
    more = data.VisionSettings(nframes=8, min_pixels=SMALL.min_pixels, max_pixels=SMALL.max_pixels)
    big = data.FrameCache(2**20)
    data.encode(mcq(vids['a']), tok, SMALL, cache=big)
    e8 = data.encode(mcq(vids['a']), tok, more, cache=big)  # frames are cached per (video, nframes)
    assert calls[-2:] == [(vids['a'], 4), (vids['a'], 8)] and e8['grid_thw'][0, 0] == 4


def test_undecodable_video_at_encode_names_sample(tmp_path, tok, vids):
    d = open(vids['a'], 'rb').read()
    (tmp_path / 't.mp4').write_bytes(d[:len(d) // 2])  # moov atom at the end: the container cannot be opened
    s = mcq(str(tmp_path / 't.mp4'))
    with pytest.raises(data.DataError, match=r't:1 \(s1\): .*t.mp4: cannot open video'):
        data.encode(s, tok, SMALL)

# ----------------------------------------------------------------------------- packing and the loader

def tiny_model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=10000.0,
                      vision_depth=2, vision_embed_dim=32, vision_num_heads=2, **tok.model_ids())
    torch.manual_seed(0)
    return Qwen2VL(cfg).eval()


def run(model, b):
    return model(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])


def seq_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction='sum')


def test_packed_sample_same_logits_and_loss_as_alone(tok, vids):
    model = tiny_model(tok)
    a = data.encode(mcq(vids['a']), tok, SMALL, '<think>left</think> <answer>A</answer>')
    r = data.Sample('r', vids['b'], 'route', 'reverse', 'Describe the route back.', answer='Turn back.',
                    answer_text='Turn back.')
    b = data.encode(r, tok, SMALL, 'Turn back, then left.')
    packed = data.pack([b, a])
    assert (packed['cu_seqlens'].dtype == torch.int32
            and packed['cu_seqlens'].tolist() == [0, len(b['input_ids']), len(b['input_ids']) + len(a['input_ids'])])
    assert packed['grid_thw'].tolist() == [[2, 2, 4], [2, 4, 4]] and packed['ids'] == ['r', 's1']
    n = len(b['input_ids'])
    assert torch.equal(packed['position_ids'], torch.cat([b['position_ids'], a['position_ids']], 1))
    alone = lambda x: dict(x, cu_seqlens=torch.tensor([0, len(x['input_ids'])], dtype=torch.int32))
    with torch.no_grad():
        alone_a, alone_b, both = run(model, alone(a)), run(model, alone(b)), run(model, packed)
    assert (both[n:] - alone_a).abs().max() < 1e-5 and (both[:n] - alone_b).abs().max() < 1e-5
    la, lb = seq_loss(alone_a, a['labels']), seq_loss(alone_b, b['labels'])
    assert abs(float(seq_loss(both, packed['labels']) - (la + lb))) < 1e-4  # one shift over the pack is safe


def test_batches_deterministic_disjoint_budgeted(tok, vids):
    samples = [data.Sample(f's{i}', vids['a' if i % 2 else 'b'], 'route', 'forward',
                           'Describe the route' + ' again' * i, answer='Go.', answer_text='Go.',
                           solution=f'<answer>Go {i}.</answer>') for i in range(10)]
    lengths = [data.sample_length(s, tok, SMALL, 'solution') for s in samples]
    assert lengths[3] == len(data.encode(samples[3], tok, SMALL, samples[3].solution)['input_ids'])
    budget = max(lengths) * 3

    def ids(**kw):
        out = []
        for b in data.batches(samples, tok, SMALL, budget, **kw):
            assert len(b['input_ids']) <= budget and b['cu_seqlens'][-1] == len(b['input_ids'])
            out.append(b['ids'])
        return out
    torch.manual_seed(0)
    one = ids(seed=1, rank=0, world_size=1, num_workers=0)
    # global RNG untouched
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    assert sorted(sum(one, [])) == sorted(s.id for s in samples) and len(one) >= 4
    assert ids(seed=1, rank=0, world_size=1, num_workers=2) == one  # workers: same batches, same order
    cache = data.FrameCache(2**20)
    assert ids(seed=1, rank=0, world_size=1, num_workers=0, cache=cache) == one
    assert sorted(k[0] for k in cache.items) == sorted([vids['a'], vids['b']])  # decoded here, kept for the next epoch
    assert ids(seed=2, rank=0, world_size=1, num_workers=0) != one
    assert ids(seed=1, epoch=1, rank=0, world_size=1, num_workers=0) != one
    r0, r1 = ids(seed=1, rank=0, world_size=2, num_workers=0), ids(seed=1, rank=1, world_size=2, num_workers=0)
    assert len(r0) == len(r1) == len(one) // 2 and not set(sum(r0, [])) & set(sum(r1, []))
    assert r0 == one[0:2 * len(r0):2] and r1 == one[1:2 * len(r1):2]
    with pytest.raises(data.DataError, match='no opposite to use as target'):
        data.batches(samples, tok, SMALL, budget, rank=0, world_size=1, target='opposite')
