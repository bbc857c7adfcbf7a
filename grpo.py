"""
GRPO for ST-R1: the policy (an SFT checkpoint) samples G completions per prompt, reward.py scores
them, and a clipped policy-gradient loss with group-normalised advantages updates it.

    python grpo.py config/grpo_egoworld.py                                      # CPU, minutes
    torchrun --nproc_per_node 8 grpo.py config/grpo_qwen2vl_7b.py \\
        --init_from=out/sft-qwen2vl-7b --data=st_r1_mcq_630.jsonl --video_root=/path/videos
    python grpo.py config/grpo_qwen2vl_7b_lora.py --init_from=out/sft-qwen2vl-7b ...  # LoRA: 1 GPU

One step: this rank's prompts -> G rollouts each from one prefill (model.generate with a per-row
seeded sampler) -> rewards, gathered over ranks -> group advantages -> prompt + completion sequences
packed for the training forward -> num_iterations x num_minibatches optimizer steps -> one metrics line.
Every number of a step is the same for 1 rank or 8 and after a resume. Knob names are TRL's
GRPOTrainer's (num_generations, beta, epsilon, epsilon_high, loss_type, scale_rewards, num_iterations);
checkpoints, FSDP2 and resume are common.py's. With --lora_rank only the adapters train (common.apply_lora,
as in sft.py): the rollouts sample from the adapted policy unmerged, the KL reference is the same model
with its adapters switched off (common.lora_disabled), and one process keeps the frozen base in the
compute dtype (bf16).

Left out on purpose: vLLM or a separate inference server (the rollout engine is model.py's KV cache),
DAPO's over-sampling to refill dropped groups, TRL's two-sided clipping `delta`, sequence-level
importance sampling (GSPO), entropy masking, QLoRA's 4-bit base, and evaluation during training (bench.py).
"""
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import reward
from common import (all_reduce, apply_lora, clip_and_step, compute_dtype_and_autocast, frozen_matmul_weights_to,
                    gather_ids, gather_rows, grad_sync, init_distributed, log_metrics, lora_disabled, lr_at,
                    make_optimizer, NonFiniteSteps, peak_memory, print0, save_checkpoint, shard_model, start_run,
                    StopSignals, target_logits)
from configurator import configure
from data import Tokenizer, VisionSettings, encode, greedy_pack, pack, read_samples
from model import Qwen2VL, filter_logits

# -----------------------------------------------------------------------------
# I/O
init_from = 'out/sft-egoworld'   # the policy's start: an SFT checkpoint dir (HF layout, tokenizer.json)
ref_from = ''            # the frozen KL reference (only loaded when beta > 0); '' = init_from (LoRA: the policy
                         # with its adapters off, no second model)
data = 'data_egoworld/train/st_r1_cot.jsonl'  # ST-R1 JSONL or a benchmark folder (only the questions are used)
video_root = ''          # remaps the JSONL's absolute video paths by basename
tasks = 'route,direction,landmark,action'  # the tasks whose questions RL trains on (the release: the MCQ ones)
out_dir = 'out/grpo'
resume = False           # continue from out_dir/train_state.json (on any number of ranks)
save_interval = 0        # steps between checkpoints; 0: only at the end. Each one is resumable.
# vision (data.VisionSettings; the paper: 8 frames, [128*28*28, 360*420] pixels a frame)
nframes = 8
min_pixels = 128 * 28 * 28
max_pixels = 360 * 420
# rollouts: the paper's G = 8 samples of <= 256 tokens at temperature 1.0, no truncation
prompts_per_step = 8     # prompts per step over ALL ranks (each rank rolls out prompts_per_step / world)
num_generations = 8      # G: completions per prompt, the group the advantage is relative to
max_completion_length = 256
temperature = 1.0        # set explicitly: sampling never inherits a checkpoint's generation_config
top_p = 1.0              # 1.0 / 0: off; truncation biases the samples away from the policy being trained
top_k = 0
# rewards (reward.score_completion's components). The release used accuracy alone; format and
# reverse thinking are shaping terms at half weight (reward.DEFAULT_WEIGHTS says why)
reward_weights = dict(reward.DEFAULT_WEIGHTS)
# loss (grpo_loss): the paper's beta 0.1 and per-sequence mean; epsilon only matters with > 1 update a rollout
beta = 0.1               # k3 KL to the reference; 0: no reference model at all
epsilon = 0.2            # clip ratio below 1 - epsilon ...
epsilon_high = None      # ... and above 1 + epsilon_high (None: = epsilon; DAPO's clip-higher: 0.28)
loss_type = 'grpo'       # 'grpo' per-sequence mean | 'dapo' token mean | 'dr_grpo' constant normaliser
scale_rewards = 'group'  # advantage scale: 'group' std | 'batch' std | 'none' (Dr. GRPO)
num_iterations = 1       # passes over each rollout batch (the release: 1, strictly on-policy)
num_minibatches = 1      # optimizer steps per pass (each on 1/num_minibatches of the completions)
drop_zero_std = False    # leave groups whose rewards are all equal out of the loss (no signal, only KL)
mask_truncated_completions = False  # leave completions cut at max_completion_length out of the loss (DAPO)
# training forward: prompt + completion sequences packed into micro-batches of <= this many tokens
train_token_budget = 16384
# optimizer: AdamW, the paper's lr 1e-5, cosine from the first step
lr = 1e-5
min_lr = 0.0
warmup_frac = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0          # max global grad norm per update; 0 = off
max_nonfinite_steps = 3  # a NaN/inf loss or grad norm skips the update; steps with one, this many in a row, stop
freeze_vision = False    # the release trains everything
# LoRA, sft.py's knobs (common.apply_lora); 0 = full weights (the paper). Adapters usually want ~10x the lr.
# With dropout > 0 the training forward is noisier than the sampler (sampler_logp_diff is then not rounding)
lora_rank = 0
lora_alpha = 8.0
lora_dropout = 0.0
lora_targets = 'q_proj,k_proj,v_proj,o_proj'  # name suffixes; + gate_proj,up_proj,down_proj for the MLP
epochs = 1
max_steps = -1           # > 0: stop after this many steps instead (epochs repeat as needed)
seed = 1337
# system
dtype = 'bfloat16'       # compute dtype on GPU (weights stay fp32); CPU always computes in fp32
save_dtype = 'float32'   # dtype of the exported model.safetensors
activation_checkpointing = True  # recompute each block in backward: ~1/3 more compute, far less memory
reduce_every_micro_batch = True  # FSDP: gradients stay sharded between micro-batches (common.grad_sync); False:
                                 # one reduce-scatter an update, full-size fp32 gradients held until then
