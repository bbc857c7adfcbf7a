"""grpo.py end to end on a shrunken EgoWorld tiny model (~0.2M parameters, 3 videos):
- the shared-prefix rollout (one prefill, KV cache copied into G rows, rows decoded together) gives
  every row exactly what decoding that row alone gives under the same per-row seed;
- the sampler draws from the top-k/top-p truncated policy and never a visual placeholder token;
- the training forward on packed prompt+completion sequences reproduces the sampler's log-probs;
- the loss normalisers are global: one micro-batch or one per sequence gives the same gradient,
  for every loss_type, with dropped groups;
- real learning: 15 GRPO steps with a simple reward (the fraction of vowels in the completion)
  raise that reward on fixed-seed rollouts of the same prompts;
- `torchrun --nproc_per_node 2` (gloo, FSDP2) follows the one-process run with the same global batch;
- kill + --resume replays the uninterrupted run exactly.
Tolerances: log-probs 1e-5 (fp32, different batch shapes); 2 ranks vs 1 process: the same tokens,
packed and summed in another order, so 1e-5 relative on the first step, then 1e-3 (AdamW at lr 1e-2
amplifies rounding where gradients are ~0; weights within 1% of what training moved them); a
normaliser or data-split bug is off by tens of percent. Resume: bitwise.
"""
import copy
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch
from safetensors.torch import load_file

import data
import egoworld
from conftest import make_tiny_world
import grpo
import reward
from model import Qwen2VL, filter_logits, rope_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
SETTINGS = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)

# the simple reward of the learning runs, shared by the subprocesses (WRAPPER) and this file
REWARD_SRC = '''
def vowel_fraction(text):
    return sum(c in 'aeiou' for c in text) / max(len(text), 1)

def vowel_rewards(samples, texts, G, weights):
    out = torch.full((len(texts), len(grpo.REWARD_KEYS)), float('nan'), dtype=torch.float64)
    out[:, 0] = torch.tensor([vowel_fraction(t) for t in texts], dtype=torch.float64)
    return out
'''
exec(REWARD_SRC)

# grpo.py as a user runs it, with the vowel reward; GRPO_KILL_AFTER=k: dies (os._exit) right after logging step k;
# GRPO_SIGTERM_AFTER=k: gets a SIGTERM there instead (the scheduler's warning)
WRAPPER = '''
import os, signal, sys, torch
sys.path.insert(0, %r)
import grpo
''' % ROOT + REWARD_SRC + '''
grpo.score_rollouts = vowel_rewards
log, kill_after = grpo.log_metrics, int(os.environ.get('GRPO_KILL_AFTER', -1))
term_after = int(os.environ.get('GRPO_SIGTERM_AFTER', -1))
def log_then_die(path, m):
    log(path, m)
    if m['step'] == kill_after:
        os._exit(9)   # as abrupt as a kill: no cleanup, no final checkpoint
    if m['step'] == term_after:
        os.kill(os.getpid(), signal.SIGTERM)
grpo.log_metrics = log_then_die
grpo.main(sys.argv[1:])
'''


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """3 EgoWorld videos (24 samples) and egoworld's tiny tokenizer + model, shrunk for speed."""
    d = tmp_path_factory.mktemp('grpo')
    make_tiny_world(d, 'train', 0, 3)
    (d / 'wrapper.py').write_text(WRAPPER)
    return d


def load(world, path=None):
    tok = data.Tokenizer(str(world / 'tiny'))
    model = Qwen2VL.from_pretrained(str(path or world / 'tiny'))
    samples = data.read_samples(str(world / 'train' / 'st_r1_cot.jsonl'))
    return tok, model, samples


def groups(prompts, tokens, lengths, G):
    """grpo.group_batch's input: every prompt with its G completions (row j: prompt j // G)."""
    return [(p, [tokens[j, :int(lengths[j])] for j in range(b * G, (b + 1) * G)]) for b, p in enumerate(prompts)]


def sequence(prompt, completion, cfg):
    """The plain layout group_batch must equal: prompt + completion as one sequence, labelled like
    data.encode's targets, at rope_positions of the whole sequence."""
    ids = torch.cat([prompt['input_ids'], completion])
    labels = torch.full_like(ids, -100)
    labels[len(prompt['input_ids']):] = completion
    pos, nxt = rope_positions(ids, prompt['grid_thw'], cfg, prompt['second_per_grid_ts'])
    return dict(input_ids=ids, labels=labels, position_ids=pos, pixel_values=prompt['pixel_values'].clone(),
                grid_thw=prompt['grid_thw'], second_per_grid_ts=prompt['second_per_grid_ts'], id=prompt['id'],
                next_position=nxt)

