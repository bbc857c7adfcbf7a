"""
Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense) in raw PyTorch: the vision tower, the decoder with multimodal
rotary (M-RoPE), a packed training forward, KV-cache generation, and Hugging Face checkpoints in and out.
The checkpoint's config.json picks the family (model_type 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl').
Qwen2.5-VL: the vision tower has RMSNorm + SwiGLU blocks, window attention except in
fullatt_block_indexes, an RMSNorm merger, and its video positions count absolute time (rope_positions).
Qwen3-VL: a 16-pixel-patch tower with learned position embeddings interpolated to each frame (plus the
2-D rotary), GELU-tanh MLPs, no windows; DeepStack (the features of deepstack_visual_indexes' blocks, each
through its own merger, added to the outputs of the first decoder layers at the visual positions); q/k
RMSNorms and no q/k/v biases in the decoder, a stated head_dim, interleaved M-RoPE (mrope_axes); a video's
time is text (data.py writes "<t seconds>" before each frame group), so its positions are per group.

Usage
    model = Qwen2VL.from_pretrained('ckpt/Qwen2-VL-7B-Instruct', dtype=torch.bfloat16, device='cuda')
    pos, next_pos = rope_positions(ids, grid_thw, model.config, second_per_grid_ts)  # one sequence
    logits = model(ids, pos, torch.tensor([0, len(ids)], dtype=torch.int32), pixel_values, grid_thw)
    tokens, logprobs, lengths = model.generate(ids, pos, cu, pixel_values, grid_thw,
        max_new_tokens=512, temperature=1.0, stop_tokens=[im_end_id], num_samples=8)
    cache, logits, next_pos = model.prefill(ids, pos, cu, pixel_values, grid_thw, max_new_tokens=512)
    cache = cache.repeat(8)                # 8 rows per prompt: b*8 .. b*8+7
    logits = model.decode_step(tokens, next_pos.repeat_interleave(8) + step, cache)   # one token per row
    model.save_pretrained('out/ckpt')     # transformers' Qwen2(_5)VL / Qwen3VLForConditionalGeneration loads it

Left out on purpose: sliding-window attention and rope scaling (off in the releases), dropout (0 in the
release), beam search, paged KV cache, decoding new images mid-generation, Qwen3-VL MoE (an error says so).
"""
import inspect
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from common import atomic_path, write_json

try:  # optional, GPU only
    from flash_attn import flash_attn_varlen_func
except Exception:
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_PARAMS = inspect.signature(varlen_attn).parameters  # its signature changed across torch versions
except Exception:
    varlen_attn, VARLEN_PARAMS = None, {}

# -----------------------------------------------------------------------------
# config

FAMILIES = ('qwen2_vl', 'qwen2_5_vl', 'qwen3_vl')

