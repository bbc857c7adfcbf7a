"""
Supervised fine-tuning of Qwen2-VL on Ego-ST samples: the long-CoT "cold start" of ST-R1.

    python sft.py config/sft_egoworld.py                                        # CPU, minutes
    torchrun --nproc_per_node 8 sft.py config/sft_qwen2vl_7b.py \\
        --init_from=/path/Qwen2-VL-7B-Instruct --data=train.jsonl               # 8 GPUs, FSDP2

Design
- One loop for one process and for torchrun: when launched by torchrun every decoder and vision
  block is an FSDP2 `fully_shard` unit (then the root), so parameters, gradients and AdamW state
  are split over ranks; alone, the model is a plain module. gloo on CPU runs the same code in tests.
- Batches are data.batches' packed varlen batches (no padding): one optimizer step = grad_accum
  batches per rank. The loss is the summed cross-entropy over the step's target tokens divided by
  their count over ALL micro-batches and ranks (all-reduced before backward), so every target token
  weighs the same however the tokens fall into batches (a mean of micro-batch means would not).
  Targets are the assistant's tokens only (data.encode's labels); logits are computed only there.
- fp32 master weights; on GPU, bf16 compute (autocast, and FSDP's bf16 all-gather with fp32
  gradient reduction). Activation checkpointing per block (model.gradient_checkpointing).
- LoRA is a small nn.Linear subclass added by name suffix; it keeps the base tensors' names, so
  merging on save (W + alpha/r * B @ A) yields plain HF tensors that transformers loads.
- Checkpoint = the merged model in the HF layout + training state (trainable tensors unmerged,
  AdamW state, step, data position, RNG of every rank) in a state-<step>/ folder published by
  atomically replacing train_state.json; `--resume=True` continues the run bit-for-bit.
  No pickle: safetensors and JSON only.

Left out on purpose: a Trainer/callback system, eval during training (bench.py does that),
sharded (per-rank) checkpoint files — the full state is gathered to rank 0, which is fine for LoRA
and costs ~3x the model's fp32 size in host RAM for a full fine-tune of a 7B — tensor/sequence
parallelism, QLoRA's 4-bit base (the release's; LoRA on a bf16/fp32 base fits 8x80 GB easily).
"""
import inspect
import json
import math
import os
import random
import resource
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from configurator import configure
from data import DataError, FrameCache, Tokenizer, VisionSettings, read_samples
from data import batches as data_batches
from model import Qwen2VL

# -----------------------------------------------------------------------------
# I/O
init_from = 'out/egoworld-tiny'  # any HF-layout Qwen2-VL checkpoint dir (weights, tokenizer.json)
data = 'data_egoworld/train/st_r1_cot.jsonl'  # ST-R1 JSONL or a benchmark-layout folder
video_root = ''          # remaps the JSONL's absolute video paths by basename (the release's are the authors')
out_dir = 'out/sft'
resume = False           # continue from out_dir/train_state.json (same number of ranks)
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
epochs = 1
max_steps = -1           # > 0: stop after this many steps instead (epochs repeat as needed)
seed = 1337
# system
dtype = 'bfloat16'       # compute dtype on GPU (weights stay fp32); CPU always computes in fp32
save_dtype = 'float32'   # dtype of the exported model.safetensors (bfloat16 halves a 7B's files)
activation_checkpointing = True  # recompute each block in backward: ~1/3 more compute, far less memory
peak_flops = 0.0         # per device, for MFU; 0: guess from the GPU's name (none on CPU)

# -----------------------------------------------------------------------------
# plumbing shared with grpo.py (`from sft import ...`)

def init_distributed():
    """-> (rank, world_size, local_rank, device). Joins torchrun's process group when RANK is set
    (NCCL on GPUs, gloo on CPU), else runs alone on the GPU if there is one."""
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if torch.cuda.is_available():
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return rank, world, local, device


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if _rank_world()[0] == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(t):
    """Sum of a tensor over ranks (a new tensor on t's device; NCCL reduces a CUDA copy); t when alone."""
    if not dist.is_initialized():
        return t
    x = t.to(torch.device('cuda', torch.cuda.current_device())) if dist.get_backend() == 'nccl' else t.clone()
    dist.all_reduce(x)
    return x.to(t.device)