# -----------------------------------------------------------------------------
# rollouts


def test_shared_prefix_rollout_equals_independent_decoding(world):
    """Rows b*G+g of one shared-prefix rollout == prompt b decoded alone with row (b, g)'s seed. 20
    frequent tokens act as stop tokens, so rows end at different steps (ragged finishing)."""
    tok, model, samples = load(world)
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in (samples[0], samples[13])]
    G, L = 3, 24
    stops = list(range(100, 120))
    seeds = [grpo.row_seed(7, 0, i, g) for i in (0, 13) for g in range(G)]
    kw = dict(max_new_tokens=L, temperature=0.9, top_k=200, top_p=0.95, stop_ids=stops,
              pad_id=tok.pad_id)
    tokens, logps, lengths, stopped = grpo.rollout(model, data.pack(prompts), G, seeds, **kw)
    assert len(set(lengths.tolist())) > 1 and stopped.any() and not stopped.all()  # the test exercises both endings
    assert len({tuple(t.tolist()) for t in tokens}) == 2 * G  # rows differ: every row has its own stream
    for b in range(2):
        for g in range(G):
            r = b * G + g
            t1, lp1, n1, s1 = grpo.rollout(model, data.pack([prompts[b]]), 1, seeds[r:r + 1], **kw)
            n = int(n1)
            assert n == int(lengths[r]) and bool(s1) == bool(stopped[r])
            assert torch.equal(t1[0, :n], tokens[r, :n]) and (tokens[r, n:] == tok.pad_id).all()
            assert (lp1[0, :n] - logps[r, :n]).abs().max() < 1e-5 and (logps[r, n:] == 0).all()
            if s1:
                assert int(t1[0, n - 1]) in stops


def test_sampler_draws_from_the_truncated_policy():
    """sample_rows by inverse CDF: frequencies follow the top-k/top-p truncated softmax, truncated and
    banned tokens never come out, and the log-prob returned is the untruncated policy's."""
    V, R = 12, 40000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 2
    logits[0, 3] = 10.0  # the most likely token, banned below
    pol = grpo.policy_logits(logits.expand(R, V), 0.8, torch.tensor([3]))
    u = torch.rand(R, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tok, lp = grpo.sample_rows(pol, u, top_k=6, top_p=0.9)
    want = filter_logits(pol[:1].log_softmax(-1), 6, 0.9).softmax(-1)[0]
    freq = torch.bincount(tok, minlength=V).double() / R
    assert (freq[want == 0] == 0).all() and freq[3] == 0 and (want > 0).sum() >= 2
    assert (freq - want.double()).abs().max() < 0.01
    assert torch.allclose(lp, pol.log_softmax(-1).gather(-1, tok[:, None])[:, 0])
    assert torch.allclose(pol[0].log_softmax(-1)[3:4].exp(), torch.zeros(1))


def test_training_forward_reproduces_sampler_logps(world):
    """The training forward (group_batch: each prompt once, its completions seeing it) gives the log-probs
    the KV-cache decode sampled with."""
    tok, model, samples = load(world)
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in samples[:2]]
    G, L = 4, 20
    seeds = [grpo.row_seed(3, 0, i, g) for i in range(2) for g in range(G)]
    tokens, logps, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, L, stop_ids=list(range(60, 70)),
                                             pad_id=tok.pad_id)
    batch = grpo.group_batch(groups(prompts, tokens, lengths, G))
    flat, ent = grpo.completion_logps(model, batch, 1.0, 'cpu', entropy=True)
    padded, mask = grpo.pad_rows(flat, lengths)
    assert int(mask.sum()) == int(lengths.sum()) and ((ent > 0) & (ent < 6.3)).all()  # entropy <= log(512)
    assert (padded[mask] - logps[:, :padded.shape[1]][mask]).abs().max() < 1e-5

