"""
What a checkpoint perceives: greedy captions of a split's videos (EgoWorld v2's captions.jsonl, the perception
stage's task) scored field by field against the exact caption: headings, the turn sequence, the landmark list,
the action list (each exact, in order), the whole caption.

    python benchmarks/caption_eval.py out/v2-base --data=out/data_v2/test/captions.jsonl --limit=200

This reads a base model's perception directly: bench.py's MCQs need a model that answers questions, which a
caption-only model was never taught.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import make_generate_fn, vision_settings  # noqa: E402
from configurator import configure  # noqa: E402
from data import Tokenizer, encode, read_st_r1_jsonl  # noqa: E402
from egoworld import INVERSE, text_to_steps  # noqa: E402
from model import Qwen2VL  # noqa: E402

# -----------------------------------------------------------------------------
ckpt = ''               # checkpoint dir; usually the first positional argument
data = 'out/data_v2/test/captions.jsonl'
limit = 200             # videos (one caption each); 200 = the whole test split
batch_size = 64         # prompts per generate call: decoding is bound by per-step overhead at this size
max_new_tokens = 96     # the longest 4-segment caption is ~40 phrase tokens
show = 3                # print this many (prediction, reference) pairs
# -----------------------------------------------------------------------------


def fields(text):
    """A caption -> {field: value}, None for what does not parse."""
    out = dict(headings=None, turns=None, landmarks=None, actions=None)
    head, sep, route = text.partition('. Route: ')
    if head.startswith('Headings: ') and sep:
        out['headings'] = head[len('Headings: '):]
    try:
        steps = text_to_steps(route)
    except ValueError:
        return out
    out['turns'] = [v for k, v in steps if k == 'turn']
    out['landmarks'] = [v for k, v in steps if k == 'go' and v]
    out['actions'] = [v for k, v in steps if k == 'do' and v in INVERSE]
    return out


def main():
    global ckpt
    args = [a for a in sys.argv[1:] if a.startswith('--')]
    ckpt = next((a for a in sys.argv[1:] if not a.startswith('--')), ckpt)
    configure(globals(), args)
    torch.set_flush_denormal(True)
    samples = read_st_r1_jsonl(data)[:limit]
    tok = Tokenizer(ckpt)
    vs = vision_settings(ckpt, data, dict(nframes=0, min_pixels=0, max_pixels=0))
    m = Qwen2VL.from_pretrained(ckpt).eval()
    answer = make_generate_fn(m, tok, max_new_tokens)
    preds = []
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            preds += answer(chunk, [encode(s, tok, vs, None, m.config) for s in chunk])
    hits = {k: 0 for k in ('headings', 'turns', 'landmarks', 'actions', 'caption', 'landmark count', 'action count',
                           'landmark items', 'action items')}
    for j, (s, p) in enumerate(zip(samples, preds)):
        got, want = fields(p.strip()), fields(s.answer)
        for k in ('headings', 'turns', 'landmarks', 'actions'):
            hits[k] += got[k] == want[k]
        hits['caption'] += p.strip() == s.answer
        for k in ('landmark', 'action'):   # softer reads: the list's length, and the share of its items named
            g, w = got[k + 's'] or [], want[k + 's']
            hits[k + ' count'] += len(g) == len(w)
            hits[k + ' items'] += len(set(g) & set(w)) / max(len(w), 1)
        if j < show:
            print(f'pred: {p.strip()}\nref:  {s.answer}\n')
    n = len(samples)
    print(f'{ckpt} on {data}: {n} videos, exact-match %: ' +
          ', '.join(f'{k} {100 * v / n:.1f}' for k, v in hits.items()))


if __name__ == '__main__':
    main()
