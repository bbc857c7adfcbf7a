"""README command 1, shortened (QUICK=1: a few videos and steps, same code path): data -> tiny
model -> SFT -> bench -> GRPO -> bench paired with SFT must run end to end and print both tables with
all eight tasks and the paired comparison."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_quick_runs_end_to_end(tmp_path):
    env = dict(os.environ, QUICK='1', SETUP='0', DATA=str(tmp_path / 'data'), OUT=str(tmp_path / 'out'),
               PYTHON=sys.executable, HF_HUB_OFFLINE='1')
    p = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh')], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    times = (tmp_path / 'out' / 'demo_times.txt').read_text().split()
    assert [t for t in times[::2]] == ['data', 'model', 'sft', 'bench_sft', 'grpo', 'bench_grpo', 'curves', 'total']
    res = json.loads((tmp_path / 'out' / 'bench' / 'grpo-egoworld_test' / 'results.json').read_text())
    text = json.dumps(res)
    for task in ('route', 'direction', 'landmark', 'action'):
        assert task in text
    assert 'forward' in text and 'reverse' in text
    assert (tmp_path / 'out' / 'grpo-egoworld' / 'model.safetensors').exists()
    assert json.loads((tmp_path / 'out' / 'bench' / 'sft-egoworld_test' / 'results.json').read_text())['evaluated'] > 0
    assert res['paired']['n'] > 0 and res['paired']['with_'].endswith('sft-egoworld_test')
    for split in ('ood', 'ood_theme'):
        assert (tmp_path / 'data' / split / 'routes.jsonl').exists()
    for png in ('curves_sft.png', 'curves_grpo.png'):
        assert (tmp_path / 'out' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    tail = p.stdout[p.stdout.index('== SFT(CoT) on EgoWorld: test split'):]  # the printed summary: two tables
    assert tail.count('| route | direction | landmark | action |') == 2
    assert tail.index('SFT(CoT) + GRPO: test split') < tail.index('McNemar z =')
    # a second run keeps the finished stages and the bench resumes with nothing left to do
    p = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh')], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'sft: done before' in p.stdout and 'grpo: done before' in p.stdout
    assert re.search(r'\b0 of \d+ samples to evaluate', p.stdout + p.stderr)