def lr_at(step, total_steps, lr, warmup_steps, min_lr=0.0):
    """Linear warmup to lr over warmup_steps (from lr/(warmup+1), so no step is wasted at 0),
    then cosine from lr to min_lr at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """AdamW over the trainable parameters: matrices decay, vectors (norms, biases) do not.
    The fused kernel where this torch has one for the parameters' device (CUDA, CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('make_optimizer: no trainable parameters (everything frozen?)')
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and params[0].device.type in ('cuda', 'cpu')
    return torch.optim.AdamW([g for g in groups if g['params']], lr=lr, betas=betas, eps=eps, fused=fused)


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha/r) * B A dropout(x). The base weight/bias stay under their own names
    (frozen); lora_A starts like PEFT's (Kaiming uniform), lora_B at zero, so training starts at W."""
    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=torch.float32)  # fp32 master weights
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling, self.dropout = alpha / rank, dropout

    def forward(self, x):
        lora = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * lora


def apply_lora(model, rank, alpha, dropout=0.0, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj')):
    """Freeze the model and put a LoRA adapter on every nn.Linear whose name ends with a target
    suffix (a '.'-separated component, e.g. 'q_proj'). Returns the adapted module names."""
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
    """In a state dict: W <- W + scaling * B @ A (in fp32) and drop the lora_A/lora_B entries.
    scalings: {module name: alpha/r}. Returns a new dict; the input is not modified."""
    sd = dict(state_dict)
    for name, s in scalings.items():
        A, B, W = sd.pop(f'{name}.lora_A'), sd.pop(f'{name}.lora_B'), sd[f'{name}.weight']
        sd[f'{name}.weight'] = (W.float() + s * (B.float() @ A.float())).to(W.dtype)
    return sd


def merge_lora(model):
    """Fold every adapter into its base weight and put a plain nn.Linear back (unsharded model)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                W = (m.weight.float() + m.scaling * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype)
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device='meta')
            linear.weight, linear.bias = nn.Parameter(W, requires_grad=m.weight.requires_grad), m.bias
            setattr(model.get_submodule(name.rpartition('.')[0]), name.rpartition('.')[2], linear)
    return model


def shard_model(model, device, param_dtype=None):
    """FSDP2: every block of every nn.ModuleList (decoder layers, vision blocks) is one shard unit,
    then the root (embeddings, merger, norm, head). param_dtype (e.g. bf16) is the all-gather and
    compute dtype; gradients are reduced in fp32 and the sharded master weights stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if hasattr(model, 'logits'):  # the loss calls model.logits(h) outside forward
        register_fsdp_forward_method(model, 'logits')
    return model


def full_state_dict(model):
    """All parameters as full CPU tensors: on rank 0 when sharded ({} elsewhere), else everywhere.
    A collective when sharded: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def log_metrics(path, metrics):
    """Append one JSON line (opened per call, so a killed run keeps every line it logged)."""
    with open(path, 'a') as f:
        f.write(json.dumps(metrics) + '\n')


def trim_metrics(path, step):
    """On resume: drop the lines a killed run logged after its last checkpoint (atomically)."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [l for l in f if json.loads(l)['step'] < step]
        with open(path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(path + '.tmp', path)


def _write_json(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(path + '.tmp', path)


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'preprocessor_config.json', 'chat_template.json',
                   'chat_template.jinja', 'generation_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt')


def save_model(out_dir, model, tokenizer_src_dir, save_dtype=torch.float32, sd=None):
    """The model with LoRA merged, in the HF layout: config.json, model.safetensors (model.py's
    save_pretrained) and the tokenizer/processor/chat-template files copied from tokenizer_src_dir."""
    sd = full_state_dict(model) if sd is None else sd
    if _rank_world()[0] != 0:
        return
    sd = merge_lora_weights(sd, {n: m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    with torch.device('meta'):
        export = Qwen2VL(model.config)
    export.load_state_dict({k: v.to(save_dtype) for k, v in sd.items()}, strict=True, assign=True)
    export.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_src_dir, name)):
            shutil.copyfile(os.path.join(tokenizer_src_dir, name), os.path.join(out_dir, name + '.tmp'))
            os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))


def _rng_state():
    py = random.getstate()
    np_state = np.random.get_state()
    return dict(python=[py[0], list(py[1]), py[2]], numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                torch=torch.get_rng_state().tolist(),
                cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


def _set_rng_state(s):
    random.setstate((s['python'][0], tuple(s['python'][1]), s['python'][2]))
    np.random.set_state((s['numpy'][0], np.array(s['numpy'][1], dtype=np.uint32), *s['numpy'][2:]))
    torch.set_rng_state(torch.tensor(s['torch'], dtype=torch.uint8))
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s['cuda']])


