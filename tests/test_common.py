"""common.py, the plumbing sft.py and grpo.py share: LoRA merges without changing logits, the
training state round-trips (trainable tensors, AdamW state, RNG), the lr schedule by hand, the atomic
writer never leaves a half-written file, start_run refuses to clobber a run and trims a killed run's
metrics on resume. Tolerances: logits 1e-4 (fp32)."""
import json
import os

import pytest
import torch

import common
import data
from conftest import make_tiny_world
from model import Qwen2VL

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp('common')
    make_tiny_world(d, 'train', 0, 1)
    return d


def packed_example(world, tok, cfg, n=2):
    samples = data.read_samples(str(world / 'train' / 'st_r1_cot.jsonl'))[:n]
    st = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    return data.pack([data.encode(s, tok, st, s.solution, cfg) for s in samples])


def test_lora_merge_keeps_logits(world, tmp_path):
    tok = data.Tokenizer(str(world / 'tiny'))
    model = Qwen2VL.from_pretrained(str(world / 'tiny')).eval()
    names = common.apply_lora(model, rank=4, alpha=8, dropout=0.1, targets='q_proj,k_proj,v_proj,o_proj')
    assert len(names) == 4 * model.config.num_hidden_layers and not any(n.startswith('visual') for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f'{n}.lora_{x}' for n in names for x in 'AB'}
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.5)  # a trained adapter, so merging has something to add
    b = packed_example(world, tok, model.config)
    fwd = lambda m: m(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
    with torch.no_grad():
        before = fwd(model)
        base = Qwen2VL.from_pretrained(str(world / 'tiny')).eval()
        assert (fwd(base) - before).abs().max() > 1e-2  # the adapter changes the output
        common.save_model(str(tmp_path), model, str(world / 'tiny'))
        reloaded = Qwen2VL.from_pretrained(str(tmp_path)).eval()
        assert (fwd(reloaded) - before).abs().max() < 1e-4
        scalings = {n: model.get_submodule(n).scaling for n in names}
        merged_sd = common.merge_lora_weights(model.state_dict(), scalings)
        assert not any('lora' in k for k in merged_sd)
        base.load_state_dict(merged_sd, strict=True)
        assert (fwd(base) - before).abs().max() < 1e-4
    with pytest.raises(ValueError, match='no nn.Linear named'):
        common.apply_lora(base, 4, 8, targets='query')


def test_training_state_round_trip(world, tmp_path):
    """save_checkpoint -> load_training_state restores trainable tensors, AdamW state and RNG."""
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    common.apply_lora(model, 2, 4, dropout=0.1)
    opt = common.make_optimizer(model, 1e-2)
    for _ in range(2):
        sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad).backward()
        opt.step()
    common.save_checkpoint(str(tmp_path), model, str(world / 'tiny'), opt, dict(step=2, epoch=0, step_in_epoch=2),
                           dict(lr=1e-2), vision_settings=None)
    draws = torch.rand(5)
    again = Qwen2VL.from_pretrained(str(world / 'tiny'))
    common.apply_lora(again, 2, 4, dropout=0.1)
    opt2 = common.make_optimizer(again, 1e-2)
    state = common.load_training_state(str(tmp_path), again, opt2)
    assert state['step'] == 2 and torch.equal(torch.rand(5), draws)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1['param_groups'] == s2['param_groups']
    assert all(torch.equal(s1['state'][i][k], s2['state'][i][k]) for i in s1['state'] for k in s1['state'][i])
    bad = Qwen2VL.from_pretrained(str(world / 'tiny'))
    common.apply_lora(bad, 2, 4, targets='q_proj')
    with pytest.raises(ValueError, match='do not match the trainable parameters'):
        common.load_training_state(str(tmp_path), bad, common.make_optimizer(bad, 1e-2))