@dataclass
class ModelConfig:
    model_type: str = 'qwen2_vl'  # the family, FAMILIES
    # language model (defaults: Qwen2-VL-7B-Instruct)
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 0                 # Qwen3-VL states its own; otherwise (or 0) hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # rotary pairs for t, h, w
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # token ids
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    # vision tower
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    vision_rope_theta: float = 10000.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL (defaults: Qwen2.5-VL-7B-Instruct) and Qwen3-VL; Qwen2-VL's is vision_mlp_ratio * embed_dim
    vision_intermediate_size: int = 3420
    # Qwen2.5-VL only
    window_size: int = 112            # side of an attention window in pixels (8 x 8 patches)
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])  # blocks with full attention
    tokens_per_second: int = 2        # temporal M-RoPE ids per second of video (rope_positions)
    # Qwen3-VL only (defaults: Qwen3-VL-8B-Instruct)
    num_position_embeddings: int = 2304  # learned vision positions: a 48 x 48 grid, interpolated to each frame
    deepstack_visual_indexes: list = field(default_factory=lambda: [8, 16, 24])  # vision blocks fed to DeepStack

    @property
    def qwen25(self):
        return self.model_type == 'qwen2_5_vl'

    @property
    def visual_token_ids(self):
        """The ids only the processor places (a visual block's start, pads and end): never generated, since a
        pad token in a completion would be fed visual features when it is trained on."""
        return (self.vision_start_token_id, self.vision_end_token_id, self.image_token_id, self.video_token_id)

    @property
    def qwen3(self):
        return self.model_type == 'qwen3_vl'

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f'model_type {self.model_type!r} is not supported (only {", ".join(FAMILIES)})')
        if not self.qwen3 or not self.head_dim:  # Qwen2(.5)-VL have no such key: always hidden_size / heads
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.qwen3 and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(f'hidden_size {self.hidden_size} is not {self.num_attention_heads} heads of '
                             f'{self.head_dim}')
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f'head_dim {self.head_dim} must be 2 * sum(mrope_section {self.mrope_section})')
        if self.qwen3 and len(self.deepstack_visual_indexes) > self.num_hidden_layers:
            raise ValueError(f'{len(self.deepstack_visual_indexes)} deepstack_visual_indexes need as many decoder '
                             f'layers, there are {self.num_hidden_layers}')
        if self.qwen25 and self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(f'window_size {self.window_size} is below one merged token '
                             f'({self.patch_size * self.spatial_merge_size} pixels)')

    @classmethod
    def from_hf(cls, d, source='config.json'):
        """Read the flat layout of the released checkpoints or transformers 5's nested one."""
        family = d.get('model_type', 'qwen2_vl')
        if family == 'qwen3_vl_moe':
            raise ValueError(f'{source}: model_type qwen3_vl_moe: the Qwen3-VL MoE models (30B-A3B, 235B-A22B) are '
                             f'out of scope; only dense Qwen3-VL (model_type qwen3_vl) is supported')
        if family not in FAMILIES:
            raise ValueError(f"{source}: model_type {family!r} is not supported (only {', '.join(FAMILIES)})")
        q25, q3 = family == 'qwen2_5_vl', family == 'qwen3_vl'
        t = {**d, **(d.get('text_config') or {})}  # nested text_config wins over top-level keys
        v = d.get('vision_config') or {}
        rope = t.get('rope_parameters') or t.get('rope_scaling') or {}
        if rope.get('rope_type', rope.get('type', 'default')) not in ('default', 'mrope'):
            raise ValueError(f"{source}: rope type {rope!r} is not supported (only mrope)")
        if t.get('use_sliding_window'):
            raise ValueError(f'{source}: use_sliding_window=true is not supported')
        if q3 and (t.get('attention_bias') or rope.get('mrope_interleaved') is False):
            raise ValueError(f"{source}: a Qwen3-VL decoder without q/k/v biases and with interleaved M-RoPE is "
                             f"supported, got attention_bias={t.get('attention_bias')}, rope {rope}")
        # the vision width and the merger's output width: Qwen2.5-VL renamed both keys, Qwen3-VL kept the new names
        width, out = ('hidden_size', 'out_hidden_size') if q25 or q3 else ('embed_dim', 'hidden_size')
        if v.get(out, t.get('hidden_size')) != t.get('hidden_size'):
            raise ValueError(f"{source}: vision_config.{out} {v[out]} != hidden_size {t.get('hidden_size')}")
        act = 'gelu_pytorch_tanh' if q3 else 'silu' if q25 else 'quick_gelu'
        if v.get('hidden_act', act) != act:
            raise ValueError(f"{source}: vision_config.hidden_act {v['hidden_act']!r} (a {family} tower uses {act!r})")
        def need(src, key, where):
            if key not in src:
                raise KeyError(f'{source}: missing {where}{key}')
            return src[key]
        D = cls()
        q25_keys = dict(vision_intermediate_size=need(v, 'intermediate_size', 'vision_config.'),
                        window_size=need(v, 'window_size', 'vision_config.'),
                        fullatt_block_indexes=list(need(v, 'fullatt_block_indexes', 'vision_config.')),
                        tokens_per_second=need(v, 'tokens_per_second', 'vision_config.')) if q25 else {}
        q3_keys = dict(vision_intermediate_size=need(v, 'intermediate_size', 'vision_config.'),
                       num_position_embeddings=need(v, 'num_position_embeddings', 'vision_config.'),
                       deepstack_visual_indexes=list(need(v, 'deepstack_visual_indexes', 'vision_config.')),
                       head_dim=need(t, 'head_dim', 'text_config.')) if q3 else {}
        return cls(
            model_type=family,
            vocab_size=need(t, 'vocab_size', ''),
            hidden_size=need(t, 'hidden_size', ''),
            intermediate_size=need(t, 'intermediate_size', ''),
            num_hidden_layers=need(t, 'num_hidden_layers', ''),
            num_attention_heads=need(t, 'num_attention_heads', ''),
            num_key_value_heads=t.get('num_key_value_heads') or t['num_attention_heads'],
            rms_norm_eps=t.get('rms_norm_eps', D.rms_norm_eps),
            rope_theta=rope.get('rope_theta', t.get('rope_theta', D.rope_theta)),
            mrope_section=list(rope.get('mrope_section', D.mrope_section)),
            tie_word_embeddings=bool(d.get('tie_word_embeddings')
                                     or (d.get('text_config') or {}).get('tie_word_embeddings')),
            max_position_embeddings=t.get('max_position_embeddings', D.max_position_embeddings),
            **{k: d.get(k, getattr(D, k))
               for k in ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id')},
            bos_token_id=t.get('bos_token_id', D.bos_token_id),
            eos_token_id=t.get('eos_token_id', D.eos_token_id),
            vision_depth=need(v, 'depth', 'vision_config.'),
            vision_embed_dim=need(v, width, 'vision_config.'),
            vision_num_heads=need(v, 'num_heads', 'vision_config.'),
            vision_mlp_ratio=v.get('mlp_ratio', D.vision_mlp_ratio),
            vision_rope_theta=(v.get('rope_parameters') or {}).get('rope_theta', D.vision_rope_theta),
            patch_size=v.get('patch_size', 16 if q3 else D.patch_size),  # transformers' defaults
            temporal_patch_size=v.get('temporal_patch_size', D.temporal_patch_size),
            spatial_merge_size=v.get('spatial_merge_size', D.spatial_merge_size),
            in_channels=v.get('in_channels', v.get('in_chans', D.in_channels)), **q25_keys, **q3_keys)

    def to_hf(self):
        """config.json in the released layout (Qwen2(.5)-VL flat, Qwen3-VL nested); transformers 4.x/5.x and vLLM
        read it."""
        vision = dict(depth=self.vision_depth, num_heads=self.vision_num_heads, patch_size=self.patch_size,
                      temporal_patch_size=self.temporal_patch_size, spatial_merge_size=self.spatial_merge_size,
                      in_channels=self.in_channels)
        if self.qwen3:
            return self._to_hf_qwen3(vision)
        if self.qwen25:
            vision.update(hidden_size=self.vision_embed_dim, out_hidden_size=self.hidden_size, hidden_act='silu',
                          intermediate_size=self.vision_intermediate_size, window_size=self.window_size,
                          fullatt_block_indexes=list(self.fullatt_block_indexes),
                          tokens_per_second=self.tokens_per_second)
        else:
            vision.update(embed_dim=self.vision_embed_dim, hidden_size=self.hidden_size, hidden_act='quick_gelu',
                          mlp_ratio=self.vision_mlp_ratio)
        return dict(
            architectures=['Qwen2_5_VLForConditionalGeneration' if self.qwen25 else 'Qwen2VLForConditionalGeneration'],
            model_type=self.model_type, hidden_act='silu',
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=dict(type='mrope', mrope_section=list(self.mrope_section)),
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=self.max_position_embeddings,
            use_sliding_window=False, attention_dropout=0.0, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, vision_config=vision)

    def _to_hf_qwen3(self, vision):
        vision.update(model_type='qwen3_vl', hidden_size=self.vision_embed_dim, out_hidden_size=self.hidden_size,
                      hidden_act='gelu_pytorch_tanh', intermediate_size=self.vision_intermediate_size,
                      num_position_embeddings=self.num_position_embeddings,
                      deepstack_visual_indexes=list(self.deepstack_visual_indexes))
        text = dict(model_type='qwen3_vl_text', hidden_act='silu', attention_bias=False, attention_dropout=0.0,
                    vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                    rope_scaling=dict(rope_type='default', mrope_section=list(self.mrope_section),
                                      mrope_interleaved=True),
                    max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        return dict(architectures=['Qwen3VLForConditionalGeneration'], model_type='qwen3_vl',
                    image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                    vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
                    tie_word_embeddings=self.tie_word_embeddings, text_config=text, vision_config=vision)

# -----------------------------------------------------------------------------
# positions

def _vision_block_positions(t, gh, gw, start, step=1):
    """(3, t*gh*gw) positions of one image/video over its merged grid, raster order (t, h, w); frame group k
    has temporal id floor(k * step) (rope_positions)."""
    tt, hh, ww = torch.meshgrid((torch.arange(t) * step).long(), torch.arange(gh), torch.arange(gw), indexing='ij')
    return torch.stack([tt, hh, ww]).flatten(1) + start

def rope_positions(input_ids, grid_thw, cfg, second_per_grid_ts=None):
    """M-RoPE ids for ONE sequence -> (position_ids (3, T) long, next_position int).
    Each run of image/video pad tokens is one visual block and takes the next grid_thw row (and the
    same row of second_per_grid_ts). The model never computes positions itself: data.py calls this per
    sample and packs the results.

    Time (Qwen2.5-VL videos only): frame group k gets temporal id start + floor(k * tokens_per_second *
    second_per_grid_t), the product taken in float32 as transformers does. second_per_grid_t is the seconds
    between two consecutive frame groups of the frames actually sampled (data.seconds_per_grid:
    temporal_patch_size * mean index spacing / clip fps), so one id is 1 / tokens_per_second seconds of
    video whatever the fps and frame count (the 7B: 0.5 s). Qwen2-VL and all images: k itself.

    Qwen3-VL writes a video's time as text before each frame group ("<t seconds>", data.py), so each run of
    video pads is ONE frame group, numbered like a one-frame image: the video's grid_thw row (t, h, w) is
    consumed by t runs of (1, h, w) each (transformers' get_rope_index splits it the same way).

    Text after a visual block continues at max(block positions) + 1: the released rule (transformers
    4.4x, vLLM) that the weights were trained with. transformers 5.x instead advances by max(h, w) / merge
    and ignores the temporal ids; the two differ when the last temporal id >= max(h, w) / merge (long or
    slow-sampled, low-resolution videos)."""
    ids = input_ids.tolist()
    grids = grid_thw.tolist() if grid_thw is not None else []
    vis = {cfg.image_token_id, cfg.video_token_id}
    m, chunks, start, g, i = cfg.spatial_merge_size, [], 0, 0, 0
    group = 0  # Qwen3-VL: frame groups of grid row g already placed
    while i < len(ids):
        j = i + 1
        while j < len(ids) and (ids[j] == ids[i] if ids[i] in vis else ids[j] not in vis):
            j += 1
        if ids[i] not in vis:  # text: one position per token, all three axes equal
            chunks.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
        else:
            if g == len(grids):
                raise ValueError(f'token {i}: visual block but only {len(grids)} grid_thw rows were given')
            t, h, w = grids[g]
            if h % m or w % m:
                raise ValueError(f'grid_thw row {g} {grids[g]}: h and w must be multiples of {m}')
            per_group = cfg.qwen3 and ids[i] == cfg.video_token_id
            if per_group:
                t, group = 1, group + 1
            step = 1
            if cfg.qwen25 and ids[i] == cfg.video_token_id:
                given = second_per_grid_ts is not None and g < len(second_per_grid_ts)
                secs = float(second_per_grid_ts[g]) if given else float('nan')
                if not secs > 0:  # never a silent default: a wrong time base shifts every frame
                    raise ValueError(f'grid_thw row {g} {grids[g]}: a Qwen2.5-VL video needs second_per_grid_ts[{g}] '
                                     f'> 0 seconds, got {secs if given else second_per_grid_ts}')
                step = cfg.tokens_per_second * torch.tensor(secs, dtype=torch.float32)
            block = _vision_block_positions(t, h // m, w // m, start, step)
            if block.shape[1] != j - i:
                raise ValueError(f'token {i}: visual block has {j - i} pad tokens, '
                                 f'grid_thw row {g} {grids[g]} needs {block.shape[1]}')
            chunks.append(block)
            start = int(block.max()) + 1  # the released rule: after the largest position
            if not per_group or group == grids[g][0]:
                g, group = g + 1, 0
        i = j
    if group:
        raise ValueError(f'grid_thw row {g} {grids[g]}: {grids[g][0]} frame groups, input_ids hold {group}')
    if g != len(grids):
        raise ValueError(f'{len(grids)} grid_thw rows but {g} visual blocks in input_ids')
    pos = torch.cat(chunks, 1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    return pos, start

def mrope_axes(cfg):
    """Which position id (0 t, 1 h, 2 w) each rotary frequency pair rotates with, (head_dim / 2,).
    Qwen2(.5)-VL: chunks, the first mrope_section[0] pairs t, the next mrope_section[1] h, the rest w.
    Qwen3-VL: interleaved, t h w t h w ... for 3 * mrope_section[1 or 2] pairs, t for the rest; so h and w
    each get low and high frequencies alike."""
    s = cfg.mrope_section
    if not cfg.qwen3:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(s))
    axes = torch.zeros(sum(s), dtype=torch.long)
    axes[1:3 * s[1]:3], axes[2:3 * s[2]:3] = 1, 2
    return axes

def mrope_cos_sin(position_ids, cfg, dtype):
    """(3, T) ids -> cos, sin (T, head_dim); frequency pair j rotates with id mrope_axes(cfg)[j]."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=position_ids.device) / hd)
    freqs = position_ids[..., None].float() * inv_freq  # (3, T, hd/2)
    axes = mrope_axes(cfg).to(position_ids.device)
    freqs = freqs.gather(0, axes.expand(1, freqs.shape[1], -1))[0]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

def vision_cos_sin(grid_thw, cfg, device):
    """2D rotary of the vision tower: half the pairs rotate with the patch row, half with the column."""
    m, pos = cfg.spatial_merge_size, []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        # patches arrive grouped by merge window (m*m neighbours adjacent), so order positions alike
        window_major = lambda a: a.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
        pos.append(torch.stack([window_major(hh), window_major(ww)], -1).repeat(t, 1))
    hd = cfg.vision_embed_dim // cfg.vision_num_heads
    inv_freq = 1.0 / cfg.vision_rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float) / (hd // 2))
    freqs = (torch.cat(pos)[..., None].float() * inv_freq).flatten(1)  # (N, hd/2): rows then columns
    emb = torch.cat((freqs, freqs), -1).to(device)
    return emb.cos(), emb.sin()

def vision_pos_embed(grid_thw, cfg, table):
    """Qwen3-VL's learned vision positions: the (side x side, d) table, side = sqrt(num_position_embeddings),
    resampled bilinearly (align_corners: the grid's corners land on the table's) to each frame's h x w
    patches, in the patches' merge-window order, the same for every frame -> (N, d), in fp32 as transformers
    weighs them, cast to the table's dtype."""
    side, m, out = int(cfg.num_position_embeddings ** 0.5), cfg.spatial_merge_size, []
    grid = table.float().view(side, side, -1)
    for t, h, w in grid_thw.tolist():
        taps = []
        for n in (h, w):  # per axis: the two table rows/columns each patch falls between, and its weight
            x = torch.linspace(0, side - 1, n, device=table.device)
            lo = x.floor().long()
            taps.append((lo, (lo + 1).clamp(max=side - 1), x - lo))
        (h0, h1, dh), (w0, w1, dw) = taps
        dh, dw = dh[:, None, None], dw[None, :, None]
        e = ((1 - dh) * (1 - dw) * grid[h0][:, w0] + (1 - dh) * dw * grid[h0][:, w1]
             + dh * (1 - dw) * grid[h1][:, w0] + dh * dw * grid[h1][:, w1])  # (h, w, d)
        e = e.view(h // m, m, w // m, m, -1).transpose(1, 2).reshape(h * w, -1)  # merge-window order
        out.append(e.repeat(t, 1))
    return torch.cat(out).to(table.dtype)

def apply_rope(x, cos, sin):
    """x (T, H, D), cos/sin (T, D); Qwen's rotate-half pairing (dim i with dim i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

def fold_rope(cos, sin):
    """apply_rope's cos, sin (T, D) -> (T, 1, D) each, rotate-half's sign folded into sin: then
    x * cos + x.roll(D // 2, -1) * sin is apply_rope(x, cos, sin) bit for bit in half the ops (the decode
    step's form: at one token a row the time is in the number of ops, not in the arithmetic)."""
    half = cos.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None]

# -----------------------------------------------------------------------------
# attention

def attention(q, k, v, cu_seqlens, max_seqlen, causal, prefix=None):
    """Packed attention, shared by both towers: q (T, H, D), k/v (T, Hkv, D); rows
    cu_seqlens[i]:cu_seqlens[i+1] attend only among themselves (causally if `causal`). Returns (T, H, D).

    On CUDA in fp16/bf16: flash-attn's varlen kernel when installed, else torch's varlen_attn. Otherwise
    (CPU, fp32) SDPA: a plain view when all segments are equally long; else one batched call over the
    segments padded to the longest (a block-diagonal mask without its off-diagonal blocks; on CPU ~10x
    faster than a call per segment); and a call per segment when padding would more than double the work.
    prefix (prefix_layout): segments that also see all of a parent segment (shared_prefix_attention)."""
    if prefix is not None:
        return shared_prefix_attention(q, k, v, cu_seqlens, max_seqlen, prefix)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)
        if varlen_attn is not None:
            kw, rep = varlen_kwargs(VARLEN_PARAMS, causal, q.shape[1] // k.shape[1])
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
    gqa = k.shape[1] != q.shape[1]
    lens = cu_seqlens.diff().cpu()
    B, L, T = len(lens), int(lens.max()), q.shape[0]
    if B == 1 or bool((lens == L).all()):  # equal segments (frames of one video, one sequence): a view
        q, k, v = (x.view(B, L, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return y.transpose(1, 2).flatten(0, 1)
    if B * L <= 2 * T:  # pad every segment to L: one batched call
        valid = padded_rows(lens, L).to(q.device)
        # causal: a real row never sees the padding after it; bidirectional: mask the padded keys
        mask = None if causal else (torch.arange(L) < lens[:, None])[:, None, None, :].to(q.device)
        y = F.scaled_dot_product_attention(*(pad_segments(x, valid, B, L) for x in (q, k, v)), attn_mask=mask,
                                           is_causal=causal, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B * L, *q.shape[1:]).index_select(0, valid)
    ys = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                         is_causal=causal, enable_gqa=gqa).transpose(0, 1)
          for qi, ki, vi in zip(q.split(lens.tolist()), k.split(lens.tolist()), v.split(lens.tolist()))]
    return torch.cat(ys)

def padded_rows(lens, L):
    """Where each real row of segments of lengths `lens`, packed back to back, sits once every segment is
    padded to L rows: (sum(lens),) indices into B * L."""
    return (torch.arange(len(lens))[:, None] * L + torch.arange(L)).masked_select(torch.arange(L) < lens[:, None])


def pad_segments(x, rows, B, L):
    """Packed (T, H, D) -> (B, H, L, D), segment b's rows first in row b, zeros after (rows: padded_rows)."""
    return x.new_zeros(B * L, *x.shape[1:]).index_copy(0, rows, x).view(B, L, *x.shape[1:]).transpose(1, 2)


def varlen_kwargs(params, causal, groups):
    """torch's varlen_attn keywords for its signature (params): newer torch takes window_size ((-1, 0) is
    causal) and enable_gqa, older torch is_causal and no GQA. Returns (keywords, how many times to repeat
    the KV heads first: only where the kernel cannot group query heads itself, and never for one head each)."""
    kw = {'window_size': (-1, 0) if causal else (-1, -1)} if 'window_size' in params else {'is_causal': causal}
    if groups > 1 and 'enable_gqa' in params:
        return dict(kw, enable_gqa=True), 1
    return kw, groups


def prefix_layout(cu_seqlens, parents, device):
    """For shared_prefix_attention: segment s's queries (rows cu_seqlens[s]:cu_seqlens[s+1]) see all of
    segment parents[s] (-1: none) and their own rows causally, e.g. GRPO's G completions of a prompt each
    seeing the prompt, which is computed once. The gather index of every segment's keys, their cu_seqlens,
    and for the padded SDPA path the rows and the bottom-right causal mask (the same in every layer)."""
    cu = cu_seqlens.tolist()
    spans = [torch.arange(a, b) for a, b in zip(cu[:-1], cu[1:])]
    keys = [torch.cat([spans[p], own]) if p >= 0 else own for own, p in zip(spans, parents.tolist())]
    lq, lk = torch.tensor([len(x) for x in spans]), torch.tensor([len(x) for x in keys])
    B, Lq, Lk = len(spans), int(lq.max()), int(lk.max())
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)
    # key j of segment b is visible to its query i: a real key, and not after i (offset by the parent's keys)
    mask = (j < lk[:, None, None]) & (j <= i + (lk - lq)[:, None, None])
    return dict(key_index=torch.cat(keys).to(device),
                cu_k=F.pad(lk.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32), max_k=Lk,
                B=B, Lq=Lq, Lk=Lk, q_rows=padded_rows(lq, Lq).to(device), k_rows=padded_rows(lk, Lk).to(device),
                mask=mask[:, None].to(device))


def shared_prefix_attention(q, k, v, cu_seqlens, max_seqlen, prefix):
    """Causal attention where each segment also sees its parent segment in full (prefix_layout). flash-attn
    when installed (its causal mask is aligned to the end of the keys, as needed here); otherwise one
    batched SDPA call over the segments padded to the longest, with the mask."""
    k, v = k[prefix['key_index']], v[prefix['key_index']]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, prefix['cu_k'], max_seqlen, prefix['max_k'], causal=True)
    B, Lq, Lk = prefix['B'], prefix['Lq'], prefix['Lk']
    y = F.scaled_dot_product_attention(pad_segments(q, prefix['q_rows'], B, Lq),
                                       pad_segments(k, prefix['k_rows'], B, Lk),
                                       pad_segments(v, prefix['k_rows'], B, Lk), attn_mask=prefix['mask'],
                                       enable_gqa=k.shape[1] != q.shape[1])
    return y.transpose(1, 2).reshape(B * Lq, *q.shape[1:]).index_select(0, prefix['q_rows'])


class KVCache:
    """Pre-allocated keys/values of every layer, k/v (L, B, Hkv, S, D); row b holds lens[b] tokens, max_len =
    max(lens) is kept on the host so that a decode step needs no device-to-host sync.
    Qwen2VL.prefill fills one row per prompt, `repeat` copies rows for several samples per prompt,
    Qwen2VL.decode_step appends one token to every row (start_step, attend in every layer, end_step).
    equal: every row holds the same number of tokens (one prompt, or prompts of one length; known on the host
    at the prefill and kept, since every row grows by one a step): then a step writes one column of the cache
    and attends without a mask."""
    def __init__(self, k, v, lens, max_len=0, equal=False):
        self.k, self.v, self.lens, self.max_len, self.equal = k, v, lens, max_len, equal
        self.mask, self.spans = None, []

    @classmethod
    def empty(cls, cfg, batch, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    def repeat(self, n):
        """Each row n times in a row (prompt b -> rows b*n .. b*n+n-1): G samples share one prefill."""
        return KVCache(self.k.repeat_interleave(n, 1), self.v.repeat_interleave(n, 1), self.lens.repeat_interleave(n),
                       self.max_len, self.equal)

    def write_prompts(self, layer, k, v):
        """A prefill's packed keys/values into rows 0.. (spans: each prompt's (start, end), set by prefill on
        the host once, not read back from the device in every layer)."""
        for b, (s, e) in enumerate(self.spans):
            self.k[layer, b, :, :e - s] = k[s:e].transpose(0, 1)
            self.v[layer, b, :, :e - s] = v[s:e].transpose(0, 1)

    def start_step(self):
        """What every layer of this step shares, made once: the keys/values each row sees once this step's
        token is written (views (L, B, Hkv, n, D)) and, unless the rows are equal, the mask of those keys
        (B, 1, 1, n) and where each row's new token goes."""
        n = self.max_len + 1
        self.k_seen, self.v_seen = self.k[:, :, :, :n], self.v[:, :, :, :n]
        if not self.equal:
            self.rows = torch.arange(len(self.lens), device=self.lens.device)
            self.mask = (torch.arange(n, device=self.lens.device) <= self.lens[:, None])[:, None, None]

    def end_step(self):
        self.lens += 1
        self.max_len += 1

    def attend(self, layer, q, k, v):
        """One new token per row: q (B, H, D), k/v (B, Hkv, D) -> (B, H, D). The query heads of each KV head
        attend as a group of queries to that one head (query head h uses KV head h // (H / Hkv), as Qwen2's
        repeat_kv): the cache is never copied out to H heads, and SDPA's fused kernels stay allowed (a boolean
        mask with enable_gqa rules them out)."""
        B, H, D = q.shape
        ks, vs = self.k_seen[layer], self.v_seen[layer]
        if self.equal:  # every row's new token goes in the same column, the last one seen
            ks[:, :, -1], vs[:, :, -1] = k, v
        else:
            ks[self.rows, :, self.lens], vs[self.rows, :, self.lens] = k.to(ks.dtype), v.to(vs.dtype)
        y = F.scaled_dot_product_attention(q.view(B, k.shape[1], -1, D), ks, vs, attn_mask=self.mask)
        return y.reshape(B, H, D)

# -----------------------------------------------------------------------------
# vision tower

class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.vision_num_heads
        self.qkv = nn.Linear(cfg.vision_embed_dim, 3 * cfg.vision_embed_dim)
        self.proj = nn.Linear(cfg.vision_embed_dim, cfg.vision_embed_dim)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.n_head, -1).unbind(1)
        q, k = (apply_rope(a.float(), cos, sin).to(v.dtype) for a in (q, k))  # rotary in fp32, as released
        return self.proj(attention(q, k, v, cu_seqlens, max_seqlen, causal=False).flatten(1))

class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vision_embed_dim, cfg.vision_embed_dim * cfg.vision_mlp_ratio)
        self.fc2 = nn.Linear(cfg.vision_embed_dim * cfg.vision_mlp_ratio, cfg.vision_embed_dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU

class Qwen3VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.vision_embed_dim, cfg.vision_intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.vision_intermediate_size, cfg.vision_embed_dim)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate='tanh'))