def test_each_prompt_computed_once_same_logps_and_gradients(world):
    """group_batch runs each prompt (and its clip) through the model once and lets its G completions see
    it; log-probs, entropies and every parameter's gradient equal those of each prompt + completion as a
    sequence of its own (1e-5: the same sums in another order). Completions of 1 token (only a stop token)
    included; the batch holds 2 prompts + their completions minus their last tokens."""
    tok, model, samples = load(world)
    G = 3
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in (samples[0], samples[8])]  # 2 videos
    seeds = [grpo.row_seed(4, 0, i, g) for i in range(2) for g in range(G)]
    tokens, _, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, 10, stop_ids=list(range(40, 90)),
                                         pad_id=tok.pad_id)
    tokens[1, 0], lengths[1] = tok.im_end_id, 1   # a completion that stops at once
    shared = grpo.group_batch(groups(prompts, tokens, lengths, G))
    alone = data.pack([sequence(prompts[j // G], tokens[j, :int(lengths[j])], model.config) for j in range(2 * G)])
    n_prompt = sum(len(p['input_ids']) for p in prompts)
    assert len(shared['input_ids']) == n_prompt + int(lengths.sum()) - 2 * G and len(shared['grid_thw']) == 2
    out = []
    for batch in (shared, alone):
        model.zero_grad()
        logp, ent = grpo.completion_logps(model, batch, 1.0, 'cpu', entropy=True)
        logp.sum().backward()
        out.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = out
    assert len(a) == int(lengths.sum()) and (a - b).abs().max() < 1e-5 and (ea - eb).abs().max() < 1e-5
    assert all((x - y).abs().max() <= 1e-5 * y.abs().max() + 1e-8 for x, y in zip(ga, gb))
    assert ga[0].abs().max() > 0   # the tower's weights have a gradient to compare


# -----------------------------------------------------------------------------
# rewards and the loss plumbing


def test_score_rollouts_lays_out_reward_components(world):
    """Columns follow REWARD_KEYS, nan where a component does not apply, values reward.py's."""
    _, _, samples = load(world)
    mcq = next(s for s in samples if s.task == 'direction')
    route = next(s for s in samples if s.task == 'route')
    texts = [mcq.solution, '<think>x</think><answer>Z</answer>', route.solution, 'no tags']
    got = grpo.score_rollouts([mcq, route], texts, 2, reward.DEFAULT_WEIGHTS)
    for j, text in enumerate(texts):
        want = reward.score_completion(text, [mcq, route][j // 2], reward.DEFAULT_WEIGHTS)
        for k, key in enumerate(grpo.REWARD_KEYS):
            assert (torch.isnan(got[j, k]) and want[key] is None) or got[j, k] == pytest.approx(want[key])
    assert got[0, 0] > 1.5 and got[1, 0] < 1.0   # the reference CoT scores high, a wrong letter does not
    no_reverse = grpo.score_rollouts([mcq, route], texts, 2, dict(reward.DEFAULT_WEIGHTS, reverse=0.0))
    assert torch.allclose(got[:, 0] - no_reverse[:, 0], 0.5 * torch.nan_to_num(got[:, 3]))


@pytest.mark.parametrize('loss_type', grpo.LOSS_TYPES)
def test_normalisers_are_global_across_micro_batches(world, loss_type):
    """train_on_rollouts with every sequence in its own micro-batch takes the same gradient (and
    reports the same loss) as with one micro-batch a minibatch; a dropped group and two minibatches
    on two iterations included. SGD with lr 1 and no clipping makes the update the gradient. Within
    1e-4 (4 large SGD steps of fp32 rounding from other kernel shapes); a wrong normaliser is off by
    a factor of the micro-batch count."""
    tok, model, samples = load(world)
    G = 4
    loss_kw = dict(loss_type=loss_type, beta=0.1, epsilon=0.2, epsilon_high=0.28, max_completion_length=12)
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in samples[:3]]
    seeds = [grpo.row_seed(5, 0, i, g) for i in range(3) for g in range(G)]
    tokens, logps, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, 12, stop_ids=list(range(60, 90)),
                                             pad_id=tok.pad_id)
    assert len(set(lengths.tolist())) > 1
    adv = torch.randn(3 * G, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([True] * G + [False] * G + [True] * G)  # group 1 dropped
    ref = Qwen2VL.from_pretrained(str(world / 'tiny'))
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    results = []
    for budget in (10**6, 1):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sums = grpo.train_on_rollouts(m, ref, opt, prompts, tokens, lengths, logps, adv, keep, G=G, num_iterations=2,
                                      num_minibatches=2, token_budget=budget, temperature=1.0, grad_clip=0.0,
                                      loss_kw=loss_kw, device='cpu', autocast=nullcontext,
                                      world=1)
        results.append((sums, m))
    (a, ma), (b, mb) = results
    assert a['updates'] == b['updates'] == 4 and a['tokens'] == b['tokens'] == 2 * float(lengths[keep].sum())
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-4, abs=1e-6) and a['norm'] == pytest.approx(b['norm'], rel=1e-4)
    assert a['norm'] > 0 and a['clip_region'] > 0  # clipping happened on the second pass
    da = torch.cat([(p - p0).flatten() for p, p0 in zip(ma.parameters(), model.parameters())]).detach()
    db = torch.cat([(p - p0).flatten() for p, p0 in zip(mb.parameters(), model.parameters())]).detach()
    assert da.abs().max() > 1e-3 and (da - db).abs().max() < 1e-4 * da.abs().max()


@pytest.mark.parametrize('loss_type', grpo.LOSS_TYPES)
def test_dropped_rows_stay_in_the_normaliser_as_in_trl(world, loss_type):
    """With rows left out (a zero-std group, a truncated completion), one update equals the gradient of
    grpo_loss over ALL rows with the left-out rows' mask zeroed, TRL's semantics: 'grpo' and 'dr_grpo'
    keep them in the denominator (dividing by the kept rows only made the step N / N_kept larger, and
    dr_grpo's constant normaliser change every step); 'dapo' divides by the kept tokens. SGD at lr 1
    makes the update the gradient; 1e-5 relative (one kernel shape against another)."""
    tok, model, samples = load(world)
    G = 4
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in samples[:3]]
    seeds = [grpo.row_seed(9, 0, i, g) for i in range(3) for g in range(G)]
    tokens, logps, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, 12, stop_ids=list(range(60, 90)),
                                             pad_id=tok.pad_id)
    adv = torch.randn(3 * G, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True] * G + [False] * G + [True, False, True, True])  # a group and one row out
    loss_kw = dict(loss_type=loss_type, beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=12)
    m = copy.deepcopy(model)
    grpo.train_on_rollouts(m, None, torch.optim.SGD(m.parameters(), lr=1.0), prompts, tokens, lengths, logps, adv,
                           keep, G=G, num_iterations=1, num_minibatches=1, token_budget=10**6, temperature=1.0,
                           grad_clip=0.0,
                           loss_kw=loss_kw, device='cpu', autocast=nullcontext, world=1)
    ref = copy.deepcopy(model)
    flat, _ = grpo.completion_logps(ref, grpo.group_batch(groups(prompts, tokens, lengths, G)), 1.0, 'cpu')
    logp, mask = grpo.pad_rows(flat, lengths)
    loss, _ = grpo.grpo_loss(logp, None, None, adv, mask & keep[:, None], **loss_kw)
    loss.backward()
    got = torch.cat([(p0 - p).flatten() for p, p0 in zip(m.parameters(), model.parameters())]).detach()
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert want.abs().max() > 1e-4 and (got - want).abs().max() < 1e-5 * want.abs().max() + 1e-9


def test_plan_updates_splits_groups_and_pads_micro_batches():
    """Minibatch k holds generation chunk k of every kept group; micro-batches pack under the budget."""
    keep = torch.tensor([True, True, False, True, False, False, False, False])  # G = 4: group 1 dropped, row 2 too
    mbs, sizes, plans = grpo.plan_updates(keep, [100] * 8, 4, 2, 250, 'cpu')
    assert mbs == [[0, 1], [3]] and sizes == [4, 4]   # 2 groups x 2 generations each, kept or not
    assert plans == [[([0, 1], 1.0)], [([3], 1.0)]]
    assert grpo.plan_updates(keep, [100] * 8, 4, 2, 100, 'cpu')[2] == [[([0], 1.0), ([1], 1.0)], [([3], 1.0)]]


def test_bad_config_fails_naming_the_key():
    defaults = {k: getattr(grpo, k) for k in ('prompts_per_step', 'num_generations', 'temperature', 'loss_type',
                                              'num_minibatches', 'reward_weights', 'max_completion_length', 'top_p',
                                              'top_k', 'num_iterations', 'scale_rewards', 'beta', 'tasks',
                                              'lora_rank', 'lora_dropout')}
    grpo.check_config(defaults, 1)
    for key, value, world_size in (('prompts_per_step', 3, 2), ('num_generations', 1, 1), ('temperature', 0.0, 1),
                                   ('loss_type', 'ppo', 1), ('num_minibatches', 9, 1),
                                   ('reward_weights', {'acc': 1.0}, 1), ('tasks', 'direction,routes', 1),
                                   ('lora_rank', -1, 1), ('lora_dropout', 1.0, 1)):
        with pytest.raises(ValueError, match=key):
            grpo.check_config(dict(defaults, **{key: value}), world_size)

# -----------------------------------------------------------------------------
# end to end


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(world, out, nproc=1, kill_after=None, term_after=None, **kw):
    """grpo.py with the vowel reward on the fixture: 2 prompts x 4 generations a step."""
    a = dict(init_from=world / 'tiny', data=world / 'train' / 'st_r1_cot.jsonl', out_dir=out, nframes=16,
             min_pixels=56 * 56, max_pixels=56 * 56, prompts_per_step=2, num_generations=4, max_completion_length=12,
             max_steps=4, lr=1e-2, min_lr=1e-2, activation_checkpointing=False, save_interval=0, temperature=1.0,
             tasks='route,direction,landmark,action')  # the trainer's tests, not the EgoWorld preset's choices
    a.update(kw)
    argv = [os.path.join(ROOT, 'config', 'grpo_egoworld.py')] + [f'--{k}={v}' for k, v in a.items()]
    # USE_LIBUV=0: torchrun's libuv TCP store hangs in some sandboxes (gVisor); the classic one works everywhere
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', USE_LIBUV='0',
               GRPO_KILL_AFTER=str(-1 if kill_after is None else kill_after),
               GRPO_SIGTERM_AFTER=str(-1 if term_after is None else term_after))
    launcher = ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    cmd = [sys.executable] + (launcher if nproc > 1 else [])
    p = subprocess.run(cmd + [str(world / 'wrapper.py')] + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    if kill_after is None and p.returncode != 0:
        raise AssertionError(f'grpo.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}')
    return p


def metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(l) for l in f]


