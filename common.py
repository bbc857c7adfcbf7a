"""
What sft.py, grpo.py and bench.py share: distributed setup, printing and all-reduce, the lr schedule and
optimizer, LoRA, FSDP2 sharding, checkpoints (an HF-layout model plus an exact-resume training state),
the metrics log, the target-token logits, and the one atomic file writer every stage writes through.

    rank, world, local_rank, device = init_distributed()         # torchrun or alone, GPU or CPU
    shard_model(model, device, torch.bfloat16)                    # under torchrun: FSDP2, a unit per block
    state = start_run(out_dir, resume, model, optimizer, config)  # None, or the saved step to go on from
    save_checkpoint(out_dir, model, init_from, optimizer, state, config, settings)

A checkpoint is the merged model in the Hugging Face layout (transformers and vLLM load it) plus a
state-<step>/ folder (trainable tensors unmerged, AdamW state, every rank's RNG) that becomes current
when train_state.json is atomically replaced: a kill at any moment leaves the previous state whole.
safetensors and JSON only; nothing is pickled.

Every part is written into state-<step>.tmp/ first: a save that fails leaves the previous checkpoint current.
The state is full tensors, so a run resumes on another number of ranks (sft.py keeps its global batch).

Left out on purpose: sharded (per-rank) checkpoint files (the full state is gathered to rank 0: fine
for LoRA, ~3x the fp32 model in host RAM for a full 7B), tensor or sequence parallelism, QLoRA's 4-bit
base (LoRA on a bf16/fp32 base fits 8x80 GB).
"""
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# files

@contextmanager
def atomic_path(path):
    """Write to the yielded temporary path; it replaces `path` only once the block finishes, so a
    reader never sees half a file. The temporary name keeps the extension (PyAV picks the format by it)."""
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{os.getpid()}{ext}'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))

# -----------------------------------------------------------------------------
# distributed

