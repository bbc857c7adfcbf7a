"""
One prepared GPU check of what no GPU has run here yet: the attention kernels, bf16 parity with transformers at
the 7B's widths, FSDP2 + checkpointing + rollout under torchrun, decode speed against the HBM roofline, and one
SFT and one GRPO step at the 7B's widths (tokens/s, MFU, peak memory); --family=qwen3_vl: all of it at
Qwen3-VL-8B's shapes. Written to fit ~8 minutes on one H100/H200; without a GPU the same checks run at tiny
widths in fp32 (~1 minute a family, CI: tests/test_gpu_check.py).
One JSON line per check, {"check", "ok", "device", "seconds", figures...}; exit 1 if any failed (a failing
check is reported with its error and the others still run).

    bash benchmarks/gpu_check.sh                         # on the GPU machine: missing wheels, then every check
    python benchmarks/gpu_check.py                       # GPU mode where CUDA is, else the CPU mode
    python benchmarks/gpu_check.py --checks=attention,decode --device=cpu
    bash benchmarks/gpu_check.sh --family=qwen3_vl       # every check at Qwen3-VL-8B's shapes (family_sizes)

What it imports: torch, numpy and safetensors (model.py, common.py) for attention and decode; transformers for
hf_parity; fsdp, sft_step and grpo_step import grpo.py / sft.py, whose data.py imports tokenizers, decord and
PIL, and tqdm. Each check imports its own, so a missing package fails only the checks that need it. A GPU
machine without internet gets the missing ones as wheels in .whl/ (git-ignored), downloaded elsewhere for its
Python (`python3 -V` there; the CUDA image this was written for: Python 3.12, torch 2.11, all but decord):

    pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \\
        decord==0.6.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 tqdm==4.70.1

(~30 MB with decord and transformers; add their own requirements if that machine lacks them), carried with
the working tree; gpu_check.sh installs from .whl (pip --no-index) only what does not import, then runs this.
"""
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import model as qwen2vl
from common import (apply_lora, clip_and_step, compute_dtype_and_autocast, frozen_matmul_weights_to, guess_peak_flops,
                    init_distributed, lora_disabled, make_optimizer, peak_memory, shard_model)
from configurator import configure
from model import ModelConfig, Qwen2VL, rope_positions

# -----------------------------------------------------------------------------
checks = 'attention,hf_parity,fsdp,decode,sft_step,grpo_step,grpo_lora_step'
device = ''   # '' = cuda when there is one, else cpu (the reduced CPU mode); 'cpu' forces the CPU mode
worker = ''   # 'fsdp': the torchrun child of the fsdp check (set by the check itself)
seed = 0
family = 'qwen2_vl'  # 'qwen3_vl': the same checks at Qwen3-VL-8B's shapes, against Qwen3VLForConditionalGeneration
# -----------------------------------------------------------------------------

CHECK_NAMES = ('attention', 'hf_parity', 'fsdp', 'decode', 'sft_step', 'grpo_step', 'grpo_lora_step')
# the tests' tiny Qwen2-VL (GQA 2:1, every id in the vocabulary) and a small one for the FSDP run on a GPU
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[2, 3, 3], rope_theta=10000.0, image_token_id=150,
            video_token_id=151, vision_start_token_id=152, vision_end_token_id=153, bos_token_id=154,
            eos_token_id=155, vision_depth=2, vision_embed_dim=32, vision_num_heads=2)
SMALL = dict(TINY, vocab_size=1024, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
             mrope_section=[8, 12, 12], vision_embed_dim=128, vision_num_heads=4)
