"""sft.py on a tiny EgoWorld: training lowers the loss, checkpoints load in transformers with our
logits, torchrun (2 gloo ranks) follows the one-process loss curve, kill + --resume replays the
uninterrupted run exactly, the loss sees assistant tokens only and normalises over the whole step.

Everything runs on a shrunken egoworld tiny model (~0.2M parameters) and 6 EgoWorld videos, so the
end-to-end runs (subprocesses, as a user would run them) take seconds each.
Tolerances: logits 1e-4 (fp32); the 2-rank loss curve 1e-5 per step (the same tokens, summed in
another order); resume: bitwise equal losses.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch
from safetensors.torch import load_file

import data
import egoworld
from conftest import make_tiny_world
import sft
from model import Qwen2VL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
STEPS = 8


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """6 EgoWorld videos (48 samples) and egoworld's tiny tokenizer + model, shrunk for speed."""
    d = tmp_path_factory.mktemp('sft')
    make_tiny_world(d, 'train', 0, 6)
    return d


def args(world, out, **kw):
    """config/sft_egoworld.py on the fixture: 8 steps of 2 micro-batches of ~4 samples, lr 3e-3."""
    a = dict(init_from=world / 'tiny', data=world / 'train' / 'st_r1_cot.jsonl', out_dir=out, max_steps=STEPS,
             token_budget=1100, grad_accum=2, num_workers=0, lr=3e-3, warmup_frac=0.0, save_interval=0)
    a.update(kw)
    return [os.path.join(ROOT, 'config', 'sft_egoworld.py')] + [f'--{k}={v}' for k, v in a.items()]