def test_a_non_finite_step_touches_no_weight_and_no_optimizer_state(world):
    """clip_and_step with a NaN gradient (or an inf loss) skips the update: weights and AdamW state exactly as
    before, gradients cleared; the next finite step steps. NonFiniteSteps stops the run after N in a row,
    naming every step and its samples, and a finite step in between resets the count."""
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = common.make_optimizer(model, 1e-2)
    for poison, loss in ((None, 1.0), ('nan', 1.0), (None, float('inf')), (None, 2.0)):
        sum(p.pow(2).sum() for p in params).backward()
        if poison:
            params[3].grad[0] = float(poison)
        before = ([p.detach().clone() for p in params],
                  {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()['state'].items()})
        norm, stepped = common.clip_and_step(opt, params, 1.0, loss)
        assert stepped == (poison is None and loss != float('inf'))
        assert all(p.grad is None for p in params)
        same = all(torch.equal(a, p) for a, p in zip(before[0], params))
        after = opt.state_dict()['state']
        assert same == (not stepped) and (before[1] == {} or
                                          all(torch.equal(before[1][i][k], after[i][k]) for i in after
                                              for k in after[i]) == (not stepped))
    bad = common.NonFiniteSteps(2)
    bad.update(0, False, ['a', 'b'])
    bad.update(1, True, ['c'])
    bad.update(2, False, ['d'])
    with pytest.raises(FloatingPointError, match=r'2 steps in a row .*step 2 \(samples d\); step 3 \(samples e, f\)'):
        bad.update(3, False, ['e', 'f'])


def partial_then_full_disk(real, target):
    """A writer that fails as a full disk does: for paths containing `target` it writes some bytes, then raises."""
    def write(*args, **kw):
        path = next(a for a in args + tuple(kw.values()) if isinstance(a, str) and os.sep in a)
        if target not in path:
            return real(*args, **kw)
        with open(path, 'wb') as f:
            f.write(b'\0' * 1000)
        raise OSError(28, 'No space left on device', path)
    return write


@pytest.mark.parametrize('where', ['weights', 'optimizer', 'rng'])
def test_a_failed_save_leaves_the_previous_checkpoint_current(world, tmp_path, monkeypatch, where):
    """Step 2's save fails half way (a full disk) in the model weights, the optimizer state or a rank's RNG file:
    the error names the step and the cause, train_state.json still points at step 1, whose model files and
    resumable state load as saved, and nothing of step 2 is left; a later save publishes and prunes as usual."""
    import model as model_py
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    opt = common.make_optimizer(model, 1e-2)
    out, tiny = str(tmp_path / 'run'), str(world / 'tiny')

    def train_and_save(step):
        sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad).backward()
        opt.step()
        opt.zero_grad()
        common.save_checkpoint(out, model, tiny, opt, dict(step=step, epoch=0, step_in_epoch=step), dict(lr=1e-2))

    train_and_save(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    files = {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)
             if os.path.isfile(os.path.join(out, f))}
    writers = dict(weights=(model_py, 'save_file', 'model.tmp'),
                   optimizer=(common, 'save_file', 'optimizer.safetensors'),
                   rng=(common, 'write_text', 'rng-rank0'))
    module, fn, target = writers[where]
    monkeypatch.setattr(module, fn, partial_then_full_disk(getattr(module, fn), target))
    with pytest.raises(RuntimeError, match=r'saving step 2 .* failed .*OSError: \[Errno 28\] No space left on device.*'
                                           r'the previous checkpoint \(step 1\) .* is untouched and current'):
        train_and_save(2)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted(list(files) + ['state-000001'])
    assert all(open(os.path.join(out, f), 'rb').read() == b for f, b in files.items())
    assert json.load(open(os.path.join(out, 'train_state.json')))['dir'] == 'state-000001'
    again = Qwen2VL.from_pretrained(out)
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    again = Qwen2VL.from_pretrained(tiny)
    assert common.load_training_state(out, again, common.make_optimizer(again, 1e-2))['step'] == 1
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    train_and_save(3)
    assert sorted(f for f in os.listdir(out) if f.startswith('state-')) == ['state-000003']


