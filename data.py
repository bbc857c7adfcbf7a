"""
Everything between files on disk and a packed batch: Ego-ST samples, Qwen2-VL's video and prompt
pipeline, the reverse-thinking CoT, and the loader. SFT, GRPO and bench all go through `encode`, so
frames, pixel budget and prompt are decided once (VisionSettings, PROMPT_VERSION) and written into every
output with `settings.record(samples, cfg)` (with the range of Qwen2.5-VL's second_per_grid_ts over the
clips, and for Qwen3-VL the range of the "<t seconds>" its prompts write).

    samples = read_samples('data_egoworld/train/st_r1_cot.jsonl')     # or a benchmark-layout folder
    item = encode(samples[0], Tokenizer(ckpt), VisionSettings(), target=samples[0].solution)
    batch = pack([item, ...])                      # input_ids (T,), cu_seqlens (B+1,), pixel_values, ...
    loader = batches(samples, tok, settings, token_budget=4096)       # packed, seeded, a share per rank

Video: decord decodes only the sampled frames; pixel_values and grid_thw equal transformers' Qwen2-VL
processors (the tests' oracle); second_per_grid_ts comes from the frames actually sampled (seconds_per_grid).
Qwen3-VL (encode's cfg): 16-pixel patches normalised to [-1, 1], and a video's prompt is its processor's, one
"<t seconds>" + visual block per frame group, t from the sampled frame indices and the clip's own fps
(frame_timestamps; never a default fps).
Text: tokenizer.json through `tokenizers`, Qwen2-VL's chat template with its default system prompt, the
loss on the assistant's tokens only. Bad input raises DataError
naming file:line or file#id and what is wrong; readers with strict=False return (samples, errors).

Left out on purpose: fps-based sampling and per-video pixel budgets (the paper uses 8 frames a clip),
multi-turn chats, several videos a sample, padding and attention masks (packed only).
"""
import ast
import collections
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # we parallelise with DataLoader workers (fork)
import decord
import numpy as np
import tokenizers
import torch
from PIL import Image

from common import write_json
from model import ModelConfig, rope_positions
from reward import COT, LETTERS, cot_text

# -----------------------------------------------------------------------------
# settings (written into every checkpoint and prediction file)

PROMPT_VERSION = 'egost-v1'  # bump whenever build_user_text or the chat layout changes

@dataclass
class VisionSettings:
    nframes: int = 8                  # frames per clip, the paper's setting
    min_pixels: int = 128 * 28 * 28   # per frame; the paper's evaluation setting (qwen-vl-utils VIDEO_MIN_PIXELS)
    max_pixels: int = 360 * 420       # per frame; 151,200 -> at most 190 merged tokens per 2-frame group
    prompt_version: str = PROMPT_VERSION

    def asdict(self):
        return asdict(self)

    def record(self, samples, cfg=None):
        """asdict() plus [min, max] of the clips' second_per_grid_ts (None without videos), from the clips'
        headers (no decoding): what checkpoints, predictions and metrics carry, so that a train/eval
        difference in the sampled frame rate shows. A Qwen3-VL cfg adds `timestamps`: [min, max] of the
        seconds its prompts write (sample_timestamps)."""
        videos = [s for s in samples if not is_image(s.video)]
        secs = sorted({second_per_grid(s, self) for s in videos})
        out = dict(self.asdict(), second_per_grid_ts=[secs[0], secs[-1]] if secs else None)
        if cfg is not None and cfg.qwen3:
            ts = [t for s in videos for t in sample_timestamps(s, self)]
            out['timestamps'] = [min(ts), max(ts)] if ts else None
        return out

PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2     # Qwen2(.5)-VL's vision tower; Qwen3-VL's patch is 16 (cfg.patch_size)
FACTOR = PATCH * MERGE                      # frame sides are multiples of 28 (Qwen3-VL: 32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
HALF = np.full(3, 0.5, dtype=np.float32)    # Qwen3-VL's processors normalise with mean = std = 0.5
DECODE_THREADS = 1  # decord threads per process: parallelism comes from DataLoader workers instead
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')

class DataError(ValueError):
    """Bad input: the message names the file, line or sample and what is wrong."""

# -----------------------------------------------------------------------------
# video -> pixel_values, grid_thw

def frame_indices(num_frames, nframes):
    """N indices spread uniformly over the whole clip, first and last frame included (rounded: the
    release truncated, which drifts towards the start)."""
    return np.round(np.linspace(0, num_frames - 1, nframes)).astype(np.int64)

def seconds_per_grid(indices, fps):
    """Qwen2.5-VL's second_per_grid_ts: the seconds between two consecutive frame groups of the frames
    actually sampled = temporal_patch_size * mean spacing of the sampled indices / the clip's fps, a float
    (never rounded: the M-RoPE time ids are floor(group * tokens_per_second * this), model.rope_positions).
    transformers' processor and qwen-vl-utils use temporal_patch_size * total frames / (N * fps) instead,
    which equals this only when the N indices are total / N apart (first in, last out)."""
    spacing = (indices[-1] - indices[0]) / (len(indices) - 1) if len(indices) > 1 else 1  # one frame: unused
    return float(TEMPORAL_PATCH * spacing / fps)

