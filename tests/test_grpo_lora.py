"""grpo.py with --lora_rank on the shrunken EgoWorld tiny model (test_grpo.py's fixture and helpers):
- adapters at zero (as training starts) give exactly the base policy's rollouts and log-probs;
- the reference is the policy with its adapters switched off (common.lora_disabled): exactly the base
  model's log-probs whatever the adapters hold, so KL is exactly 0 at step 0, and no second model exists;
- the rollout engine samples from the adapted policy unmerged: the tokens of the merged model, and the
  training forward reproduces the sampler's log-probs;
- the frozen base in bf16 computes, under bf16 autocast, exactly what the fp32 base does;
- gradients reach only the adapters: every base tensor is bit-identical after the updates;
- end to end: KL = 0 at step 0 in the log, the merged model.safetensors gives the unmerged policy's
  logits, kill + --resume (LoRA dropout on, so the RNG restore matters) replays the run bit for bit,
  and `torchrun --nproc_per_node 2` follows one process.
Tolerances: log-probs of one forward against another 1e-5 (fp32, other kernel shapes), merged against
unmerged logits 1e-4 (fp32 W + s B A summed in another order); 2 ranks as in test_grpo.py; the rest bitwise.
"""
import copy
import json
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import grpo
from model import Qwen2VL
from test_grpo import KW, SETTINGS, groups, load, metrics, run, world  # noqa: F401 (world: a fixture)

torch.set_num_threads(1)
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS)


def adapted(model, dropout=0.0, trained=True):
    """A copy of model with LoRA on attention and MLP; trained: lora_B random (as after training)."""
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    common.apply_lora(m, LORA['lora_rank'], LORA['lora_alpha'], dropout, TARGETS)
    if trained:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith('lora_B'):
                    p.normal_(0, 0.3)
    return m


def rollouts(model, tok, prompts, G=3, L=12, seed=5):
    seeds = [grpo.row_seed(seed, 0, i, g) for i in range(len(prompts)) for g in range(G)]
    return grpo.rollout(model, data.pack(prompts), G, seeds, L, stop_ids=list(range(60, 90)),
                        pad_id=tok.pad_id)


def logps_of(model, batch, tok):
    with torch.no_grad():
        return grpo.completion_logps(model, batch, 1.0, 'cpu')[0]


def test_zero_adapters_are_the_base_and_the_reference_is_the_base(world):
    """Adapters at zero: the same rollouts and log-probs as the base, bit for bit. Trained adapters: the
    policy moves, and inside lora_disabled the same model gives the base's log-probs bit for bit (the
    reference), and the adapters are back on after it."""
    tok, base, samples = load(world)
    prompts = [data.encode(s, tok, SETTINGS, None, base.config) for s in samples[:2]]
    fresh = adapted(base, trained=False).eval()
    t0, lp0, n0, s0 = rollouts(base, tok, prompts)
    t1, lp1, n1, s1 = rollouts(fresh, tok, prompts)
    assert torch.equal(t0, t1) and torch.equal(lp0, lp1) and torch.equal(n0, n1) and torch.equal(s0, s1)
    batch = grpo.group_batch(groups(prompts, t0, n0, 3))
    want = logps_of(base, batch, tok)
    assert torch.equal(logps_of(fresh, batch, tok), want)

    policy = adapted(base).eval()
    moved = logps_of(policy, batch, tok)
    assert (moved - want).abs().max() > 1e-2
    with common.lora_disabled(policy):
        assert torch.equal(logps_of(policy, batch, tok), want)
    assert torch.equal(logps_of(policy, batch, tok), moved)