def save_checkpoint(out_dir, model, tokenizer_src_dir, optimizer, state, config, vision_settings=None,
                    save_dtype=torch.float32):
    """Write the HF-layout model (LoRA merged) plus run_config.json / vision_settings.json into
    out_dir; with an optimizer also the resumable training state: state-<step>/ {trainable.safetensors
    (unmerged trainable tensors), optimizer.safetensors + optimizer.json, rng-rank<r>.json}, published
    by atomically replacing train_state.json (= `state` + its folder), so a kill at any moment leaves
    the previous state intact. Collective when sharded: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    rank = _rank_world()[0]
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    os.makedirs(out_dir, exist_ok=True)
    sd = full_state_dict(model)
    save_model(out_dir, model, tokenizer_src_dir, save_dtype, sd)
    if rank == 0:
        _write_json(os.path.join(out_dir, 'run_config.json'), config)
        if vision_settings is not None:
            _write_json(os.path.join(out_dir, 'vision_settings.json'), vision_settings)
    if optimizer is None:
        return
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    name = f"state-{state['step']:06d}"
    tmp = os.path.join(out_dir, name + '.tmp')
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file({k: v.contiguous() for k, v in sd.items() if k in trainable}, os.path.join(tmp, 'trainable.safetensors'))
        save_file({f'{fqn}/{k}': v.contiguous() for fqn, s in osd['state'].items() for k, v in s.items()},
                  os.path.join(tmp, 'optimizer.safetensors'))
        _write_json(os.path.join(tmp, 'optimizer.json'), dict(param_groups=osd['param_groups']))
    barrier()
    _write_json(os.path.join(tmp, f'rng-rank{rank}.json'), _rng_state())
    barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        os.replace(tmp, os.path.join(out_dir, name))
        _write_json(os.path.join(out_dir, 'train_state.json'), dict(state, dir=name))
        for old in os.listdir(out_dir):  # earlier states are superseded once the pointer moved
            if old.startswith('state-') and old != name:
                shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    barrier()


def load_training_state(out_dir, model, optimizer):
    """Restore what save_checkpoint wrote: the trainable tensors into model (built from the same
    init_from, LoRA applied, sharded or not), the AdamW state, this rank's RNG. Returns the saved
    `state` dict (step, data position, ...). Collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    pointer = os.path.join(out_dir, 'train_state.json')
    if not os.path.exists(pointer):
        raise FileNotFoundError(f'{pointer}: no training state to resume from')
    with open(pointer) as f:
        state = json.load(f)
    rank, world = _rank_world()
    if state.get('world_size', world) != world:
        raise ValueError(f"{pointer}: saved with {state['world_size']} ranks, resuming with {world}: the data "
                         f"shards and RNG streams would differ; resume with the same number of ranks")
    folder = os.path.join(out_dir, state['dir'])
    sharded = dist.is_initialized()
    load = rank == 0 or not sharded  # when sharded, rank 0 reads and broadcasts
    trainable = load_file(os.path.join(folder, 'trainable.safetensors')) if load else {}
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if load and set(trainable) != want:
        raise ValueError(f'{folder}/trainable.safetensors: tensors {sorted(set(trainable) ^ want)[:5]} do not match '
                         f'the trainable parameters (different LoRA/freeze settings than the saved run?)')
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
    with open(os.path.join(folder, f'rng-rank{rank}.json')) as f:
        _set_rng_state(json.load(f))
    return state

# -----------------------------------------------------------------------------
# loss, FLOPs, data

def target_positions(labels):
    """Positions t whose next token labels[t+1] is a target (labels are not shifted, HF style)."""
    return (labels[1:] != -100).nonzero().squeeze(1)


def target_loss(model, batch, device):
    """(summed cross-entropy over the batch's target tokens (fp32), their count). Logits only at
    the targets: the full (T, vocab) fp32 logits of a long video batch would be gigabytes."""
    pv = batch['pixel_values'].to(device) if batch['pixel_values'] is not None else None
    h = model(batch['input_ids'].to(device), batch['position_ids'].to(device), batch['cu_seqlens'].to(device),
              pv, batch['grid_thw'], return_hidden=True)
    pos = target_positions(batch['labels']).to(device)
    logits = model.logits(h[pos]).float()
    return F.cross_entropy(logits, batch['labels'][1:].to(device)[pos], reduction='sum'), len(pos)