def frame_timestamps(indices, fps):
    """Qwen3-VL's "<t seconds>" of each frame group: the mean of its first and last frame's time, index / the
    clip's fps, computed as its processor does (an odd count repeats the last frame, as the pixels do).
    The processor without video_metadata takes the frames it is given as indices 0..N-1 at 24 fps."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % TEMPORAL_PATCH)
    return [float((idx[i] / fps + idx[i + TEMPORAL_PATCH - 1] / fps) / 2) for i in range(0, len(idx), TEMPORAL_PATCH)]

def sample_timestamps(sample, settings):
    """frame_timestamps of a sample's clip as encode samples it (header only); [] for a still image."""
    if is_image(sample.video):
        return []
    num_frames, _, _, fps = video_info(sample.video)
    return frame_timestamps(frame_indices(num_frames, settings.nframes), fps)

def second_per_grid(sample, settings):
    """seconds_per_grid of a sample's clip as encode samples it; 0.0 for a still image (one frame, no time)."""
    if is_image(sample.video):
        return 0.0
    num_frames, _, _, fps = video_info(sample.video)
    return seconds_per_grid(frame_indices(num_frames, settings.nframes), fps)

def _open_video(path):
    if not os.path.isfile(path):
        raise DataError(f'{path}: video not found')
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECODE_THREADS)
    except Exception as e:  # decord raises RuntimeError/DECORDError with ffmpeg's message
        raise DataError(f'{path}: cannot open video ({str(e).splitlines()[0]})') from e
    if len(vr) == 0:
        raise DataError(f'{path}: video has no frames')
    return vr

def _decode(path, vr, indices):
    try:
        return vr.get_batch(indices).asnumpy()
    except Exception as e:
        raise DataError(f'{path}: cannot decode frames ({str(e).splitlines()[0]})') from e

def load_frames(path, nframes):
    """uint8 (N, H, W, 3) RGB. Only the sampled frames are decoded (seek + decode from the previous key frame)."""
    vr = _open_video(path)
    return _decode(path, vr, frame_indices(len(vr), nframes).tolist())

def load_image(path):
    """uint8 (1, H, W, 3): a still image is a one-frame video."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))[None]
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: cannot read image ({e})') from e

def is_image(path):
    return path.lower().endswith(IMAGE_EXTS)

_VIDEO_INFO = {}
def video_info(path):
    """(num_frames, height, width, fps) without decoding the clip (frame 0 only); cached per path.
    An image: (1, height, width, None)."""
    if path not in _VIDEO_INFO:
        if is_image(path):
            try:
                with Image.open(path) as im:
                    _VIDEO_INFO[path] = (1, im.height, im.width, None)
            except OSError as e:
                raise DataError(f'{path}: cannot read image ({e})') from e
        else:  # decord exposes no header size; frame 0 is a key frame, cheap to decode
            vr = _open_video(path)
            fps = vr.get_avg_fps()
            if not fps > 0:  # the M-RoPE time base needs it (seconds_per_grid)
                raise DataError(f'{path}: video header has no frame rate ({fps})')
            _VIDEO_INFO[path] = (len(vr), *_decode(path, vr, [0]).shape[1:3], float(fps))
    return _VIDEO_INFO[path]

def smart_resize(height, width, min_pixels, max_pixels, factor=FACTOR):
    """Qwen2-VL's rule: sides become multiples of `factor`, area lands in [min_pixels, max_pixels],
    aspect ratio kept as well as possible."""
    if max(height, width) / min(height, width) > 200:
        raise DataError(f'frame {height}x{width}: aspect ratio above 200')
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w

def pixel_format(cfg):
    """(patch side, mean, std) of the family's processors: Qwen2(.5)-VL 14 and CLIP's, Qwen3-VL 16 and 0.5."""
    return (cfg.patch_size, HALF, HALF) if cfg is not None and cfg.qwen3 else (PATCH, CLIP_MEAN, CLIP_STD)

def visual_grid(num_frames, height, width, settings, cfg=None):
    """grid_thw (t, h, w) in patches for N frames of H x W, before decoding anything."""
    patch = pixel_format(cfg)[0]
    h, w = smart_resize(height, width, settings.min_pixels, settings.max_pixels, patch * MERGE)
    return -(-num_frames // TEMPORAL_PATCH), h // patch, w // patch

def preprocess_frames(frames, settings, cfg=None):
    """uint8 (N, H, W, 3) -> pixel_values float32 (t*h*w, 3*2*p*p), grid_thw long (1, 3): resized to
    smart_resize's sides, scaled to [0, 1], normalised, padded to an even frame count, and cut into
    patches in the order of transformers' Qwen2-VL / Qwen3-VL processors (p, mean, std: pixel_format(cfg)).
    PIL bicubic is the kernel of transformers' PIL image processor (the tests' oracle); torchvision's
    (its video processors, qwen-vl-utils) differs by a few grey levels at edges (benchmarks/data_speed.py).
    The pixel budget is per frame; Qwen3-VL's video processor states it per clip (its size x N frames)."""
    patch, mean, std = pixel_format(cfg)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise DataError(f'frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}')
    n, height, width, _ = frames.shape
    H, W = smart_resize(height, width, settings.min_pixels, settings.max_pixels, patch * MERGE)
    if (H, W) != (height, width):  # PIL returns an unchanged copy at the same size: skip the round trip
        frames = np.stack([np.asarray(Image.fromarray(f).resize((W, H), Image.BICUBIC)) for f in frames])
    x = (frames.astype(np.float32) / 255 - mean) / std
    if n % TEMPORAL_PATCH:  # an odd count repeats its last frame (a still image becomes 2 equal frames)
        x = np.concatenate([x, np.repeat(x[-1:], TEMPORAL_PATCH - n % TEMPORAL_PATCH, 0)])
    t, gh, gw = len(x) // TEMPORAL_PATCH, H // patch, W // patch
    x = x.reshape(t, TEMPORAL_PATCH, gh // MERGE, MERGE, patch, gw // MERGE, MERGE, patch, 3)
    # -> (t, gh/2, gw/2, 2, 2 | channel, temporal, row, col): rows are patches, and each 2x2 merge window's
    # four are adjacent, so the vision tower's merger concatenates neighbours
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(t * gh * gw, 3 * TEMPORAL_PATCH * patch * patch)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([[t, gh, gw]])

# -----------------------------------------------------------------------------
# tokenizer and chat format

SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
                  '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
                  '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>']  # Qwen2-VL's, in id order