FSDP_FAILED_SAVE = '''
import common, model as model_py
shard_model(model, torch.device('cpu'))
opt = common.make_optimizer(model, 1e-2)
b = data.pack([data.encode(s, tok, settings, s.solution, model.config) for s in samples[:2]])
out, rank = os.path.join(d, f'run_{int(flag)}'), dist.get_rank()

def step_and_save(k):
    forward(b).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    common.save_checkpoint(out, model, os.path.join(d, 'tiny'), opt, dict(step=k, epoch=0, step_in_epoch=k), {})

def full_disk(real, target):
    def write(*args, **kw):
        if target in next(a for a in args if isinstance(a, str)):  # save_file(t, path), write_text(path, t)
            raise OSError(28, 'No space left on device')
        return real(*args, **kw)
    return write
step_and_save(1)
if rank == int(flag):  # rank 0's weights file (flag 0) or rank 1's RNG file (flag 1) hits a full disk
    if flag:
        common.write_text = full_disk(common.write_text, 'rng-rank1')
    else:
        model_py.save_file = full_disk(model_py.save_file, 'model.tmp')
try:
    step_and_save(2)
    err = None
except RuntimeError as e:
    err = str(e)
step = common.load_training_state(out, model, opt)['step']  # collective: every rank is still in step
with open(os.path.join(d, f'r{rank}_{int(flag)}.json'), 'w') as f:
    json.dump(dict(err=err, step=step, files=sorted(os.listdir(out))), f)
if rank == 0:
    json.dump({}, open(os.path.join(d, f'out_{int(flag)}.json'), 'w'))
dist.barrier()  # no rank tears gloo down while a peer still talks (one CI run aborted there)
dist.destroy_process_group()
'''


def test_a_save_failing_on_one_rank_fails_on_all_and_keeps_the_previous_checkpoint(tmp_path):
    """2 ranks under torchrun/gloo: rank 0's weights file or rank 1's RNG file hits a full disk at step 2. Every
    rank raises (none is left waiting), the error names the rank and the cause, the previous checkpoint (step 1)
    stays current and loads on both ranks, and no part of step 2 is left."""
    run_fsdp(tmp_path, FSDP_FAILED_SAVE)
    for flag in (0, 1):
        r = [json.load(open(tmp_path / f'r{rank}_{flag}.json')) for rank in (0, 1)]
        assert all(x['step'] == 1 and x['files'] == r[0]['files'] for x in r)
        assert 'state-000001' in r[0]['files'] and not [f for f in r[0]['files'] if '000002' in f]
        for x in r:
            assert 'saving step 2 to' in x['err'] and 'failed on 1 rank(s)' in x['err'], x['err']
            assert 'the previous checkpoint (step 1)' in x['err']
        assert 'No space left on device' in r[flag]['err'] and f'(rank {flag}: OSError' in r[flag]['err']


