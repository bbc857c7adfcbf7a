"""
Training throughput of sft.py's step against the same loop over transformers' Qwen2-VL, on CPU.

    python benchmarks/sft_speed.py                   # tiny (egoworld's ~2M) and ~50M configs, 2 threads
    python benchmarks/sft_speed.py --threads=1 --steps=4

Both sides train the same EgoWorld samples (CoT targets, 16 frames of 56x56 -> 32 visual tokens)
from the same weights with fused AdamW: ours on a packed varlen batch through sft.forward_backward
(logits at target tokens only), transformers on the padded (B, L_max) batch with an attention mask
and `labels` (its standard loss: full logits). tokens/s counts real tokens (no padding) for both.
The machine is shared with other jobs, so the two sides alternate step by step in one process and
see the same load; best (least disturbed) and median step times are reported. Memory is measured
with each side alone in a fresh process: the peak RSS during 3 training steps, and "train MB" = that
peak minus the RSS before them (gradients, AdamW state, activations). Linux only (/proc).
No activation checkpointing on either side.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

threads = 2
steps = 8            # timed steps per side (after 2 warm-up steps)
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
    from model import ModelConfig, Qwen2VL
    if not os.path.exists(os.path.join(root, 'tiny', 'config.json')):
        egoworld.make_tiny_model(os.path.join(root, 'tiny'), tiny_corpus=50)
        egoworld.generate_split(os.path.join(root, 'train'), 0, 4, 'default', egoworld.segments)
        cfg = Qwen2VL.from_pretrained(os.path.join(root, 'tiny')).config
        torch.manual_seed(0)
        big = Qwen2VL(ModelConfig(**{**cfg.__dict__, **SIZES['50m']}))
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


def build(root, impl, size):
    """(step function, model) for one side; the step is forward, backward, AdamW step, zero_grad."""
    import data
    import sft
    torch.manual_seed(0)
    tok, items = encoded(root, size)
    path = os.path.join(root, size)
    if impl == 'ours':
        from model import Qwen2VL
        model = Qwen2VL.from_pretrained(path).train()
        b = data.pack(items)
        fwd_bwd = lambda: sft.forward_backward(model, [b], 'cpu')
    else:
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging
        logging.set_verbosity_error()
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
        b = padded(items, tok.pad_id)
        fwd_bwd = lambda: model(**b).loss.backward()
    opt = sft.make_optimizer(model, 1e-4)

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model, sum(len(it['input_ids']) for it in items), b['input_ids'].numel()


def _status_mb(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key))


def memory_case(root, impl, size):
    """Alone in a fresh process: the peak RSS of 3 training steps (the high-water mark is reset after
    loading, so import/loading peaks do not count) and its excess over the RSS before them."""
    torch.set_num_threads(threads)
    step, model, _, _ = build(root, impl, size)
    before = _status_mb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # Linux: reset VmHWM to the current RSS
    for _ in range(3):
        step()
    return dict(peak_rss_mb=_status_mb('VmHWM'), train_mb=_status_mb('VmHWM') - before)


def main():
    from configurator import configure
    configure(globals())
    if case:
        print(json.dumps(memory_case(work, *case.split(':'))))
        return
    torch.set_num_threads(threads)
    root = work or tempfile.mkdtemp(prefix='bench_sft_')
    prepare(root)
    print(f'CPU, torch {torch.__version__}, {threads} threads; a step = {batch} EgoWorld CoT samples, fp32, '
          f'fused AdamW, no activation checkpointing. Speed: the two sides alternate step by step in one process '
          f'({steps} steps each after 2 warm-up), so both see the same machine load; '
          f'memory: each side alone in a fresh process.')
    for size in SIZES:
        sides = {impl: build(root, impl, size) for impl in ('ours', 'hf')}
        times = {impl: [] for impl in sides}
        for i in range(steps + 2):
            for impl, (step, _, _, _) in sides.items():
                t0 = time.perf_counter()
                step()
                if i >= 2:
                    times[impl].append(time.perf_counter() - t0)
        _, model, n_tokens, _ = sides['ours']
        n_padded = sides['hf'][3]
        del sides
        mem = {}
        for impl in times:
            cmd = [sys.executable, __file__, f'--case={impl}:{size}', f'--work={root}', f'--threads={threads}',
                   f'--batch={batch}']
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            if p.returncode:
                raise RuntimeError(f'{impl}:{size} failed:\n{p.stderr[-3000:]}')
            mem[impl] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"\n{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{n_tokens} tokens a step ({n_padded} padded)")
        print(f"  {'':14s}{'best s':>8s}{'median s':>10s}{'tokens/s':>10s}{'peak RSS MB':>13s}{'train MB':>10s}")
        best, med = {}, {}
        for impl, name in (('ours', 'sft.py'), ('hf', 'transformers')):
            t = sorted(times[impl])
            best[impl], med[impl] = t[0], t[len(t) // 2]
            print(f"  {name:14s}{t[0]:8.3f}{med[impl]:10.3f}{n_tokens / t[0]:10.0f}"
                  f"{mem[impl]['peak_rss_mb']:13.0f}{mem[impl]['train_mb']:10.0f}")
        print(f"  ours/transformers: speed {best['hf'] / best['ours']:.2f}x (best steps), "
              f"{med['hf'] / med['ours']:.2f}x (medians); "
              f"training memory {mem['ours']['train_mb'] / max(mem['hf']['train_mb'], 1):.2f}x")


if __name__ == '__main__':
    main()
