"""
Training curves as PNG, from the metrics.jsonl that sft.py and grpo.py write into their out_dir.

    python curves.py out/sft-egoworld --out=out/curves_sft.png
    python curves.py out/grpo-acc out/grpo-reverse --out=out/curves_grpo.png   # runs overlaid

The panels follow the kind of run (a GRPO log has reward columns): SFT draws loss and grad norm,
GRPO the total reward, accuracy, format, reverse-thinking reward, KL and completion length. Raw
values are drawn faint and an exponential moving average on top. Drawn with Pillow, which
the project already needs for frames: no plotting library for six line charts.
Left out: log axes, interactive plots, anything a notebook does better.
"""
import math
import os
import sys

from PIL import Image, ImageDraw

import data

SFT_KEYS = ['log10 loss', 'grad_norm']   # the loss spans 7 -> 0.2: a log scale shows the late part
GRPO_KEYS = ['reward/total', 'reward/accuracy', 'reward/format', 'reward/reverse', 'kl', 'completion_len']
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
W, H, PAD = 420, 260, 44   # one panel, px


def read_metrics(run):
    """The rows of run/metrics.jsonl (run: a directory or the file); a torn last line is skipped."""
    path = os.path.join(run, 'metrics.jsonl') if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f'curves.py: {path} not found (run sft.py / grpo.py with that out_dir first)')
    try:
        return [r for _, r in data.read_jsonl_log(path)[0]]
    except data.DataError as e:
        raise SystemExit(f'curves.py: {e}') from None


def series(rows, key):
    log = key.startswith('log10 ')
    key = key[len('log10 '):] if log else key
    pts = [(r['step'], float(r[key])) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return [(s, math.log10(v)) for s, v in pts if v > 0] if log else pts


def ema(values, alpha):
    out, m = [], None
    for v in values:
        m = v if m is None else alpha * v + (1 - alpha) * m
        out.append(m)
    return out


def nice_ticks(lo, hi, n=4):
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_panel(img, x0, y0, title, curves, window=1 / 30):
    """curves: [(name, colour, [(step, value)])] into the panel whose top-left corner is (x0, y0); the
    moving average spans `window` of each run."""
    d = ImageDraw.Draw(img)
    d.text((x0 + PAD, y0 + 6), title, fill=(0, 0, 0))
    pts = [p for _, _, s in curves for p in s]
    if not pts:
        d.text((x0 + PAD, y0 + H // 2), '(not logged)', fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(max(xs), min(xs) + 1)
    ylo, yhi = min(ys), max(ys)
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    left, top, right, bottom = x0 + PAD, y0 + 24, x0 + W - 10, y0 + H - 28
    X = lambda v: left + (v - xlo) / (xhi - xlo) * (right - left)
    Y = lambda v: bottom - (v - ylo) / (yhi - ylo) * (bottom - top)
    for t in nice_ticks(ylo, yhi):
        d.line([(left, Y(t)), (right, Y(t))], fill=(230, 230, 230))
        d.text((x0 + 2, Y(t) - 6), f'{t:.3g}', fill=(80, 80, 80))
    for t in nice_ticks(xlo, xhi):
        d.text((X(t) - 8, bottom + 6), f'{t:g}', fill=(80, 80, 80))
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for i, (name, colour, s) in enumerate(curves):
        steps, vals = [p[0] for p in s], [p[1] for p in s]
        faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
        smooth = ema(vals, alpha=2 / (max(3, len(vals) * window) + 1))
        for v, col, width in ((vals, faint, 1), (smooth, colour, 2)):
            line = [(X(a), Y(b)) for a, b in zip(steps, v)]
            if len(line) == 1:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=col)
            else:
                d.line(line, fill=col, width=width)
        if len(curves) > 1:
            d.text((right - 150, top + 4 + 12 * i), name[:24], fill=colour)


def plot(runs, out, names=None):
    """One PNG with a panel per metric; every run overlaid in its own colour."""
    logs = [read_metrics(r) for r in runs]
    names = names or [os.path.basename(os.path.normpath(r)) for r in runs]
    grpo = any('reward/total' in row for rows in logs for row in rows[:1])
    keys = GRPO_KEYS if grpo else SFT_KEYS
    # a GRPO step's rewards are a mean over a few prompts, noisy: a wider window than SFT's loss needs
    window = 1 / 8 if grpo else 1 / 30
    cols = 2 if len(keys) > 1 else 1
    nrows = math.ceil(len(keys) / cols)
    img = Image.new('RGB', (cols * W, nrows * H + 24), 'white')
    title = ' | '.join(names) + '   (x: step; faint: each step; bold: moving average)'
    ImageDraw.Draw(img).text((8, 6), title, fill=(0, 0, 0))
    for k, key in enumerate(keys):
        curves = [(n, COLOURS[i % len(COLOURS)], series(rows, key)) for i, (n, rows) in enumerate(zip(names, logs))]
        draw_panel(img, (k % cols) * W, 24 + (k // cols) * H, key, curves, window)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
    return img


def parse_runs(argv, prog, out, usage, doc):
    """RUN... [--out=PATH] [--names=a,b] -> (runs, out, names): the command line of curves.py and leaderboard.py;
    without a run, doc (the script's docstring) is the message."""
    runs, names = [], None
    for a in argv:
        if a.startswith('--out='):
            out = a[len('--out='):]
        elif a.startswith('--names='):
            names = a[len('--names='):].split(',')
        elif a.startswith('--'):
            raise SystemExit(f'{prog}: unknown option {a} ({usage})')
        else:
            runs.append(a)
    if not runs:
        raise SystemExit(doc)
    if names and len(names) != len(runs):
        raise SystemExit(f'{prog}: {len(names)} names for {len(runs)} runs')
    return runs, out, names


def main(argv):
    runs, out, names = parse_runs(argv, 'curves.py', 'curves.png', '--out=PNG, --names=a,b', __doc__)
    plot(runs, out, names)
    print(f'curves: {", ".join(runs)} -> {out}')


if __name__ == '__main__':
    main(sys.argv[1:])