SYSTEM_PROMPT = 'You are a helpful assistant.'
# Qwen2-VL-Instruct's chat template, written into the tokenizer dirs we build (transformers needs it).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split (tokenizer.json of the released models)
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The phrase split: pieces end only at punctuation, newlines and tags, so BPE may merge whole phrases
# ("turn left", " pink window", the fixed instructions) into one token. For tiny models trained from
# scratch on a closed world, where sequence length is the compute budget (see build_tokenizer).
# "=" splits too: egoworld's cot_check pairs "turn left = turn right" must stay two items, not one
# merged token (measured: MCQ 48.5% avg with the split vs 37.8% merged, 1,400 SFT steps; README).
PHRASE_SPLIT = r"""</?[a-z]+>|[\r\n]+|[,.?:!()=]"""
SENTENCE_START = r""" (?=[A-Z])"""  # and a capitalised word starts a new piece ("... turn left| And then ...")

class Tokenizer:
    """tokenizer.json (a file or the directory holding it) through the `tokenizers` library."""
    def __init__(self, path):
        self.path = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
        if not os.path.isfile(self.path):
            raise DataError(f'{self.path}: tokenizer.json not found')
        self.tk = tokenizers.Tokenizer.from_file(self.path)
        def tid(token):
            i = self.tk.token_to_id(token)
            if i is None:
                raise DataError(f'{self.path}: special token {token} missing (not a Qwen2-VL tokenizer?)')
            return i
        self.im_start_id, self.im_end_id = tid('<|im_start|>'), tid('<|im_end|>')
        self.vision_start_id, self.vision_end_id = tid('<|vision_start|>'), tid('<|vision_end|>')
        self.image_pad_id, self.video_pad_id = tid('<|image_pad|>'), tid('<|video_pad|>')
        self.pad_id = tid('<|endoftext|>')
        self.eos_id = self.im_end_id  # the chat model ends its turn with <|im_end|>
        self.vocab_size = self.tk.get_vocab_size()

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def model_ids(self):
        """The token ids a ModelConfig needs for this tokenizer."""
        return dict(image_token_id=self.image_pad_id, video_token_id=self.video_pad_id, bos_token_id=self.pad_id,
                    vision_start_token_id=self.vision_start_id, vision_end_token_id=self.vision_end_id,
                    eos_token_id=self.eos_id)

def write_preprocessor_config(out_dir, settings, cfg=None):
    """preprocessor_config.json as released with Qwen2-VL (or Qwen3-VL: cfg), with our pixel budget."""
    patch, mean, std = pixel_format(cfg)
    cfg = dict(image_processor_type='Qwen2VLImageProcessor',
               processor_class='Qwen3VLProcessor' if cfg is not None and cfg.qwen3 else 'Qwen2VLProcessor',
               min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, patch_size=patch,
               temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE, image_mean=mean.tolist(),
               image_std=std.tolist(), do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, do_convert_rgb=True)
    write_json(os.path.join(out_dir, 'preprocessor_config.json'), cfg)