# Everything that differs between the GPU check and its CPU mode. Attention shapes: name -> (query heads, KV
# heads, head dim, causal); the GPU's are the 7B's (LM: 28 q / 4 KV heads of 128; vision: 16 heads of 80).
# Shared prefix: (prompt length, its completions' lengths) per prompt. The 7B-width models keep the real
# widths and vocabulary and cut depth: hf_parity 2 + 2 blocks; sft/grpo 8 LM layers + 8 vision blocks, so
# that fp32 weights, gradients and AdamW (16 bytes/param, ~3.2B params: ~51 GB) fit one 80 GB GPU.
SIZES = dict(
    cuda=dict(dtype=torch.bfloat16, attn_tol=1e-3,
              attn_shapes=dict(lm=(28, 4, 128, True), vision=(16, 16, 80, False)),
              attn_lens=dict(ragged=[1500, 517, 2048, 33]),
              prefix=[(1100, [256, 200, 31, 256, 1, 128, 77, 256]), (300, [64, 3, 256])],
              parity_cfg=dict(num_hidden_layers=2, vision_depth=2), parity_text=(40, 24), parity_grid=(4, 32, 32),
              parity_tol=1e-4,
              fsdp_cfg=SMALL, fsdp_grid=(2, 8, 8), fsdp_rollout=(4, 16), fsdp_timeout=300,
              decode_cfg=dict(vision_depth=1), decode_rows=[8, 64], decode_prompt=512, decode_warmup=4,
              decode_steps=64,
              train_cfg=dict(num_hidden_layers=8, vision_depth=8), train_grid=(4, 32, 32), train_text=(40, 24),
              sft_target=256, grpo_generations=8, grpo_completion=256, train_steps=2,
              lora_cfg={}, lora_grid=(4, 26, 30)),  # the whole 7B; 8 frames at <= 360x420 px (the LoRA preset)
    cpu=dict(dtype=torch.float32, attn_tol=1e-5,
             attn_shapes=dict(lm=(4, 2, 16, True), vision=(4, 4, 16, False)),
             # model.attention's three CPU paths: one view, one padded batch, a call per segment
             attn_lens=dict(equal=[8, 8, 8], padded=[5, 9, 6], per_segment=[1, 1, 20]),
             prefix=[(12, [5, 1, 9]), (7, [3, 4])],
             parity_cfg=TINY, parity_text=(6, 5), parity_grid=(4, 8, 8), parity_tol=1e-5,
             fsdp_cfg=TINY, fsdp_grid=(2, 4, 4), fsdp_rollout=(2, 4), fsdp_timeout=300,
             decode_cfg=dict(TINY, num_hidden_layers=4, vision_depth=1), decode_rows=[2, 8], decode_prompt=32,
             decode_warmup=2, decode_steps=8,
             train_cfg=TINY, train_grid=(2, 4, 4), train_text=(6, 5), sft_target=16, grpo_generations=4,
             grpo_completion=12, train_steps=1, lora_cfg=TINY, lora_grid=(2, 4, 4)))
# the LoRA presets the grpo_lora_step check runs, and the peak memory their budgets allow (GiB)
LORA_PRESET = dict(qwen2_vl=('grpo_qwen2vl_7b_lora.py', 32.0), qwen3_vl=('grpo_qwen3vl_8b_lora.py', 44.0))


def family_sizes(S, dev_type):
    """SIZES[dev_type] for --family=qwen3_vl: every model-shaped entry at Qwen3-VL-8B's (its released config.json,
    tests/test_model_qwen3.py; the CPU mode: the tiny config with 16-pixel patches), DeepStack fed from blocks
    the cut-down towers have; the LoRA step on the whole 8B at its preset's 16 frames of 128 * 32 * 32 px."""
    if dev_type == 'cpu':
        q3 = dict(model_type='qwen3_vl', patch_size=16, vision_intermediate_size=48, num_position_embeddings=64)
        return dict(S, parity_cfg=dict(TINY, **q3, deepstack_visual_indexes=[0, 1]),
                    fsdp_cfg=dict(TINY, **q3, deepstack_visual_indexes=[0]),
                    decode_cfg=dict(S['decode_cfg'], **q3, deepstack_visual_indexes=[0]),
                    train_cfg=dict(TINY, **q3, deepstack_visual_indexes=[0, 1]),
                    lora_cfg=dict(TINY, **q3, deepstack_visual_indexes=[1]))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
    from test_model_qwen3 import RELEASED_3_8B_CONFIG
    b8 = dict(ModelConfig.from_hf(RELEASED_3_8B_CONFIG).__dict__)
    small = dict(SMALL, model_type='qwen3_vl', patch_size=16, vision_intermediate_size=512, head_dim=64,
                 num_position_embeddings=64, deepstack_visual_indexes=[0])
    return dict(S, attn_shapes=dict(lm=(32, 8, 128, True), vision=(16, 16, 72, False)),
                parity_cfg=dict(b8, num_hidden_layers=2, vision_depth=2, deepstack_visual_indexes=[0, 1]),
                fsdp_cfg=small, decode_cfg=dict(b8, vision_depth=1, deepstack_visual_indexes=[0]),
                # 8 + 8 blocks with the real widths: ~3.1B params, fp32 + grads + AdamW ~50 GB
                train_cfg=dict(b8, num_hidden_layers=8, vision_depth=8, deepstack_visual_indexes=[2, 4, 6]),
                lora_cfg=b8, lora_grid=(8, 16, 32))

# HBM bandwidth (B/s, datasheets) by device name, first match wins; None for anything else
HBM_BANDWIDTH = (('H200', 4.8e12), ('H100 PCIe', 2.0e12), ('H100 NVL', 3.9e12), ('H100', 3.35e12), ('A100', 2.0e12))

# -----------------------------------------------------------------------------
# helpers