def vision_norm(cfg):
    """Qwen2-VL's and Qwen3-VL's vision towers normalise with LayerNorm, Qwen2.5-VL's with RMSNorm."""
    d = cfg.vision_embed_dim
    return RMSNorm(d, 1e-6) if cfg.qwen25 else nn.LayerNorm(d, eps=1e-6)

class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = vision_norm(cfg)
        self.attn = VisionAttention(cfg)
        self.norm2 = vision_norm(cfg)
        # Qwen2.5-VL: the decoder's SwiGLU MLP with biases; Qwen2-VL: fc1, QuickGELU, fc2; Qwen3-VL: GELU-tanh
        self.mlp = (MLP(cfg.vision_embed_dim, cfg.vision_intermediate_size, bias=True) if cfg.qwen25
                    else Qwen3VisionMLP(cfg) if cfg.qwen3 else VisionMLP(cfg))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))

class PatchMerger(nn.Module):
    """Concatenate each m x m window of patch features (adjacent rows) and project to the LM width."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.vision_embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = vision_norm(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))

class Qwen3PatchMerger(nn.Module):
    """Qwen3-VL's merger: LayerNorm over each patch (the final merger) or over the m x m concatenation
    (postshuffle: the DeepStack mergers), then Linear, GELU, Linear to the LM width."""
    def __init__(self, cfg, postshuffle):
        super().__init__()
        self.d, self.postshuffle = cfg.vision_embed_dim * cfg.spatial_merge_size ** 2, postshuffle
        self.norm = nn.LayerNorm(self.d if postshuffle else cfg.vision_embed_dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.d, self.d)
        self.linear_fc2 = nn.Linear(self.d, cfg.hidden_size)

    def forward(self, x):
        x = self.norm(x.view(-1, self.d) if self.postshuffle else x).view(-1, self.d)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))

class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # a Conv3d whose kernel equals its stride is a Linear on flattened patches; we keep the conv's
        # parameter shape for checkpoint compatibility and run it as a matmul
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(cfg.in_channels, cfg.vision_embed_dim, k, k,
                                                             bias=cfg.qwen3)))
        if cfg.qwen3:
            self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.vision_embed_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_depth))
        self.merger = Qwen3PatchMerger(cfg, False) if cfg.qwen3 else PatchMerger(cfg)
        if cfg.qwen3:
            self.deepstack_merger_list = nn.ModuleList(Qwen3PatchMerger(cfg, True)
                                                       for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values, grid_thw, ckpt=False):
        """-> (features (N, hidden_size), one row per merged token in raster order; DeepStack features: a list
        of such, one per deepstack_visual_indexes entry, [] outside Qwen3-VL)."""
        w = self.patch_embed.proj.weight
        if grid_thw is None or pixel_values.shape != (int(grid_thw.prod(-1).sum()), w[0].numel()):
            raise ValueError(f'pixel_values {tuple(pixel_values.shape)} do not match grid_thw '
                             f'{None if grid_thw is None else grid_thw.tolist()} ({w[0].numel()} values per patch)')
        x = F.linear(pixel_values.to(w.dtype), w.flatten(1), self.patch_embed.proj.bias)
        if self.cfg.qwen3:
            x = x + vision_pos_embed(grid_thw, self.cfg, self.pos_embed.weight)
        cos, sin = vision_cos_sin(grid_thw, self.cfg, x.device)
        # packed like the decoder's input: attention stays inside one temporal slice of one image/video
        # (grid_t segments of h*w patches each), which is how the official tower confines it
        seg = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        full = windows = (F.pad(seg.cumsum(0), (1, 0)).to(device=x.device, dtype=torch.int32), int(seg.max()))
        if self.cfg.qwen25:  # regroup patches window by window; frames stay contiguous, so `full` still holds
            order, lens = window_order(grid_thw, self.cfg)
            order = order.to(x.device)
            x, cos, sin = (a.view(len(order), -1, a.shape[-1])[order].flatten(0, 1) for a in (x, cos, sin))
            windows = (F.pad(lens.cumsum(0), (1, 0)).to(device=x.device, dtype=torch.int32), int(lens.max()))
        deep = []
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, ckpt, x, cos, sin, *(full if i in self.cfg.fullatt_block_indexes else windows))
            if self.cfg.qwen3 and i in self.cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        x = self.merger(x)  # one row per merged token
        return (x[torch.argsort(order)] if self.cfg.qwen25 else x), deep  # back to raster order

def window_order(grid_thw, cfg):
    """Qwen2.5-VL's window attention layout. Each frame's merged tokens (m*m patches each) are tiled by
    windows of window_size pixels a side (the 7B: 4 x 4 merged tokens), the last row and column of windows
    cut short at the frame's edge; windows in raster order, frames in order. Returns (order: the merged
    token at each new position (N,), long; each window's length in patches (n_windows,))."""
    m = cfg.spatial_merge_size
    k = cfg.window_size // (m * cfg.patch_size)  # merged tokens a side of a window
    order, lens, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        nh, nw = -(-gh // k), -(-gw // k)
        idx = F.pad(torch.arange(t * gh * gw).view(t, gh, gw), (0, nw * k - gw, 0, nh * k - gh), value=-1)
        win = idx.view(t, nh, k, nw, k).transpose(2, 3).reshape(t * nh * nw, k * k)  # a row per window
        order.append(win[win >= 0] + base)
        lens.append((win >= 0).sum(1) * m * m)
        base += t * gh * gw
    return torch.cat(order), torch.cat(lens)

def run_block(block, ckpt, *args):
    """Activation checkpointing switch: recompute the block in backward instead of storing it."""
    return checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)