def test_schedule():
    lrs = [common.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == 1.0
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_atomic_path_publishes_whole_files_only(tmp_path):
    """The target appears only when the block finishes; a failure inside it leaves the old file and
    no temporary behind. The temporary keeps the extension (PyAV picks a format by it)."""
    path = tmp_path / 'clip.mp4'
    path.write_text('old')
    with common.atomic_path(str(path)) as tmp:
        assert tmp.endswith('.mp4') and tmp != str(path)
        open(tmp, 'w').write('new')
        assert path.read_text() == 'old'
    assert path.read_text() == 'new'
    with pytest.raises(RuntimeError):
        with common.atomic_path(str(path)) as tmp:
            open(tmp, 'w').write('half')
            raise RuntimeError('killed mid-write')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['clip.mp4']


def test_start_run_refuses_to_clobber_and_trims_on_resume(world, tmp_path):
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    opt = common.make_optimizer(model, 1e-2)
    out = tmp_path / 'run'
    assert common.start_run(str(out), False, model, opt, dict(lr=1e-2)) is None
    for step in range(5):  # a run that logged 5 steps and was killed after saving step 3
        common.log_metrics(str(out / 'metrics.jsonl'), dict(step=step))
    common.save_checkpoint(str(out), model, str(world / 'tiny'), opt, dict(step=3), dict(lr=1e-2))
    with pytest.raises(FileExistsError, match='--resume=True'):
        common.start_run(str(out), False, model, opt, dict(lr=1e-2))
    assert common.start_run(str(out), True, model, opt, dict(lr=1e-2))['step'] == 3
    assert [json.loads(line)['step'] for line in open(out / 'metrics.jsonl')] == [0, 1, 2]


# the start of both FSDP scripts: 2 gloo ranks, the tiny model and samples of the world in argv[1]
FSDP_HEAD = '''
import json, os, sys, torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
import data
from common import grad_sync, shard_model
from model import Qwen2VL
d, flag = sys.argv[1], sys.argv[2] == '1'
dist.init_process_group('gloo')
tok, model = data.Tokenizer(os.path.join(d, 'tiny')), Qwen2VL.from_pretrained(os.path.join(d, 'tiny'))
samples = data.read_samples(os.path.join(d, 'train', 'st_r1_cot.jsonl'))[:4]
settings = data.VisionSettings(16, 56 * 56, 56 * 56)
forward = lambda b: model(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
'''

FSDP_BF16 = '''
b = data.pack([data.encode(s, tok, settings, s.solution, model.config) for s in samples[:2]])
model.gradient_checkpointing = flag
shard_model(model, torch.device('cpu'), torch.bfloat16)
logits = forward(b)
assert logits.dtype == torch.bfloat16  # FSDP's mixed precision is on
logits.float().logsumexp(-1).mean().backward()
grads = {n: p.grad.full_tensor().float().norm().item() for n, p in model.named_parameters()}
if dist.get_rank() == 0:
    json.dump(grads, open(os.path.join(d, f'out_{int(flag)}.json'), 'w'))
dist.barrier()  # no rank tears gloo down while a peer still talks (one CI run aborted there)
dist.destroy_process_group()
'''


def run_fsdp(tmp_path, body):
    """The FSDP script FSDP_HEAD + body under torchrun (2 ranks, gloo) with argv[2] = 0 and 1: their out_*.json."""
    import subprocess
    import sys
    make_tiny_world(tmp_path, 'train', 0, 1)
    script = tmp_path / 'fsdp.py'
    script.write_text(FSDP_HEAD.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + body)
    env = dict(os.environ, OMP_NUM_THREADS='1', USE_LIBUV='0')
    for flag in ('0', '1'):
        p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                            str(script), str(tmp_path), flag], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    return [json.load(open(tmp_path / f'out_{k}.json')) for k in (0, 1)]


def test_fsdp_bf16_with_checkpointing_and_a_trainable_tower(tmp_path):
    """FSDP2 with bf16 compute, activation checkpointing and the vision tower training, 2 ranks under
    torchrun/gloo: the backward runs (the recompute sees what the first pass saw: no CheckpointError from
    inputs cast differently) and every gradient, the tower's included, equals the run without checkpointing."""
    plain, ckpt = run_fsdp(tmp_path, FSDP_BF16)
    assert any(n.startswith('visual.blocks') for n in plain) and all(v > 0 for v in plain.values())
    assert plain == pytest.approx(ckpt, rel=1e-6)


FSDP_ACCUM = '''
batches = [data.pack([data.encode(s, tok, settings, s.solution, model.config) for s in pair])
           for pair in (samples[:2], samples[2:])]
shard_model(model, torch.device('cpu'))
held = None
for i, b in enumerate(batches):
    grad_sync(model, i == len(batches) - 1, flag)
    forward(b).logsumexp(-1).mean().backward()
    if i == 0:  # what a rank holds between micro-batches: sharded gradients, or none yet (kept unsharded inside FSDP)
        held = [None if p.grad is None else [p.grad.to_local().numel(), p.numel()] for p in model.parameters()]
grads = {n: p.grad.full_tensor().norm().item() for n, p in model.named_parameters()}
if dist.get_rank() == 0:
    json.dump(dict(held=held, grads=grads), open(os.path.join(d, f'out_{int(flag)}.json'), 'w'))
dist.barrier()  # no rank tears gloo down while a peer still talks (one CI run aborted there)
dist.destroy_process_group()
'''


def test_fsdp_gradients_stay_sharded_between_micro_batches(tmp_path):
    """common.grad_sync under FSDP2 (2 ranks, torchrun/gloo, 2 micro-batches): reducing every micro-batch
    leaves each rank only its shard of every gradient in between (half of each matrix's rows); one reduce a
    step holds none yet (FSDP keeps them unsharded); both end with the same gradients."""
    once, every = run_fsdp(tmp_path, FSDP_ACCUM)
    assert all(h is None for h in once['held'])
    assert all(h is not None and h[0] <= (h[1] + 1) // 2 for h in every['held'])
    assert every['grads'] == pytest.approx(once['grads'], rel=1e-5)