def build_tokenizer(texts, vocab_size, out_dir, settings=None, phrases=False):
    """Train a small byte-level BPE laid out like Qwen2's (the 14 special tokens after the learned
    vocabulary) and write tokenizer.json, tokenizer_config.json (with the chat template),
    chat_template.json and preprocessor_config.json, which transformers loads. Returns a Tokenizer.
    phrases=False: Qwen2's pre-tokenizer split (words never merge). phrases=True: PHRASE_SPLIT, so
    frequent multi-word phrases become single tokens; on EgoWorld text this makes a training sample
    ~2.2x shorter (~160 tokens, not ~350), ~2x more samples a second on a CPU, and a route step one token."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    split = [pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior='isolated')] if not phrases else [
        pre_tokenizers.Split(tokenizers.Regex(PHRASE_SPLIT), behavior='isolated'),
        pre_tokenizers.Split(tokenizers.Regex(SENTENCE_START), behavior='merged_with_next')]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.pre_tokenizer = pre_tokenizers.Sequence(split + [byte_level])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, 'tokenizer.json'))
    # transformers' Qwen2Tokenizer rebuilds Qwen2's own split; the generic class keeps the file's
    config = dict(tokenizer_class='PreTrainedTokenizerFast' if phrases else 'Qwen2Tokenizer', eos_token='<|im_end|>',
                  pad_token='<|endoftext|>', bos_token=None,
                  unk_token=None, errors='replace', model_max_length=32768, split_special_tokens=False,
                  clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
    for name, obj in (('tokenizer_config.json', config), ('chat_template.json', {'chat_template': CHAT_TEMPLATE})):
        write_json(os.path.join(out_dir, name), obj)
    write_preprocessor_config(out_dir, settings or VisionSettings())
    return Tokenizer(out_dir)

VISUAL_SPECIAL_TOKENS = ('<|vision_start|>', '<|vision_end|>', '<|image_pad|>', '<|video_pad|>')

def chat_tokens(tok, user_text, n_visual, target=None, image=False, timestamps=None):
    """One system/user(/assistant) chat with its visual block first, as Qwen2-VL's template writes it.
    timestamps (Qwen3-VL videos): one "<t seconds>" + block per frame group instead, as the release's
    processor writes it (the template's <|vision_start|><|video_pad|><|vision_end|> replaced whole;
    transformers 5 keeps that outer pair, test_data pins the difference), n_visual split evenly.
    Returns (input_ids, labels) lists; target None ends the prompt at "<|im_start|>assistant\\n".
    Labels are the assistant's tokens and its closing <|im_end|> (generation stops there; the "\\n"
    after it is glue and stays out), -100 elsewhere, NOT shifted (HF's convention): CE(logits[:-1],
    labels[1:]) over a packed batch never crosses a sequence, as each starts with an unlabelled token."""
    for name, text in (('question', user_text), ('target', target or '')):
        found = [t for t in VISUAL_SPECIAL_TOKENS if t in text]
        if found:  # it would be one more visual block, or a pad without features: the model's inputs break
            raise DataError(f'the {name} holds {", ".join(found)}: only the processor places visual tokens')
    pad = '<|image_pad|>' if image else '<|video_pad|>'
    blocks = [''] if timestamps is None else [f'<{t:.1f} seconds>' for t in timestamps]
    vision = ''.join(f'{b}<|vision_start|>{pad}<|vision_end|>' for b in blocks)
    prompt = (f'<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n'
              f'{vision}{user_text}<|im_end|>\n<|im_start|>assistant\n')
    text = prompt if target is None else prompt + target + '<|im_end|>\n'
    enc = tok.tk.encode(text, add_special_tokens=False)  # one pass over the whole text, like transformers
    ids, end = enc.ids, len(text) - 1
    labels = [i if len(prompt) <= s < end else -100 for i, (s, _) in zip(ids, enc.offsets)]
    pad_id, per = tok.image_pad_id if image else tok.video_pad_id, n_visual // len(blocks)
    out_ids, out_labels = [], []  # each placeholder in the text expanded in id space to its merged tokens
    for i, l in zip(ids, labels):
        out_ids += [i] * per if i == pad_id else [i]
        out_labels += [-100] * per if i == pad_id else [l]
    return out_ids, out_labels

# -----------------------------------------------------------------------------
# samples and the one prompt

MCQ_INSTRUCTION = ('Instructions: Please select the most appropriate answer from the options above and return only '
                   'the option number (e.g. A, B, C or D).')  # the release's sentence, kept verbatim
THINK_INSTRUCTION = ('Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, '
                     'i.e., <think> reasoning process here </think><answer> answer here </answer>.')

@dataclass
class Sample:
    id: str
    video: str
    task: str            # 'route' | 'direction' | 'landmark' | 'action'
    direction: str       # 'forward' | 'reverse'
    question: str
    options: list = field(default_factory=list)   # [] for route
    answer: str = ''     # letter for MCQ, text for route
    answer_text: str = ''
    opposite: str = None  # ground truth of the opposite-direction question on the same video
    opposite_question: str = None  # that question (benchmark layout; the CoT names it)
    solution: str = None  # reference CoT target <think>...</think><answer>...</answer>
    source: str = ''     # "file:line" or "file#id"

def build_user_text(sample):
    """The user turn for every stage (SFT, GRPO, bench)."""
    lines = [sample.question]
    if sample.options:
        lines += ['Options:'] + [f'{L}. {o}' for L, o in zip(LETTERS, sample.options)] + [MCQ_INSTRUCTION]
    return '\n'.join(lines + [THINK_INSTRUCTION])

# -----------------------------------------------------------------------------
# readers

PREFIX = re.compile(r'^(?:\s*Please take an? egocentric view to understand the following questions?\.)+\s*')
ANSWER_KEYS = ('answer', 'correct_answer', 'correct_option', 'correct', 'gt', 'ground_truth', 'gt_answer',
               'label', 'answer_idx', 'answer_index', 'correct_choice', 'answer_letter')
BENCH_FILE = re.compile(r'^Part(\d+)_(forward|reverse)_(qa|mcq|mcq_landmark|mcq_action)\.json$')
BENCH_TASK = {'qa': 'route', 'mcq': 'direction', 'mcq_landmark': 'landmark', 'mcq_action': 'action'}
ACTION_FORWARD = 'which actions did you perform to reach your destination?'

def clean_text(s):
    """Collapse whitespace and drop the space before punctuation ("starting point ?")."""
    return re.sub(r'\s+([?.,!])', r'\1', ' '.join(str(s).split()))

def clean_option(s):
    return clean_text(s).rstrip('.').strip()  # the release ends some options with "."

def classify_question(text):
    """(task, direction) from an Ego-ST question stem; None where it cannot tell."""
    s = text.lower()
    task = ('action' if 'action' in s else 'landmark' if 'landmark' in s else 'direction' if 'direction' in s
            else 'route' if re.search(r'route|describe|how (do|did|can) you (get|go|return)', s) else None)
    direction = ('reverse' if re.search(r'\bto (the )?starting point|\breturn', s)
                 else 'forward' if 'destination' in s else None)
    return task, direction

def split_inline_options(text):
    """' A. x, B. y, C. z' -> ['x', 'y', 'z']. Options may contain commas, so split only at the
    next expected letter marker (", B. " after A, and so on)."""
    m = re.match(r'\s*A\.\s', text)
    if not m:
        return []
    opts, pos = [], m.end()
    for letter in LETTERS[1:]:
        nxt = re.compile(rf',\s*{letter}\.\s').search(text, pos)
        if not nxt:
            break
        opts.append(text[pos:nxt.start()])
        pos = nxt.end()
    return [clean_option(o) for o in opts + [text[pos:]]]

def clean_listish(v):
    """A list, or its Python repr as in the release's CoT ("['Turn back', 'go straight']"),
    -> 'Turn back, go straight'."""
    if isinstance(v, str) and v.strip().startswith('['):
        try:
            v = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            pass
    return ', '.join(clean_text(x) for x in v) if isinstance(v, list) else clean_text(v)

def check_mcq(where, options, answer):
    if not options or any(not o for o in options):
        raise DataError(f'{where}: empty options' + (f' ({options})' if options else ''))
    if answer not in LETTERS[:len(options)]:
        raise DataError(f'{where}: answer {answer!r} is not among the options {LETTERS[:len(options)]}')

def cot_target(sample):
    """The reverse-thinking CoT SFT trains on: the sample's own solution (ST-R1 JSONL), else written from
    the opposite direction's question and ground truth (benchmark layout)."""
    if sample.solution:
        return sample.solution
    if not sample.opposite or not sample.opposite_question:
        raise DataError(f'{sample.source} ({sample.id}): no solution and no opposite-direction question to '
                        f'write the reverse-thinking CoT from; train it with --cot=False')
    conclusion = f'the correct answer is {sample.answer}' if sample.options else 'reversing it gives the route.'
    other = 'reverse' if sample.direction == 'forward' else 'forward'
    return cot_text(other, sample.opposite_question, sample.opposite, sample.question, conclusion, sample.answer)