# -----------------------------------------------------------------------------
# language model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

class Attention(nn.Module):
    """Qwen2's attention (q/k/v biases); Qwen3-VL's has none and RMS-normalises each head of q and k before
    the rotary."""
    def __init__(self, cfg):
        super().__init__()
        self.hd, bias = cfg.head_dim, not cfg.qwen3
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * self.hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qwen3 else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qwen3 else None

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache=None, layer=0, prefix=None):
        T = x.shape[0]
        q, k, v = (p(x).view(T, -1, self.hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cu_seqlens is None:  # decode: row i of x is the next token of cache row i; cos, sin from fold_rope
            qk = torch.cat((q, k), 1)
            q, k = (qk * cos + qk.roll(self.hd // 2, -1) * sin).to(v.dtype).split((q.shape[1], k.shape[1]), 1)
            y = cache.attend(layer, q, k, v)
        else:
            q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
            if cache is not None:
                cache.write_prompts(layer, k, v)
            y = attention(q, k, v, cu_seqlens, max_seqlen, causal=True, prefix=prefix)
        return self.o_proj(y.flatten(1))

class MLP(nn.Module):
    """SwiGLU: the decoder's (no biases) and Qwen2.5-VL's vision blocks' (biases)."""
    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache=None, layer=0, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache, layer, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))

# -----------------------------------------------------------------------------
# the model

class Qwen2VL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # True: recompute blocks in backward when training
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # for random checkpoints only; real weights come from from_pretrained
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def lm_head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h):
        return F.linear(h, self.lm_head_weight())

    def embed(self, input_ids, pixel_values=None, grid_thw=None):
        """Token embeddings with the vision features scattered, in order, into the pad positions.
        -> (embeddings (T, hidden), DeepStack: (the pad positions (n,), features per layer) or None)."""
        x = self.embed_tokens(input_ids)
        is_vis = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        n = int(is_vis.sum())
        if pixel_values is None:
            if n:
                raise ValueError(f'input_ids hold {n} image/video pad tokens but no pixel_values were given')
            return x, None
        feats, deep = self.visual(pixel_values, grid_thw, self.gradient_checkpointing and self.training)
        if feats.shape[0] != n:
            raise ValueError(f'input_ids hold {n} image/video pad tokens but grid_thw {grid_thw.tolist()} '
                             f'gives {feats.shape[0]} features')
        return x.masked_scatter(is_vis[:, None], feats.to(x.dtype)), (is_vis.nonzero()[:, 0], deep) if deep else None

    def forward(self, input_ids, position_ids, cu_seqlens, pixel_values=None, grid_thw=None, return_hidden=False,
                cache=None, parents=None):
        """Packed batch -> logits (T, vocab), or final normed hidden states (T, hidden) if return_hidden.
        The one input layout: sequences concatenated into input_ids (T,) with position_ids (3, T) from
        rope_positions, and cu_seqlens (B+1,) int32 marking where each starts; no padding, no masks.
        With `cache`, sequence b's keys/values are also written into cache row b (prefill). parents (B,):
        segment b continues segment parents[b] (-1: none) and sees it whole (prefix_layout)."""
        T = input_ids.shape[0]
        if position_ids.shape != (3, T) or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f'packed batch of {T} tokens needs position_ids (3, {T}) and cu_seqlens from 0 to {T}; '
                             f'got {tuple(position_ids.shape)} and {cu_seqlens.tolist()}')
        x, deepstack = self.embed(input_ids, pixel_values, grid_thw)
        cos, sin = mrope_cos_sin(position_ids.to(x.device), self.config, x.dtype)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max())
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        prefix = prefix_layout(cu, parents, x.device) if parents is not None else None
        for i, block in enumerate(self.layers):
            x = run_block(block, ckpt, x, cos, sin, cu, max_seqlen, cache, i, prefix)
            if deepstack is not None and i < len(deepstack[1]):  # Qwen3-VL: DeepStack after the first layers
                x = x.index_add(0, deepstack[0], deepstack[1][i].to(x.dtype))
        h = self.norm(x)
        return h if return_hidden else self.logits(h)

    # ----- generation -----

    @torch.no_grad()
    def prefill(self, input_ids, position_ids, cu_seqlens, pixel_values=None, grid_thw=None, max_new_tokens=0):
        """Run packed prompts once into a fresh cache (one row per prompt) with room for max_new_tokens
        more per row. Returns (cache, logits of each prompt's last token (B, vocab) fp32, next positions (B,)).
        For several samples per prompt (GRPO), cache.repeat(G) afterwards: the video is encoded once."""
        cu = cu_seqlens.long().tolist()
        lens = torch.tensor([e - s for s, e in zip(cu[:-1], cu[1:])])
        w = self.embed_tokens.weight  # under autocast keep the cache in the low precision the kernels use
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        cache = KVCache.empty(self.config, len(lens), int(lens.max()) + max_new_tokens, dtype, w.device)
        cache.spans = list(zip(cu[:-1], cu[1:]))
        h = self.forward(input_ids, position_ids, cu_seqlens, pixel_values, grid_thw, return_hidden=True, cache=cache)
        cache.lens, cache.max_len, cache.equal = lens.to(w.device), int(lens.max()), bool((lens == lens[0]).all())
        logits = self.logits(h[[e - 1 for e in cu[1:]]]).float()
        # decoding continues after the largest position of the prompt (the released rule of rope_positions)
        next_pos = torch.stack([position_ids[:, s:e].max() + 1 for s, e in zip(cu[:-1], cu[1:])])
        return cache, logits, next_pos.to(w.device)

    @torch.no_grad()
    def decode_step(self, tokens, positions, cache, rope=None):
        """Append one text token to every cache row: tokens, positions (B,) -> logits (B, vocab) fp32.
        rope: fold_rope of `positions`' rotary when the caller made it already (generate, for all steps at once)."""
        x = self.embed_tokens(tokens)
        if rope is None:
            rope = fold_rope(*mrope_cos_sin(positions.expand(3, -1), self.config, x.dtype))
        cos, sin = rope
        cache.start_step()
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, None, None, cache, i)
        cache.end_step()
        return self.logits(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, input_ids, position_ids, cu_seqlens, pixel_values=None, grid_thw=None, *, max_new_tokens=256,
                 temperature=0.0, top_k=0, top_p=1.0, generator=None, sampler=None, stop_tokens=(), num_samples=1,
                 pad_token_id=0):
        """Continue every prompt of a packed batch num_samples times (prompt b -> rows b*num_samples + j):
        one prefill, each prompt's cache copied into its rows, all rows decoded together. A row stops after
        emitting one of stop_tokens (kept) or at max_new_tokens. The next token comes from
        sampler(logits (R, vocab) fp32, step) -> (tokens (R,), log-probs (R,)); by default `sample` with
        temperature / top_k / top_p / generator (temperature 0: greedy). The visual tokens
        (config.visual_token_ids) are at -inf in the logits every sampler sees: no caller can emit one.
        Returns tokens (R, N) long (pad_token_id after a row's end), log-probs (R, N) fp32 (0 after the end)
        and lengths (R,); N = the longest row."""
        sampler = sampler or (lambda logits, step: sample(logits, temperature, top_k, top_p, generator))
        visual = torch.tensor(self.config.visual_token_ids, device=self.embed_tokens.weight.device)
        cache, logits, pos = self.prefill(input_ids, position_ids, cu_seqlens, pixel_values, grid_thw, max_new_tokens)
        if num_samples > 1:
            cache, logits = cache.repeat(num_samples), logits.repeat_interleave(num_samples, 0)
            pos = pos.repeat_interleave(num_samples)
        R, dev = logits.shape[0], logits.device
        tokens = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(R, max_new_tokens, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=dev)
        # the rotary of every step's positions at once, (steps, R, 1, head_dim): a step only picks its row
        steps = (pos + torch.arange(max_new_tokens, device=dev)[:, None]).flatten()
        rope = fold_rope(*mrope_cos_sin(steps.expand(3, -1), self.config, self.embed_tokens.weight.dtype))
        cos, sin = (t.view(max_new_tokens, R, 1, -1) for t in rope)
        n = 0  # steps taken. A step samples and stores; where each row ended is worked out once, after the loop
        for i in range(max_new_tokens):
            tok, lp = sampler(logits.index_fill_(-1, visual, float('-inf')), i)
            tokens[:, i], logprobs[:, i], n = tok, lp, i + 1
            if len(stop):
                done |= torch.isin(tok, stop)
                if done.all():
                    break
            if n < max_new_tokens:
                logits = self.decode_step(tok, pos + i, cache, (cos[i], sin[i]))
        # a row ends with its first stop token; what it sampled after that is padding
        hit = torch.isin(tokens[:, :n], stop)
        after = hit.cumsum(1) > hit
        lengths = n - after.sum(1)
        return tokens[:, :n].masked_fill(after, pad_token_id), logprobs[:, :n].masked_fill(after, 0.0), lengths

    # ----- checkpoints -----

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device='cpu'):
        """Load an HF-layout directory (config.json + model.safetensors, or shards + index). Loading is
        strict: any missing, unexpected or wrongly shaped tensor is an error. The model is built on the
        meta device and the checkpoint's tensors become its parameters (assign=True), so a 7B never
        exists twice in memory. Returned in train mode like any new nn.Module (no dropout: only
        checkpointing looks at it)."""
        with open(os.path.join(path, 'config.json')) as f:
            cfg = ModelConfig.from_hf(json.load(f), os.path.join(path, 'config.json'))
        with torch.device('meta'):
            model = cls(cfg)
        want = {k: p.shape for k, p in model.state_dict().items()}
        state, seen, unexpected, bad = {}, set(), [], []
        for file in _weight_files(path):
            with safe_open(file, 'pt') as st:
                for hf_name in st.keys():
                    name = _to_ours(hf_name)
                    if name == 'lm_head.weight' and cfg.tie_word_embeddings:
                        continue  # a tied head saved anyway is the embedding again
                    if name not in want:
                        unexpected.append(f'{hf_name} ({os.path.basename(file)})')
                        continue
                    seen.add(name)
                    t = st.get_tensor(hf_name)
                    if t.shape != want[name]:
                        bad.append(f'{hf_name} {tuple(t.shape)} != {tuple(want[name])}')
                        continue
                    state[name] = t.to(device=device, dtype=dtype)
        missing = [_to_hf(k, cfg) for k in want if k not in seen]
        if missing or unexpected or bad:
            raise ValueError(f'{path}: checkpoint does not match the model; missing: {missing}; '
                             f'unexpected: {unexpected}; wrong shape: {bad}')
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_size=4 * 2**30):
        """Write this model's weights, or `state_dict` (full tensors under our names, e.g. gathered from
        FSDP shards with LoRA merged), in the released checkpoints' layout, which transformers 4.x/5.x
        and vLLM load: config.json + model.safetensors, or model-0000i-of-0000n.safetensors + index past
        max_shard_size bytes. Earlier model*.safetensors files in `path` are removed first; every file
        is written atomically."""
        with torch.device('meta'):
            names = list(Qwen2VL(self.config).state_dict())  # the canonical order, which also fills shards
        sd = self.state_dict() if state_dict is None else state_dict
        if set(sd) != set(names):
            raise ValueError(f'save_pretrained: the state dict does not match the model: missing '
                             f'{sorted(set(names) - set(sd))[:5]}, unexpected {sorted(set(sd) - set(names))[:5]}')
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):  # stale weights of an earlier save would confuse loaders
            if f.startswith('model') and (f.endswith('.safetensors') or f.endswith('.safetensors.index.json')):
                os.remove(os.path.join(path, f))
        shards, size = [{}], 0
        for k in names:
            t = sd[k]
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards, size = shards + [{}], 0
            shards[-1][_to_hf(k, self.config)] = t.detach().contiguous().cpu()
            size += nbytes
        files = ['model.safetensors'] if len(shards) == 1 else \
            [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
        for name, shard in zip(files, shards):
            with atomic_path(os.path.join(path, name)) as tmp:
                save_file(shard, tmp, metadata={'format': 'pt'})
        if len(shards) > 1:
            index = dict(
                metadata=dict(total_size=sum(t.numel() * t.element_size() for s in shards for t in s.values())),
                weight_map={k: n for n, s in zip(files, shards) for k in s})
            write_json(os.path.join(path, 'model.safetensors.index.json'), index)
        cfg = self.config.to_hf()
        cfg['torch_dtype'] = str(sd['embed_tokens.weight'].dtype).removeprefix('torch.')
        write_json(os.path.join(path, 'config.json'), cfg)

# -----------------------------------------------------------------------------
# helpers

def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits, then the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float('-inf'))
    return logits