def mean_reward(world, model_dir, n_prompts=4, G=8, L=16):
    """The vowel reward of fixed-seed rollouts (the same uniforms for both models) on fixed prompts."""
    tok, model, samples = load(world, model_dir)
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in samples[:n_prompts]]
    seeds = [grpo.row_seed(12345, 0, i, g) for i in range(n_prompts) for g in range(G)]
    tokens, _, lengths, stopped = grpo.rollout(model, data.pack(prompts), G, seeds, L, stop_ids=[tok.im_end_id],
                                               pad_id=tok.pad_id)
    return sum(map(vowel_fraction, grpo.completion_texts(tok, tokens, lengths, stopped))) / len(tokens)


def test_grpo_raises_the_reward(world):
    out = world / 'learn'
    steps = 25   # 15 sufficed at the tiny model's former std-0.02 init; its matrices now start at 0.06
    run(world, out, max_steps=steps, num_generations=8, max_completion_length=16, beta=0.0)
    before, after = mean_reward(world, world / 'tiny'), mean_reward(world, out)
    assert after > before + 0.1, (before, after)
    m = metrics(out)
    assert [x['step'] for x in m] == list(range(steps))
    r = [x['reward'] for x in m]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.05, r
    # the log is complete and sane: the sampler and the training forward agree (fp32), rates are rates
    for x in m:
        assert x['sampler_logp_diff'] < 1e-4 and x['kl'] is None and x['updates'] == 1
        assert x['ratio'] == pytest.approx(1.0)
        assert 0 <= x['truncated'] <= 1 and 0 <= x['zero_std'] <= 1 and x['kept'] == 1.0
        assert x['rollout_tokens_per_s'] > 0 and x['train_tokens_per_s'] > 0 and x['completion_len_max'] <= 16
        assert x['reward/total_std'] > 0 and x['reward/accuracy'] is None and x['entropy'] > 0
    for f in ('config.json', 'model.safetensors', 'tokenizer.json', 'train_state.json', 'run_config.json'):
        assert (out / f).exists(), f