def forward_backward(model, micro_batches, device, autocast=nullcontext):
    """Backward of (sum of CE over every target token of the step, on every rank) / (their global
    count). Returns (the step's loss: global mean CE per target token, global target count)."""
    n = int(all_reduce(torch.tensor(sum(len(target_positions(b['labels'])) for b in micro_batches))))
    world = _rank_world()[1]
    total = torch.zeros((), device=device)
    for i, b in enumerate(micro_batches):
        if hasattr(model, 'set_requires_gradient_sync'):  # FSDP: reduce-scatter once, on the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with autocast():
            ce, _ = target_loss(model, b, device)
        # FSDP averages gradients over ranks; * world turns that average back into the sum we want
        (ce * (world / max(n, 1))).backward()
        total += ce.detach()
    return float(all_reduce(total)) / max(n, 1), n


def param_counts(model):
    """Parameter counts for the FLOP estimate (before sharding): LM blocks, vision patch
    embedding + blocks (per patch), merger (per merged token)."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    v = model.visual
    return dict(lm=count(model.layers), vision=count(v.blocks) + count(v.patch_embed), merger=count(v.merger))


def step_flops(cfg, counts, batch, n_targets, train_vision):
    """Training FLOPs of one packed batch: 6*N per token for the LM blocks, causal attention
    6*L*d*sum(len^2), the head only at target tokens; the vision tower per patch (6*N trained,
    2*N forward-only when frozen: nothing upstream needs its gradient) plus its full attention
    within each temporal slice."""
    lens = (batch['cu_seqlens'][1:] - batch['cu_seqlens'][:-1]).double()
    T = float(lens.sum())
    f = 6 * counts['lm'] * T + 6 * cfg.num_hidden_layers * cfg.hidden_size * float((lens ** 2).sum())
    f += 6 * cfg.hidden_size * cfg.vocab_size * n_targets
    g = batch['grid_thw']
    if g is not None and len(g):
        k = 6 if train_vision else 2
        P, slices = float(g.prod(-1).sum()), (g[:, 0] * (g[:, 1] * g[:, 2]).double() ** 2).sum()
        f += k * (counts['vision'] * P + counts['merger'] * P / cfg.spatial_merge_size ** 2)
        f += k * 2 * cfg.vision_depth * cfg.vision_embed_dim * float(slices)
    return f


PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12}


def guess_peak_flops(device):
    """Dense bf16 peak FLOP/s of one device, for MFU; 0 when unknown (CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)


