"""
Several bench.py runs side by side in the paper's table layout: a row per model, the eight tasks (route,
direction, landmark, action x forward, reverse) and the averages, as markdown, CSV and a PNG bar chart.

    python leaderboard.py out/bench/sft-egoworld_test out/bench/grpo-egoworld_test --out=out/leaderboard
    python leaderboard.py RUN_DIR ... --names=SFT,GRPO --out=assets/leaderboard   # -> .md, .csv, .png
    python leaderboard.py out/bench/x_test ... --splits=ood,ood_theme   # + out/bench/x_ood, x_ood_theme overall

Each RUN_DIR is a bench.py out_dir (its results.json). A row whose settings differ from the most common ones
(frames, pixels, prompt version, decoding mode, judge) is marked with * and the difference is written under the
table: such numbers are not comparable as they stand. Scores are bench.py's: MCQ accuracy %, route = the 0-5
score x 20 (the judge's when one ran). A script of its own, not a bench.py command: it reads JSON files only (no
torch, no model; --pairs imports bench.py for its McNemar test), like curves.py, whose Pillow drawing helpers it
shares.
--splits adds a column per other split: the overall score of the run's sibling out_dir (its name with _test
replaced by _<split>). A run benched with --paired_with gets a last column: its McNemar z and the run it is
paired with (a row's name when that run is a row). --pairs=5:9,6:9 adds McNemar's z for more pairs of rows
(1-based; bench.py's own test, from the runs' predictions.jsonl). Left out: sorting, HTML.
"""
import collections
import csv
import io
import json
import math
import os
import re
import sys

from PIL import Image, ImageDraw

from curves import COLOURS, nice_ticks, parse_runs

