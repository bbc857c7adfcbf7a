"""
Training throughput of sft.py's step against the same loop over transformers' Qwen2-VL, on CPU.

    python bench_sft.py                   # tiny (egoworld's ~2M) and ~50M configs, 2 threads
    python bench_sft.py --threads=1 --steps=4 --rounds=3

Both sides train the same EgoWorld samples (CoT targets, 16 frames of 56x56 -> 32 visual tokens)
from the same weights with fused AdamW: ours on a packed varlen batch through sft.forward_backward
(logits at target tokens only), transformers on the padded (B, L_max) batch with an attention mask
and `labels` (its standard loss: full logits). tokens/s counts real tokens (no padding) for both.
Each (model, size) runs in a fresh subprocess so its peak RSS is its own; "train MB" is the peak
RSS minus the RSS before the first step (weights, optimizer state, activations, allocator slack).
No activation checkpointing on either side.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch

threads = 2
steps = 6            # timed steps per run (after 2 warm-up steps)
rounds = 2           # runs per side, alternating ours/hf: the machine is shared, load comes and goes
batch = 8            # samples per step
case = ''            # internal: run one case in this process ('ours:tiny', 'hf:50m', ...)
work = ''            # internal: folder holding the data and checkpoints

SIZES = {  # the tiny model is egoworld.make_tiny_model's; "50m" widens and deepens it
    'tiny': {},
    '50m': dict(hidden_size=640, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=10,
                num_key_value_heads=2, mrope_section=[8, 12, 12], vision_depth=4, vision_embed_dim=256,
                vision_num_heads=4),
}


def prepare(root):
    """EgoWorld samples, the tiny tokenizer/model, and a ~50M model on the same tokenizer."""
    import egoworld
    import model as model_lib
    if not os.path.exists(os.path.join(root, 'tiny', 'config.json')):
        egoworld.tiny_corpus = 50
        egoworld.make_tiny_model(os.path.join(root, 'tiny'))
        egoworld.generate_split(os.path.join(root, 'train'), 0, 4, 'default', egoworld.segments)
        cfg = model_lib.Qwen2VL.from_pretrained(os.path.join(root, 'tiny')).config
        torch.manual_seed(0)
        big = model_lib.Qwen2VL(model_lib.ModelConfig(**{**cfg.__dict__, **SIZES['50m']}))
        big.save_pretrained(os.path.join(root, '50m'))
        for f in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.json', 'preprocessor_config.json'):
            with open(os.path.join(root, 'tiny', f)) as a, open(os.path.join(root, '50m', f), 'w') as b:
                b.write(a.read())


def encoded(root, size):
    import data
    from model import Qwen2VL
    tok = data.Tokenizer(os.path.join(root, size))
    cfg = Qwen2VL.from_pretrained(os.path.join(root, size)).config
    st = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    samples = data.read_samples(os.path.join(root, 'train', 'st_r1_cot.jsonl'))[:batch]
    return tok, [data.encode(s, tok, st, s.solution, cfg) for s in samples]


def padded(items, pad_id):
    """The transformers-side batch: right-padded ids/labels/mask, (3, B, L) positions, videos in order."""
    L = max(len(it['input_ids']) for it in items)
    ids = torch.full((len(items), L), pad_id)
    labels = torch.full((len(items), L), -100)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    pos = torch.zeros(3, len(items), L, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it['input_ids'])
        ids[i, :n], labels[i, :n], mask[i, :n], pos[:, i, :n] = it['input_ids'], it['labels'], 1, it['position_ids']
    return dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos,
                pixel_values_videos=torch.cat([it['pixel_values'] for it in items]),
                video_grid_thw=torch.cat([it['grid_thw'] for it in items]))


def run_case(root, impl, size):
    """Time `steps` optimizer steps after 2 warm-up steps; returns a dict of numbers."""
    import data
    import sft
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok, items = encoded(root, size)
    n_tokens = sum(len(it['input_ids']) for it in items)
    path = os.path.join(root, size)
    if impl == 'ours':
        from model import Qwen2VL
        model = Qwen2VL.from_pretrained(path).train()
        b = data.pack(items)
        step_fn = lambda: sft.forward_backward(model, [b], 'cpu')
    else:
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging
        logging.set_verbosity_error()
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
        b = padded(items, tok.pad_id)
        step_fn = lambda: model(**b).loss.backward()
    opt = sft.make_optimizer(model, 1e-4)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, losses = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = step_fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(impl=impl, size=size, params=sum(p.numel() for p in model.parameters()), tokens=n_tokens,
                padded_tokens=b['input_ids'].numel(), times=times, peak_rss_mb=rss / 1024, train_mb=(rss - rss0) / 1024)


def main():
    from configurator import configure
    configure(globals())
    if case:
        impl, size = case.split(':')
        print(json.dumps(run_case(work, impl, size)))
        return
    root = work or tempfile.mkdtemp(prefix='bench_sft_')
    prepare(root)
    print(f'CPU, torch {torch.__version__}, {threads} threads, batch of {batch} EgoWorld CoT samples, fp32, fused AdamW, '
          f'no activation checkpointing; {rounds} alternating runs x {steps} steps per side; '
          f'best step (least disturbed by other load) and median')
    for size in SIZES:
        runs = {'ours': [], 'hf': []}
        for _ in range(rounds):
            for impl in runs:
                cmd = [sys.executable, __file__, f'--case={impl}:{size}', f'--work={root}', f'--threads={threads}',
                       f'--steps={steps}', f'--batch={batch}']
                p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if p.returncode:
                    raise RuntimeError(f'{impl}:{size} failed:\n{p.stderr[-3000:]}')
                runs[impl].append(json.loads(p.stdout.strip().splitlines()[-1]))
        o = runs['ours'][0]
        print(f"\n{size}: {o['params'] / 1e6:.1f}M parameters, {o['tokens']} tokens ({runs['hf'][0]['padded_tokens']} padded)")
        print(f"  {'':14s}{'best s':>8s}{'median s':>10s}{'tokens/s':>10s}{'peak RSS MB':>13s}{'train MB':>10s}")
        best = {}
        for impl, name in (('ours', 'sft.py'), ('hf', 'transformers')):
            t = sorted(x for r in runs[impl] for x in r['times'])
            best[impl] = t[0]
            mem = min(r['train_mb'] for r in runs[impl])
            print(f"  {name:14s}{t[0]:8.3f}{t[len(t) // 2]:10.3f}{o['tokens'] / t[0]:10.0f}"
                  f"{min(r['peak_rss_mb'] for r in runs[impl]):13.0f}{mem:10.0f}")
        print(f"  speed ratio, ours/transformers tokens/s (best steps): {best['hf'] / best['ours']:.2f}x; train memory "
              f"ratio ours/transformers: {min(r['train_mb'] for r in runs['ours']) / max(min(r['train_mb'] for r in runs['hf']), 1):.2f}")


if __name__ == '__main__':
    main()