def test_bf16_base_computes_what_the_fp32_base_computes_under_autocast(world):
    """grpo.py's one-process LoRA keeps the frozen matmul weights in the compute dtype
    (common.frozen_matmul_weights_to); the adapters stay fp32 and trainable, and under bf16 autocast the policy and
    its reference give exactly the fp32-base model's log-probs."""
    tok, base, samples = load(world)
    prompts = [data.encode(s, tok, SETTINGS, None, base.config) for s in samples[:2]]
    t, _, n, _ = rollouts(base, tok, prompts)
    batch = grpo.group_batch(groups(prompts, t, n, 3))
    fp32 = adapted(base).eval()
    half = common.frozen_matmul_weights_to(copy.deepcopy(fp32), torch.bfloat16)
    q = half.layers[0].self_attn.q_proj
    assert q.weight.dtype == q.bias.dtype == torch.bfloat16 and q.lora_A.dtype == q.lora_B.dtype == torch.float32
    assert {n for n, p in half.named_parameters() if p.requires_grad} == \
        {n for n, p in fp32.named_parameters() if p.requires_grad}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(logps_of(half, batch, tok), logps_of(fp32, batch, tok))
        with common.lora_disabled(half), common.lora_disabled(fp32):
            assert torch.equal(logps_of(half, batch, tok), logps_of(fp32, batch, tok))
    # the merge is fp32: the adapters' update survives on a bf16 base (rounded back to bf16 it would not)
    merged = common.merge_lora_weights(half.state_dict(), {'layers.0.self_attn.q_proj': q.scaling})
    update = q.scaling * (q.lora_B @ q.lora_A).detach()
    assert (merged['layers.0.self_attn.q_proj.weight'] - q.weight.float() - update).abs().max() < 1e-6


def test_rollouts_sample_the_adapted_policy_unmerged(world):
    """The KV-cache rollout of the unmerged LoRA policy draws the merged model's tokens (same per-row
    seeds), and the training forward gives the log-probs it sampled with; the base draws other tokens."""
    tok, base, samples = load(world)
    prompts = [data.encode(s, tok, SETTINGS, None, base.config) for s in samples[:2]]
    policy = adapted(base).eval()
    merged = copy.deepcopy(base).eval()
    scalings = {n: m.scaling for n, m in policy.named_modules() if isinstance(m, common.LoRALinear)}
    merged.load_state_dict(common.merge_lora_weights(policy.state_dict(), scalings))
    t, lp, n, _ = rollouts(policy, tok, prompts)
    tm, lpm, nm, _ = rollouts(merged, tok, prompts)
    assert torch.equal(t, tm) and torch.equal(n, nm) and (lp - lpm).abs().max() < 1e-5
    assert not torch.equal(t, rollouts(base, tok, prompts)[0])
    noisy = adapted(base, dropout=0.5).train()  # a training-mode model samples without its dropout
    rng = torch.get_rng_state()
    assert all(torch.equal(x, y) for x, y in zip(rollouts(noisy, tok, prompts), (t, lp, n)))
    assert noisy.training and torch.equal(torch.get_rng_state(), rng)
    flat = logps_of(policy, grpo.group_batch(groups(prompts, t, n, 3)), tok)
    padded, mask = grpo.pad_rows(flat, n)
    assert (padded[mask] - lp[:, :padded.shape[1]][mask]).abs().max() < 1e-5


def test_kl_is_zero_at_step_0_and_only_adapters_train(world):
    """train_on_rollouts as grpo.py calls it with LoRA (ref = the policy itself, AdamW over the trainable
    parameters): the KL of the first update is exactly 0; after 2 updates every base tensor is
    bit-identical, and both adapter matrices moved (lora_A only from the second update: lora_B starts at 0)."""
    tok, base, samples = load(world)
    G = 4
    prompts = [data.encode(s, tok, SETTINGS, None, base.config) for s in samples[:2]]
    tokens, logp, lengths, _ = rollouts(base, tok, prompts, G=G)
    adv = torch.randn(2 * G, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2 * G, dtype=torch.bool)
    kw = dict(G=G, num_minibatches=1, token_budget=10**6, temperature=1.0, grad_clip=1.0,
              device='cpu', autocast=nullcontext, world=1,
              loss_kw=dict(loss_type='grpo', beta=0.1, epsilon=0.2, epsilon_high=None, max_completion_length=12))
    results = {}
    for iterations in (1, 2):
        policy = adapted(base, dropout=0.1, trained=False).train()
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        opt = common.make_optimizer(policy, 1e-2)
        assert {id(p) for g in opt.param_groups for p in g['params']} == \
            {id(p) for n, p in policy.named_parameters() if 'lora_' in n}
        sums = grpo.train_on_rollouts(policy, policy, opt, prompts, tokens, lengths, logp, adv, keep,
                                      num_iterations=iterations, **kw)
        results[iterations] = sums, before, policy.state_dict()
    sums, before, after = results[1]
    assert sums['kl'] == 0.0 and sums['norm'] > 0
    sums, before, after = results[2]
    assert sums['kl'] > 0  # the second update sees a policy that moved away from the reference
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == ('lora_' in k), k


