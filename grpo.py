"""
GRPO for ST-R1: the policy (an SFT checkpoint of model.Qwen2VL) samples G completions per prompt,
reward.py scores them, and a clipped policy-gradient loss with group-normalised advantages updates
it. Knob names follow TRL's GRPOTrainer: num_generations, beta, epsilon, epsilon_high, loss_type,
scale_rewards, num_iterations.

The full design (this file grows in stages; what is implemented so far is marked [here]):
- Rollouts with our own engine: prefill each prompt (with its video) once, copy its KV cache into
  the G sample rows, decode all rows together with temperature / top-p / top-k set explicitly, stop
  at <|im_end|> or max_completion_length, keep the sampling log-probs (old_logp). [later]
- Rewards: reward.score_completion per completion; every component logged on its own. [reward.py]
- Advantages [here: group_advantages]: A_i = (r_i - mean_group(r)) / (std + eps), eps = 1e-4 (the
  release and TRL). std is the UNBIASED (Bessel-corrected, torch.std's default) standard deviation,
  as in TRL: of the group for scale_rewards='group', of all rewards passed in for 'batch' (the caller
  passes the rewards gathered from all ranks, as TRL gathers them), and no division for 'none'
  (Dr. GRPO). The mean is always the group's. Groups whose rewards are all equal get advantage
  exactly 0 (TRL's formula leaves rounding noise there: ~6e-4 for eight float32 rewards of 0.9,
  whose mean is off by 6e-8, divided by 0 + 1e-4) and are flagged so the loop may drop them.
  Rewards are laid out prompt-major: generation g of prompt p at index p * G + g.
- Loss [here: grpo_loss], per completion token t of sequence i:
      ratio   = exp(logp - old_logp)          (old_logp = logp.detach() when num_iterations == 1:
                                                ratio == 1 but the gradient is the policy gradient)
      l_t     = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i)
      l_t    += beta * (exp(ref - logp) - (ref - logp) - 1)      (k3 KL estimator, when beta > 0)
  aggregated by loss_type:
      'grpo'    sum_t(l * m) / sum_t(m) per sequence, then the mean over sequences (the paper's)
      'dapo'    sum(l * m) / num_items: token-level over the batch. num_items defaults to this
                call's token count. TRL passes the token count of the whole generation batch across
                all ranks divided by the number of ranks (gradients are averaged over ranks), so
                that micro-batches and ranks each contribute in proportion to their tokens; pass
                that as num_items to get the same loss.
      'dr_grpo' sum(l * m) / (B * max_completion_length): a constant normaliser, no length bias.
  Like TRL, 'grpo' and 'dr_grpo' normalise per call: with gradient accumulation over k
  micro-batches the caller divides the loss by k. Statistics (detached): the token-mean KL, the
  fractions of tokens clipped low (ratio < 1 - epsilon with A < 0), high (ratio > 1 + epsilon_high
  with A > 0) and either (TRL's clip_ratio/low_mean, high_mean, region_mean), the mean ratio.
- num_iterations >= 1 updates per rollout batch, in minibatches; beta = 0 loads no reference model.
  [later]
- FSDP2 under torchrun, each rank rolls out its own prompts, metrics reduced across ranks, a metrics
  JSONL per step, checkpoints and exact resume as in sft.py. [later]

Deliberately left out (of the loss): TRL's two-sided clipping `delta`, sequence-level importance
sampling (GSPO), entropy masking, and a clamp on the KL estimator.
"""
import torch

LOSS_TYPES = ('grpo', 'dapo', 'dr_grpo')
SCALE_REWARDS = ('group', 'batch', 'none')


def group_advantages(rewards, num_generations, scale_rewards='group', eps=1e-4):
    """rewards (N,) prompt-major -> (advantages (N,) float32, zero_std (N,) bool: True for every
    member of a group whose rewards are all equal). See the module docstring."""
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
    """The GRPO surrogate loss (module docstring) on padded completions.
    logp (B, L): log-probs of the sampled tokens under the policy being trained (requires grad).
    old_logp (B, L) | None: under the policy that sampled them (None: logp.detach()).
    ref_logp (B, L) | None: under the frozen reference; required when beta > 0.
    advantages (B,); mask (B, L) bool or 0/1, True on completion tokens.
    Defaults are TRL's (beta 0, epsilon 0.2, epsilon_high = epsilon, loss_type 'dapo').
    Returns (loss: 0-d tensor, stats: dict of detached 0-d tensors)."""
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

    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if ref_logp is not None:
        delta = torch.where(m, ref_logp.detach().float(), zero) - logp
        kl = torch.exp(delta) - delta - 1
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
