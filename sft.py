"""
Supervised fine-tuning of Qwen2-VL on Ego-ST samples: the long-CoT "cold start" of ST-R1.

    python sft.py config/sft_egoworld.py                                        # CPU, minutes
    torchrun --nproc_per_node 8 sft.py config/sft_qwen2vl_7b.py \\
        --init_from=/path/Qwen2-VL-7B-Instruct --data=train.jsonl               # 8 GPUs, FSDP2

The targets are the reverse-thinking CoT (the sample's own solution, or one written from the opposite
direction's ground truth) or, with --cot=False, the bare answer. Batches are data.batches' packed
sequences (no padding); one optimizer step is grad_accum of them on every rank, and its loss is the
mean cross-entropy over every target token of the step, so each token weighs the same however tokens
fall into batches. fp32 master weights; bf16 autocast on GPU; LoRA, FSDP2, checkpoints and exact
--resume are common.py's.

Left out on purpose: a Trainer or callbacks, evaluation during training (bench.py does that),
sequence packing across steps, tensor/sequence parallelism.
"""
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce, apply_lora, clip_and_step, compute_dtype_and_autocast, frozen_matmul_weights_to,
                    gather_ids, grad_sync, guess_peak_flops, init_distributed, log_metrics, lr_at, make_optimizer,
                    NonFiniteSteps, peak_memory, print0, rank_world, save_checkpoint, shard_model, start_run,
                    StopSignals, target_logits, target_positions, train_state)
from configurator import configure
from data import FrameCache, Tokenizer, VisionSettings, batches, cot_target, read_samples
from model import Qwen2VL

# -----------------------------------------------------------------------------
# I/O
init_from = 'out/egoworld-tiny'  # any HF-layout Qwen2-VL checkpoint dir (weights, tokenizer.json)
data = 'data_egoworld/train/st_r1_cot.jsonl'  # ST-R1 JSONL or a benchmark-layout folder
video_root = ''          # remaps the JSONL's absolute video paths by basename (the release's are the authors')
out_dir = 'out/sft'
resume = False           # continue from out_dir/train_state.json (on any number of ranks: the global batch stays)
save_interval = 0        # steps between checkpoints; 0: only at the end. Each one is resumable.
# targets
cot = True               # True: the reverse-thinking CoT solution; False: the bare <answer>X</answer>
# vision (data.VisionSettings; the paper: 8 frames, [128*28*28, 360*420] pixels a frame)
nframes = 8
min_pixels = 128 * 28 * 28
max_pixels = 360 * 420
# batching: one optimizer step = grad_accum packed batches of <= token_budget tokens on every rank
token_budget = 4096      # tokens of one packed micro-batch (vision + text); memory scales with it
grad_accum = 1
num_workers = 2          # DataLoader processes decoding video ahead of the GPU
frame_cache_mb = 0       # decoded frames kept (data.FrameCache): an epoch reads each video once per
                         # question (8 in Ego-ST). Per worker; with num_workers=0 it outlives the epoch.
                         # 0: off (7B-sized clips would need GBs)
# LoRA (the paper's cold start: r=8, alpha=8, dropout 0.1 on q,k,v,o of the LLM); 0 = full fine-tune
lora_rank = 0
lora_alpha = 8.0
lora_dropout = 0.0
lora_targets = 'q_proj,k_proj,v_proj,o_proj'  # name suffixes; the vision tower's are qkv/proj
freeze_vision = False    # keep the vision tower as released (it sees the same kind of frames)
# optimizer: AdamW, linear warmup then cosine
lr = 8e-5
min_lr = 0.0
warmup_frac = 0.1        # of all steps, as in the release (HF warmup_ratio)
weight_decay = 0.0       # HF Trainer's default, which the release used
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.3          # max global grad norm; 0 = off
max_nonfinite_steps = 3  # a NaN/inf loss or grad norm skips the update; this many in a row stop the run
epochs = 1
max_steps = -1           # > 0: stop after this many steps instead (epochs repeat as needed)
seed = 1337
# system
dtype = 'bfloat16'       # compute dtype on GPU (weights stay fp32); CPU always computes in fp32
save_dtype = 'float32'   # dtype of the exported model.safetensors (bfloat16 halves a 7B's files)
activation_checkpointing = True  # recompute each block in backward: ~1/3 more compute, far less memory
reduce_every_micro_batch = True  # FSDP: gradients stay sharded between micro-batches (common.grad_sync); False:
                                 # one reduce-scatter a step, full-size fp32 gradients held until then
peak_flops = 0.0         # per device, for MFU; 0: guess from the GPU's name (none on CPU)

# -----------------------------------------------------------------------------

def target_loss(model, batch, device):
    """(summed cross-entropy over the batch's target tokens (fp32), their count)."""
    logits, targets = target_logits(model, batch, device)
    return F.cross_entropy(logits.float(), targets, reduction='sum'), len(targets)


