"""
Do bench.py's backends give the same answers? The same checkpoint benched by our model.py (backend ours) and
by transformers (backend hf: AutoModelForImageTextToText, its tokenizer and chat template), greedy, same
frames; then hf again with --hf_rope=released (transformers' M-RoPE rule swapped for the released one our
model follows, model.rope_positions), to show which part of any disagreement that rule explains. Prints the
share of identical outputs and of identical parsed answers, per run against ours.

    python benchmarks/backend_agreement.py CKPT --data=data_egoworld/test --out=out/agreement
    python benchmarks/backend_agreement.py CKPT --data=... --out=... --limit=64 --max_new_tokens=64   # quicker

Each run is bench.main (the real CLI path, config/bench_egoworld.py's settings) into out/<run>, so a re-run
resumes and the predictions stay to be read; out/<run>_differ.json lists the ids whose outputs differ.
Qwen2-VL only (hf_rope='released' is). Left out: sampling (not comparable sample by sample), the OpenAI
backend (tests/test_bench_backends.py puts a server between the two and asserts equal answers).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import bench


def agreement(a_dir, b_dir):
    """(n both answered, % identical raw output, % identical parsed answer, ids that differ)."""
    a, b = bench.read_records(a_dir), bench.read_records(b_dir)
    ids = [k for k in a if k in b]
    raw = [k for k in ids if a[k]['raw'] != b[k]['raw']]
    parsed = [k for k in ids if a[k]['parsed'] != b[k]['parsed']]
    pct = lambda bad: 100 * (1 - len(bad) / len(ids)) if ids else float('nan')
    return len(ids), pct(raw), pct(parsed), raw


def main(argv):
    ck = argv[0] if argv and not argv[0].startswith('--') else None
    opts = dict(a[2:].split('=', 1) for a in argv[1 if ck else 0:] if a.startswith('--') and '=' in a)
    if not ck:
        raise SystemExit(__doc__)
    out = opts.pop('out', 'out/agreement')
    common = [ck, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'config',
                               'bench_egoworld.py')] + [f'--{k}={v}' for k, v in opts.items()]
    runs = [('ours', ['--backend=ours']), ('hf', ['--backend=hf', '--hf_rope=transformers']),
            ('hf-released-rope', ['--backend=hf', '--hf_rope=released'])]
    for name, extra in runs:
        bench.main(common + extra + [f'--out_dir={os.path.join(out, name)}'])
    print('\n| run | vs ours: n | identical output % | identical parsed answer % |\n|---|---|---|---|')
    for name, _ in runs[1:]:
        n, raw, parsed, differ = agreement(os.path.join(out, 'ours'), os.path.join(out, name))
        print(f'| {name} | {n} | {raw:.2f} | {parsed:.2f} |')
        with open(os.path.join(out, f'{name}_differ.json'), 'w') as f:
            json.dump(differ, f)


if __name__ == '__main__':
    main(sys.argv[1:])