def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def timed(fn, dev):
    """(fn(), seconds), the device synchronised on both sides."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def max_err(a, b):
    return float((a.detach().float() - b.detach().float()).abs().max())


def text_limit(cfg):
    """Random text ids stay below every special id of the config."""
    return min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
               cfg.bos_token_id, cfg.eos_token_id)


def video_sample(cfg, n_before, grid, n_after, n_target, g):
    """A data.encode-shaped sample without a tokenizer or a video file: n_before random text ids, one video of
    grid (t, h, w) with random pixels, n_after more text ids, then n_target target ids (the labels; -100
    elsewhere). Positions from rope_positions, as data.encode makes them. Qwen3-VL: a block per frame group,
    each after 6 random ids in place of its "<t seconds>"."""
    t, h, w = grid
    text = lambda n: torch.randint(0, text_limit(cfg), (n,), generator=g)
    block = lambda k: [torch.tensor([cfg.vision_start_token_id]),
                       torch.full((k * h * w // cfg.spatial_merge_size ** 2,), cfg.video_token_id),
                       torch.tensor([cfg.vision_end_token_id])]
    video = [x for _ in range(t) for x in [text(6)] + block(1)] if cfg.qwen3 else block(t)
    ids = torch.cat([text(n_before), *video, text(n_after), text(n_target)])
    labels = torch.full_like(ids, -100)
    labels[len(ids) - n_target:] = ids[len(ids) - n_target:]
    grid_thw = torch.tensor([grid])
    pos, next_pos = rope_positions(ids, grid_thw, cfg)
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    return dict(input_ids=ids, labels=labels, position_ids=pos, grid_thw=grid_thw, id='gpu_check',
                pixel_values=torch.randn(t * h * w, patch, generator=g), next_position=next_pos,
                second_per_grid_ts=torch.tensor([1.0], dtype=torch.float64))  # Qwen2-VL's positions ignore it


def random_model(cfg, dev, dtype=torch.float32):
    """Qwen2VL with its random init made on the device itself (a 7B's 30 GB of fp32 never pass the host)."""
    with torch.device(dev):
        return Qwen2VL(cfg).to(dtype)

# -----------------------------------------------------------------------------
# 1. attention kernels against an fp32 reference

@contextmanager
def counting(module, names):
    """Count calls of the module-level functions `names` of module (None ones stay None): which kernel ran."""
    calls, saved = dict.fromkeys(names, 0), {n: getattr(module, n) for n in names}

    def counted(name, f):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return wrapper
    for n, f in saved.items():
        if f is not None:
            setattr(module, n, counted(n, f))
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(module, n, f)


def math_attention(q, k, v, segments, causal):
    """The reference, plain math in the inputs' dtype: per segment (query rows, key rows) softmax(q k^T / sqrt(D)) v,
    query head h on KV head h // (H / Hkv); causal masks align to the end of the keys (query i sees key
    j <= i + Lk - Lq)."""
    rep, out = q.shape[1] // k.shape[1], []
    for rows, keys in segments:
        qs, ks, vs = q[rows], k[keys].repeat_interleave(rep, 1), v[keys].repeat_interleave(rep, 1)
        s = torch.einsum('ihd,jhd->hij', qs, ks) / math.sqrt(q.shape[-1])
        if causal:
            lq, lk = len(rows), len(keys)
            s = s.masked_fill(torch.arange(lk, device=q.device) > torch.arange(lq, device=q.device)[:, None] + lk - lq,
                              float('-inf'))
        out.append(torch.einsum('hij,jhd->ihd', s.softmax(-1), vs))
    return torch.cat(out)


def attention_errors(fn, segments, causal, shape, dtype, dev, g):
    """Max abs errors against math_attention in fp32, on the same (dtype-rounded) inputs and output gradient,
    of out, dq, dk, dv of fn(q, k, v) in dtype and of math_attention itself in dtype (what plain rounding to
    dtype costs: the floor), and the fp32 reference's max abs of each."""
    H, Hkv, D, T = *shape, sum(len(r) for r, _ in segments)
    q, k, v, dout = (torch.randn(T, h, D, generator=g).to(dev, dtype) for h in (H, Hkv, Hkv, H))

    def run(f, as_dtype):
        leaves = [t.to(as_dtype).clone().requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]
    reference = lambda *a: math_attention(*a, segments, causal)
    ref, ours, floor = run(reference, torch.float32), run(fn, dtype), run(reference, dtype)
    names = ('out', 'dq', 'dk', 'dv')
    return ({n: max_err(a, b) for n, a, b in zip(names, ours, ref)},
            {n: max_err(a, b) for n, a, b in zip(names, floor, ref)},
            {n: float(b.abs().max()) for n, b in zip(names, ref)})


def check_attention(dev, S, seed):
    """model.attention on ragged packs at the LM and vision shapes, and shared_prefix_attention (GRPO's
    prompt-once layout), forward and backward, against the fp32 reference. Pass, per tensor: max abs error
    <= 2 x the floor (math_attention in the same dtype: flash-attn's own test rule) + attn_tol x max abs ref."""
    g, dtype, tol = torch.Generator().manual_seed(seed), S['dtype'], S['attn_tol']
    cases, ok = {}, True

    def record(name, errs, floor, scale):
        nonlocal ok
        ok &= all(errs[n] <= 2 * floor[n] + tol * scale[n] for n in errs) and all(x > 0 for x in scale.values())
        cases[name] = dict(max_abs_err=errs, floor=floor, max_abs_ref=scale)
    with counting(qwen2vl, ('flash_attn_varlen_func', 'varlen_attn')) as calls:
        for shape_name, (H, Hkv, D, causal) in S['attn_shapes'].items():
            for lens_name, lens in S['attn_lens'].items():
                cu = torch.tensor([0] + lens).cumsum(0).to(dev, torch.int32)
                segs = [(torch.arange(a, b, device=dev),) * 2 for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
                fn = lambda q, k, v: qwen2vl.attention(q, k, v, cu, max(lens), causal)
                record(f'{shape_name}/{lens_name}', *attention_errors(fn, segs, causal, (H, Hkv, D), dtype, dev, g))
        packed_calls = dict(calls)
        # shared prefix: every prompt segment, then its completions, each seeing its prompt whole (group_batch)
        lens, parents = [], []
        for prompt, completions in S['prefix']:
            parents += [-1] + [len(lens)] * len(completions)
            lens += [prompt] + completions
        cu = torch.tensor([0] + lens).cumsum(0).to(dev, torch.int32)
        spans = [torch.arange(a, b, device=dev) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        segs = [(s, torch.cat([spans[p], s]) if p >= 0 else s) for s, p in zip(spans, parents)]
        prefix = qwen2vl.prefix_layout(cu, torch.tensor(parents), dev)
        fn = lambda q, k, v: qwen2vl.attention(q, k, v, cu, max(lens), True, prefix=prefix)
        record('lm/shared_prefix', *attention_errors(fn, segs, True, S['attn_shapes']['lm'][:3], dtype, dev, g))
    backend = lambda c: next((n for n in ('flash_attn_varlen_func', 'varlen_attn') if c[n]), 'sdpa')
    shared = {n: calls[n] - packed_calls[n] for n in calls}
    dname = str(dtype).removeprefix('torch.')
    return dict(ok=ok, dtype=dname, varlen_params=list(qwen2vl.VARLEN_PARAMS),
                flash_attn_installed=qwen2vl.flash_attn_varlen_func is not None, backend=backend(packed_calls),
                shared_prefix_backend=backend(shared) if shared['flash_attn_varlen_func'] else 'sdpa (padded, mask)',
                tolerance=f'max abs err <= 2 * floor (the same math in {dname}) + {tol} * max abs of the fp32 '
                          f'reference, per tensor', cases=cases)

# -----------------------------------------------------------------------------
# 2. bf16 logits against transformers, at the 7B's widths

def randomize_(hf, seed, dev):
    """Every parameter re-drawn (norm weights 1 +- 0.1, the rest N(0, 0.02)) and rounded to bf16, so the bf16
    and fp32 copies of both models hold exactly the same values."""
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1 and name.endswith('weight') and ('norm' in name or 'ln_q' in name):
                p.uniform_(0.9, 1.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
            p.copy_(p.bfloat16())


def check_hf_parity(dev, S, seed):
    """Our Qwen2VL against transformers' Qwen2VLForConditionalGeneration (the oracle) on one text + video
    sequence. One bf16-valued checkpoint, saved in bf16, is loaded four times: transformers and ours, each in
    fp32 and bf16 (transformers' from_pretrained in bf16 keeps its rotary buffers fp32, as in real use). The
    noise floor is what bf16 costs transformers itself: max |HF bf16 - HF fp32| over all logits. Pass:
    max |ours bf16 - HF fp32| <= 1.5 x that floor, and max |ours fp32 - HF fp32| <= parity_tol x max |HF fp32|
    (1e-4 on a GPU: on CPU at these widths it was 2e-6; 1e-5 at the CPU mode's, where it is 1e-6)."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    cfg = ModelConfig(**S['parity_cfg'])
    config_cls, model_cls = ((Qwen3VLConfig, Qwen3VLForConditionalGeneration) if cfg.qwen3
                             else (Qwen2VLConfig, Qwen2VLForConditionalGeneration))
    g = torch.Generator().manual_seed(seed)
    s = video_sample(cfg, S['parity_text'][0], S['parity_grid'], S['parity_text'][1], 0, g)
    ids, pos, grid = s['input_ids'].to(dev), s['position_ids'].to(dev), s['grid_thw'].to(dev)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=dev)
    # positions given to transformers too: ours are the released text-after-video rule (see rope_positions)
    hf_logits = lambda hf: hf(input_ids=ids[None], position_ids=pos[:, None], video_grid_thw=grid,
                              pixel_values_videos=s['pixel_values'].to(dev, hf.dtype)).logits[0].float()
    logits = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        with torch.device(dev):
            hf = model_cls(config_cls(**cfg.to_hf())).eval()
        randomize_(hf, seed, dev)
        hf.save_pretrained(d, state_dict={k: v.bfloat16() for k, v in hf.state_dict().items()})
        logits['hf32'] = hf_logits(hf)
        del hf  # one model on the device at a time
        for name, dtype in (('hf16', torch.bfloat16), ('hf32_reloaded', torch.float32)):
            hf = model_cls.from_pretrained(d, dtype=dtype).to(dev).eval()
            logits[name] = hf_logits(hf)
            del hf
        for name, dtype in (('ours32', torch.float32), ('ours16', torch.bfloat16)):
            ours = Qwen2VL.from_pretrained(d, dtype, dev).eval()
            logits[name] = ours(ids, pos, cu, s['pixel_values'].to(dev), grid).float()
            del ours
    scale = float(logits['hf32'].abs().max())
    floor = max_err(logits['hf16'], logits['hf32'])
    e32, e16 = max_err(logits['ours32'], logits['hf32']), max_err(logits['ours16'], logits['hf32'])
    reload = max_err(logits['hf32_reloaded'], logits['hf32'])  # 0: the checkpoint holds exactly the oracle's values
    tol = S['parity_tol']
    return dict(ok=reload == 0 and e32 <= tol * scale and 0 < floor and e16 <= 1.5 * floor, family=cfg.model_type,
                tokens=len(ids),
                video_grid=list(S['parity_grid']), layers=cfg.num_hidden_layers, vision_blocks=cfg.vision_depth,
                hidden=cfg.hidden_size, vocab=cfg.vocab_size, max_abs_hf32=scale, noise_floor_hf16_vs_hf32=floor,
                ours16_vs_hf32=e16, ours16_vs_hf16=max_err(logits['ours16'], logits['hf16']), ours32_vs_hf32=e32,
                hf32_reloaded_vs_hf32=reload,
                rule=f'ours16_vs_hf32 <= 1.5 * noise floor and ours32_vs_hf32 <= {tol} * max_abs_hf32 (max abs over '
                     f'every logit); hf32_reloaded_vs_hf32 == 0')

# -----------------------------------------------------------------------------
# 3. FSDP2 under torchrun: checkpointing, a trainable tower, an optimizer step, a rollout

def check_fsdp(dev, S, seed):
    """This script again as a one-rank torchrun job (NCCL on a GPU, gloo on CPU); its JSON line is the result."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
           os.path.abspath(__file__), '--worker=fsdp', f'--device={dev.type}', f'--seed={seed}', f'--family={family}']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=S['fsdp_timeout'],
                       env=dict(os.environ, USE_LIBUV='0'))  # the CPU build's TCPStore lacks libuv
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
    if not lines:
        return dict(ok=False, error=f'torchrun exited {p.returncode} without a result: {p.stderr[-3000:]}')
    return dict(lines[-1], ok=lines[-1]['ok'] and p.returncode == 0, returncode=p.returncode)


def fsdp_worker(dev, S, seed):
    """The fsdp check inside torchrun: shard as grpo.py does (bf16 all-gathers; on a GPU also bf16 autocast),
    gradient checkpointing on, the vision tower trainable; one SFT forward + backward on a packed video batch,
    an optimizer step, then a GRPO rollout through the registered `generate`. Prints one JSON line."""
    res, stage = dict(ok=False), 'import'
    try:
        import data
        import grpo
        import sft
        from torch.distributed.fsdp import register_fsdp_forward_method
        stage = 'init'
        _, world, _, dev = init_distributed(dev.type)
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        cfg, grid = ModelConfig(**S['fsdp_cfg']), S['fsdp_grid']
        model = random_model(cfg, dev)
        model.gradient_checkpointing = True
        model.train()
        compute, autocast = compute_dtype_and_autocast(dev, 'bfloat16')
        shard_model(model, dev, torch.bfloat16)  # MixedPrecisionPolicy: bf16 params, cast_forward_inputs=True
        register_fsdp_forward_method(model, 'generate')
        optimizer = make_optimizer(model, 1e-4)
        batch = data.pack([video_sample(cfg, 5, grid, 4, 8, g), video_sample(cfg, 3, grid, 6, 5, g)])
        res.update(world=world, param_dtype='bfloat16', autocast=str(compute).removeprefix('torch.'),
                   gradient_checkpointing=True)
        stage = 'forward+backward'
        loss, n_targets = sft.forward_backward(model, [batch], dev, autocast)
        vision = [p.grad for p in model.visual.parameters()]
        vision_norm = math.sqrt(sum(float(x.full_tensor().float().norm()) ** 2 for x in vision if x is not None))
        no_grad = sum(x is None or not bool(x.full_tensor().ne(0).any()) for x in vision)
        stage = 'optimizer step'
        norm, _ = clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], 1.0, loss)
        stage = 'rollout'
        G, new = S['fsdp_rollout']
        prompts = data.pack([video_sample(cfg, 4, grid, 3, 0, g), video_sample(cfg, 2, grid, 5, 0, g)])
        seeds = [grpo.row_seed(seed, 0, b, j) for b in range(2) for j in range(G)]
        with grpo.gathered_for_rollout(model), autocast():
            tokens, logps, lengths, _ = grpo.rollout(model, prompts, G, seeds, new)  # no stop ids: every row full
        stage = 'done'
        res.update(ok=math.isfinite(loss) and vision_norm > 0 and no_grad == 0 and math.isfinite(norm)
                   and tuple(tokens.shape) == (2 * G, new) and bool(torch.isfinite(logps).all())
                   and bool((lengths == new).all()),
                   loss=loss, target_tokens=n_targets, grad_norm=norm, vision_grad_norm=vision_norm,
                   vision_params_without_grad=no_grad, rollout_shape=list(tokens.shape),
                   rollout_expected=[2 * G, new])
    except Exception as e:  # CheckpointError from the recompute would land here: report its text
        res.update(ok=False, error=f'{type(e).__name__}: {e}'[:3000], traceback=traceback.format_exc()[-3000:])
    res['stage'] = stage
    print(json.dumps(dict(res, device=device_name(dev))), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

# -----------------------------------------------------------------------------
# 4. decode tokens/s of the full-depth LM against the HBM roofline

def check_decode(dev, S, seed):
    """Prefill decode_prompt random text tokens in each of `rows` rows (one packed forward), then time greedy
    decode_step calls. Roofline: every step reads the LM's weights once (all but the embedding table, which
    is only gathered, and the vision tower) plus the KV cache so far, at the device's HBM bandwidth. ok: the
    logits stay finite (that decoding is right is tests/test_model.py's: the cache against a full forward)."""
    cfg, P = ModelConfig(**S['decode_cfg']), S['decode_prompt']
    model = random_model(cfg, dev, S['dtype']).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if not n.startswith(('visual.', 'embed_tokens.')))
    name = device_name(dev)
    bandwidth = next((b for k, b in HBM_BANDWIDTH if k in name), None) if dev.type == 'cuda' else None
    g, runs, ok = torch.Generator().manual_seed(seed), [], True
    warm, steps = S['decode_warmup'], S['decode_steps']
    hd = cfg.head_dim
    for rows in S['decode_rows']:
        ids = torch.randint(0, text_limit(cfg), (rows, P), generator=g)
        pos = torch.cat([rope_positions(r, None, cfg)[0] for r in ids], 1)
        cu = (torch.arange(rows + 1) * P).to(torch.int32)
        (cache, logits, next_pos), t_prefill = timed(
            lambda: model.prefill(ids.flatten().to(dev), pos.to(dev), cu.to(dev), max_new_tokens=warm + steps), dev)
        tok = logits.argmax(-1)
        for i in range(warm):
            tok = model.decode_step(tok, next_pos + i, cache).argmax(-1)

        def decode():
            t = tok
            for i in range(warm, warm + steps):
                logits = model.decode_step(t, next_pos + i, cache)
                t = logits.argmax(-1)
            return bool(torch.isfinite(logits).all())
        finite, dt = timed(decode, dev)
        # step i attends to P + i + 1 cached keys and values in every layer
        kv_bytes = sum(2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * (P + i + 1) * hd
                       for i in range(warm, warm + steps)) * cache.k.element_size()
        roofline_s = (steps * weight_bytes + kv_bytes) / bandwidth if bandwidth else None
        ok &= finite
        runs.append(dict(rows=rows, prefill_tokens_per_s=rows * P / t_prefill, decode_tokens_per_s=rows * steps / dt,
                         ms_per_step=1e3 * dt / steps, roofline_pct=100 * roofline_s / dt if roofline_s else None))
        del cache
    return dict(ok=ok, dtype=str(S['dtype']).removeprefix('torch.'), layers=cfg.num_hidden_layers,
                hidden=cfg.hidden_size, prompt_tokens=P, decode_steps=steps, weight_bytes_per_step=weight_bytes,
                hbm_bandwidth=bandwidth, runs=runs)