TASKS = ('route', 'direction', 'landmark', 'action')
COLUMNS = [f'{t}_{d}' for t in TASKS for d in ('forward', 'reverse')] + ['forward', 'reverse', 'overall']
# curves.py's five colours, then five more of the same (tab10) palette: ten runs before a colour repeats
PALETTE = COLOURS + [(140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
COMPARED = ('nframes', 'min_pixels', 'max_pixels', 'prompt_version', 'mode', 'judge_model')


def _load(run):
    """A bench out_dir (or its results.json) -> (results dict, {column: score}); a clear exit if it is not one."""
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
    return s, scores


def read_run(run, name=None, splits=()):
    """A bench out_dir (or its results.json) -> dict(name, settings, scores: {column: % or None}, paired: bench's
    McNemar dict or None); splits: also the overall score of each sibling out_dir run[:-5] + '_' + split."""
    s, scores = _load(run)
    for split in splits:
        base = os.path.normpath(run)
        if not base.endswith('_test'):
            raise SystemExit(f'leaderboard: {run}: --splits needs run dirs named *_test (the sibling is *_{split})')
        scores[split] = _load(base[:-len('_test')] + '_' + split)[1]['overall']
    st = s.get('settings', {})
    scores = {c: None if v is None or (isinstance(v, float) and math.isnan(v)) else v for c, v in scores.items()}
    default = f"{st.get('backend', 'ours')}:{os.path.basename(os.path.normpath(str(st.get('model') or run)))}"
    return dict(name=name or default, settings=st, scores=scores, path=os.path.normpath(run), paired=s.get('paired'))


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


def paired_text(row, rows):
    """'+3.95 vs NAME': bench's McNemar z against the run it was paired with (a row's name if it is one)."""
    p = row['paired']
    if not p:
        return '-'
    names = {r['path']: r['name'] for r in rows}
    return f"{p['z']:+.2f} vs {names.get(os.path.normpath(p['with_']), os.path.basename(p['with_']))}"


def markdown(rows, marks, columns=COLUMNS):
    paired = any(r['paired'] for r in rows)
    heads = ['model'] + [label(c) for c in columns] + (['paired z'] if paired else [])
    out = ['| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
    for i, r in enumerate(rows):
        cells = [_f(r['scores'][c]) for c in columns] + ([paired_text(r, rows)] if paired else [])
        out.append(f"| {r['name']}{' *' if i in marks else ''} | " + ' | '.join(cells) + ' |')
    out += [''] + [f"\\* {rows[i]['name']}: settings differ: {d}" for i, d in marks.items()]
    return '\n'.join(out).rstrip() + '\n'


def to_csv(rows, marks, columns=COLUMNS):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['model', 'backend', 'revision'] + columns + ['settings_differ', 'paired_z', 'paired_with'])
    for i, r in enumerate(rows):
        st, p = r['settings'], r['paired'] or {}
        w.writerow([r['name'], st.get('backend', 'ours'), st.get('revision') or '']
                   + ['' if r['scores'][c] is None else f"{r['scores'][c]:.4f}" for c in columns] + [marks.get(i, '')]
                   + ['' if 'z' not in p else f"{p['z']:.4f}", p.get('with_', '')])
    return buf.getvalue()


BAR, GAP, LEFT, TOP, PLOT_H = 12, 18, 44, 40, 220   # px


def group_width(n_runs):
    return max(BAR * n_runs + GAP, 64)  # room for the widest label, 'direction'


def bar_chart(rows, marks, columns=COLUMNS):
    """Grouped bars: a group per column (8 tasks + 3 averages + other splits), a bar per run in its colour,
    y 0-100 %."""
    group = group_width(len(rows))
    width = LEFT + group * len(columns) + 10
    img = Image.new('RGB', (width, TOP + PLOT_H + 44 + 14 * len(rows)), 'white')
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), "Ego-ST Bench score % (MCQ: accuracy; route: 0-5 score x 20); * settings differ from the "
                      "other rows'", fill=(0, 0, 0))
    y = lambda v: TOP + PLOT_H - v / 100 * PLOT_H
    for t in nice_ticks(0, 100, 5):
        d.line([(LEFT, y(t)), (width - 10, y(t))], fill=(230, 230, 230))
        d.text((4, y(t) - 6), f'{t:g}', fill=(80, 80, 80))
    for g, c in enumerate(columns):
        x0 = LEFT + g * group + GAP // 2
        for i, r in enumerate(rows):
            v = r['scores'][c]
            if v is not None:
                d.rectangle([x0 + i * BAR, y(v), x0 + (i + 1) * BAR - 2, y(0)], fill=PALETTE[i % len(PALETTE)])
        # two lines: 'direction' over 'forward', 'overall' over 'average', a split's name over 'overall'
        task, _, way = c.partition('_') if c in COLUMNS else (c, '', 'overall')
        d.text((x0, TOP + PLOT_H + 4), task, fill=(0, 0, 0))
        d.text((x0, TOP + PLOT_H + 16), way or 'average', fill=(90, 90, 90))
    d.line([(LEFT, y(0)), (width - 10, y(0))], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        ly = TOP + PLOT_H + 36 + 14 * i
        d.rectangle([LEFT, ly + 2, LEFT + 10, ly + 10], fill=PALETTE[i % len(PALETTE)])
        d.text((LEFT + 16, ly), r['name'] + (' *' if i in marks else ''), fill=(0, 0, 0))
    return img


def compare(rows, pairs):
    """Markdown lines: McNemar's z of row i against row j for each (i, j) in pairs (1-based), as bench.py
    --paired_with computes it from the two runs' predictions.jsonl."""
    import bench   # torch comes with it: only for --pairs
    out = ['| compared (rows) | MCQ % | wrong -> right / right -> wrong | McNemar z |', '|---|---|---|---|']
    for i, j in pairs:
        if not (1 <= i <= len(rows) and 1 <= j <= len(rows)):
            raise SystemExit(f'leaderboard: --pairs {i}:{j}: rows are 1 to {len(rows)}')
        a, b = rows[i - 1], rows[j - 1]
        try:
            m = bench.mcnemar(bench.read_records(a['path']), bench.read_records(b['path']))
        except bench.DataError as e:
            raise SystemExit(f'leaderboard: --pairs {i}:{j}: {e}') from None
        out.append(f"| {a['name']} ({i}) vs {b['name']} ({j}) | {m['accuracy']:.1f} vs {m['baseline_accuracy']:.1f} | "
                   f"{m['wrong_to_right']} / {m['right_to_wrong']} | {m['z']:+.2f} |")
    return '\n'.join(out) + '\n'


def build(runs, out, names=None, splits=(), pairs=()):
    """Write out.md, out.csv, out.png for the runs (and the splits' columns, the pairs' tests under the table);
    returns the markdown."""
    rows = [read_run(r, n, splits) for r, n in zip(runs, names or [None] * len(runs))]
    # a column no row has (route, when only the MCQ tasks were benched) is left out
    columns = [c for c in COLUMNS + list(splits) if any(r['scores'][c] is not None for r in rows)]
    marks = mark_differing(rows)
    md = markdown(rows, marks, columns) + ('\n' + compare(rows, pairs) if pairs else '')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for ext, text in (('md', md), ('csv', to_csv(rows, marks, columns))):
        with open(f'{out}.{ext}', 'w') as f:
            f.write(text)
    bar_chart(rows, marks, columns).save(f'{out}.png')
    return md


PAIR = re.compile(r'(\d+):(\d+)$')


def main(argv):
    opts = {k: [x for a in argv if a.startswith(f'--{k}=') for x in a.split('=', 1)[1].split(',') if x]
            for k in ('splits', 'pairs')}
    runs, out, names = parse_runs([a for a in argv if not a.startswith(('--splits=', '--pairs='))], 'leaderboard',
                                  'leaderboard', '--out=PATH_WITHOUT_EXTENSION, --names=a,b, --splits=ood,ood_theme, '
                                  '--pairs=5:9,6:9', __doc__)
    matches = [PAIR.match(p) for p in opts['pairs']]
    if not all(matches):
        raise SystemExit(f"leaderboard: --pairs={','.join(opts['pairs'])}: want ROW:ROW pairs such as 5:9")
    pairs = [(int(m.group(1)), int(m.group(2))) for m in matches]
    print(build(runs, out, names, opts['splits'], pairs), end='')
    print(f'leaderboard: {out}.md, {out}.csv, {out}.png')


if __name__ == '__main__':
    main(sys.argv[1:])
