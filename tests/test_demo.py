"""README command 1, shortened (QUICK=1: a few videos and steps, same code path): EgoWorld v2 data -> tiny
model -> base -> reading drill -> CoT cold start -> GRPO, the base, cold start and GRPO benched on the test
split's MCQs, each paired with the row before it, must run end to end and print the three-row table."""
import csv
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_demo(tmp_path, **env):
    """QUICK=1 bash demo.sh with data and outputs under tmp_path; fails with the output's tail."""
    env = dict(os.environ, QUICK='1', SETUP='0', DATA=str(tmp_path / 'data'), OUT=str(tmp_path / 'out'),
               PYTHON=sys.executable, HF_HUB_OFFLINE='1', **env)
    p = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh')], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def summary(p):
    """The summary the demo prints last: the three-row table (base, cold start, ST-R1) with its paired z."""
    tail = p.stdout[p.stdout.index('== EgoWorld v2, test split MCQ'):]
    rows = [l.split(' | ')[0].strip('| ') for l in tail.splitlines() if l.startswith('| ') and 'model' not in l]
    assert rows == ['base', 'CoT-SFT', 'ST-R1'], tail
    assert '| paired z |' in tail and 'vs CoT-SFT' in tail and 'vs base' in tail
    return tail


def test_demo_quick_runs_end_to_end(tmp_path):
    p = quick_demo(tmp_path)
    out = tmp_path / 'out'
    times = (out / 'demo_times.txt').read_text().split()
    assert times[::2] == ['data', 'cold', 'bench_base', 'bench_cold', 'grpo', 'bench_grpo', 'table', 'curves', 'total']
    res = json.loads((out / 'bench' / 'grpo_test' / 'results.json').read_text())
    text = json.dumps(res)
    for task in ('direction', 'landmark', 'action'):
        assert task in text
    assert 'forward' in text and 'reverse' in text
    assert res['paired']['n'] > 0 and res['paired']['with_'].endswith('cold_test')
    cold = json.loads((out / 'bench' / 'cold_test' / 'results.json').read_text())
    assert cold['evaluated'] > 0 and cold['paired']['with_'].endswith('base_test')
    # the paper's order: the committed base -> cold start on cold_start.jsonl -> GRPO on the other videos' MCQs
    cfg = {r: json.loads((out / r / 'run_config.json').read_text()) for r in ('cold', 'grpo')}
    assert cfg['cold']['init_from'] == 'assets/egoworld_v2_base' and cfg['cold']['data'].endswith('cold_start.jsonl')
    base = json.loads((out / 'bench' / 'base_test' / 'results.json').read_text())
    assert base['settings']['model'].endswith('egoworld_v2_base')
    assert cfg['grpo']['init_from'].endswith('cold') and cfg['grpo']['data'].endswith('rl_mcq.jsonl')
    assert cfg['grpo']['reward_weights']['reverse'] == 0.5 and (out / 'grpo' / 'model.safetensors').exists()
    for split in ('ood', 'ood_theme'):
        assert (tmp_path / 'data' / split / 'routes.jsonl').exists()
    for png in ('curves_sft.png', 'curves_grpo.png', 'table.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary(p)
    # a second run keeps the finished stages and the bench resumes with nothing left to do
    p = quick_demo(tmp_path)
    assert 'cold: done before' in p.stdout and 'grpo: done before' in p.stdout
    assert re.search(r'\b0 of \d+ samples to evaluate', p.stdout + p.stderr)


def test_demo_quick_on_a_tiny_qwen25(tmp_path):
    """The same QUICK path with FAMILY=qwen2_5_vl: egoworld.py makes a tiny Qwen2.5-VL and sft.py, bench.py,
    grpo.py run on it unchanged; every output records the clips' time base (16 of 16 frames at 8 fps: 0.25 s
    a frame group)."""
    p = quick_demo(tmp_path, FAMILY='qwen2_5_vl')
    out = tmp_path / 'out'
    times = (out / 'demo_times.txt').read_text().split()
    assert times[:8:2] == ['data', 'model', 'base', 'read']   # no Qwen2.5-VL base is committed: it is trained
    assert json.loads((out / 'cold' / 'run_config.json').read_text())['init_from'].endswith('read')
    for ckpt in ('tiny', 'cold', 'grpo'):
        cfg = json.loads((out / ckpt / 'config.json').read_text())
        assert cfg['model_type'] == 'qwen2_5_vl' and cfg['vision_config']['tokens_per_second'] == 2
    for ckpt in ('cold', 'grpo'):
        assert json.loads((out / ckpt / 'vision_settings.json').read_text())['second_per_grid_ts'] == [0.25, 0.25]
    res = json.loads((out / 'bench' / 'grpo_test' / 'results.json').read_text())
    assert res['evaluated'] == 12 and res['settings']['second_per_grid_ts'] == [0.25, 0.25]
    preds = (out / 'bench' / 'grpo_test' / 'predictions.jsonl').read_text().splitlines()
    assert {json.loads(l)['second_per_grid_ts'] for l in preds} == {0.25}
    summary(p)


def test_demo_quick_on_a_tiny_qwen3(tmp_path):
    """The same QUICK path with FAMILY=qwen3_vl: a tiny Qwen3-VL (16-pixel patches, DeepStack, interleaved
    M-RoPE) through sft.py, bench.py, grpo.py unchanged; its prompts' timestamps (16 of 16 frames at 8 fps:
    frame groups at 0.0625, 0.3125, ..., 1.8125 s) recorded in every output."""
    p = quick_demo(tmp_path, FAMILY='qwen3_vl')
    out = tmp_path / 'out'
    for ckpt in ('tiny', 'cold', 'grpo'):
        cfg = json.loads((out / ckpt / 'config.json').read_text())
        assert cfg['model_type'] == 'qwen3_vl' and cfg['vision_config']['deepstack_visual_indexes'] == [0]
    for ckpt in ('base', 'cold', 'grpo'):
        vs = json.loads((out / ckpt / 'vision_settings.json').read_text())
        assert vs['timestamps'] == [0.0625, 1.8125] and vs['max_pixels'] == 64 * 64
    res = json.loads((out / 'bench' / 'grpo_test' / 'results.json').read_text())
    assert res['evaluated'] == 12 and res['settings']['timestamps'] == [0.0625, 1.8125]
    preds = (out / 'bench' / 'grpo_test' / 'predictions.jsonl').read_text().splitlines()
    assert {tuple(json.loads(l)['timestamps']) for l in preds} == {tuple(0.0625 + 0.25 * k for k in range(8))}
    summary(p)


def test_demo_full_quick_writes_the_v2_table(tmp_path):
    """FULL=1 (EgoWorld v2, the paper's table), QUICK sizes: every row is trained and benched on the three splits,
    the GRPO rows paired with the checkpoint they start from, the table written as .md, .csv and .png."""
    p = quick_demo(tmp_path, FULL='1')
    out = tmp_path / 'out'
    rows = list(csv.DictReader(open(out / 'table_v2.csv')))
    assert [r['model'] for r in rows] == ['base', 'CoT-SFT', '+GRPO acc+fmt s1', '+GRPO acc+fmt s2', 'ST-R1 s1',
                                          'ST-R1 s2', 'fwd-CoT-SFT', 'fwd +GRPO', 'CoT-SFT more', 'answer SFT']
    assert all(r['ood'] and r['ood_theme'] and r['overall'] for r in rows)
    assert [os.path.basename(r['paired_with']) for r in rows] == ['', ''] + ['cold_test'] * 4 + ['', 'cold_fwd_test'] \
        + ['cold_test'] * 2
    md = (out / 'table_v2.md').read_text()
    assert 'ST-R1 s1 (5) vs CoT-SFT more (9)' in md and 'fwd-CoT-SFT (7) vs CoT-SFT (2)' in md
    assert (out / 'table_v2.png').read_bytes()[:8] == (out / 'curves_grpo.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the ST-R1 rows use the reverse-thinking reward, the acc+fmt rows and the forward-only GRPO do not
    weights = {r: json.loads((out / r / 'run_config.json').read_text())['reward_weights']['reverse']
               for r in ('rev1', 'acc1', 'fwd')}
    assert weights == {'rev1': 0.5, 'acc1': 0.0, 'fwd': 0.0}
    assert json.loads((out / 'rev2' / 'run_config.json').read_text())['seed'] == 2
    assert 'cold_start_forward.jsonl' in json.loads((out / 'cold_fwd' / 'run_config.json').read_text())['data']
    p = quick_demo(tmp_path, FULL='1')   # a second run keeps every finished stage
    assert 'cold: done before' in (out / 'logs' / 'cold.log').read_text() and 'base: done before' in p.stdout