# -----------------------------------------------------------------------------
# 5. one SFT and one GRPO step at the 7B's widths

def train_setup(dev, S):
    """fp32 master weights, gradient checkpointing, the vision tower trainable, AdamW: as sft.py / grpo.py."""
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = ModelConfig(**S['train_cfg'])
    model = random_model(cfg, dev)
    model.gradient_checkpointing = True
    model.train()
    return cfg, model, make_optimizer(model, 1e-5), [p for p in model.parameters() if p.requires_grad]


def step_report(dev, S, cfg, model, step, batch, n_targets):
    """Run step() once to warm up and train_steps times timed; tokens/s, MFU (sft.step_flops: the vision tower
    included) and peak memory of the mean timed step."""
    import sft
    step()
    losses, dt = [], 0.0
    for _ in range(S['train_steps']):
        (loss, norm), t = timed(step, dev)
        losses.append(loss)
        dt += t / S['train_steps']
    flops = sft.step_flops(cfg, sft.param_counts(model), batch, n_targets, True)
    peak = guess_peak_flops(dev)
    return dict(ok=all(map(math.isfinite, losses)) and 0 < norm < math.inf,
                layers=cfg.num_hidden_layers, vision_blocks=cfg.vision_depth, hidden=cfg.hidden_size,
                params=sum(p.numel() for p in model.parameters()), tokens=len(batch['input_ids']),
                target_tokens=n_targets, video_grid=batch['grid_thw'][0].tolist(), losses=losses, grad_norm=norm,
                step_s=dt, tokens_per_s=len(batch['input_ids']) / dt, flops_per_step=flops,
                mfu=flops / dt / peak if peak else None, peak_memory_gb=peak_memory(dev) / 2**30)


