"""curves.py: the panels follow the run's kind, values land where they should, bad logs are named."""
import json
import math

import pytest
from PIL import Image

import curves


def write_log(path, rows, torn=''):
    path.mkdir(parents=True, exist_ok=True)
    (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows) + torn)
    return str(path)


def test_sft_and_grpo_panels_and_torn_last_line(tmp_path):
    sft = write_log(tmp_path / 'sft', [dict(step=i, loss=10.0 ** -(i / 10), grad_norm=1.0) for i in range(20)],
                    torn='{"step": 20, "lo')
    rows = curves.read_metrics(sft)
    assert len(rows) == 20                                   # the torn line is dropped, nothing else
    assert [(s, round(v, 9)) for s, v in curves.series(rows, 'log10 loss')[:3]] == [(0, 0.0), (1, -0.1), (2, -0.2)]
    img = curves.plot([sft], str(tmp_path / 's.png'))
    assert img.size == (2 * curves.W, curves.H + 24)         # loss and grad norm side by side
    grpo = write_log(tmp_path / 'grpo', [{'step': i, 'reward/total': i / 10, 'reward/accuracy': None, 'kl': 0.0}
                                         for i in range(5)])
    img = curves.plot([grpo, grpo], str(tmp_path / 'g.png'), names=['a', 'b'])
    assert img.size == (2 * curves.W, 3 * curves.H + 24)     # six GRPO panels
    assert Image.open(tmp_path / 'g.png').size == img.size
    assert curves.series(curves.read_metrics(grpo), 'reward/accuracy') == []   # None is "not logged"


def test_line_drawn_where_the_values_are(tmp_path):
    run = write_log(tmp_path / 'r', [dict(step=i, loss=1.0, grad_norm=float(i)) for i in range(31)])
    img = curves.plot([run], str(tmp_path / 'p.png')).convert('RGB')
    # grad_norm rises linearly: the bold line runs from the panel's lower-left to its upper-right corner
    x0, top, bottom = curves.W + curves.PAD, 24 + 24, 24 + curves.H - 28
    blue = lambda p: p[2] > 150 and p[0] < 120
    left = [y for y in range(top, bottom + 1) if blue(img.getpixel((x0 + 3, y)))]
    right = [y for y in range(top, bottom + 1) if blue(img.getpixel((2 * curves.W - 13, y)))]
    assert left and right and min(left) > max(right) and max(left) > (top + bottom) / 2 > min(right)


def test_bad_line_names_file_and_line(tmp_path):
    (tmp_path / 'r').mkdir()
    (tmp_path / 'r' / 'metrics.jsonl').write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(SystemExit, match=r'metrics.jsonl:2: not a JSON record'):
        curves.read_metrics(str(tmp_path / 'r'))
    with pytest.raises(SystemExit, match='not found'):
        curves.read_metrics(str(tmp_path / 'missing'))
    with pytest.raises(SystemExit, match='unknown option'):
        curves.main(['--bogus=1'])
    assert math.isclose(curves.ema([0, 10], 0.5)[-1], 5.0)