def run(argv, nproc=1, kill_after=None, check=True, script=None):
    """sft.py as a user runs it. kill_after=k: the process dies (os._exit) right after logging step k.
    script: one process running this Python source instead (a wrapper around sft.main)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    if nproc > 1:
        if script:  # torchrun runs files
            with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
                f.write(f'import sys; sys.path.insert(0, {ROOT!r})' + script)
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--standalone',
               f.name if script else os.path.join(ROOT, 'sft.py')]
    else:
        cmd = [sys.executable, '-c', script or KILLER % (kill_after if kill_after is not None else -1)]
    p = subprocess.Popen(cmd + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        p.stdout_text, p.stderr_text = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun's workers too, not just the launcher
        raise
    if check and p.returncode != 0:
        raise AssertionError(f'sft.py failed ({p.returncode}):\n{p.stdout_text[-3000:]}\n{p.stderr_text[-5000:]}')
    return p


KILLER = '''
import os, sys, sft
log = sft.log_metrics
def log_then_die(path, m):
    log(path, m)
    if m['step'] == %d:
        os._exit(9)   # as abrupt as a kill: no cleanup, no final checkpoint
sft.log_metrics = log_then_die
sft.main(sys.argv[1:])
'''

NAN_INJECTOR = '''
import sys, sft
steps, calls, forward_backward = {%s}, [0], sft.forward_backward
def poisoned(model, *args, **kw):  # a NaN gradient at the chosen steps on rank 0, as an overflow would leave it
    loss, n = forward_backward(model, *args, **kw)
    if calls[0] in steps and sft.rank_world()[0] == 0:
        next(p for p in model.parameters() if p.requires_grad).grad.fill_(float('nan'))
    calls[0] += 1
    return loss, n
sft.forward_backward = poisoned
sft.main(sys.argv[1:])
'''


def metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope='module')
def baseline(world):
    """One uninterrupted single-process run (full fine-tune), shared by three tests."""
    out = world / 'base'
    run(args(world, out))
    return out


def packed_example(world, tok, cfg, n=2):
    samples = data.read_samples(str(world / 'train' / 'st_r1_cot.jsonl'))[:n]
    st = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    return samples, data.pack([data.encode(s, tok, st, s.solution, cfg) for s in samples])


def test_training_lowers_loss_and_checkpoint_loads_in_transformers(world, baseline):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    m = metrics(baseline)
    assert [x['step'] for x in m] == list(range(STEPS))
    loss = [x['loss'] for x in m]
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - 0.3, loss
    assert all(x['tokens_per_s'] > 0 and x['peak_mem_gb'] > 0 and x['grad_norm'] > 0 for x in m)
    # the saved model is the trained one (the trainable tensors of the training state), in the HF layout
    ours = Qwen2VL.from_pretrained(str(baseline)).eval()
    state = json.load(open(baseline / 'train_state.json'))
    assert state['step'] == STEPS
    trained = Qwen2VL.from_pretrained(str(world / 'tiny'))
    trained.load_state_dict(load_file(str(baseline / state['dir'] / 'trainable.safetensors')), strict=True)
    fresh = Qwen2VL.from_pretrained(str(world / 'tiny'))
    assert not torch.equal(fresh.embed_tokens.weight, ours.embed_tokens.weight)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(baseline)).eval()
    tok = data.Tokenizer(str(baseline))
    _, b = packed_example(world, tok, ours.config, n=1)
    with torch.no_grad():
        a = ours(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
        t = trained.eval()(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
        h = hf(input_ids=b['input_ids'][None], position_ids=b['position_ids'][:, None],
               pixel_values_videos=b['pixel_values'], video_grid_thw=b['grid_thw']).logits[0]
    assert (a - h).abs().max() < 1e-4 and (a - t).abs().max() < 1e-4
    # the tokenizer, chat template and run records travel with the checkpoint
    hf_tok = AutoTokenizer.from_pretrained(str(baseline))
    assert hf_tok('go straight, turn left')['input_ids'] == tok.encode('go straight, turn left')
    assert json.load(open(baseline / 'vision_settings.json')) == dict(  # EgoWorld: 16 of 16 frames at 8 fps
        data.VisionSettings(16, 56 * 56, 56 * 56).asdict(), second_per_grid_ts=[0.25, 0.25])
    assert json.load(open(baseline / 'run_config.json'))['max_steps'] == STEPS
    for f in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'preprocessor_config.json',
              'chat_template.json'):
        assert (baseline / f).exists(), f


def test_torchrun_two_ranks_follow_one_process(world, baseline):
    """2 gloo ranks x 1 micro-batch = 1 process x 2 micro-batches: the same global batch each step.
    FSDP2 with activation checkpointing (recomputation changes no value) against a plain module."""
    out = world / 'ddp'
    run(args(world, out, grad_accum=1, activation_checkpointing=True), nproc=2)
    a, b = metrics(baseline), metrics(out)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert x['target_tokens'] == y['target_tokens'] and x['tokens'] == y['tokens']
        assert abs(x['loss'] - y['loss']) < 1e-5, (x, y)
        assert abs(x['grad_norm'] - y['grad_norm']) < 1e-4 * x['grad_norm']
    wa, wb = load_file(str(baseline / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-5 for k in wa)


def test_frame_cache_changes_no_value(world, baseline):
    """The preset decodes through a FrameCache (each of the 6 clips is read once per question, 8
    times an epoch, so most reads here are hits); without the cache the run is bit-identical."""
    out = world / 'nocache'
    run(args(world, out, frame_cache_mb=0))
    a, b = metrics(baseline), metrics(out)
    assert [(x['loss'], x['grad_norm']) for x in a] == [(x['loss'], x['grad_norm']) for x in b]
    wa, wb = load_file(str(baseline / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_and_resume_replays_the_run_exactly(world):
    """LoRA with dropout, so the RNG restore matters too. Killed after step 4 (last checkpoint: 3)."""
    kw = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1, save_interval=3)
    full, cut = world / 'lora_full', world / 'lora_cut'
    run(args(world, full, **kw))
    p = run(args(world, cut, **kw), kill_after=4, check=False)
    assert p.returncode == 9 and len(metrics(cut)) == 5
    assert json.load(open(cut / 'train_state.json'))['step'] == 3
    p = run(args(world, cut, **kw), check=False)  # a fresh run must not clobber it
    assert p.returncode != 0 and 'continue it with --resume=True' in p.stderr_text
    run(args(world, cut, resume=True, **kw))
    a, b = metrics(full), metrics(cut)
    assert [x['step'] for x in b] == list(range(STEPS))
    assert [x['loss'] for x in a] == [x['loss'] for x in b]
    assert [x['grad_norm'] for x in a] == [x['grad_norm'] for x in b]


def test_loss_sees_assistant_tokens_only(world):
    """Token by token: the loss has a gradient at position t iff token t+1 is in the assistant turn
    (its text and closing <|im_end|>), found from the chat layout, not from the labels; so never at
    system, user, vision or padding tokens."""
    tok = data.Tokenizer(str(world / 'tiny'))
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    samples, b = packed_example(world, tok, model.config, n=3)
    ids = b['input_ids'].tolist()
    expected = torch.zeros(len(ids), dtype=torch.bool)
    for s, e, sample in zip(b['cu_seqlens'][:-1].tolist(), b['cu_seqlens'][1:].tolist(), samples):
        turns = [i for i in range(s, e) if ids[i] == tok.im_start_id]
        assert len(turns) == 3  # system, user, assistant
        first = next(j for j in range(turns[2], e) if tok.decode(ids[turns[2] + 1:j]) == 'assistant\n')
        end = ids.index(tok.im_end_id, first)
        assert tok.decode(ids[first:end]) == sample.solution
        expected[first - 1:end] = True   # positions predicting tokens first .. end (the <|im_end|>)
    # the loss through a "model" whose hidden states are a leaf: which positions get a gradient?
    h = torch.randn(len(ids), model.config.hidden_size, requires_grad=True)
    fake = lambda *a, **k: h
    fake.logits = model.logits
    ce, n = sft.target_loss(fake, b, 'cpu')
    ce.backward()
    got = h.grad.abs().sum(-1) > 0
    assert n == int(expected.sum()) and torch.equal(got, expected)
    not_targets = {tok.vision_start_id, tok.vision_end_id, tok.video_pad_id, tok.image_pad_id, tok.pad_id,
                   tok.im_start_id}
    assert not any(ids[t + 1] in not_targets for t in got.nonzero().squeeze(1).tolist())


def test_loss_normalised_over_the_whole_step(world):
    """Two micro-batches with different target counts: the accumulated gradient is that of the mean
    CE over all their target tokens at once, not the mean of the two micro-batch means."""
    tok = data.Tokenizer(str(world / 'tiny'))
    model = Qwen2VL.from_pretrained(str(world / 'tiny'))
    samples = data.read_samples(str(world / 'train' / 'st_r1_nocot.jsonl'))
    st = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    enc = [data.encode(s, tok, st, s.solution, model.config) for s in samples[:3]]
    micro = [data.pack(enc[:1]), data.pack(enc[1:])]
    loss, n = sft.forward_backward(model, micro, 'cpu')
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    whole = data.pack(enc)
    pos = sft.target_positions(whole['labels'])
    logits = model(whole['input_ids'], whole['position_ids'], whole['cu_seqlens'], whole['pixel_values'],
                   whole['grid_thw'])
    ref = torch.nn.functional.cross_entropy(logits[pos], whole['labels'][1:][pos])
    ref.backward()
    assert n == len(pos) and abs(loss - ref.item()) < 1e-5
    counts = [len(sft.target_positions(m['labels'])) for m in micro]
    assert counts[0] != counts[1] // 2  # the two normalisations differ on this step
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, atol=1e-6, rtol=1e-4), k


def test_flop_count_by_hand():
    """2 sequences (10, 20 tokens), one video grid (2, 4, 4) = 32 patches in 2 slices of 16."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=512,
                          spatial_merge_size=2, vision_depth=1, vision_embed_dim=32)
    counts = dict(lm=1000, vision=200, merger=50)
    b = dict(cu_seqlens=torch.tensor([0, 10, 30]), grid_thw=torch.tensor([[2, 4, 4]]))
    lm = 6 * 1000 * 30 + 6 * 2 * 64 * (10 ** 2 + 20 ** 2) + 6 * 64 * 512 * 5
    trained = 6 * (200 * 32 + 50 * 32 / 4) + 6 * 2 * 1 * 32 * (2 * 16 ** 2)
    frozen = 2 * (200 * 32 + 50 * 32 / 4) + 2 * 2 * 1 * 32 * (2 * 16 ** 2)
    assert sft.step_flops(cfg, counts, b, 5, True) == lm + trained
    assert sft.step_flops(cfg, counts, b, 5, False) == lm + frozen