def check_sft_step(dev, S, seed):
    """sft.forward_backward + clip_and_step on one packed batch: a video prompt and its target."""
    import data
    import sft
    cfg, model, optimizer, params = train_setup(dev, S)
    _, autocast = compute_dtype_and_autocast(dev, 'bfloat16')
    g = torch.Generator().manual_seed(seed)
    batch = data.pack([video_sample(cfg, S['train_text'][0], S['train_grid'], S['train_text'][1], S['sft_target'], g)])

    def step():
        loss, _ = sft.forward_backward(model, [batch], dev, autocast)
        return loss, clip_and_step(optimizer, params, 1.0, loss)[0]
    return step_report(dev, S, cfg, model, step, batch, S['sft_target'])


def check_grpo_step(dev, S, seed):
    """One video prompt with G random completions (grpo.group_batch: the prompt computed once), their
    log-probs (grpo.completion_logps), grpo_loss backward and clip_and_step, as grpo.train_on_rollouts does.
    tokens: the batch's, the prompt once. sft.step_flops counts each segment's own attention only, so the
    completions' attention to their prompt (~1% of the step here) is left out of the MFU."""
    import grpo
    cfg, model, optimizer, params = train_setup(dev, S)
    _, autocast = compute_dtype_and_autocast(dev, 'bfloat16')
    g = torch.Generator().manual_seed(seed)
    prompt = video_sample(cfg, S['train_text'][0], S['train_grid'], S['train_text'][1], 0, g)
    G, L = S['grpo_generations'], S['grpo_completion']
    lengths = torch.randint(3 * L // 4, L + 1, (G,), generator=g)
    completions = [torch.randint(0, text_limit(cfg), (int(n),), generator=g) for n in lengths]
    batch = grpo.group_batch([(prompt, completions)])
    adv, _ = grpo.group_advantages(torch.rand(G, generator=g), G)

    def step():
        with autocast():
            flat, _ = grpo.completion_logps(model, batch, 1.0, dev)
        logp, mask = grpo.pad_rows(flat, lengths.to(dev))
        loss, _ = grpo.grpo_loss(logp, None, None, adv.to(dev), mask, loss_type='grpo')
        loss.backward()
        return float(loss.detach()), clip_and_step(optimizer, params, 1.0, float(loss.detach()))[0]
    return dict(step_report(dev, S, cfg, model, step, batch, len(batch['targets'])), generations=G,
                completion_tokens=int(lengths.sum()))


def check_grpo_lora_step(dev, S, seed):
    """config/grpo_qwen2vl_7b_lora.py's step on the whole 7B (its memory budget says ~32 GiB; --family=qwen3_vl:
    config/grpo_qwen3vl_8b_lora.py's on the whole 8B, ~44 GiB, its 16-frame prompt): the frozen base's
    matmul weights in bf16 (frozen_matmul_weights_to), LoRA r=32 on the attention and MLP projections, G rollouts
    of one 8-frame prompt from the adapted policy (unmerged), the reference's log-probs with the adapters off (no
    second model), then the policy's, the loss with KL and the adapters' AdamW step. ok: finite, KL exactly 0
    (the adapters start at zero), the base untouched, and peak memory within the budget on a GPU."""
    import contextlib
    import data
    import grpo
    import runpy
    cfg = ModelConfig(**S['lora_cfg'])
    name, budget = LORA_PRESET[cfg.model_type]
    with contextlib.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):  # presets exec by that path
        preset = runpy.run_path(os.path.join('config', name))
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    compute, autocast = compute_dtype_and_autocast(dev, 'bfloat16')
    model = random_model(cfg, dev)
    apply_lora(model, preset['lora_rank'], preset['lora_alpha'], 0.0, preset['lora_targets'])
    if compute != torch.float32:
        frozen_matmul_weights_to(model, compute)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, preset['lr'])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
    g = torch.Generator().manual_seed(seed)
    prompt = video_sample(cfg, S['train_text'][0], S['lora_grid'], S['train_text'][1], 0, g)
    G, L = S['grpo_generations'], S['grpo_completion']
    seeds = [grpo.row_seed(seed, 0, 0, j) for j in range(G)]
    (rolled, t_roll) = timed(lambda: _rollout(grpo, model, data.pack([prompt]), G, seeds, L, autocast), dev)
    tokens, _, lengths, _ = rolled
    batch = grpo.group_batch([(prompt, [tokens[j, :int(lengths[j])] for j in range(G)])])
    adv, _ = grpo.group_advantages(torch.rand(G, generator=g), G)

    def step():
        with torch.no_grad(), lora_disabled(model), autocast():
            ref, _ = grpo.completion_logps(model, batch, 1.0, dev)
        with autocast():
            flat, _ = grpo.completion_logps(model, batch, 1.0, dev)
        logp, mask = grpo.pad_rows(flat, lengths.to(dev))
        loss, st = grpo.grpo_loss(logp, None, grpo.pad_rows(ref, lengths.to(dev))[0], adv.to(dev), mask,
                                  beta=preset['beta'], loss_type='grpo')
        loss.backward()
        return (float(loss.detach()), float(st['kl'])), clip_and_step(optimizer, params, 1.0, float(loss.detach()))[0]
    (loss0, kl0), _ = step()  # adapters at zero: the policy is the reference
    (loss1, _), t_step = timed(step, dev)
    unchanged = all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    peak = peak_memory(dev) / 2**30
    return dict(ok=math.isfinite(loss0) and math.isfinite(loss1[0]) and kl0 == 0.0 and unchanged
                and (dev.type != 'cuda' or peak <= budget), preset=name,
                layers=cfg.num_hidden_layers, params=sum(p.numel() for p in model.parameters()),
                trainable=sum(p.numel() for p in params), kl_step0=kl0, base_unchanged=unchanged,
                rollout_rows=G, rollout_tokens=int(lengths.sum()), rollout_s=t_roll,
                rollout_tokens_per_s=float(lengths.sum()) / t_roll, train_tokens=len(batch['input_ids']),
                step_s=t_step, peak_memory_gb=peak, budget_gb=budget)