def lora_logits(world, out, batch):
    """Logits of the merged checkpoint and of the unmerged policy rebuilt from the resumable state."""
    merged = Qwen2VL.from_pretrained(str(out)).eval()  # strict: an HF layout, no lora_* tensors
    policy = Qwen2VL.from_pretrained(str(world / 'tiny')).eval()
    common.apply_lora(policy, LORA['lora_rank'], LORA['lora_alpha'], 0.0, TARGETS)
    state = json.load(open(out / 'train_state.json'))
    adapters = load_file(str(out / state['dir'] / 'trainable.safetensors'))
    assert adapters and all('lora_' in k for k in adapters)
    missing, unexpected = policy.load_state_dict(adapters, strict=False)
    assert not unexpected and not any('lora_' in k for k in missing)
    fwd = lambda m: m(batch['input_ids'], batch['position_ids'], batch['cu_seqlens'], batch['pixel_values'],
                      batch['grid_thw'])
    with torch.no_grad():
        return fwd(merged), fwd(policy), fwd(Qwen2VL.from_pretrained(str(world / 'tiny')).eval())


LKW = dict(beta=0.1, loss_type='dapo', lr=5e-2, min_lr=5e-2, **LORA)


@pytest.fixture(scope='module')
def lora_baseline(world):
    """One uninterrupted single-process LoRA run with KL, 1 update a step (KL at step 0 is the reference's)."""
    out = world / 'lora_base'
    p = run(world, out, **LKW)
    assert 'LoRA r=4' in p.stdout + p.stderr
    return out


def test_lora_run_starts_at_kl_0_and_saves_the_merged_policy(world, lora_baseline):
    m = metrics(lora_baseline)
    assert [x['step'] for x in m] == [0, 1, 2, 3]
    assert m[0]['kl'] == 0.0 and m[-1]['kl'] > 0 and m[0]['sampler_logp_diff'] < 1e-4
    tok, model, samples = load(world)
    batch = data.pack([data.encode(s, tok, SETTINGS, s.solution, model.config) for s in samples[:2]])
    merged, unmerged, base = lora_logits(world, lora_baseline, batch)
    assert (unmerged - base).abs().max() > 1e-3  # training moved the adapters
    assert (merged - unmerged).abs().max() < 1e-4