SIGNAL_WRAPPER = '''
import os, sys
sys.path.insert(0, %r)
import sft
open(os.path.join(%r, 'pid_' + os.environ['RANK']), 'w').write(str(os.getpid()))
sft.main(sys.argv[1:])
'''


def test_sigterm_on_one_rank_stops_all_after_the_same_step_and_resumes_exactly(world, tmp_path):
    """The scheduler's SIGTERM reaching one rank of a 2-rank torchrun run: both ranks finish that step, write a
    resumable checkpoint and exit 0, saying how to resume; --resume=True then ends with the weights of an
    uninterrupted run."""
    steps = 30
    full, cut = world / 'sig_full', world / 'sig_cut'
    run(args(world, full, max_steps=steps, grad_accum=1), nproc=2)
    wrapper = tmp_path / 'wrapper.py'
    wrapper.write_text(SIGNAL_WRAPPER % (ROOT, str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                          str(wrapper)] + args(world, cut, max_steps=steps, grad_accum=1), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not (cut / 'metrics.jsonl').exists() or len(metrics(cut)) < 3:
            assert p.poll() is None, 'the run ended before the signal'
            time.sleep(0.05)
        os.kill(int((tmp_path / 'pid_1').read_text()), signal.SIGTERM)  # rank 1 only: rank 0 must follow
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    stopped = json.load(open(cut / 'train_state.json'))['step']
    assert 3 <= stopped < steps and f'after step {stopped}' in out + err and '--resume=True' in out + err
    assert len(metrics(cut)) == stopped
    run(args(world, cut, max_steps=steps, grad_accum=1, resume=True), nproc=2)
    a, b = load_file(str(full / 'model.safetensors')), load_file(str(cut / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('nproc', [1, 2])
def test_a_nan_step_is_skipped_and_logged_and_too_many_in_a_row_stop_the_run(world, baseline, nproc):
    """A NaN gradient at step 2 (on rank 0 only, with 2 ranks): every rank skips the update (common.clip_and_step;
    its test shows nothing is touched), the step is logged with its samples, the run finishes; steps before it
    equal the clean run's. NaN at steps 2, 3, 4 with max_nonfinite_steps=3: the run stops with an error naming
    the three steps."""
    out, ga = world / f'nan_once_{nproc}', 2 // nproc
    p = run(args(world, out, grad_accum=ga), nproc, script=NAN_INJECTOR % '2')
    m, clean = metrics(out), metrics(baseline)
    assert [x['skipped'] for x in m] == [i == 2 for i in range(STEPS)]
    assert m[2]['grad_norm'] != m[2]['grad_norm'] and m[2]['samples'] == clean[2]['samples']
    assert f"step 2: non-finite loss or gradient norm, update skipped; samples: {', '.join(m[2]['samples'])}" \
        in p.stdout_text + p.stderr_text
    assert all(abs(x['loss'] - y['loss']) < 1e-5 for x, y in zip(m[:3], clean[:3]))
    assert abs(m[3]['loss'] - clean[3]['loss']) > 1e-4
    out = world / f'nan_thrice_{nproc}'
    p = run(args(world, out, max_nonfinite_steps=3, grad_accum=ga), nproc, script=NAN_INJECTOR % '2, 3, 4',
            check=False)
    assert p.returncode != 0 and len(metrics(out)) == 5
    err = p.stderr_text
    assert 'FloatingPointError: 3 steps in a row with a non-finite loss or gradient norm' in err
    assert all(f"step {k} (samples {', '.join(metrics(out)[k]['samples'])})" in err for k in (2, 3, 4))


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_sees_every_sample_once(world, baseline, tmp_path, before, after):
    """Killed after step 4 (checkpoint at step 3) on `before` ranks, resumed with the same command on `after`:
    grad_accum is rescaled to keep the global batch (2 packed batches a step), so every step sees exactly the
    samples the uninterrupted run saw, no sample twice in an epoch, and the weights end within 1e-5 of it
    (the same sums in another order)."""
    out, ga = world / f'ranks_{before}_to_{after}', 2 // before
    kw = dict(grad_accum=ga, save_interval=3)
    if before == 1:
        p = run(args(world, out, **kw), kill_after=4, check=False)
    else:
        killer = tmp_path / 'killer.py'
        killer.write_text(f'import sys; sys.path.insert(0, {ROOT!r})' + KILLER % 4)
        p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={before}',
                            '--standalone', str(killer)] + args(world, out, **kw), cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
    assert p.returncode != 0 and json.load(open(out / 'train_state.json'))['step'] == 3
    p = run(args(world, out, resume=True, **kw), nproc=after)
    assert f'grad_accum {ga} -> {2 // after}' in p.stdout_text + p.stderr_text
    a, b = metrics(baseline), metrics(out)
    assert [x['step'] for x in b] == list(range(STEPS))
    assert [sorted(x['samples']) for x in a] == [sorted(x['samples']) for x in b]
    for e in {x['epoch'] for x in b}:
        seen = [i for x in b if x['epoch'] == e for i in x['samples']]
        assert len(seen) == len(set(seen))
    assert all(abs(x['loss'] - y['loss']) < 1e-5 for x, y in zip(a, b))
    wa, wb = load_file(str(baseline / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-5 for k in wa)