def sample(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """logits (R, V) -> (token (R,), log-prob (R,)). The log-prob is log_softmax(logits / temperature)
    at the token: the tempered distribution before top-k/top-p truncation (at temperature 1 the
    policy's log-probs GRPO needs); greedy (temperature 0) reports log_softmax(logits)."""
    logits = logits.float()
    if temperature == 0:
        logp = logits.log_softmax(-1)
        tok = logits.argmax(-1)
    else:
        logp = (logits / temperature).log_softmax(-1)
        probs = filter_logits(logp, top_k, top_p).softmax(-1)
        tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]

# Our parameter names are HF's with the decoder's "model." prefix dropped; these two are the whole key map.

def _to_ours(hf_name):
    """HF tensor name -> ours. Accepts the released layout (model.layers.*, visual.*) and the
    in-memory layout of transformers 5 (model.language_model.*, model.visual.*)."""
    for hf, ours in (('model.language_model.', ''), ('model.visual.', 'visual.'), ('model.', ''),
                     ('visual.', 'visual.'), ('lm_head.', 'lm_head.')):
        if hf_name.startswith(hf):
            return ours + hf_name[len(hf):]
    return hf_name  # unknown: reported as unexpected

def _to_hf(name, cfg):
    """Ours -> the released layout: Qwen2(.5)-VL model.* / visual.*, Qwen3-VL model.language_model.* /
    model.visual.*."""
    if name.startswith('lm_head.'):
        return name
    if cfg.qwen3:
        return 'model.' + name if name.startswith('visual.') else 'model.language_model.' + name
    return name if name.startswith('visual.') else 'model.' + name

def _weight_files(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(os.path.join(path, 'model.safetensors')):
        return [os.path.join(path, 'model.safetensors')]
    if not os.path.exists(index):
        raise FileNotFoundError(f'{path}: neither model.safetensors nor model.safetensors.index.json')
    with open(index) as f:
        files = [os.path.join(path, n) for n in sorted(set(json.load(f)['weight_map'].values()))]
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f'{index} names {os.path.basename(file)}, which does not exist')
    return files
