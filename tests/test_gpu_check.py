"""benchmarks/gpu_check.py in its CPU mode: the GPU check's code at tiny widths in fp32, so that the script a
GPU session will run has run here. Every check passes, in order, with the figures a CPU run must give; another
seed passes too, and the same seed gives the same numbers (timings aside): nothing depends on what a random
model happens to sample. A check that raises is reported as failed (ok=false, its error) and the others still
run, with exit status 1."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'gpu_check.py')
CHECKS = ['attention', 'hf_parity', 'fsdp', 'decode', 'sft_step', 'grpo_step', 'grpo_lora_step']


def run_cpu_mode(*args):
    p = subprocess.run([sys.executable, SCRIPT, '--device=cpu', *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='2'))
    return p, [json.loads(line) for line in p.stdout.splitlines()]


def test_cpu_mode_passes_every_check():
    p, lines = run_cpu_mode()
    assert [x['check'] for x in lines] == CHECKS, p.stdout[-3000:] + p.stderr[-3000:]
    assert [x['check'] for x in lines if not x['ok']] == [] and p.returncode == 0, p.stdout[-5000:]
    by = {x['check']: x for x in lines}
    assert all(x['device'] == 'cpu' for x in lines)
    att = by['attention']  # the three CPU SDPA paths at both shapes, and the shared prefix, forward and backward
    assert att['backend'] == 'sdpa' and sorted(att['cases']) == sorted(
        [f'{s}/{p}' for s in ('lm', 'vision') for p in ('equal', 'padded', 'per_segment')] + ['lm/shared_prefix'])
    par = by['hf_parity']
    assert 0 < par['noise_floor_hf16_vs_hf32'] and par['ours32_vs_hf32'] < 1e-5
    fsdp = by['fsdp']
    assert fsdp['stage'] == 'done' and fsdp['param_dtype'] == 'bfloat16' and fsdp['vision_grad_norm'] > 0
    assert fsdp['rollout_shape'] == fsdp['rollout_expected']
    assert [r['rows'] for r in by['decode']['runs']] == [2, 8]
    assert all(r['roofline_pct'] is None and r['decode_tokens_per_s'] > 0 for r in by['decode']['runs'])
    for name in ('sft_step', 'grpo_step'):  # no MFU without a known peak; FLOPs and tokens counted all the same
        assert by[name]['mfu'] is None and by[name]['flops_per_step'] > 0 and by[name]['tokens'] > 0
    assert by['grpo_step']['target_tokens'] == by['grpo_step']['completion_tokens']
    lora = by['grpo_lora_step']  # the LoRA preset's adapters, the reference with them off: KL 0 at step 0
    assert lora['kl_step0'] == 0.0 and lora['base_unchanged'] and 0 < lora['trainable'] < lora['params'] / 2


def without_timings(x):
    """A check's line less what the clock or the allocator decides (seconds, rates, peak memory)."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items()
                if not (k in ('seconds', 'ms_per_step') or k.endswith(('_s', 'per_s', '_pct'))
                        or k.startswith('peak_memory'))}
    return [without_timings(v) for v in x] if isinstance(x, list) else x


def test_another_seed_passes_and_the_same_seed_gives_the_same_numbers():
    """The checks that build random models and sample from them (decode, the SFT, GRPO and LoRA GRPO steps) at
    seed 1, twice: every check passes and both runs print the same losses, norms, KL and token counts."""
    names = 'decode,sft_step,grpo_step,grpo_lora_step'
    (p1, a), (p2, b) = run_cpu_mode(f'--checks={names}', '--seed=1'), run_cpu_mode(f'--checks={names}', '--seed=1')
    assert p1.returncode == p2.returncode == 0 and all(x['ok'] for x in a + b), p1.stdout[-3000:] + p2.stdout[-3000:]
    assert [x['check'] for x in a] == names.split(',') and a[1]['losses'] and a[3]['rollout_tokens'] > 0
    assert [without_timings(x) for x in a] == [without_timings(x) for x in b]


def test_cpu_mode_qwen3_passes_every_check():
    """--family=qwen3_vl: the same checks on the tiny Qwen3-VL (16-pixel patches, DeepStack, interleaved M-RoPE,
    a block per frame group), hf_parity against Qwen3VLForConditionalGeneration, the 8B LoRA preset's step."""
    p = subprocess.run([sys.executable, SCRIPT, '--device=cpu', '--family=qwen3_vl'], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS='2'))
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [x['check'] for x in lines] == CHECKS, p.stdout[-3000:] + p.stderr[-3000:]
    assert [x['check'] for x in lines if not x['ok']] == [] and p.returncode == 0, p.stdout[-5000:]
    by = {x['check']: x for x in lines}
    assert by['hf_parity']['family'] == 'qwen3_vl' and by['hf_parity']['ours32_vs_hf32'] < 1e-5
    assert by['fsdp']['stage'] == 'done' and by['fsdp']['vision_grad_norm'] > 0
    assert by['grpo_lora_step']['preset'] == 'grpo_qwen3vl_8b_lora.py' and by['grpo_lora_step']['kl_step0'] == 0.0


def test_a_failing_check_is_reported_and_the_others_still_run(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import gpu_check
    for name in ('checks', 'device'):  # main() overrides these settings: give them back afterwards
        monkeypatch.setattr(gpu_check, name, getattr(gpu_check, name))

    def broken(dev, S, seed):
        raise RuntimeError('kernel exploded')
    monkeypatch.setitem(gpu_check.CHECKS, 'attention', broken)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(['--checks=attention,decode', '--device=cpu'])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert e.value.code == 1 and [(x['check'], x['ok']) for x in lines] == [('attention', False), ('decode', True)]
    assert lines[0]['error'] == 'RuntimeError: kernel exploded'
    with pytest.raises(ValueError, match="unknown \\['atention'\\]"):
        gpu_check.main(['--checks=atention'])