KW = dict(beta=0.1, num_iterations=2, num_minibatches=2, loss_type='dapo', epsilon_high=0.28)


@pytest.fixture(scope='module')
def baseline(world):
    """One uninterrupted single-process run with KL, 2 passes x 2 minibatches (clipping active)."""
    out = world / 'base'
    run(world, out, **KW)
    return out


def test_torchrun_two_ranks_follow_one_process(world, baseline):
    """2 gloo ranks x 1 prompt = 1 process x 2 prompts: same rollouts, same loss, same weights."""
    out = world / 'ddp'
    run(world, out, nproc=2, **KW)
    a, b = metrics(baseline), metrics(out)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x['rollout_tokens'] == y['rollout_tokens'] and x['reward'] == pytest.approx(y['reward'], abs=1e-12)
        # step 0 starts from the same weights; later steps inherit AdamW-amplified rounding
        tol = dict(rel=1e-5, abs=1e-6) if x['step'] == 0 else dict(rel=1e-3, abs=1e-4)
        for k in ('loss', 'grad_norm', 'kl', 'clip_region', 'entropy'):
            assert y[k] == pytest.approx(x[k], **tol), (k, x[k], y[k])
    assert a[-1]['kl'] > 0 and a[-1]['clip_region'] > 0 and abs(a[-1]['loss']) > 0
    # weights: AdamW amplifies rounding where gradients are ~0, so compare with what training moved (~0.1)
    w0 = load_file(str(world / 'tiny' / 'model.safetensors'))
    wa, wb = load_file(str(baseline / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-2 * (wa[k] - w0[k]).abs().max(), k


def test_kill_and_resume_replays_the_run_exactly(world, baseline):
    """Killed after step 2 (last checkpoint: after step 1); --resume redoes step 2 and continues."""
    cut = world / 'cut'
    p = run(world, cut, kill_after=2, save_interval=2, **KW)
    assert p.returncode == 9 and len(metrics(cut)) == 3
    assert json.load(open(cut / 'train_state.json'))['step'] == 2
    run(world, cut, resume=True, save_interval=2, **KW)
    a, b = metrics(baseline), metrics(cut)
    assert [x['step'] for x in b] == [0, 1, 2, 3]
    for k in ('loss', 'grad_norm', 'reward', 'kl', 'rollout_tokens'):
        assert [x[k] for x in a] == [x[k] for x in b], k


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(world, baseline):
    """A SIGTERM during step 1: the step finishes, a resumable checkpoint is written (save_interval=0: none
    would be otherwise), the process exits 0 saying how to resume, and --resume replays the rest exactly."""
    cut = world / 'term'
    p = run(world, cut, term_after=1, **KW)
    assert p.returncode == 0 and 'stopped by SIGTERM/SIGUSR1' in p.stdout + p.stderr
    assert json.load(open(cut / 'train_state.json'))['step'] == 2 and len(metrics(cut)) == 2
    run(world, cut, resume=True, **KW)
    a, b = metrics(baseline), metrics(cut)
    assert [x['step'] for x in b] == [0, 1, 2, 3]
    for k in ('loss', 'grad_norm', 'reward', 'kl', 'rollout_tokens'):
        assert [x[k] for x in a] == [x[k] for x in b], k


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(world, baseline, before, after):
    """SIGTERM during step 1 on `before` ranks, --resume=True on `after`: each step's prompts are a slice of the
    global batch (step_prompts) and each row's seed its own, so every step rolls out the prompts of the
    uninterrupted run, none twice in the epoch, and the numbers follow it within the 2-rank test's tolerance."""
    cut = world / f'ranks_{before}_to_{after}'
    p = run(world, cut, nproc=before, term_after=1, **KW)
    assert p.returncode == 0 and json.load(open(cut / 'train_state.json'))['step'] == 2
    p = run(world, cut, nproc=after, resume=True, **KW)
    assert f'saved on {before} rank(s), resuming on {after}' in p.stdout + p.stderr
    a, b = metrics(baseline), metrics(cut)
    assert [x['step'] for x in b] == [0, 1, 2, 3] and {x['epoch'] for x in b} == {0}
    assert [sorted(x['samples']) for x in a] == [sorted(x['samples']) for x in b]
    seen = [i for x in b for i in x['samples']]
    assert len(seen) == len(set(seen)) == 8
    for x, y in zip(a, b):
        assert x['rollout_tokens'] == y['rollout_tokens']
        tol = dict(rel=1e-5, abs=1e-6) if x['step'] == 0 else dict(rel=1e-3, abs=1e-4)
        for k in ('loss', 'grad_norm', 'kl', 'reward'):
            assert y[k] == pytest.approx(x[k], **tol), (k, x[k], y[k])


def test_null_control_shuffles_rewards_only_within_groups():
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    from grpo_null import shuffle_within_groups
    r = torch.arange(48, dtype=torch.float32).reshape(24, 2)  # 3 groups of 8, two reward columns
    s = shuffle_within_groups(r, 8)
    assert not torch.equal(s, r)
    for b in range(3):  # the same rows in each group, whole rows moved, never across groups
        assert sorted(s[b * 8:(b + 1) * 8, 0].tolist()) == r[b * 8:(b + 1) * 8, 0].tolist()
    assert torch.equal(s[:, 1] - s[:, 0], torch.ones(24))
    assert torch.equal(shuffle_within_groups(r, 8), s)


def rollout_batch(tok, model, samples, G=2, n=3):
    prompts = [data.encode(s, tok, SETTINGS, None, model.config) for s in samples[:n]]
    seeds = [grpo.row_seed(9, 0, i, g) for i in range(n) for g in range(G)]
    tokens, _, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, 10,
                                         pad_id=tok.pad_id)
    return grpo.group_batch(groups(prompts, tokens, lengths, G))


def test_reference_in_compute_dtype_equals_the_fp32_policy_under_autocast(world):
    """One process runs the fp32 policy under autocast: a frozen reference with only its matmul weights in bf16
    (common.frozen_matmul_weights_to, as grpo.py makes it) gives exactly the policy's log-probs, so KL = 0 at
    step 0; a reference cast to bf16 whole (embeddings and norms too) does not."""
    from common import frozen_matmul_weights_to
    tok, model, samples = load(world)
    batch = rollout_batch(tok, model, samples)
    ref = frozen_matmul_weights_to(copy.deepcopy(model).requires_grad_(False), torch.bfloat16)
    assert ref.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert ref.embed_tokens.weight.dtype == ref.norm.weight.dtype == torch.float32
    whole = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        policy, same, other = (grpo.completion_logps(m, batch, 1.0, 'cpu')[0]
                               for m in (model, ref, whole))
    assert torch.equal(policy, same)
    assert not torch.equal(policy, other)


def test_frozen_weights_in_compute_dtype_change_nothing_under_autocast(world):
    """One process, frozen tower + LoRA (sft.py / grpo.py under autocast): the frozen matmul weights go to bf16,
    the trainable ones stay fp32, and the log-probs and every trainable gradient are exactly what they were."""
    from common import apply_lora, frozen_matmul_weights_to, merge_lora_weights
    tok, model, samples = load(world)
    batch = rollout_batch(tok, model, samples)
    torch.manual_seed(0)
    model.visual.requires_grad_(False)
    apply_lora(model, 4, 8.0, targets=('q_proj', 'v_proj', 'gate_proj'))
    for m in model.modules():  # adapters away from zero, so the gradients reach through them
        if hasattr(m, 'lora_B'):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    cast = frozen_matmul_weights_to(copy.deepcopy(model), torch.bfloat16)
    attn, merger = cast.layers[0].self_attn, cast.visual.merger.mlp[0]
    assert attn.q_proj.weight.dtype == attn.k_proj.weight.dtype == merger.weight.dtype == torch.bfloat16
    assert attn.q_proj.lora_A.dtype == attn.q_proj.lora_B.dtype == cast.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)
    out = []
    for m in (model, cast):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logp = grpo.completion_logps(m, batch, 1.0, 'cpu')[0]
        logp.sum().backward()
        out.append((logp.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) > 0
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
    # the saved model merges a bf16 base into fp32: the adapters' update is not rounded away
    scalings = {n: m.scaling for n, m in cast.named_modules() if hasattr(m, 'lora_B')}
    merged, base = merge_lora_weights(cast.state_dict(), scalings), 'layers.0.self_attn.q_proj'
    delta = scalings[base] * attn.q_proj.lora_B @ attn.q_proj.lora_A
    assert merged[f'{base}.weight'].dtype == torch.float32
    assert torch.allclose(merged[f'{base}.weight'] - attn.q_proj.weight.float(), delta, atol=1e-7)
