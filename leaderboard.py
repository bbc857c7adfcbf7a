"""
Several bench.py runs side by side in the paper's table layout: a row per model, the eight tasks (route,
direction, landmark, action x forward, reverse) and the averages, as markdown, CSV and a PNG bar chart.

    python leaderboard.py out/bench/sft-egoworld_test out/bench/grpo-egoworld_test --out=out/leaderboard
    python leaderboard.py RUN_DIR ... --names=SFT,GRPO --out=assets/leaderboard   # -> .md, .csv, .png

Each RUN_DIR is a bench.py out_dir (its results.json). A row whose settings differ from the most common ones
(frames, pixels, prompt version, decoding mode, judge) is marked with * and the difference is written under the
table: such numbers are not comparable as they stand. Scores are bench.py's: MCQ accuracy %, route = the 0-5
score x 20 (the judge's when one ran). A script of its own, not a bench.py command: it reads JSON files only (no
torch, no model), like curves.py, whose Pillow drawing helpers it shares.
Left out: significance between rows (bench.py --paired_with gives McNemar's z for two runs), sorting, HTML.
"""
import collections
import csv
import io
import json
import math
import os
import sys

from PIL import Image, ImageDraw

from curves import COLOURS, nice_ticks, parse_runs

TASKS = ('route', 'direction', 'landmark', 'action')
COLUMNS = [f'{t}_{d}' for t in TASKS for d in ('forward', 'reverse')] + ['forward', 'reverse', 'overall']
# curves.py's five colours, then five more of the same (tab10) palette: ten runs before a colour repeats
PALETTE = COLOURS + [(140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
COMPARED = ('nframes', 'min_pixels', 'max_pixels', 'prompt_version', 'mode', 'judge_model')


def read_run(run, name=None):
    """A bench out_dir (or its results.json) -> dict(name, settings, scores: {column: % or None})."""
    path = run if run.endswith('.json') else os.path.join(run, 'results.json')
    if not os.path.isfile(path):
        raise SystemExit(f'leaderboard: {path} not found (run bench.py with that out_dir to the end first)')
    try:
        with open(path) as f:
            s = json.load(f)
        scores = {c: s['tasks'][c]['score'] if c in s['tasks'] else None for c in COLUMNS[:8]}
        scores.update({c: s[c] for c in COLUMNS[8:]})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f'leaderboard: {path}: not a bench.py results.json ({type(e).__name__}: {e})') from None
    st = s.get('settings', {})
    scores = {c: None if v is None or (isinstance(v, float) and math.isnan(v)) else v for c, v in scores.items()}
    default = f"{st.get('backend', 'ours')}:{os.path.basename(os.path.normpath(str(st.get('model') or run)))}"
    return dict(name=name or default, settings=st, scores=scores)


def mark_differing(rows):
    """{row index: 'key value (others: value)' ...} for rows whose COMPARED settings differ from the most
    common combination (ties: the first row's)."""
    keys = [tuple(r['settings'].get(k) for k in COMPARED) for r in rows]
    common = collections.Counter(keys).most_common()
    ref = max(common, key=lambda kv: (kv[1], -keys.index(kv[0])))[0]
    return {i: ', '.join(f'{k} {v} (others: {w})' for k, v, w in zip(COMPARED, key, ref) if v != w)
            for i, key in enumerate(keys) if key != ref}


def label(column):
    return column.replace('_forward', ' f').replace('_reverse', ' r')


def _f(v):
    return '-' if v is None else f'{v:.1f}'


def markdown(rows, marks):
    heads = ['model'] + [label(c) for c in COLUMNS]
    out = ['| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
    for i, r in enumerate(rows):
        out.append(f"| {r['name']}{' *' if i in marks else ''} | " + ' | '.join(_f(r['scores'][c]) for c in COLUMNS)
                   + ' |')
    out += [''] + [f"\\* {rows[i]['name']}: settings differ: {d}" for i, d in marks.items()]
    return '\n'.join(out).rstrip() + '\n'


def to_csv(rows, marks):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['model', 'backend', 'revision'] + COLUMNS + ['settings_differ'])
    for i, r in enumerate(rows):
        st = r['settings']
        w.writerow([r['name'], st.get('backend', 'ours'), st.get('revision') or '']
                   + ['' if r['scores'][c] is None else f"{r['scores'][c]:.4f}" for c in COLUMNS] + [marks.get(i, '')])
    return buf.getvalue()


BAR, GAP, LEFT, TOP, PLOT_H = 12, 18, 44, 40, 220   # px


def group_width(n_runs):
    return max(BAR * n_runs + GAP, 64)  # room for the widest label, 'direction'


def bar_chart(rows, marks):
    """Grouped bars: a group per column (8 tasks + 3 averages), a bar per run in its colour, y 0-100 %."""
    group = group_width(len(rows))
    width = LEFT + group * len(COLUMNS) + 10
    img = Image.new('RGB', (width, TOP + PLOT_H + 44 + 14 * len(rows)), 'white')
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), "Ego-ST Bench score % (MCQ: accuracy; route: 0-5 score x 20); * settings differ from the "
                      "other rows'", fill=(0, 0, 0))
    y = lambda v: TOP + PLOT_H - v / 100 * PLOT_H
    for t in nice_ticks(0, 100, 5):
        d.line([(LEFT, y(t)), (width - 10, y(t))], fill=(230, 230, 230))
        d.text((4, y(t) - 6), f'{t:g}', fill=(80, 80, 80))
    for g, c in enumerate(COLUMNS):
        x0 = LEFT + g * group + GAP // 2
        for i, r in enumerate(rows):
            v = r['scores'][c]
            if v is not None:
                d.rectangle([x0 + i * BAR, y(v), x0 + (i + 1) * BAR - 2, y(0)], fill=PALETTE[i % len(PALETTE)])
        task, _, way = c.partition('_')  # two lines: 'direction' over 'forward'; 'overall' over 'average'
        d.text((x0, TOP + PLOT_H + 4), task, fill=(0, 0, 0))
        d.text((x0, TOP + PLOT_H + 16), way or 'average', fill=(90, 90, 90))
    d.line([(LEFT, y(0)), (width - 10, y(0))], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        ly = TOP + PLOT_H + 36 + 14 * i
        d.rectangle([LEFT, ly + 2, LEFT + 10, ly + 10], fill=PALETTE[i % len(PALETTE)])
        d.text((LEFT + 16, ly), r['name'] + (' *' if i in marks else ''), fill=(0, 0, 0))
    return img


def build(runs, out, names=None):
    """Write out.md, out.csv, out.png for the runs; returns the markdown."""
    rows = [read_run(r, n) for r, n in zip(runs, names or [None] * len(runs))]
    marks = mark_differing(rows)
    md = markdown(rows, marks)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for ext, text in (('md', md), ('csv', to_csv(rows, marks))):
        with open(f'{out}.{ext}', 'w') as f:
            f.write(text)
    bar_chart(rows, marks).save(f'{out}.png')
    return md


def main(argv):
    runs, out, names = parse_runs(argv, 'leaderboard', 'leaderboard', '--out=PATH_WITHOUT_EXTENSION, --names=a,b',
                                  __doc__)
    print(build(runs, out, names), end='')
    print(f'leaderboard: {out}.md, {out}.csv, {out}.png')


if __name__ == '__main__':
    main(sys.argv[1:])