def init_distributed(device_type=None):
    """-> (rank, world_size, local_rank, device). Joins torchrun's process group when RANK is set
    (NCCL on GPUs, gloo on CPU), else runs alone. device_type: 'cuda' | 'cpu'; None = cuda if present."""
    cuda = (device_type or ('cuda' if torch.cuda.is_available() else 'cpu')) == 'cuda'
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device('cuda' if cuda else 'cpu')
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if cuda:
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return rank, world, local, device


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args, **kwargs):
    if rank_world()[0] == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values, device, op='sum'):
    """Numbers (a float or nested lists) summed or maxed over ranks -> a CPU float64 tensor. The
    collective runs on `device` (NCCL reduces CUDA tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == 'max' else dist.ReduceOp.SUM)
    return t.cpu()


class StopSignals:
    """SIGTERM / SIGUSR1 (a scheduler's warning before a time limit, a preemption) ask a run to stop. The
    handler only sets a flag; after each step the ranks agree (one all-reduce: did any rank get one?), so all
    stop after the same step, write a resumable checkpoint and exit 0."""
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum = None
        for s in signals:
            signal.signal(s, self._set)

    def _set(self, signum, frame):
        self.signum = signum

    def agreed(self, device):
        return bool(all_reduce(float(self.signum is not None), device, 'max'))

    def report(self, step, total_steps, out_dir):
        if step < total_steps:
            print0(f'stopped by SIGTERM/SIGUSR1 after step {step}: checkpoint in {out_dir}; to continue, run the '
                   f'same command with --resume=True')
        else:
            print0(f'done: {total_steps} steps; model and training state in {out_dir}')


def gather_ids(ids, device):
    """Every rank's list of non-negative ints, concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return list(ids)
    n = int(all_reduce(len(ids), device, 'max'))
    t = torch.full((n,), -1, dtype=torch.long)
    t[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    return [i for i in gather_rows(t.to(device)).tolist() if i >= 0]


def gather_rows(t):
    """Every rank's rows (the same count on each) concatenated in rank order; t when alone."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def compute_dtype_and_autocast(device, dtype):
    """GPU: the compute dtype (e.g. bf16) under autocast, weights staying fp32; CPU always fp32."""
    compute = getattr(torch, dtype) if device.type == 'cuda' else torch.float32
    if compute == torch.float32:
        return compute, nullcontext
    return compute, lambda: torch.autocast('cuda', dtype=compute)


def frozen_matmul_weights_to(model, dtype):
    """One process under autocast: the frozen weights of the matmuls (nn.Linear, nn.Conv3d; a frozen tower,
    LoRA's base, the whole GRPO reference) in dtype, as autocast casts them anyway, so they are not re-cast on
    every forward and recompute and take half the memory; trainable weights stay fp32 masters, embeddings and
    norms as they were. Under the same autocast the model computes exactly what it computed before (the GRPO
    reference: KL = 0 at step 0). A checkpoint saves the frozen weights as rounded (exact for a bf16 release)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            for p in m.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    return model


def grad_sync(model, last, every_micro_batch):
    """FSDP: reduce-scatter this micro-batch's gradients now (every_micro_batch, or the step's last one); else
    they accumulate unsharded in fp32 until the last one: one reduce-scatter a step, but full-size gradients
    held in between (~33 GB a rank for a full 7B fine-tune, against ~4 GB sharded over 8). No-op unsharded."""
    if hasattr(model, 'set_requires_gradient_sync'):
        model.set_requires_gradient_sync(every_micro_batch or last)


def peak_memory(device):
    """Peak bytes: the CUDA allocator's peak on GPU, the process's peak resident set on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12}


def guess_peak_flops(device):
    """Dense bf16 peak FLOP/s of one device, for MFU; 0 when unknown (CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)

# -----------------------------------------------------------------------------
# the loss side: logits only where there is a target

def target_positions(labels):
    """Positions t whose next token labels[t+1] is a target (labels are not shifted, HF style)."""
    return (labels[1:] != -100).nonzero().squeeze(1)


def target_logits(model, batch, device):
    """(logits at the target positions of a packed batch, the target ids). Only there: the full
    (T, vocab) fp32 logits of a long video batch would be gigabytes. The targets are the labels (data.pack),
    or given as target_rows / targets (grpo.group_batch, where one prompt row predicts G first tokens)."""
    pv = batch['pixel_values'].to(device) if batch['pixel_values'] is not None else None
    h = model(batch['input_ids'].to(device), batch['position_ids'].to(device), batch['cu_seqlens'].to(device),
              pv, batch['grid_thw'], return_hidden=True, parents=batch.get('parents'))
    if 'targets' in batch:
        return model.logits(h[batch['target_rows'].to(device)]), batch['targets'].to(device)
    pos = target_positions(batch['labels']).to(device)
    return model.logits(h[pos]), batch['labels'][1:].to(device)[pos]

# -----------------------------------------------------------------------------
# optimizer

def lr_at(step, total_steps, lr, warmup_steps, min_lr=0.0):
    """Linear warmup to lr (from lr/(warmup+1), so no step is wasted at 0), then cosine down to
    min_lr at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not. Fused
    where this torch has the kernel for the parameters' device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('make_optimizer: no trainable parameters (everything frozen?)')
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and params[0].device.type in ('cuda', 'cpu')
    return torch.optim.AdamW([g for g in groups if g['params']], lr=lr, betas=betas, eps=eps, fused=fused)


def clip_and_step(optimizer, params, grad_clip, loss=0.0):
    """Clip the global grad norm (0: off) and step, unless the (global) loss or the norm is NaN/inf: then no
    weight and no optimizer state is touched. Zero the grads. Returns (the norm before clipping, stepped);
    every rank sees the same norm and loss, so all skip together."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    norm = float(norm.full_tensor() if hasattr(norm, 'full_tensor') else norm)  # FSDP: a DTensor
    stepped = math.isfinite(norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


class NonFiniteSteps:
    """Skipped (non-finite) steps in a row: each is reported with its samples; max_in_a_row of them stop the
    run with an error naming them all (a corrupt sample or a diverged run, not a one-off overflow)."""
    def __init__(self, max_in_a_row):
        self.max_in_a_row, self.run = max_in_a_row, []

    def update(self, step, stepped, samples):
        if stepped:
            self.run = []
            return
        self.run.append(f"step {step} (samples {', '.join(samples)})")
        print0(f'step {step}: non-finite loss or gradient norm, update skipped; samples: {", ".join(samples)}')
        if len(self.run) >= self.max_in_a_row:
            raise FloatingPointError(f'{len(self.run)} steps in a row with a non-finite loss or gradient norm '
                                     f'(max_nonfinite_steps={self.max_in_a_row}): ' + '; '.join(self.run))

# -----------------------------------------------------------------------------
# LoRA

class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha/r) B A dropout(x). W and b keep their names (frozen), so merging
    gives plain HF tensors. lora_A starts like PEFT's (Kaiming uniform), lora_B at zero: training
    starts at W."""
    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=torch.float32)  # fp32 master weights
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling, self.dropout = alpha / rank, dropout
        self.enabled = True  # False: the base layer alone (lora_disabled)

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return base
        return base + self.scaling * F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_A),
                                              self.lora_B)


@contextmanager
def lora_disabled(model):
    """Inside the block the model computes as its base, every adapter switched off: GRPO's KL reference
    without a second copy of the weights. A no-op on a model without adapters."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapted:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapted:
            m.enabled = True


def apply_lora(model, rank, alpha, dropout=0.0, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj')):
    """Freeze the model and put an adapter on every nn.Linear whose last name component is a target
    ('q_proj', ...; a comma-separated string works too). Returns the adapted module names."""
    targets = [t.strip() for t in (targets.split(',') if isinstance(targets, str) else targets) if t.strip()]
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.split('.')[-1] in targets]
    if not names:
        linear = sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f'apply_lora: no nn.Linear named {targets}; the model has {linear}')
    for n in names:
        parent, child = model.get_submodule(n.rpartition('.')[0]), n.rpartition('.')[2]
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, rank, alpha, dropout).train(base.training))
    return names