def parse_st_r1_item(d, where, base_dir, video_root=None):
    """One ST-R1 JSONL object -> Sample. Optional 'task'/'direction' fields override the stem."""
    if not isinstance(d, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(d).__name__}')
    missing = [k for k in ('problem', 'solution', 'video', 'original_answer') if k not in d]
    if missing:
        raise DataError(f'{where}: missing field(s) {missing}; keys found: {sorted(d)}')
    body = str(d['problem']).split('\n\nInstructions:')[0]
    m = re.search(r'\s*\bOptions:', body)
    stem = PREFIX.sub('', body[:m.start()] if m else body)
    options = split_inline_options(body[m.end():]) if m else []
    task, direction = classify_question(stem)
    sol = d['solution']
    cot = COT.search(sol) if isinstance(sol, str) else None
    if cot and task == 'landmark' and 'actions' in cot.group(2) + cot.group(4):
        # the release's forward action items carry the landmark stem; CoT and options are about actions
        task, stem = 'action', re.sub(r'which landmarks.*', ACTION_FORWARD, stem)
    task, direction = d.get('task', task), d.get('direction', direction)
    if task not in ('route', 'direction', 'landmark', 'action') or direction not in ('forward', 'reverse'):
        raise DataError(f'{where}: cannot tell task/direction (got {task}/{direction}) from question {stem!r}')
    answer = str(d['original_answer']).strip()
    if task == 'route':
        answer = answer_text = clean_listish(d['original_answer'])
        if not answer_text:
            raise DataError(f'{where}: empty answer')
    else:
        if m is None:
            raise DataError(f'{where}: MCQ problem without " Options:"')
        check_mcq(where, options, answer)
        answer_text = options[LETTERS.index(answer)]
        got = re.search(r'<answer>\s*(.*?)\s*</answer>', sol or '')
        if sol is not None and (not got or got.group(1) != answer):
            raise DataError(f'{where}: solution answers {got.group(1) if got else None!r}, '
                            f'original_answer is {answer!r}')
    opposite = None
    if cot:  # the CoT states a ground truth first (cleaned of the release's list repr) ...
        stated = clean_listish(cot.group(3))
        sol = sol[:cot.end(2)] + ' ' + stated + ' ' + sol[cot.start(4) - len('And then think about '):]
        if cot.group(1) != direction:  # ... the opposite direction's, in reverse thinking (a forward-only
            opposite = stated           # thought states the question's own; pair_opposites fills it then)
    video = str(d['video'])
    video = os.path.join(video_root, os.path.basename(video)) if video_root else os.path.join(base_dir, video)
    return Sample(id=where.rsplit('/', 1)[-1], video=video, task=task, direction=direction,
                  question=clean_text(stem), options=options if task != 'route' else [], answer=answer,
                  answer_text=answer_text, opposite=opposite, solution=sol, source=where)

