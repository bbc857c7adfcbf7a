"""
Do bench.py's backends give the same answers? The same checkpoint benched by our model.py (backend ours) and by
transformers (backend hf: AutoModelForImageTextToText, its tokenizer and chat template), greedy, same frames; then
hf again with transformers' M-RoPE rule swapped for the released one our model follows (model.rope_positions), to
show which part of any disagreement that rule explains. Prints the share of identical outputs and of identical
parsed answers, per run against ours.

    python benchmarks/backend_agreement.py CKPT --data=data_egoworld/test --out=out/agreement
    python benchmarks/backend_agreement.py CKPT --data=... --out=... --limit=64 --max_new_tokens=64   # quicker

Each run is bench.main (the real CLI path) into out/<run>, so a re-run resumes and the predictions stay to be
read. Qwen2-VL only for the released-rope run (Qwen2.5-VL's time ids need second_per_grid_ts there).
Left out: sampling (temperature > 0 is not comparable sample by sample), the OpenAI backend (tests/test_bench_api.py
puts a server between the two and asserts equal answers).
"""
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import bench
from model import rope_positions


def released_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                        attention_mask=None, **kw):
    """transformers' Qwen2VLModel.get_rope_index, computed with model.rope_positions (text after a visual block
    continues at its largest position + 1) on each row's unpadded tokens -> (positions (3, B, L), deltas (B, 1))."""
    c = self.config
    cfg = types.SimpleNamespace(image_token_id=c.image_token_id, video_token_id=c.video_token_id, qwen25=False,
                                spatial_merge_size=c.vision_config.spatial_merge_size)
    grids = {c.image_token_id: iter(image_grid_thw if image_grid_thw is not None else []),
             c.video_token_id: iter(video_grid_thw if video_grid_thw is not None else [])}
    pos = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    deltas = []
    for b, row in enumerate(input_ids):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(row, dtype=torch.bool)
        ids = row[keep].cpu()
        starts = [i for i in range(len(ids)) if int(ids[i]) in grids and (i == 0 or ids[i - 1] != ids[i])]
        g = torch.stack([next(grids[int(ids[i])]).cpu() for i in starts]) if starts else None
        p, nxt = rope_positions(ids, g, cfg)
        pos[:, b, keep] = p.to(pos.device)
        deltas.append(nxt - len(ids))
    return pos, torch.tensor(deltas, device=input_ids.device)[:, None]


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
    runs = [('ours', ['--backend=ours']), ('hf', ['--backend=hf']), ('hf-released-rope', ['--backend=hf'])]
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    original = modeling_qwen2_vl.Qwen2VLModel.get_rope_index
    for name, extra in runs:
        modeling_qwen2_vl.Qwen2VLModel.get_rope_index = released_rope_index if 'released' in name else original
        bench.main(common + extra + [f'--out_dir={os.path.join(out, name)}'])
    print('\n| run | vs ours: n | identical output % | identical parsed answer % |\n|---|---|---|---|')
    for name, _ in runs[1:]:
        n, raw, parsed, differ = agreement(os.path.join(out, 'ours'), os.path.join(out, name))
        print(f'| {name} | {n} | {raw:.2f} | {parsed:.2f} |')
        with open(os.path.join(out, f'{name}_differ.json'), 'w') as f:
            json.dump(differ, f)


if __name__ == '__main__':
    main(sys.argv[1:])