def merge_lora_weights(state_dict, scalings):
    """W <- W + scaling * B @ A (in fp32) in a state dict, lora_A/lora_B dropped; a new dict.
    scalings: {module name: alpha/r}. A bf16 base (frozen_matmul_weights_to) merges into fp32: rounding the
    merged weight back to bf16 would lose most of a small update."""
    sd = dict(state_dict)
    for name, s in scalings.items():
        A, B, W = sd.pop(f'{name}.lora_A'), sd.pop(f'{name}.lora_B'), sd[f'{name}.weight']
        sd[f'{name}.weight'] = (W.float() + s * (B.float() @ A.float())).to(torch.promote_types(W.dtype, A.dtype))
    return sd

# -----------------------------------------------------------------------------
# FSDP2

def shard_model(model, device, param_dtype=None):
    """Every block of every nn.ModuleList (decoder layers, vision blocks) is one FSDP2 unit, then the
    root (embeddings, merger, norm, head). param_dtype (bf16) is the all-gather and compute dtype;
    gradients are reduced in fp32 and the sharded master weights stay fp32. The residual stream is then bf16
    (each unit casts its inputs), as in a bf16 model; one process under autocast keeps it fp32 (fp32
    embeddings, bf16 matmul outputs added into it): the two differ by bf16 rounding, not in kind."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if hasattr(model, 'logits'):  # the losses call model.logits(h) outside forward
        register_fsdp_forward_method(model, 'logits')
    return model


def full_state_dict(model):
    """All parameters as full CPU tensors: on rank 0 when sharded ({} elsewhere), else everywhere.
    A collective when sharded: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

# -----------------------------------------------------------------------------
# checkpoints

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'preprocessor_config.json', 'chat_template.json',
                   'chat_template.jinja', 'generation_config.json', 'special_tokens_map.json', 'vocab.json',
                   'merges.txt')


def save_model(out_dir, model, tokenizer_src_dir, save_dtype=torch.float32, sd=None):
    """The model with LoRA merged, in the HF layout (model.save_pretrained), plus the tokenizer,
    processor and chat-template files of tokenizer_src_dir. Collective when sharded."""
    sd = full_state_dict(model) if sd is None else sd
    if rank_world()[0] != 0:
        return
    sd = merge_lora_weights(sd, {n: m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    model.save_pretrained(out_dir, {k: v.to(save_dtype) for k, v in sd.items()})
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_src_dir, name)):
            with atomic_path(os.path.join(out_dir, name)) as tmp:
                shutil.copyfile(os.path.join(tokenizer_src_dir, name), tmp)