log_interval = 1

LOSS_TYPES = ('grpo', 'dapo', 'dr_grpo')
MAX_LOG_GAP = 20.0  # exp(20) ~ 5e8: far past any clip range, far from fp32's overflow at exp(88)
SCALE_REWARDS = ('group', 'batch', 'none')
REWARD_KEYS = ('total', 'accuracy', 'format', 'reverse', 'route')

# -----------------------------------------------------------------------------
# the loss

def group_advantages(rewards, num_generations, scale_rewards='group', eps=1e-4):
    """rewards (N,) prompt-major -> (advantages (N,) float32, zero_std (N,) bool: True for every member of a
    group whose rewards are all equal; its advantage is 0). The advantage is the reward minus its group's
    mean, divided by the group's std ('group'), the batch's std ('batch') or nothing ('none')."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = torch.as_tensor(rewards, dtype=torch.float32)
    G = int(num_generations)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(r.shape)}")
    if G < 2:
        raise ValueError(f"num_generations must be >= 2 (a group of one has no relative advantage), got {G}")
    if r.numel() == 0 or r.numel() % G != 0:
        raise ValueError(f"{r.numel()} rewards do not split into groups of num_generations={G}")
    if not torch.isfinite(r).all():
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    groups = r.view(-1, G)
    adv = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    zero_std = (groups.amax(dim=1) == groups.amin(dim=1)).repeat_interleave(G)
    if scale_rewards == 'group':
        adv = adv / (groups.std(dim=1).repeat_interleave(G) + eps)
    elif scale_rewards == 'batch':
        adv = adv / (r.std() + eps)
    return adv.masked_fill(zero_std, 0.0), zero_std


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0, epsilon=0.2, epsilon_high=None,
              loss_type='dapo', max_completion_length=None, num_items=None):
    """The clipped surrogate -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) per token,
    plus beta * k3 KL to the reference, on padded completions (B, L).
    logp: the trained policy's log-probs of the sampled tokens (requires grad); old_logp: the sampling
    policy's (None: logp.detach(), ratio 1, the plain policy gradient); ref_logp: the reference's,
    required when beta > 0; advantages (B,); mask (B, L) True on completion tokens.
    Normalisers: 'grpo' the mean over sequences of each one's token mean; 'dapo' the token sum over
    num_items (default: the tokens here); 'dr_grpo' the token sum over B * max_completion_length.
    Defaults are TRL's. Returns (loss 0-d, stats: dict of detached 0-d tensors)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, L), got shape {tuple(logp.shape)}")
    B, L = logp.shape
    for name, t in (('old_logp', old_logp), ('ref_logp', ref_logp), ('mask', mask)):
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must have logp's shape {(B, L)}, got {tuple(t.shape)}")
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must be (B,) = {(B,)}, got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the frozen reference's log-probs)")
    if loss_type == 'dr_grpo' and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser)")
    if num_items is not None and loss_type != 'dapo':
        raise ValueError(f"num_items is the 'dapo' normaliser; loss_type={loss_type!r} does not use it")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    m = mask.bool()
    mf = m.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    # padding may hold anything (-inf, nan): zero it before exp so no nan reaches the gradient
    logp = torch.where(m, logp.float(), zero)
    old = logp.detach() if old_logp is None else torch.where(m, old_logp.detach().float(), zero)
    A = advantages.detach().float().unsqueeze(1)

    # log-ratios and KL gaps clamped to +-MAX_LOG_GAP: exp of an extreme gap (a token the reference or the
    # sampler found ~impossible) would overflow to inf, and inf * 0 to nan; a clamped token gets no gradient
    ratio = torch.exp((logp - old).clamp(-MAX_LOG_GAP, MAX_LOG_GAP))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if ref_logp is not None:
        delta = (torch.where(m, ref_logp.detach().float(), zero) - logp).clamp(-MAX_LOG_GAP, MAX_LOG_GAP)
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = per_token * mf

    if loss_type == 'grpo':
        loss = (per_token.sum(dim=1) / mf.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == 'dapo':
        denom = mf.sum().clamp(min=1.0) if num_items is None else torch.as_tensor(num_items, dtype=torch.float32)
        if float(denom) <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        loss = per_token.sum() / denom
    else:
        loss = per_token.sum() / (B * max_completion_length)

    with torch.no_grad():
        ntok = mf.sum().clamp(min=1.0)
        low = (ratio < 1 - epsilon) & (A < 0) & m
        high = (ratio > 1 + epsilon_high) & (A > 0) & m
        stats = {
            'clip_low': low.sum() / ntok,
            'clip_high': high.sum() / ntok,
            'clip_region': (low | high).sum() / ntok,
            'ratio': (ratio * mf).sum() / ntok,
            'tokens': mf.sum(),
        }
        if kl is not None:
            stats['kl'] = (kl * mf).sum() / ntok
    return loss, {k: v.detach() for k, v in stats.items()}

# -----------------------------------------------------------------------------
# rollouts

def row_seed(seed, epoch, index, generation):
    """The seed of one rollout row: a function of (run seed, epoch, the prompt's index in the data,
    the generation) only, so a row's tokens are the same for any number of ranks, any batching and
    after a resume. SeedSequence mixes the tuple, so neighbouring rows are unrelated."""
    return int(np.random.SeedSequence([seed, epoch, index, generation]).generate_state(1, np.uint64)[0] >> 1)


def row_uniforms(seeds, n, device='cpu'):
    """(len(seeds), n) float64 uniforms in [0, 1): row r from its own generator seeded with seeds[r]."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds]).to(device)


def policy_logits(logits, temperature, banned=None):
    """The policy's logits: fp32, divided by the temperature, banned ids at -inf. The policy never emits a
    visual token: model.generate bans them (config.visual_token_ids) in every rollout, and the training forward
    passes the same ids here, so the trained log-probs give them no mass either."""
    logits = logits.float() / temperature
    return logits if banned is None else logits.index_fill(-1, banned, float('-inf'))


def sample_rows(logits, u, top_k=0, top_p=1.0):
    """One token per row by inverse CDF: the first token whose cumulative probability exceeds u (R,).
    top-k/top-p truncate what is sampled from; the log-prob returned is the untruncated policy's
    (TRL's choice too). The CDF is float64, so 150k-entry sums do not drift, and a token of probability
    0 is never the first to exceed u (its CDF equals its predecessor's)."""
    logp = logits.log_softmax(-1)
    cdf = filter_logits(logp, top_k, top_p).softmax(-1).double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    tok = tok.clamp_(max=logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def rollout(model, batch, num_generations, seeds, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
            stop_ids=(), pad_id=0):
    """num_generations completions of every prompt of a packed batch (prompt b -> rows b*G .. b*G+G-1),
    row r sampled with row_uniforms(seeds)[r]. Returns tokens (R, N) (pad_id after the end), the sampled
    tokens' log-probs under policy_logits (R, N), lengths (R,), stopped (R,): ended on a stop id. Samples the
    policy itself: in eval mode (no LoRA dropout, no draw from torch's RNG), the model's mode restored after."""
    B = len(batch['cu_seqlens']) - 1
    if len(seeds) != B * num_generations:
        raise ValueError(f'rollout: {B} prompts x {num_generations} generations need {B * num_generations} seeds, '
                         f'got {len(seeds)}')
    dev = model.embed_tokens.weight.device
    uniforms = row_uniforms(seeds, max_new_tokens, dev)
    sampler = lambda logits, i: sample_rows(policy_logits(logits, temperature), uniforms[:, i], top_k, top_p)
    pv = batch['pixel_values'].to(dev) if batch.get('pixel_values') is not None else None
    # eval mode: no LoRA dropout while sampling. Inference mode (no autograd bookkeeping at all) takes ~1/4 off a
    # small model's decode step on a CPU; not under FSDP2, whose unsharding updates parameters in place (an
    # error in inference mode, torch 2.13)
    from torch.distributed.fsdp import FSDPModule
    training = model.training
    model.eval()
    with torch.inference_mode(not isinstance(model, FSDPModule)):
        out = model.generate(
            batch['input_ids'].to(dev), batch['position_ids'].to(dev), batch['cu_seqlens'].to(dev), pv,
            batch.get('grid_thw'), max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_ids,
            num_samples=num_generations, pad_token_id=pad_id)
    model.train(training)
    tokens, logps, lengths = (t.clone() for t in out)  # ordinary tensors again: the caller may update them in place
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    return tokens, logps, lengths, torch.isin(last, torch.tensor(list(stop_ids), dtype=torch.long, device=dev))


@contextmanager
def gathered_for_rollout(model):
    """FSDP: keep every unit's parameters gathered from its first use in the rollout to the end, so the
    blocks are all-gathered once, in the prefill, not once per decoded token, and ranks may stop
    decoding at different steps. `generate` must be a registered FSDP forward method of the root
    (main does it), so the root's parameters stay gathered for the whole call. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)

# -----------------------------------------------------------------------------
# rewards

def score_rollouts(samples, texts, num_generations, weights):
    """reward.score_completion of completion j against samples[j // G] -> (N, len(REWARD_KEYS)) float64,
    nan where a component does not apply to the sample."""
    out = torch.full((len(texts), len(REWARD_KEYS)), float('nan'), dtype=torch.float64)
    for j, text in enumerate(texts):
        comps = reward.score_completion(text, samples[j // num_generations], weights)
        for k, key in enumerate(REWARD_KEYS):
            if comps.get(key) is not None:
                out[j, k] = comps[key]
    return out


def completion_texts(tok, tokens, lengths, stopped):
    """The completions as text, the stop token left out (the reward sees what the user would)."""
    return [tok.decode(tokens[j, :int(lengths[j]) - int(stopped[j])].tolist()) for j in range(len(tokens))]


def reward_metrics(rewards):
    """mean/std of every reward component over the completions it applies to (global rewards)."""
    m = {}
    for k, key in enumerate(REWARD_KEYS):
        v = rewards[:, k][~torch.isnan(rewards[:, k])]
        m[f'reward/{key}'] = float(v.mean()) if len(v) else None
        m[f'reward/{key}_std'] = float(v.std(correction=0)) if len(v) else None
    m['reward'], m['accuracy'] = m['reward/total'], m['reward/accuracy']
    return m

# -----------------------------------------------------------------------------
# the training forward

def group_batch(groups):
    """The training forward's batch for completions grouped by prompt, [(prompt (data.encode, no target),
    [completion ids, stop token included])]: each prompt is one segment, computed once (its clip through
    the tower once too), and each completion one more that sees its prompt in full (Qwen2VL.forward's
    parents), at the positions decoding gave it. A completion's last token is only a target, and the
    prompt's last token predicts every completion's first. Targets come in completion order, stop tokens
    included: the policy learns to stop. Equals each prompt + completion as a sequence of its own."""
    ids, pos, cu, parents, pixels, grids, rows, targets, names = [], [], [0], [], [], [], [], [], []
    for prompt, completions in groups:
        parent = len(parents)
        ids.append(prompt['input_ids'])
        pos.append(prompt['position_ids'])
        parents.append(-1)
        cu.append(cu[-1] + len(prompt['input_ids']))
        pixels.append(prompt['pixel_values'])
        grids.append(prompt['grid_thw'])
        for j, c in enumerate(completions):
            c = c.cpu()
            names.append(f"completion {j} of sample {prompt.get('id')}")
            rows.append(cu[parent + 1] - 1)
            if len(c) > 1:
                ids.append(c[:-1])
                pos.append((prompt['next_position'] + torch.arange(len(c) - 1)).expand(3, -1))
                parents.append(parent)
                rows.extend(range(cu[-1], cu[-1] + len(c) - 1))
                cu.append(cu[-1] + len(c) - 1)
            targets.append(c)
    return dict(input_ids=torch.cat(ids), position_ids=torch.cat(pos, 1),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32), parents=torch.tensor(parents),
                pixel_values=torch.cat(pixels), grid_thw=torch.cat(grids), target_rows=torch.tensor(rows),
                targets=torch.cat(targets), completions=names,
                target_cu=torch.tensor([0] + [len(c) for c in targets]).cumsum(0))


def check_text_only(batch, visual_ids):
    """A completion is text: a visual token in one (a sampler other than model.generate's, an older run's
    rollouts) would be fed visual features in the training forward and fail deep inside it. Name it instead."""
    if 'completions' not in batch:  # a data.pack batch: data.encode checked its texts
        return
    hit = torch.isin(batch['targets'], torch.tensor(visual_ids))
    if hit.any():
        k = int(hit.nonzero()[0, 0])
        c = int(torch.searchsorted(batch['target_cu'], k, right=True)) - 1
        raise ValueError(f"{batch['completions'][c]} holds the visual token {int(batch['targets'][k])} at "
                         f"position {k - int(batch['target_cu'][c])}: only the processor places visual tokens "
                         f"(model.generate never samples them)")


def completion_logps(model, batch, temperature, device, entropy=False):
    """Log-probs under policy_logits of every completion token of a group_batch, flat (n,) in completion
    order: the distribution the tokens were sampled from, before top-k/top-p. With entropy=True also the
    policy's entropy at each of them (detached)."""
    check_text_only(batch, model.config.visual_token_ids)
    logits, target = target_logits(model, batch, device)
    logits = policy_logits(logits, temperature, torch.tensor(model.config.visual_token_ids, device=logits.device))
    logp = logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = torch.special.entr(torch.softmax(logits, -1)).sum(-1)
    return logp, ent


def pad_rows(flat, lengths):
    """Flat per-token values, rows back to back, -> (B, max length) zero-padded, and the mask."""
    L = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(L, device=flat.device)[None] < lengths.to(flat.device)[:, None]
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat), mask

# -----------------------------------------------------------------------------
# the step's bookkeeping

def step_prompts(num_samples, epoch, step_in_epoch, rank, world, prompts_per_step, seed):
    """Indices of this rank's prompts at (epoch, step): the epoch's seeded permutation (the same on every
    rank) cut into steps of prompts_per_step, each cut into world slices, so the global batch is the same
    for any number of ranks."""
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    chunk = order[step_in_epoch * prompts_per_step:(step_in_epoch + 1) * prompts_per_step]
    per_rank = prompts_per_step // world
    return chunk[rank * per_rank:(rank + 1) * per_rank].tolist()


def plan_updates(keep, seq_len, G, num_minibatches, token_budget, device):
    """This rank's minibatches: (kept rows, how many rows the minibatch has kept or not, micro-batches as
    lists of (rows, weight)). Minibatch k holds generation chunk k of every group, so it is the same set of
    completions for any number of ranks and sees every prompt. Micro-batches pack the kept rows under
    token_budget; every rank gets the same number per minibatch (FSDP's collectives pair up), padded with
    zero-weight copies of its first completion."""
    chunks = [set(c.tolist()) for c in np.array_split(np.arange(G), num_minibatches)]
    kept = keep.nonzero().squeeze(1).tolist()
    minibatches = [[j for j in kept if j % G in c] for c in chunks]
    sizes = [len(keep) // G * len(c) for c in chunks]
    plans = [greedy_pack(mb, seq_len, token_budget) for mb in minibatches]  # consecutive rows
    n_micro = all_reduce([len(p) for p in plans], device, 'max').long().tolist()
    plans = [[(rows, 1.0) for rows in p] + [([0], 0.0)] * (n - len(p)) for p, n in zip(plans, n_micro)]
    return minibatches, sizes, plans


def train_on_rollouts(model, ref, optimizer, prompts, tokens, lengths, sampler_logp, adv, keep, *, G,
                      num_iterations, num_minibatches, token_budget, temperature, grad_clip, loss_kw, device,
                      autocast, world, reduce_every_micro_batch=True):
    """The updates of one step on this rank's rollouts (prompts: data.encode of each prompt; tokens, lengths,
    sampler_logp: the rollout's, row j a completion of prompt j // G; adv, keep: per row); loss_kw:
    grpo_loss's settings. Returns the sums the step's metrics are made of (this rank's; loss and grad norm
    already global)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_type = loss_kw['loss_type']
    # the token budget counts every completion with its prompt, as if the prompt were not shared
    seq_len = [len(prompts[j // G]['input_ids']) + int(lengths[j]) for j in range(len(lengths))]
    minibatches, sizes, plans = plan_updates(keep, seq_len, G, num_minibatches, token_budget, device)
    counts = all_reduce([[len(mb), float(lengths[mb].sum()) if mb else 0.0, n]
                         for mb, n in zip(minibatches, sizes)], device)
    completion = lambda j: tokens[j, :int(lengths[j])]
    batches = {tuple(rows): group_batch([(prompts[b], [completion(j) for j in rows if j // G == b])
                                         for b in dict.fromkeys(j // G for j in rows)])
               for p in plans for rows, _ in p}
    sums = dict(loss=0.0, norm=0.0, updates=0, skipped=0, train_tokens=0.0, tokens=0.0, clip_low=0.0, clip_high=0.0,
                clip_region=0.0, ratio=0.0, kl=0.0, entropy=0.0, diag_tokens=0.0, logp_diff=0.0)

    def logps(net, rows, entropy=False):
        with autocast():
            return completion_logps(net, batches[tuple(rows)], temperature, device, entropy)

    def diagnose(flat, ent, rows):
        # entropy, and |training - sampler log-prob| of the policy that sampled: the sampler's KV-cache
        # decode and the packed training forward round differently (~2e-7 in fp32 on CPU); a large
        # value means a bug in positions or packing
        r = torch.tensor(rows)
        mask = pad_rows(flat, lengths[r])[1].cpu()
        sums['entropy'] += float(ent.sum())
        sums['diag_tokens'] += len(ent)
        sums['logp_diff'] += float((flat.detach().cpu() - sampler_logp[r][:, :mask.shape[1]][mask]).abs().sum())

    # With more than one update a rollout batch, old_logp is a no-grad forward of the policy before the
    # first update (TRL's choice), not the sampler's: their rounding differs (more in bf16), which would
    # show up as ratios != 1 and spurious clipping. The reference's, once, when beta > 0.
    need_old = num_iterations > 1 or num_minibatches > 1
    old, ref_lp = {}, {}
    with torch.no_grad():
        for p in plans:
            for rows, weight in p:
                if need_old:
                    old[tuple(rows)], ent = logps(model, rows, entropy=True)
                    if weight:
                        diagnose(old[tuple(rows)], ent, rows)
                if ref is not None:
                    with lora_disabled(ref):  # LoRA: ref is the policy itself, its adapters off
                        ref_lp[tuple(rows)] = logps(ref, rows)[0]

    for it in range(num_iterations):
        for mb, p in enumerate(plans):
            n_kept, n_tok, n_seq = counts[mb].tolist()
            if n_kept == 0:
                continue  # nothing kept on any rank: nothing to learn from
            loss_sum = 0.0
            for k, (rows, weight) in enumerate(p):
                grad_sync(model, k == len(p) - 1, reduce_every_micro_batch)
                r = torch.tensor(rows)
                flat, ent = logps(model, rows, entropy=not need_old)
                logp, mask = pad_rows(flat, lengths[r].to(device))
                old_lp = pad_rows(old[tuple(rows)], lengths[r].to(device))[0] if need_old else None
                ref_pad = pad_rows(ref_lp[tuple(rows)], lengths[r].to(device))[0] if ref is not None else None
                loss, st = grpo_loss(logp, old_lp, ref_pad, adv[r].to(device), mask, **loss_kw,
                                     num_items=n_tok / world if loss_type == 'dapo' else None)
                # Normalisers are the minibatch's, over all ranks, so micro-batching and ranks change
                # nothing: 'dapo' divides by the global count of kept tokens / world (FSDP averages gradients
                # over ranks); 'grpo' and 'dr_grpo' scale each micro-batch's mean by its share of ALL the
                # minibatch's sequences: a dropped row counts in the denominator with nothing in the sum, as
                # TRL's zeroed mask does (dividing by the kept rows would scale the step by N / N_kept)
                scale = weight * (1.0 if loss_type == 'dapo' else len(rows) * world / n_seq)
                (loss * scale).backward()
                loss_sum += float(loss.detach()) * scale
                sums['train_tokens'] += len(batches[tuple(rows)]['input_ids']) * weight
                w = float(st['tokens']) * weight
                sums['tokens'] += w
                for key in ('clip_low', 'clip_high', 'clip_region', 'ratio', 'kl'):
                    sums[key] += float(st.get(key, 0.0)) * w
                if not need_old and weight:
                    diagnose(flat, ent, rows)
            loss_mb = float(all_reduce(loss_sum, device)) / world
            norm, stepped = clip_and_step(optimizer, params, grad_clip, loss_mb)
            sums['norm'] += norm
            sums['loss'] += loss_mb
            sums['updates'] += 1
            sums['skipped'] += not stepped
    return sums


def step_metrics(sums, rewards, lengths, stopped, keep, zero_std, with_kl, t_roll, t_train, device):
    """One step's metrics over all ranks, from train_on_rollouts' sums and the rollouts (this rank's rows;
    rewards and zero_std already global)."""
    keys = ('train_tokens', 'tokens', 'clip_low', 'clip_high', 'clip_region', 'ratio', 'kl', 'entropy',
            'diag_tokens', 'logp_diff')
    red = dict(zip(keys, all_reduce([float(sums[k]) for k in keys], device).tolist()))
    lens = gather_rows(lengths.to(device)).cpu().double()
    trunc = gather_rows((~stopped).long().to(device)).cpu().double()
    n_kept = float(all_reduce(float(keep.sum()), device))
    ntok, ndiag, nup = max(red['tokens'], 1.0), max(red['diag_tokens'], 1.0), max(sums['updates'], 1)
    return dict(loss=sums['loss'] / nup, grad_norm=sums['norm'] / nup, updates=sums['updates'],
                skipped_updates=sums['skipped'],
                **reward_metrics(rewards), kl=red['kl'] / ntok if with_kl else None,
                clip_low=red['clip_low'] / ntok, clip_high=red['clip_high'] / ntok,
                clip_region=red['clip_region'] / ntok, ratio=red['ratio'] / ntok, entropy=red['entropy'] / ndiag,
                sampler_logp_diff=red['logp_diff'] / ndiag, completion_len=float(lens.mean()),
                completion_len_max=int(lens.max()), truncated=float(trunc.mean()),
                zero_std=float(zero_std.double().mean()), kept=n_kept / len(lens), rollout_tokens=int(lens.sum()),
                rollout_tokens_per_s=float(lens.sum()) / t_roll, train_tokens_per_s=red['train_tokens'] / t_train)


def check_config(c, world):
    """Settings (the dict configure returns) that cannot run fail here, naming the key."""
    G, components = c['num_generations'], list(REWARD_KEYS[1:])
    unknown = sorted(set(c['reward_weights']) - set(components))
    bad_tasks = sorted(set(c['tasks'].split(',')) - set(reward.TASKS))
    bad = [(c['prompts_per_step'] % world != 0,
            f"prompts_per_step={c['prompts_per_step']} must be a multiple of the {world} ranks"),
           (c['prompts_per_step'] < 1, f"prompts_per_step={c['prompts_per_step']} must be >= 1"),
           (G < 2, f'num_generations={G}: a group of one has no relative advantage'),
           (not c['temperature'] > 0, f"temperature={c['temperature']}: GRPO samples (> 0); greedy has no spread"),
           (c['max_completion_length'] < 1, f"max_completion_length={c['max_completion_length']} must be >= 1"),
           (not 0 < c['top_p'] <= 1, f"top_p={c['top_p']} must be in (0, 1]"),
           (c['top_k'] < 0, f"top_k={c['top_k']} must be >= 0 (0: off)"),
           (c['num_iterations'] < 1, f"num_iterations={c['num_iterations']} must be >= 1"),
           (not 1 <= c['num_minibatches'] <= G, f"num_minibatches={c['num_minibatches']} must be in "
                                                f"[1, num_generations={G}] (minibatches split each group)"),
           (c['loss_type'] not in LOSS_TYPES, f"loss_type={c['loss_type']!r}: one of {LOSS_TYPES}"),
           (c['scale_rewards'] not in SCALE_REWARDS, f"scale_rewards={c['scale_rewards']!r}: one of {SCALE_REWARDS}"),
           (c['beta'] < 0, f"beta={c['beta']} must be >= 0"),
           (c['lora_rank'] < 0, f"lora_rank={c['lora_rank']} must be >= 0 (0: full weights)"),
           (not 0 <= c['lora_dropout'] < 1, f"lora_dropout={c['lora_dropout']} must be in [0, 1)"),
           (unknown, f'reward_weights: unknown component(s) {unknown}; components are {components}'),
           (bad_tasks, f"tasks={c['tasks']!r}: unknown {bad_tasks}; tasks are {list(reward.TASKS)}")]
    for failed, msg in bad:
        if failed:
            raise ValueError(msg)

# -----------------------------------------------------------------------------

def main(argv=None):
    config = configure(globals(), argv)
    rank, world, local_rank, device = init_distributed()
    check_config(config, world)
    master = rank == 0
    torch.manual_seed(seed)
    on_gpu = device.type == 'cuda'
    compute_dtype, autocast = compute_dtype_and_autocast(device, dtype)
    G = num_generations

    # data: the same preprocessing as sft.py and bench.py (data.encode)
    settings = VisionSettings(nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels)
    tok = Tokenizer(init_from)
    samples = read_samples(data, **({'video_root': video_root} if video_root and not os.path.isdir(data) else {}))
    rl_tasks = tasks.split(',')
    samples = [smp for smp in samples if smp.task in rl_tasks]
    if not samples:
        raise ValueError(f'{data}: no question of tasks={tasks!r} to train on')
    for smp in samples:  # a ground truth the reward cannot use fails now, naming its file:line, not hours in
        reward.score_completion('', smp, reward_weights)
    steps_per_epoch = len(samples) // prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f'{data}: {len(samples)} samples, fewer than prompts_per_step={prompts_per_step}')
    total_steps = max_steps if max_steps > 0 else epochs * steps_per_epoch
    print0(f'{data}: {len(samples)} samples, {steps_per_epoch} steps an epoch of {prompts_per_step} prompts x {G}')

    # the policy (fp32 master weights) and, only when beta > 0, the frozen reference (no fp32 copy)
    model = Qwen2VL.from_pretrained(init_from, dtype=torch.float32, device=device)  # sharding frees the rest
    if freeze_vision:
        model.visual.requires_grad_(False)
    if lora_rank > 0:
        names = apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        torch.manual_seed(seed + rank)  # LoRA dropout: a stream per rank (a resumed run restores its own)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f'LoRA r={lora_rank} alpha={lora_alpha} on {len(names)} linears: {n_train / 1e6:.3f}M trainable')
    model.gradient_checkpointing = activation_checkpointing
    model.train()
    ref = None
    if beta > 0 and lora_rank > 0 and not ref_from:
        ref = model  # its adapters switched off (train_on_rollouts): the base, without a second copy
    elif beta > 0:  # computing exactly what the policy computes at step 0: one process runs the fp32 policy under
        # autocast, so the reference keeps fp32 embeddings and norms (its matmuls in the compute dtype); FSDP
        # gathers every parameter of both in the compute dtype (and wants one dtype a unit)
        ref = Qwen2VL.from_pretrained(ref_from or init_from, dtype=torch.float32 if world == 1 else compute_dtype,
                                      device=device)
        ref.requires_grad_(False)
        ref.eval()
    if world == 1 and compute_dtype != torch.float32:  # frozen matmul weights (LoRA's base, a frozen tower, the
        for m in (model, ref):                          # reference) as autocast casts them; casting twice is a no-op
            if m is not None:
                frozen_matmul_weights_to(m, compute_dtype)
    if world > 1:
        from torch.distributed.fsdp import register_fsdp_forward_method
        shard_model(model, device, compute_dtype if compute_dtype != torch.float32 else None)
        register_fsdp_forward_method(model, 'generate')  # the whole rollout is one forward of the root
        if ref is not None and ref is not model:
            shard_model(ref, device, compute_dtype if compute_dtype != torch.float32 else None)
    cfg = model.config
    optimizer = make_optimizer(model, lr, weight_decay, (beta1, beta2))
    stop_ids = sorted({tok.im_end_id, tok.pad_id})  # <|im_end|> ends the turn; <|endoftext|> as Qwen's config
    warmup = int(warmup_frac * total_steps)
    loss_kw = dict(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type,
                   max_completion_length=max_completion_length)
    state = start_run(out_dir, resume, model, optimizer, config)
    step = state['step'] if state else 0
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    print0(f'{total_steps} steps, lr {lr}, beta {beta}, loss {loss_type}, {num_iterations} x {num_minibatches} '
           f'updates a step, {"FSDP2 on " if world > 1 else ""}{world} {device.type} process(es)')

    pbar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    signals, nonfinite = StopSignals(), NonFiniteSteps(max_nonfinite_steps)
    while step < total_steps:
        epoch, s = divmod(step, steps_per_epoch)
        t0 = time.time()
        lr_now = lr_at(step, total_steps, lr, warmup, min_lr)
        for g in optimizer.param_groups:
            g['lr'] = lr_now

        # this rank's prompts, rolled out G times each with per-row seeds
        idx = step_prompts(len(samples), epoch, s, rank, world, prompts_per_step, seed)
        prompts = [encode(samples[i], tok, settings, None, cfg) for i in idx]
        seeds = [row_seed(seed, epoch, i, g) for i in idx for g in range(G)]
        t_roll = time.time()
        with gathered_for_rollout(model), autocast():
            tokens, sampler_logp, lengths, stopped = rollout(model, pack(prompts), G, seeds, max_completion_length,
                                                             temperature, top_k, top_p, stop_ids, tok.pad_id)
        if on_gpu:
            torch.cuda.synchronize()
        t_roll = float(all_reduce(time.time() - t_roll, device, 'max'))
        tokens, sampler_logp, lengths, stopped = tokens.cpu(), sampler_logp.cpu(), lengths.cpu(), stopped.cpu()

        # rewards on every rank, gathered: advantages are relative to the group (or the global batch)
        texts = completion_texts(tok, tokens, lengths, stopped)
        rewards = gather_rows(score_rollouts([samples[i] for i in idx], texts, G, reward_weights).to(device)).cpu()
        adv_all, zero_all = group_advantages(rewards[:, 0], G, scale_rewards)
        N = len(idx) * G
        adv, zero_std = adv_all[rank * N:(rank + 1) * N], zero_all[rank * N:(rank + 1) * N]
        keep = torch.ones(N, dtype=torch.bool)
        if drop_zero_std:
            keep &= ~zero_std
        if mask_truncated_completions:
            keep &= stopped
        t_train = time.time()

        # the updates, on the completions grouped by prompt (group_batch)
        sums = train_on_rollouts(model, ref, optimizer, prompts, tokens, lengths, sampler_logp, adv, keep, G=G,
                                 num_iterations=num_iterations, num_minibatches=num_minibatches,
                                 token_budget=train_token_budget, temperature=temperature, grad_clip=grad_clip,
                                 loss_kw=loss_kw, device=device, autocast=autocast, world=world,
                                 reduce_every_micro_batch=reduce_every_micro_batch)
        if on_gpu:
            torch.cuda.synchronize()
        t_train = float(all_reduce(time.time() - t_train, device, 'max'))

        ids = [samples[i].id for i in gather_ids(idx, device)]
        m = dict(step=step, epoch=epoch, lr=lr_now, **step_metrics(sums, rewards, lengths, stopped, keep, zero_all,
                                                                    ref is not None, t_roll, t_train, device),
                 dt=time.time() - t0, peak_mem_gb=peak_memory(device) / 2**30, samples=ids)
        step += 1
        if master and (step % log_interval == 0 or step == total_steps or sums['skipped']):
            log_metrics(metrics_path, m)
            pbar.set_postfix(reward=f"{m['reward']:.3f}", loss=f"{m['loss']:.4f}", len=f"{m['completion_len']:.0f}",
                             roll_tok_s=f"{m['rollout_tokens_per_s']:.0f}")
        pbar.update(1)
        nonfinite.update(step - 1, sums['skipped'] == 0, ids)
        stop = signals.agreed(device)
        if step == total_steps or stop or (save_interval > 0 and step % save_interval == 0):
            # sampling needs no RNG state: every row's seed is a function of (seed, epoch, prompt, generation)
            state = dict(step=step, epoch=step // steps_per_epoch, step_in_epoch=step % steps_per_epoch,
                         world_size=world)
            save_checkpoint(out_dir, model, init_from, optimizer, state, config, settings.record(samples, cfg),
                            getattr(torch, save_dtype))
        if stop:
            break
    pbar.close()
    signals.report(step, total_steps, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