def resolve_answer(where, value, options, key):
    """Letter, "(B)", "B. text", option text or 0-based index -> letter."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return LETTERS[value]
    elif isinstance(value, str):
        s = value.strip()
        m = re.fullmatch(rf'\(?([{LETTERS}])[.):]?\)?(?:\s+(.*))?', s)
        if m and m.group(1) in LETTERS[:len(options)] and (
                not m.group(2) or clean_option(m.group(2)).lower() == options[LETTERS.index(m.group(1))].lower()):
            return m.group(1)
        hits = [i for i, o in enumerate(options) if o.lower() == clean_option(s).lower()]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    raise DataError(f'{where}: answer {value!r} (field {key!r}) matches no option letter, text or index of {options}')

def parse_bench_item(item, where, task, direction, video_dir):
    if not isinstance(item, dict):
        raise DataError(f'{where}: expected an object, got {type(item).__name__}')
    if 'video' not in item:
        raise DataError(f"{where}: missing field 'video'; keys found: {sorted(item)}")
    video = os.path.join(video_dir, str(item['video']))
    if task == 'route':
        key, other = f'{direction}_answer', ('reverse' if direction == 'forward' else 'forward') + '_answer'
        if 'question' not in item or key not in item:
            raise DataError(f"{where}: route QA needs 'question' and {key!r}; keys found: {sorted(item)}")
        answer = clean_listish(item[key])
        if not answer:
            raise DataError(f'{where}: empty {key}')
        return Sample(id=where.rsplit('/', 1)[-1], video=video, task=task, direction=direction,
                      question=clean_text(item['question']), answer=answer, answer_text=answer,
                      opposite=clean_listish(item[other]) if item.get(other) else None, source=where)
    mcq = item.get(f'{direction}_mcq')
    if not isinstance(mcq, dict) or 'question' not in mcq or 'options' not in mcq:
        raise DataError(f"{where}: needs {direction}_mcq with 'question' and 'options'; keys found: {sorted(item)}"
                        + (f', in {direction}_mcq: {sorted(mcq)}' if isinstance(mcq, dict) else ''))
    if not isinstance(mcq['options'], list) or len(mcq['options']) > len(LETTERS):
        raise DataError(f"{where}: options must be a list of at most {len(LETTERS)}, got {mcq['options']!r}")
    options = [clean_option(re.sub(rf'^\(?{L}[.):]\)?\s+', '', str(o).strip()))
               for L, o in zip(LETTERS, mcq['options'])]
    key = next((k for src in (mcq, item) for k in ANSWER_KEYS if k in src), None)
    if key is None:
        raise DataError(f'{where}: no correct-option field (looked for {list(ANSWER_KEYS)}); keys found: '
                        f'{sorted(mcq)} in {direction}_mcq, {sorted(item)} in the item')
    check_mcq(where, options, 'A')
    answer = resolve_answer(where, mcq.get(key, item.get(key)), options, key)
    return Sample(id=where.rsplit('/', 1)[-1], video=video, task=task, direction=direction,
                  question=clean_text(mcq['question']), options=options, answer=answer,
                  answer_text=options[LETTERS.index(answer)], source=where)

def pair_opposites(samples):
    """Fill `opposite` (and `opposite_question`) from the other direction's item of the same video and
    task (i-th forward with i-th reverse, in file order); left None where the counts differ. The
    reverse-thinking CoT starts from them."""
    groups = {}
    for s in samples:
        groups.setdefault((s.video, s.task), {'forward': [], 'reverse': []})[s.direction].append(s)
    for g in groups.values():
        if len(g['forward']) == len(g['reverse']):
            for f, r in zip(g['forward'], g['reverse']):
                f.opposite = f.opposite or r.answer_text
                r.opposite = r.opposite or f.answer_text
                f.opposite_question, r.opposite_question = r.question, f.question
    return samples

def _check_video(s, check_videos):
    """Missing or undecodable videos are caught when reading (header + frame 0), not mid-training."""
    try:
        if check_videos:
            video_info(s.video)
    except DataError as e:
        raise DataError(f'{s.source}: {e}') from e
    return s

def _keep(samples, errors, strict, make):
    """samples += make(); a DataError is raised (strict) or collected."""
    try:
        samples.append(make())
    except DataError as e:
        if strict:
            raise
        errors.append(str(e))

def _load_json(where, text, one_line=False):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f'column {e.colno}' if one_line else f'line {e.lineno} column {e.colno}'
        raise DataError(f'{where}: malformed JSON ({e.msg} at {at})') from e

def read_jsonl_log(path):
    """A JSONL file that an interrupted writer may have left with a torn last line (predictions,
    metrics) -> ([(line number, record)], the torn last line's number or None). Any other line
    that is not JSON is a DataError naming path:line."""
    with open(path) as f:
        lines = f.read().split('\n')
    last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
    rows, torn = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append((i + 1, json.loads(line)))
        except json.JSONDecodeError as e:
            if i != last:
                raise DataError(f'{path}:{i + 1}: not a JSON record ({e}); fix or delete the file') from None
            torn = i + 1
    return rows, torn

def read_st_r1_jsonl(path, video_root=None, strict=True, check_videos=True):
    """The released ST-R1 training file (or one written like it). video_root remaps the authors'
    absolute paths by basename; relative paths are taken from the file's folder."""
    def make(line, where):
        s = parse_st_r1_item(_load_json(where, line, one_line=True), where, os.path.dirname(path), video_root)
        return _check_video(s, check_videos)
    samples, errors = [], []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                _keep(samples, errors, strict, lambda: make(line, f'{path}:{lineno}'))
    pair_opposites(samples)
    return samples if strict else (samples, errors)

def _part_video_dir(root, part):
    """part{N}/ or part{N}_<anything>/ (part3_clip/, part4_clip/ in the release)."""
    names = sorted(n for n in os.listdir(root)
                   if re.fullmatch(rf'part{part}(_\w+)?', n) and os.path.isdir(os.path.join(root, n)))
    return os.path.join(root, names[0] if names else f'part{part}')

def read_benchmark(root, strict=True, check_videos=True):
    """The benchmark layout: PartN_{forward,reverse}_{qa,mcq,mcq_landmark,mcq_action}.json + partN*/ videos."""
    files = sorted(n for n in os.listdir(root) if BENCH_FILE.match(n))
    if not files:
        raise DataError(f'{root}: no PartN_{{forward,reverse}}_{{qa,mcq,mcq_landmark,mcq_action}}.json files')
    def items(path):
        with open(path, encoding='utf-8') as f:
            data = _load_json(path, f.read())
        if not isinstance(data, dict):
            raise DataError(f'{path}: expected a JSON object keyed by sample id, got {type(data).__name__}')
        return list(data.items())
    def make(name, key, item, kind, direction, video_dir):
        s = parse_bench_item(item, f'{os.path.join(root, name)}#{key}', BENCH_TASK[kind], direction, video_dir)
        s.id = f'{name[:-5]}#{key}'  # ids repeat across the files
        return _check_video(s, check_videos)
    samples, errors, files_ok = [], [], []
    for name in files:
        _keep(files_ok, errors, strict, lambda: (name, items(os.path.join(root, name))))
    for name, pairs in files_ok:
        part, direction, kind = BENCH_FILE.match(name).groups()
        for key, item in pairs:
            _keep(samples, errors, strict, lambda: make(name, key, item, kind, direction, _part_video_dir(root, part)))
    pair_opposites(samples)
    return samples if strict else (samples, errors)

def read_samples(path, **kwargs):
    """A benchmark folder or an ST-R1-style .jsonl; several, comma-separated, are read in turn and concatenated
    (e.g. EgoWorld v2's perception stage: 'captions.jsonl,reading.jsonl'). strict=False: (samples, errors)."""
    if ',' in path and not os.path.exists(path):
        got = [read_samples(p.strip(), **kwargs) for p in path.split(',')]
        if kwargs.get('strict', True):
            return [s for g in got for s in g]
        return [s for g, _ in got for s in g], [e for _, es in got for e in es]
    if os.path.isdir(path):
        return read_benchmark(path, **kwargs)
    if path.endswith('.jsonl'):
        return read_st_r1_jsonl(path, **kwargs)
    raise DataError(f'{path}: neither a benchmark folder nor a .jsonl file')

# -----------------------------------------------------------------------------
# encode, pack, batches

def _config(tok, cfg):
    return cfg if cfg is not None else ModelConfig(**tok.model_ids(), spatial_merge_size=MERGE)

class FrameCache:
    """Decoded frames by (path, nframes); past max_bytes the least recently used go. Frames come
    back read-only (preprocessing copies them). Lives in the process that decodes (a DataLoader
    worker holds its own)."""
    def __init__(self, max_bytes):
        self.max_bytes, self.used, self.items = max_bytes, 0, collections.OrderedDict()

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        x = load()
        x.flags.writeable = False
        if x.nbytes <= self.max_bytes:
            self.items[key] = x
            self.used += x.nbytes
            while self.used > self.max_bytes:
                self.used -= self.items.popitem(last=False)[1].nbytes
        return x

def encode(sample, tok, settings, target=None, cfg=None, cache=None):
    """Sample -> dict(input_ids (T,), labels (T,), position_ids (3, T), pixel_values, grid_thw,
    second_per_grid_ts (1,) float64, id, next_position; a Qwen3-VL video also timestamps, the seconds its
    prompt writes). target None: prompt only, ending with "<|im_start|>assistant\\n". cache: a FrameCache
    to decode through."""
    image, cfg = is_image(sample.video), _config(tok, cfg)
    load = (lambda: load_image(sample.video)) if image else (lambda: load_frames(sample.video, settings.nframes))
    try:
        frames = load() if cache is None else cache.get((sample.video, 1 if image else settings.nframes), load)
        secs = torch.tensor([second_per_grid(sample, settings)], dtype=torch.float64)
        stamps = sample_timestamps(sample, settings) if cfg.qwen3 and not image else None
        pixel_values, grid_thw = preprocess_frames(frames, settings, cfg)
        ids, labels = chat_tokens(tok, build_user_text(sample), int(grid_thw.prod()) // MERGE**2, target, image,
                                  stamps)
    except DataError as e:
        raise DataError(f'{sample.source} ({sample.id}): {e}') from e
    input_ids = torch.tensor(ids)
    position_ids, next_position = rope_positions(input_ids, grid_thw, cfg, secs)
    out = dict(input_ids=input_ids, labels=torch.tensor(labels), position_ids=position_ids,
               pixel_values=pixel_values, grid_thw=grid_thw, second_per_grid_ts=secs, id=sample.id,
               next_position=next_position)
    return out if stamps is None else dict(out, timestamps=stamps)

def pack(items):
    """Concatenate encoded samples into one packed batch with cu_seqlens (B+1,) int32."""
    if not items:
        raise ValueError('pack: no samples')
    lens = torch.tensor([len(it['input_ids']) for it in items])
    cu = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    return dict(input_ids=torch.cat([it['input_ids'] for it in items]),
                labels=torch.cat([it['labels'] for it in items]),
                position_ids=torch.cat([it['position_ids'] for it in items], 1), cu_seqlens=cu,
                pixel_values=torch.cat([it['pixel_values'] for it in items]),
                grid_thw=torch.cat([it['grid_thw'] for it in items]),
                second_per_grid_ts=torch.cat([it['second_per_grid_ts'] for it in items]),
                ids=[it['id'] for it in items], next_positions=[it['next_position'] for it in items])

def target_text(sample, target):
    """target: None (prompt only), a Sample field name ('solution', 'answer_text', ...) or a function."""
    if target is None:
        return None
    text = target(sample) if callable(target) else getattr(sample, target)
    if text is None:
        raise DataError(f'{sample.source} ({sample.id}): no {getattr(target, "__name__", target)} to use as target')
    return text

def sample_length(sample, tok, settings, target=None, cfg=None):
    """Exact token count of encode(sample) without decoding the video."""
    image, (_, h, w, _), cfg = is_image(sample.video), video_info(sample.video), _config(tok, cfg)
    t, gh, gw = visual_grid(1 if image else settings.nframes, h, w, settings, cfg)
    stamps = sample_timestamps(sample, settings) if cfg.qwen3 and not image else None
    ids, _ = chat_tokens(tok, build_user_text(sample), t * gh * gw // MERGE**2, target_text(sample, target), image,
                         stamps)
    return len(ids)

def greedy_pack(order, lengths, token_budget):
    """The indices in `order` packed greedily: a batch closes when the next index would pass
    token_budget tokens; a longer one gets a batch of its own."""
    plan, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > token_budget:
            plan.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    return plan + [cur] if cur else plan

def plan_batches(lengths, token_budget, seed):
    """Seeded shuffle (seed: an int or a tuple such as (seed, epoch)), then greedy packing."""
    return greedy_pack(np.random.default_rng(seed).permutation(len(lengths)).tolist(), lengths, token_budget)

class PackedBatches(torch.utils.data.Dataset):
    """Batch i of a plan, decoded and packed (runs in the DataLoader workers; each worker decodes
    through its own copy of the cache)."""
    def __init__(self, samples, plan, tok, settings, target, cfg=None, cache=None):
        self.samples, self.plan, self.tok, self.settings, self.target = samples, plan, tok, settings, target
        self.cfg, self.cache = _config(tok, cfg), cache

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        batch = pack([encode(s, self.tok, self.settings, target_text(s, self.target), self.cfg, self.cache)
                      for s in (self.samples[j] for j in self.plan[i])])
        return dict(batch, sample_index=torch.tensor(self.plan[i]))  # which samples: logged with each step

def batches(samples, tok, settings, token_budget, seed=0, rank=None, world_size=None, num_workers=2,
            target='solution', epoch=0, cfg=None, cache=None):
    """DataLoader over this rank's packed batches (len() = steps this epoch). Lengths are known before
    decoding (video header + tokenizer), so the epoch is planned up front: a (seed, epoch) shuffle, greedy
    packing under token_budget, the batches dealt to ranks disjointly, the same number each (the fewer
    than world_size left over are dropped). rank/world_size default to
    torch.distributed's when it is initialised, else 0/1. cache: a FrameCache to decode through;
    with num_workers=0 it is this process's and outlives the epoch, else each worker gets a copy."""
    if rank is None and world_size is None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f'batches: need 0 <= rank < world_size, got rank={rank} world_size={world_size}')
    lengths = [sample_length(s, tok, settings, target, cfg) for s in samples]
    plan = plan_batches(lengths, token_budget, (seed, epoch))
    per_rank = len(plan) // world_size
    if per_rank == 0:
        raise ValueError(f'batches: {len(samples)} samples make {len(plan)} batches, fewer than {world_size} ranks')
    mine = plan[rank::world_size][:per_rank]
    # own generator: iterating must not draw from torch's global RNG (dropout, sampling use it)
    return torch.utils.data.DataLoader(PackedBatches(samples, mine, tok, settings, target, cfg, cache), batch_size=None,
                                       shuffle=False, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed))