def _rng_state():
    py, np_state = random.getstate(), np.random.get_state()
    return dict(python=[py[0], list(py[1]), py[2]], numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                torch=torch.get_rng_state().tolist(),
                cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


def _set_rng_state(s):
    random.setstate((s['python'][0], tuple(s['python'][1]), s['python'][2]))
    np.random.set_state((s['numpy'][0], np.array(s['numpy'][1], dtype=np.uint32), *s['numpy'][2:]))
    torch.set_rng_state(torch.tensor(s['torch'], dtype=torch.uint8))
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s['cuda']])


def train_state(out_dir):
    """The current checkpoint's `state` (out_dir/train_state.json, with its folder as 'dir'), or None."""
    pointer = os.path.join(out_dir, 'train_state.json')
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return json.load(f)


def save_checkpoint(out_dir, model, tokenizer_src_dir, optimizer, state, config, vision_settings=None,
                    save_dtype=torch.float32):
    """The HF-layout model, run_config.json and vision_settings.json in out_dir; with an optimizer also
    the resumable state: state-<step>/ {trainable.safetensors, optimizer.safetensors + .json,
    rng-rank<r>.json}, made current by atomically replacing train_state.json (`state` + its folder).
    All of it is written into state-<step>.tmp/ first and published only once every rank's part is there, so
    a save that fails (disk full, quota, an I/O error) leaves the previous checkpoint whole and current, and
    raises saying what failed; older states are removed only after the new one is published.
    Collective when sharded: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    rank = rank_world()[0]
    name = f"state-{state['step']:06d}"
    stage = os.path.join(out_dir, name + '.tmp')
    sd = full_state_dict(model)  # the collectives first, so that a failed write cannot leave a rank waiting
    osd = None if optimizer is None else \
        get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = None
    try:  # failures are caught and reported below, on every rank
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
            os.makedirs(os.path.join(stage, 'model'))
            save_model(os.path.join(stage, 'model'), model, tokenizer_src_dir, save_dtype, sd)
            write_json(os.path.join(stage, 'model', 'run_config.json'), config)
            if vision_settings is not None:
                write_json(os.path.join(stage, 'model', 'vision_settings.json'), vision_settings)
            if osd is not None:
                trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                save_file({k: v.contiguous() for k, v in sd.items() if k in trainable},
                          os.path.join(stage, 'trainable.safetensors'))
                save_file({f'{fqn}/{k}': v.contiguous() for fqn, s in osd['state'].items() for k, v in s.items()},
                          os.path.join(stage, 'optimizer.safetensors'))
                write_json(os.path.join(stage, 'optimizer.json'), dict(param_groups=osd['param_groups']))
    except Exception as e:
        error = f'{type(e).__name__}: {e}'
    barrier()
    try:
        if osd is not None and error is None:
            write_json(os.path.join(stage, f'rng-rank{rank}.json'), _rng_state())
    except Exception as e:
        error = f'{type(e).__name__}: {e}'
    failed = all_reduce([float(error is not None)], next(model.parameters()).device)
    if float(failed.sum()):
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        prev = train_state(out_dir)
        prev = f"step {prev['step']}" if prev else 'none yet'
        raise RuntimeError(f"saving step {state['step']} to {stage} failed on {int(failed.sum())} rank(s)"
                           f"{f' (rank {rank}: {error})' if error else ''}; the previous checkpoint ({prev}) in "
                           f"{out_dir} is untouched and current")
    if rank == 0:  # publish: the model files, then the state and its pointer, then prune
        model_dir = os.path.join(stage, 'model')
        new = os.listdir(model_dir)
        for f in sorted(new, key=lambda f: (f.endswith('.json'), f)):  # weights before index and config
            os.replace(os.path.join(model_dir, f), os.path.join(out_dir, f))
        for f in os.listdir(out_dir):  # weights of another shard layout would confuse loaders
            if f.startswith('model') and f.endswith(('.safetensors', '.safetensors.index.json')) and f not in new:
                os.remove(os.path.join(out_dir, f))
        os.rmdir(model_dir)
        if osd is None:
            os.rmdir(stage)
        else:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            os.replace(stage, os.path.join(out_dir, name))
            write_json(os.path.join(out_dir, 'train_state.json'), dict(state, dir=name))
            for old in os.listdir(out_dir):  # earlier states are superseded once the pointer moved
                if old.startswith('state-') and old != name:
                    shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    barrier()


def load_training_state(out_dir, model, optimizer):
    """Restore what save_checkpoint wrote into a model built the same way (same init_from, LoRA,
    sharding): trainable tensors, AdamW state, this rank's RNG. Returns the saved `state` dict.
    Collective when sharded."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    pointer, state = os.path.join(out_dir, 'train_state.json'), train_state(out_dir)
    if state is None:
        raise FileNotFoundError(f'{pointer}: no training state to resume from')
    rank, world = rank_world()
    folder = os.path.join(out_dir, state['dir'])
    sharded = dist.is_initialized()
    load = rank == 0 or not sharded  # when sharded, rank 0 reads and broadcasts
    trainable = load_file(os.path.join(folder, 'trainable.safetensors')) if load else {}
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if load and set(trainable) != want:
        raise ValueError(f'{folder}/trainable.safetensors: tensors {sorted(set(trainable) ^ want)[:5]} do not '
                         f'match the trainable parameters (different LoRA/freeze settings than the saved run?)')
    osd = {}
    if load:
        flat = load_file(os.path.join(folder, 'optimizer.safetensors'))
        with open(os.path.join(folder, 'optimizer.json')) as f:
            groups = json.load(f)['param_groups']  # JSON turned tuples (betas) into lists
            osd = dict(state={}, param_groups=[{k: tuple(v) if isinstance(v, list) and k != 'params' else v
                                                for k, v in g.items()} for g in groups])
        for key, v in flat.items():
            fqn, _, k = key.rpartition('/')
            osd['state'].setdefault(fqn, {})[k] = v
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False) if sharded else \
        StateDictOptions(strict=False)
    set_model_state_dict(model, trainable, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=osd, options=opts)
    saved_world = state.get('world_size', world)
    if saved_world != world:  # the full (gathered) tensors load on any number of ranks; RNG streams are per rank
        print0(f'{pointer}: saved on {saved_world} rank(s), resuming on {world}: ranks below {min(saved_world, world)} '
               f'continue their random streams, others start fresh (only dropout draws from them)')
    if rank < saved_world:
        with open(os.path.join(folder, f'rng-rank{rank}.json')) as f:
            _set_rng_state(json.load(f))
    return state