def test_lora_torchrun_two_ranks_follow_one_process(world, lora_baseline):
    """2 gloo ranks (FSDP2: the fp32 base and adapters sharded, the reference the same sharded model) x 1
    prompt = 1 process x 2 prompts; tolerances as test_grpo's."""
    out = world / 'lora_ddp'
    run(world, out, nproc=2, **LKW)
    a, b = metrics(lora_baseline), metrics(out)
    assert len(a) == len(b) == 4 and b[0]['kl'] == 0.0
    for x, y in zip(a, b):
        assert x['rollout_tokens'] == y['rollout_tokens'] and x['reward'] == pytest.approx(y['reward'], abs=1e-12)
        tol = dict(rel=1e-5, abs=1e-6) if x['step'] == 0 else dict(rel=1e-3, abs=1e-4)
        for k in ('loss', 'grad_norm', 'kl', 'entropy'):
            assert y[k] == pytest.approx(x[k], **tol), (k, x[k], y[k])
    w0 = load_file(str(world / 'tiny' / 'model.safetensors'))
    wa, wb = load_file(str(lora_baseline / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert wa.keys() == wb.keys() == w0.keys()
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert moved > 1e-3 and all((wa[k] - wb[k]).abs().max() < 1e-2 * moved for k in wa)


def test_lora_kill_and_resume_replays_the_run_exactly(world):
    """LoRA dropout 0.1 (the training forward draws from the RNG the checkpoint restores), 2 passes x 2
    minibatches; killed after step 2 (last checkpoint: after step 1); --resume redoes step 2 and goes on."""
    kw = dict(KW, **LORA, lora_dropout=0.1, lr=5e-2, min_lr=5e-2, save_interval=2)
    full, cut = world / 'lora_full', world / 'lora_cut'
    run(world, full, **kw)
    p = run(world, cut, kill_after=2, **kw)
    assert p.returncode == 9 and len(metrics(cut)) == 3
    assert json.load(open(cut / 'train_state.json'))['step'] == 2
    run(world, cut, resume=True, **kw)
    a, b = metrics(full), metrics(cut)
    assert [x['step'] for x in b] == [0, 1, 2, 3] and a[-1]['kl'] > 0
    for k in ('loss', 'grad_norm', 'reward', 'kl', 'rollout_tokens', 'entropy'):
        assert [x[k] for x in a] == [x[k] for x in b], k
    wa, wb = load_file(str(full / 'model.safetensors')), load_file(str(cut / 'model.safetensors'))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reference_with_adapters_off_equals_a_separate_base_model(world):
    """Trained adapters (a later step): the step with ref = the policy itself (grpo.py's LoRA reference)
    takes exactly the step of ref = a separate copy of the base model: the same KL (> 0), loss and adapters."""
    tok, base, samples = load(world)
    G = 4
    prompts = [data.encode(s, tok, SETTINGS, None, base.config) for s in samples[:2]]
    tokens, logp, lengths, _ = rollouts(base, tok, prompts, G=G)
    adv = torch.randn(2 * G, generator=torch.Generator().manual_seed(1))
    out = []
    for separate in (False, True):
        policy = adapted(base).train()
        opt = common.make_optimizer(policy, 1e-2)
        sums = grpo.train_on_rollouts(
            policy, base if separate else policy, opt, prompts, tokens, lengths, logp, adv,
            torch.ones(2 * G, dtype=torch.bool), G=G, num_iterations=1, num_minibatches=1, token_budget=10**6,
            temperature=1.0, grad_clip=1.0, device='cpu', autocast=nullcontext, world=1,
            loss_kw=dict(loss_type='grpo', beta=0.1, epsilon=0.2, epsilon_high=None, max_completion_length=12))
        out.append((sums, policy.state_dict()))
    (a, wa), (b, wb) = out
    assert a['kl'] > 1e-3 and a['kl'] == b['kl'] and a['loss'] == b['loss']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_7b_lora_preset_parses_and_its_adapter_count_is_the_budget_s():
    """config/grpo_qwen2vl_7b_lora.py sets only grpo.py's settings with their types, passes check_config on
    one process, and LoRA on the real 7B config (meta device: no weights) adapts 7 x 28 projections with the
    80.7M trainable parameters its memory budget counts."""
    import os
    from configurator import configure
    from model import ModelConfig
    c = configure(dict(vars(grpo)), [os.path.join(os.path.dirname(grpo.__file__), 'config', 'grpo_qwen2vl_7b_lora.py')])
    grpo.check_config(c, 1)
    assert c['lora_rank'] == 32 and c['activation_checkpointing'] and c['dtype'] == 'bfloat16'
    with torch.device('meta'):
        m = Qwen2VL(ModelConfig())
    names = common.apply_lora(m, c['lora_rank'], c['lora_alpha'], c['lora_dropout'], c['lora_targets'])
    assert len(names) == 7 * 28 and not any(n.startswith('visual') for n in names)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 28 * 32 * 90_112 == 80_740_352


def test_8b_qwen3_lora_preset_parses_and_its_adapter_count_is_the_budget_s(monkeypatch):
    """config/grpo_qwen3vl_8b_lora.py: the 7B LoRA recipe at the Qwen3-VL presets' frames; LoRA on the released
    Qwen3-VL-8B config (meta device) adapts 7 x 36 projections with the 87.3M parameters its budget counts, and
    the base's split into bf16 matmuls (8.14B) and fp32 rest (0.626B) is the budget's."""
    import os
    from configurator import configure
    from model import ModelConfig
    from test_model_qwen3 import RELEASED_3_8B_CONFIG
    root = os.path.dirname(grpo.__file__)
    monkeypatch.chdir(root)  # the preset execs its base by the path its usage line runs from
    c = configure(dict(vars(grpo)), [os.path.join(root, 'config', 'grpo_qwen3vl_8b_lora.py')])
    grpo.check_config(c, 1)
    assert (c['lora_rank'], c['lr'], c['nframes'], c['max_pixels']) == (32, 1e-4, 16, 128 * 32 * 32)
    with torch.device('meta'):
        m = Qwen2VL(ModelConfig.from_hf(RELEASED_3_8B_CONFIG))
    matmuls = sum(x.weight.numel() for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv3d)))
    total = sum(p.numel() for p in m.parameters())
    assert round(matmuls / 1e9, 2) == 8.14 and round((total - matmuls) / 1e9, 3) == 0.626
    names = common.apply_lora(m, c['lora_rank'], c['lora_alpha'], c['lora_dropout'], c['lora_targets'])
    assert len(names) == 7 * 36 and not any(n.startswith('visual') for n in names)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 36 * 32 * 75_776 == 87_293_952