def peak_memory(device):
    """Peak bytes: CUDA allocator peak on GPU, peak resident set of the process on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cot_target(sample):
    """The reverse-thinking CoT: the sample's own solution (ST-R1 JSONL), else built from the
    opposite direction's ground truth (benchmark layout), in the release's template."""
    if sample.solution:
        return sample.solution
    if not sample.opposite:
        raise DataError(f'{sample.source} ({sample.id}): no solution and no opposite-direction ground truth '
                        f'to build the reverse-thinking CoT from; train it with --cot=False')
    o = 'reverse' if sample.direction == 'forward' else 'forward'
    think = f"Let's start by thinking {o}: {sample.opposite.rstrip('.')}. And then think about {sample.question}"
    if sample.options:
        think += f' Hence, the correct answer is {sample.answer}'
    return f'<think>{think}</think> <answer>{sample.answer}</answer>'


def answer_target(sample):
    """The bare answer (the no-CoT ablation)."""
    return f'<answer>{sample.answer}</answer>'


def step_batches(samples, tok, settings, target, model_cfg, rank, world, epoch, start, cache=None):
    """Yield (epoch, step in epoch, [grad_accum packed batches]) from step `start` of `epoch` on,
    forever (epochs reshuffle). The tail batches of an epoch that do not fill a step are dropped.
    The loader gets its own RNG so that making one never draws from torch's global RNG (which
    LoRA dropout uses): a resumed run sees the same random numbers as an uninterrupted one."""
    while True:
        loader = data_batches(samples, tok, settings, token_budget, seed, rank, world, num_workers, target, epoch, model_cfg, cache)
        n = len(loader) // grad_accum
        if n == 0:
            raise ValueError(f'{data}: {len(loader)} batches per rank, fewer than grad_accum={grad_accum}')
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
    compute_dtype = getattr(torch, dtype) if on_gpu else torch.float32
    autocast = (lambda: torch.autocast('cuda', dtype=compute_dtype)) if on_gpu and compute_dtype != torch.float32 else nullcontext

    # data: the same preprocessing as grpo.py and bench.py (data.py); checked before any compute
    settings = VisionSettings(nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels)
    tok = Tokenizer(init_from)
    samples = read_samples(data, **({'video_root': video_root} if video_root and not os.path.isdir(data) else {}))
    print0(f'{data}: {len(samples)} samples; targets: {"reverse-thinking CoT" if cot else "bare answers"}')

    # model: fp32 master weights, adapters, then shards
    model = Qwen2VL.from_pretrained(init_from, dtype=torch.float32, device=device)  # sharding frees the rest
    if freeze_vision:
        model.visual.requires_grad_(False)
    if lora_rank > 0:
        print0(f'LoRA r={lora_rank} alpha={lora_alpha} on {len(apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets))} linears')
    counts = param_counts(model)
    train_vision = any(p.requires_grad for p in model.visual.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f'parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, trainable {n_train / 1e6:.3f}M')
    model.gradient_checkpointing = activation_checkpointing
    model.train()
    if world > 1:
        shard_model(model, device, compute_dtype if compute_dtype != torch.float32 else None)
    optimizer = make_optimizer(model, lr, weight_decay, (beta1, beta2))

    # schedule: the number of steps is known up front (lengths come from video headers)
    target = cot_target if cot else answer_target
    per_epoch = lambda e: len(data_batches(samples, tok, settings, token_budget, seed, 0, world, 0, target, e, model.config)) // grad_accum
    total_steps = max_steps if max_steps > 0 else sum(per_epoch(e) for e in range(epochs))
    warmup = int(warmup_frac * total_steps)
    step, epoch, start = 0, 0, 0
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    torch.manual_seed(seed + rank)  # LoRA dropout: a stream per rank (a resumed run restores its own)
    if resume:
        state = load_training_state(out_dir, model, optimizer)
        step, epoch, start = state['step'], state['epoch'], state['step_in_epoch']
        with open(os.path.join(out_dir, 'run_config.json')) as f:
            changed = sorted(k for k, v in json.load(f).items() if k != 'resume' and config.get(k) != v)
        print0(f'resumed from {out_dir} at step {step} (epoch {epoch}, step {start} of it)' +
               (f'; settings changed since: {changed}' if changed else ''))
        if master:
            trim_metrics(metrics_path, step)
    elif os.path.exists(os.path.join(out_dir, 'train_state.json')):
        raise FileExistsError(f'{out_dir} holds a run (train_state.json): continue it with --resume=True '
                              f'or pick another --out_dir')
    elif master:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    peak = peak_flops or guess_peak_flops(device)
    params = [p for p in model.parameters() if p.requires_grad]
    print0(f'{total_steps} steps of {grad_accum} x {world} packed batches (<= {token_budget} tokens), '
           f'warmup {warmup}, lr {lr}, {"FSDP2 on " if world > 1 else ""}{world} {device.type} process(es)')

    def checkpoint(step_done, epoch_next, start_next):
        state = dict(step=step_done, epoch=epoch_next, step_in_epoch=start_next, world_size=world)
        save_checkpoint(out_dir, model, init_from, optimizer, state, config, settings.asdict(), getattr(torch, save_dtype))

    cache = FrameCache(frame_cache_mb * 2**20) if frame_cache_mb > 0 else None
    batches_iter = step_batches(samples, tok, settings, target, model.config, rank, world, epoch, start, cache)
    pbar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, s, micro = next(batches_iter)
        lr_now = lr_at(step, total_steps, lr, warmup, min_lr)
        for g in optimizer.param_groups:
            g['lr'] = lr_now
        loss, n_targets = forward_backward(model, micro, device, autocast)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
        norm = float(norm.full_tensor() if hasattr(norm, 'full_tensor') else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens, flops = 0, 0.0
        for b in micro:
            tokens += len(b['input_ids'])
            flops += step_flops(model.config, counts, b, len(target_positions(b['labels'])), train_vision)
        tokens, flops = all_reduce(torch.tensor([float(tokens), flops], dtype=torch.float64)).tolist()
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        if master:
            m = dict(step=step - 1, loss=loss, lr=lr_now, grad_norm=norm, target_tokens=n_targets, tokens=int(tokens),
                     tokens_per_s=tokens / dt, mfu=flops / dt / (peak * world) if peak else None,
                     peak_mem_gb=peak_memory(device) / 2**30, dt=dt)
            log_metrics(metrics_path, m)
            pbar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr_now:.2e}', tok_s=f'{tokens / dt:.0f}')
        pbar.update(1)
        if step == total_steps or (save_interval > 0 and step % save_interval == 0):
            checkpoint(step, epoch, s + 1)
    pbar.close()
    print0(f'done: {total_steps} steps; model and training state in {out_dir}')
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