def start_run(out_dir, resume, model, optimizer, config):
    """A fresh run gets an empty out_dir/metrics.jsonl and returns None (an out_dir that holds a run
    is an error); --resume restores the training state, drops the metrics a killed run logged after
    it, names the settings changed since, and returns the saved state."""
    metrics = os.path.join(out_dir, 'metrics.jsonl')
    master = rank_world()[0] == 0
    if not resume:
        if train_state(out_dir) is not None:
            raise FileExistsError(f'{out_dir} holds a run (train_state.json): continue it with --resume=True '
                                  f'or pick another --out_dir')
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(metrics):
                os.remove(metrics)
        return None
    state = load_training_state(out_dir, model, optimizer)
    with open(os.path.join(out_dir, 'run_config.json')) as f:
        changed = sorted(k for k, v in json.load(f).items() if k != 'resume' and config.get(k) != v)
    print0(f"resumed from {out_dir} at step {state['step']}" + (f'; changed since: {changed}' if changed else ''))
    if master and os.path.exists(metrics):
        with open(metrics) as f:
            kept = [line for line in f if json.loads(line)['step'] < state['step']]
        write_text(metrics, ''.join(kept))
    return state


def log_metrics(path, metrics):
    """Append one JSON line (opened per call, so a killed run keeps every line it logged)."""
    with open(path, 'a') as f:
        f.write(json.dumps(metrics) + '\n')
