"""
Where a CoT checkpoint's MCQ answers go wrong, read from bench.py's predictions of an EgoWorld split: per task
and direction, how often the stated answer ("reversing it gives: X.") is the right option's text, how often the
letter is the option equal to the stated text, and, over every line of the Check block, how often the option's
items were copied right out of the prompt and how often the yes/no verdict agrees with the pairs as written.

    python benchmarks/mcq_diagnose.py out/bench/v21-capsft_test out/data_v21/test
"""
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import read_benchmark  # noqa: E402

STATED = re.compile(r'gives: (.*?)\. Check (.*?)\. So the correct', re.S)
LINE = re.compile(r'([A-D]): (.*) \((yes|no)\)$')
JUDGED = re.compile(r'(.*) vs (.*) (same|differ)$')   # egoworld --cot_judged's pair: "a vs b same"


def split_pair(p):
    """'a = b' or (judged) 'a vs b same' -> (a, b), or None."""
    m = JUDGED.match(p)
    if m:
        return m.group(1), m.group(2)
    if p.count(' = ') == 1:
        return tuple(p.split(' = '))
    return None


def main(bench_dir, split):
    truth = {(s.id, s.task, s.direction): s for s in read_benchmark(split)}
    per = defaultdict(lambda: [0, 0, 0, 0])    # n, stated right, letter follows the stated text, correct
    lines = copied = agree = 0
    with open(os.path.join(bench_dir, 'predictions.jsonl')) as f:
        recs = [json.loads(line) for line in f]
    for r in recs:
        if 'raw' not in r:
            continue
        s = truth[r['id'], r['task'], r['direction']]
        m = STATED.search(r['raw'])
        stated = m.group(1) if m else None
        follows = stated in s.options and r.get('parsed') == 'ABCD'[s.options.index(stated)]
        row = per[r['task'], r['direction']]
        row[0] += 1
        row[1] += stated == s.answer_text
        row[2] += follows
        row[3] += bool(r.get('correct'))
        for k, line in enumerate(m.group(2).split('; ') if m else []):
            mm = LINE.match(line)
            pairs = [split_pair(p) for p in mm.group(2).split(', ')] if mm else []
            if not mm or k >= len(s.options) or None in pairs:
                continue
            opt, said = [a for a, _ in pairs if a != 'nothing'], [b for _, b in pairs if b != 'nothing']
            lines += 1
            copied += opt == s.options[k].split(', ')
            agree += (mm.group(3) == 'yes') == (opt == said)
    for (task, d), (n, right, fol, cor) in sorted(per.items()):
        print(f'{task:9s} {d:7s} n {n}: stated right {100 * right / n:.1f}%, letter follows stated '
              f'{100 * fol / n:.1f}%, correct {100 * cor / n:.1f}%')
    print(f'Check lines {lines}: option copied right {100 * copied / max(lines, 1):.1f}%, verdict agrees with the '
          f'written pair {100 * agree / max(lines, 1):.1f}%')


if __name__ == '__main__':
    main(*sys.argv[1:3])
