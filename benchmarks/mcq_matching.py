"""
How fast does the tiny EgoWorld LM learn option matching, the step SFT fails at without egoworld's Check block?

    python benchmarks/mcq_matching.py                       # full CoT tail in the loss, all three MCQ tasks
    python benchmarks/mcq_matching.py --loss=letter          # loss on the answer letter only
    python benchmarks/mcq_matching.py --tasks=direction --steps=600
    python benchmarks/mcq_matching.py --cot=check --steps=400      # egoworld's cot_check tail

Text only, no video: each sample is the real chat prompt of an EgoWorld MCQ (data.build_user_text,
data.chat_tokens) followed by the tail of the reverse-thinking CoT that egoworld.cot_solution writes,
with the *correct* derived answer already in it:

    <think>Hence, reversing it gives: turn right, turn left, so the correct answer is B

so the only thing left to learn is which option line that answer is. --cot=check uses the tail
that egoworld.cot_check writes instead ("... gives: X. Check A: o1 = x1, ... (no); B: ... (yes). So
the correct answer is B") and also reports how often each "(yes)/(no)" verdict is predicted right
given the pairs before it (teacher-forced; "exactly one yes" alone gives 13/16 = 81%). A fresh tiny model
(egoworld.make_tiny_model's config and init, or --init_from) trains on this with AdamW, and the
teacher-forced accuracy of the letter is printed per task on 100 held-out questions each. Chance is
25%; counting alone (any option with as many items as the answer) gives 61-65% (measured over 3,000
generated questions: direction 65%, landmark 61%, action 61%), so only accuracy well above that shows
that options are compared item by item.
--loss=tail puts every CoT token in the loss as sft.py does (the derived answer is unpredictable
from text, like in SFT before the video is understood); --loss=letter only the letter.
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import data
import egoworld
from model import Qwen2VL
from configurator import configure

init_from = ''       # a checkpoint dir; '' makes egoworld's tiny model in a temp dir
tasks = 'direction,landmark,action'
loss = 'tail'        # 'tail' (every CoT token, as SFT) or 'letter'
cot = 'answer'       # 'answer' (the tail without egoworld's Check block) or 'check' (egoworld's default, cot_check)
steps = 600
eval_every = 100
batch = 32           # samples a step (the probe's batch)
lr = 1e-3
threads = 2
seed = 0
configure(globals())
assert loss in ('tail', 'letter'), f'loss must be tail or letter, got {loss!r}'
assert cot in ('answer', 'check'), f'cot must be answer or check, got {cot!r}'
TASKS = tasks.split(',')
for t in TASKS:
    assert t in ('direction', 'landmark', 'action'), f'unknown MCQ task {t!r}'
COT_OPTS = dict(cot_check=cot == 'check')   # the tail is cut from egoworld's own CoT


def encode(tok, rng, task, d):
    """(ids, labels, letter position, verdict positions) of one text-only matching sample."""
    route, qs = egoworld.make_questions(rng, egoworld.segments, egoworld.seg_len, egoworld.n_options)
    q = qs[task, d]
    s = data.Sample(id='0', video='', task=task, direction=d, question=q['question'], options=q['options'],
                    answer=q['answer'], answer_text=q['answer_text'])
    # "<think>... Hence, reversing it gives: X ... is B</think> ..."
    sol = egoworld.cot_solution(route, qs, task, d, **COT_OPTS)
    tail = '<think>' + sol[sol.index('Hence, '):sol.index('</think>')]
    ids, labels = data.chat_tokens(tok, data.build_user_text(s), 0, tail)
    end = len(ids) - 2                  # chat_tokens appends <|im_end|>\n: the letter is just before
    ids, labels = ids[:end], labels[:end]
    labels = labels[1:] + [-100]        # label at t = token t+1
    if loss == 'letter':
        labels = [-100] * (end - 2) + [labels[end - 2], -100]
    paren = tok.encode('(')[0]
    verdicts = [i for i, t in enumerate(ids) if t == paren and labels[i] != -100] if cot == 'check' else []
    return ids, labels, end - 2, verdicts


def packed(items):
    ids = torch.tensor([i for x in items for i in x[0]])
    labels = torch.tensor([i for x in items for i in x[1]])
    cu, letters, verdicts, n = [0], [], [], 0
    for x in items:
        letters.append(n + x[2])
        verdicts += [n + i for i in x[3]]
        n += len(x[0])
        cu.append(n)
    pos = torch.cat([torch.arange(len(x[0])) for x in items]).expand(3, -1)
    return ids, labels, pos, torch.tensor(cu), torch.tensor(letters), torch.tensor(verdicts, dtype=torch.long)


@torch.no_grad()
def letter_accuracy(m, evalsets):
    m.eval()
    out = {}
    for name, (ids, labels, pos, cu, letters, verdicts) in evalsets.items():
        logits = m(ids, pos, cu)
        out[name] = (logits[letters].argmax(-1) == labels[letters]).float().mean().item()
        if len(verdicts):
            out[name + ' verdicts'] = (logits[verdicts].argmax(-1) == labels[verdicts]).float().mean().item()
    m.train()
    return out


def main():
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix='mcq_matching_') as tmp:
        path = init_from or tmp
        if not init_from:
            egoworld.make_tiny_model(path, cot_opts=COT_OPTS)   # its tokenizer learns the tail's words
        tok = data.Tokenizer(path)
        m = Qwen2VL.from_pretrained(path)
    m.train()
    erng = np.random.default_rng([seed, 1])
    evalsets = {f'{t}-{d}': packed([encode(tok, erng, t, d) for _ in range(100)])
                for t in TASKS for d in ('forward', 'reverse')}
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng([seed, 0])
    print(f'{path}: loss on {loss}, tasks {TASKS}, batch {batch}, lr {lr}; '
          f'letter accuracy (teacher-forced, chance 0.25)')
    t0 = time.time()
    for step in range(steps + 1):
        if step % eval_every == 0:
            acc = letter_accuracy(m, evalsets)
            mean = np.mean([v for k, v in acc.items() if not k.endswith('verdicts')])
            print(f'step {step:5d} {time.time() - t0:6.0f}s  mean {mean:.3f}  '
                  + '  '.join(f'{k} {v:.2f}' for k, v in acc.items()), flush=True)
        if step == steps:
            break
        ids, labels, pos, cu, _, _ = packed([encode(tok, rng, TASKS[rng.integers(len(TASKS))],
                                                    ('forward', 'reverse')[rng.integers(2)])
                                             for _ in range(batch)])
        for g in opt.param_groups:
            g['lr'] = lr * min(1.0, (step + 1) / 50)
        F.cross_entropy(m(ids, pos, cu), labels, ignore_index=-100).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == '__main__':
    main()