def _rollout(grpo, model, batch, G, seeds, L, autocast):
    with autocast():
        return grpo.rollout(model, batch, G, seeds, L)  # no stop ids: every row L tokens

# -----------------------------------------------------------------------------

CHECKS = dict(attention=check_attention, hf_parity=check_hf_parity, fsdp=check_fsdp, decode=check_decode,
              sft_step=check_sft_step, grpo_step=check_grpo_step, grpo_lora_step=check_grpo_lora_step)


def run_check(name, dev, S, seed):
    """One check -> its JSON line (dict); an exception is a failed check with its text, not the end of the run.
    torch's global RNG (random inits, LoRA's) is seeded first: a check's numbers depend on the seed only, not on
    the run or on the checks before it."""
    t0 = time.time()
    torch.manual_seed(seed)
    try:
        res = CHECKS[name](dev, S, seed)
    except Exception as e:
        res = dict(ok=False, error=f'{type(e).__name__}: {e}'[:3000], traceback=traceback.format_exc()[-3000:])
    gc.collect()  # the next check starts with the device's memory free
    if dev.type == 'cuda':
        torch.cuda.empty_cache()
    return {'check': name, 'ok': bool(res.pop('ok')), 'device': device_name(dev),
            'seconds': round(time.time() - t0, 1), **res}


def main(argv=None):
    configure(globals(), argv)
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if family not in ('qwen2_vl', 'qwen3_vl'):
        raise ValueError(f"--family={family!r}: 'qwen2_vl' (the 7B's shapes) or 'qwen3_vl' (the 8B's)")
    S = SIZES[dev.type] if family == 'qwen2_vl' else family_sizes(SIZES[dev.type], dev.type)
    if worker:
        if worker != 'fsdp':
            raise ValueError(f"--worker={worker!r}: the only worker is 'fsdp'")
        return fsdp_worker(dev, S, seed)
    names = [c.strip() for c in checks.split(',') if c.strip()]
    unknown = sorted(set(names) - set(CHECK_NAMES))
    if unknown:
        raise ValueError(f'--checks: unknown {unknown}; the checks are {list(CHECK_NAMES)}')
    if dev.type == 'cuda':  # fp32 references must be fp32: no TF32 in matmuls or in transformers' Conv3d
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    failed = []
    for name in names:
        line = run_check(name, dev, S, seed)
        print(json.dumps(line), flush=True)
        if not line['ok']:
            failed.append(name)
    if failed:
        print(f'gpu_check: failed: {failed}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