def forward_backward(model, micro_batches, device, autocast=nullcontext, reduce_every_micro_batch=True):
    """Backward of (sum of CE over every target token of the step, on every rank) / (their global count),
    the count all-reduced before any backward. Returns (the step's mean CE per target token, the count)."""
    n = int(all_reduce(sum(len(target_positions(b['labels'])) for b in micro_batches), device))
    world = rank_world()[1]
    total = torch.zeros((), device=device)
    for i, b in enumerate(micro_batches):
        grad_sync(model, i == len(micro_batches) - 1, reduce_every_micro_batch)
        with autocast():
            ce, _ = target_loss(model, b, device)
        # FSDP averages gradients over ranks; * world turns that average back into the sum we want
        (ce * (world / max(n, 1))).backward()
        total += ce.detach()
    return float(all_reduce(float(total), device)) / max(n, 1), n


def param_counts(model):
    """Parameter counts for the FLOP estimate (before sharding): LM blocks, vision patch embedding +
    blocks (per patch), merger and DeepStack mergers (per merged token)."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    v = model.visual
    deepstack = count(v.deepstack_merger_list) if hasattr(v, 'deepstack_merger_list') else 0  # Qwen3-VL's
    return dict(lm=count(model.layers), vision=count(v.blocks) + count(v.patch_embed),
                merger=count(v.merger) + deepstack)


def step_flops(cfg, counts, batch, n_targets, train_vision):
    """Training FLOPs of one packed batch: 6*N per token for the LM blocks, causal attention
    6*L*d*sum(len^2), the head only at target tokens; the vision tower per patch (6*N trained, 2*N
    forward-only when frozen: nothing upstream needs its gradient) plus its full attention within each
    temporal slice."""
    lens = (batch['cu_seqlens'][1:] - batch['cu_seqlens'][:-1]).double()
    T = float(lens.sum())
    width = cfg.num_attention_heads * cfg.head_dim  # attention's (Qwen3-VL's head_dim is its own)
    f = 6 * counts['lm'] * T + 6 * cfg.num_hidden_layers * width * float((lens ** 2).sum())
    f += 6 * cfg.hidden_size * cfg.vocab_size * n_targets
    g = batch['grid_thw']
    if g is not None and len(g):
        k = 6 if train_vision else 2
        P, slices = float(g.prod(-1).sum()), (g[:, 0] * (g[:, 1] * g[:, 2]).double() ** 2).sum()
        f += k * (counts['vision'] * P + counts['merger'] * P / cfg.spatial_merge_size ** 2)
        f += k * 2 * cfg.vision_depth * cfg.vision_embed_dim * float(slices)
    return f


def answer_target(sample):
    """The bare answer (the no-CoT ablation)."""
    return f'<answer>{sample.answer}</answer>'


def accum_for_world(state, grad_accum, world, source):
    """grad_accum on `world` ranks for a run saved as `state` (train_state.json): the saved global batch
    (its grad_accum x its ranks packed batches a step), shared out anew; grad_accum as given on the same ranks."""
    saved_world, saved_accum = state.get('world_size', world), state.get('grad_accum', grad_accum)
    if saved_world == world:
        return grad_accum
    n = saved_world * saved_accum
    if n % world:
        raise ValueError(f'{source}: saved on {saved_world} rank(s) x grad_accum {saved_accum} = {n} packed batches '
                         f'a step, which {world} ranks cannot share evenly; resume on a number of ranks dividing {n}')
    print0(f'resuming on {world} rank(s), saved on {saved_world}: grad_accum {saved_accum} -> {n // world} keeps '
           f'the global batch of {n} packed batches a step')
    return n // world


def step_batches(loader_for_epoch, grad_accum, num_workers, seed, epoch, start):
    """Yield (epoch, step in epoch, [grad_accum packed batches]) from step `start` of `epoch` on, forever
    (epochs reshuffle); loader_for_epoch(e) is data.batches of epoch e. The tail batches of an epoch
    that do not fill a step are dropped. The DataLoader gets its own generator, so iterating never
    draws from torch's global RNG (LoRA dropout's): a resumed run sees the same random numbers."""
    while True:
        loader = loader_for_epoch(epoch)
        n = len(loader) // grad_accum
        if n == 0:
            raise ValueError(f'{len(loader)} batches per rank, fewer than grad_accum={grad_accum}')
        part = torch.utils.data.Subset(loader.dataset, range(start * grad_accum, n * grad_accum))
        it = iter(torch.utils.data.DataLoader(part, batch_size=None, num_workers=num_workers,
                                              generator=torch.Generator().manual_seed(seed)))
        for s in range(start, n):
            yield epoch, s, [next(it) for _ in range(grad_accum)]
        epoch, start = epoch + 1, 0

# -----------------------------------------------------------------------------

def main(argv=None):
    config = configure(globals(), argv)
    rank, world, local_rank, device = init_distributed()
    master = rank == 0
    torch.manual_seed(seed)  # the same on every rank: LoRA's init must agree before sharding
    on_gpu = device.type == 'cuda'
    compute_dtype, autocast = compute_dtype_and_autocast(device, dtype)

    # data: the same preprocessing as grpo.py and bench.py (data.encode); checked before any compute
    settings = VisionSettings(nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels)
    tok = Tokenizer(init_from)
    samples = read_samples(data, **({'video_root': video_root} if video_root and not os.path.isdir(data) else {}))
    print0(f'{data}: {len(samples)} samples; targets: {"reverse-thinking CoT" if cot else "bare answers"}')

    # model: fp32 master weights, adapters, then shards
    model = Qwen2VL.from_pretrained(init_from, dtype=torch.float32, device=device)  # sharding frees the rest
    if freeze_vision:
        model.visual.requires_grad_(False)
    if lora_rank > 0:
        names = apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        print0(f'LoRA r={lora_rank} alpha={lora_alpha} on {len(names)} linears')
    counts = param_counts(model)
    train_vision = any(p.requires_grad for p in model.visual.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f'parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, trainable {n_train / 1e6:.3f}M')
    model.gradient_checkpointing = activation_checkpointing
    model.train()
    if world > 1:
        shard_model(model, device, compute_dtype if compute_dtype != torch.float32 else None)
    elif compute_dtype != torch.float32:
        frozen_matmul_weights_to(model, compute_dtype)
    optimizer = make_optimizer(model, lr, weight_decay, (beta1, beta2))

    # resumed on another number of ranks: the same global batch of packed batches a step, so every step sees the
    # samples it saw before (data.batches deals global batch j to rank j % world)
    saved, accum = train_state(out_dir) if resume else None, grad_accum
    if saved:
        accum = accum_for_world(saved, grad_accum, world, os.path.join(out_dir, 'train_state.json'))
    # schedule: the number of steps is known up front (lengths come from video headers)
    target = cot_target if cot else answer_target
    cache = FrameCache(frame_cache_mb * 2**20) if frame_cache_mb > 0 else None
    epoch_batches = lambda e, r, workers: batches(samples, tok, settings, token_budget, seed, r, world, workers,
                                                  target, e, model.config, cache)
    total_steps = max_steps if max_steps > 0 else sum(len(epoch_batches(e, 0, 0)) // accum for e in range(epochs))
    warmup = int(warmup_frac * total_steps)
    torch.manual_seed(seed + rank)  # LoRA dropout: a stream per rank (a resumed run restores its own)
    state = start_run(out_dir, resume, model, optimizer, config)
    step, epoch, start = (state['step'], state['epoch'], state['step_in_epoch']) if state else (0, 0, 0)
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    peak = peak_flops or guess_peak_flops(device)
    params = [p for p in model.parameters() if p.requires_grad]
    print0(f'{total_steps} steps of {accum} x {world} packed batches (<= {token_budget} tokens), '
           f'warmup {warmup}, lr {lr}, {"FSDP2 on " if world > 1 else ""}{world} {device.type} process(es)')

    batch_iter = step_batches(lambda e: epoch_batches(e, rank, num_workers), accum, num_workers, seed, epoch,
                              start)
    pbar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    signals, nonfinite = StopSignals(), NonFiniteSteps(max_nonfinite_steps)
    while step < total_steps:
        t0 = time.time()
        epoch, s, micro = next(batch_iter)
        lr_now = lr_at(step, total_steps, lr, warmup, min_lr)
        for g in optimizer.param_groups:
            g['lr'] = lr_now
        loss, n_targets = forward_backward(model, micro, device, autocast, reduce_every_micro_batch)
        norm, stepped = clip_and_step(optimizer, params, grad_clip, loss)
        ids = [samples[i].id for i in gather_ids([i for b in micro for i in b['sample_index'].tolist()], device)]
        tokens = sum(len(b['input_ids']) for b in micro)
        flops = sum(step_flops(model.config, counts, b, len(target_positions(b['labels'])), train_vision)
                    for b in micro)
        tokens, flops = all_reduce([float(tokens), flops], device).tolist()
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        if master:
            m = dict(step=step - 1, epoch=epoch, loss=loss, lr=lr_now, grad_norm=norm, skipped=not stepped,
                     target_tokens=n_targets, tokens=int(tokens), tokens_per_s=tokens / dt,
                     mfu=flops / dt / (peak * world) if peak else None, peak_mem_gb=peak_memory(device) / 2**30,
                     dt=dt, samples=ids)
            log_metrics(metrics_path, m)
            pbar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr_now:.2e}', tok_s=f'{tokens / dt:.0f}')
        pbar.update(1)
        nonfinite.update(step - 1, stepped, ids)
        stop = signals.agreed(device)
        if step == total_steps or stop or (save_interval > 0 and step % save_interval == 0):
            state = dict(step=step, epoch=epoch, step_in_epoch=s + 1, world_size=world, grad_accum=accum)
            save_checkpoint(out_dir, model, init_from, optimizer, state, config,
                            settings.record(samples, model.config), getattr(torch, save_dtype))
        if stop:
            break
    pbar.close()
    signals.report(step, total_steps, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
