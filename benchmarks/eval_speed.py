"""
Evaluation speed of bench.py on this CPU: QA/s for the tiny EgoWorld checkpoint, one sample at a
time against batched generation (one KV cache per batch), with and without DataLoader workers
decoding videos while the model runs, and the letter-logits mode. Same samples, same model, one
process, side by side; ratios against the one-at-a-time baseline.

    python benchmarks/eval_speed.py                      # makes a tiny checkpoint + 8 EgoWorld videos in a temp dir
    python benchmarks/eval_speed.py --ckpt=out/egoworld-tiny --data=data_egoworld/test --n_samples=128

Every run goes through bench.evaluate (the real loop: decode, encode, generate, score, write JSONL)
into a fresh output folder. The untrained model never emits <|im_end|>, so every answer runs to
max_new_tokens: batches are not cut short by early stops, which is the fair (and worst) case.
Left out: GPU timings (bench.py runs unchanged there), the LLM judge (network-bound).
"""
import functools
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import bench
from data import Tokenizer, VisionSettings
import egoworld
from model import Qwen2VL

# -----------------------------------------------------------------------------
ckpt = ''              # '' -> egoworld.make_tiny_model in a temp dir (the tests' default model, full size)
data = ''              # '' -> 8 EgoWorld test videos (64 samples, all eight tasks) in a temp dir
n_samples = 64         # first N samples
max_new_tokens = 64    # a tiny model's CoT is short; the paper's 512 scales the generate rows ~linearly
threads = 1            # torch threads for the model; with 1 worker process that fills this 2-core machine
runs = 'generate:1:0,generate:1:1,generate:8:0,generate:8:1,generate:16:1,logits:16:1'  # mode:batch:workers
# -----------------------------------------------------------------------------


def setup(tmp):
    """(checkpoint dir, samples) as configured, making what is missing under tmp."""
    ck = ckpt or os.path.join(tmp, 'tiny')
    if not ckpt:
        egoworld.make_tiny_model(ck)
    path = data or os.path.join(tmp, 'test')
    if not data:
        egoworld.generate_split(path, 1, 8, 'default', egoworld.segments)
    samples, errors = bench.load_samples(path)
    assert not errors, errors
    return ck, samples[:n_samples]


def timed(samples, model, tok, vs, mode, batch, workers, out):
    answer = bench.make_generate_fn(model, tok, max_new_tokens)
    if mode == 'logits':
        answer = bench.make_logits_fn(model, tok, bench.logits_prefix, answer)
    settings = dict(vs.asdict(), mode=mode, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    with torch.inference_mode():
        summ = bench.evaluate(samples, answer, out, settings,
                              prepare=functools.partial(bench.prepare_sample, tok, vs, model.config),
                              batch_size=batch, num_workers=workers, progress=False)
    dt = time.perf_counter() - t0
    assert summ['evaluated'] == len(samples), summ['bad_samples']
    return len(samples) / dt


def main():
    from configurator import configure
    configure(globals())
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ck, samples = setup(tmp)
        model = Qwen2VL.from_pretrained(ck).eval()
        tok = Tokenizer(ck)
        vs = VisionSettings(nframes=egoworld.key_frames, min_pixels=egoworld.size ** 2, max_pixels=egoworld.size ** 2)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{len(samples)} samples, model {n_params / 1e6:.2f}M params, {vs.nframes} frames of {egoworld.size}px, "
              f"max_new_tokens {max_new_tokens}, torch threads {threads}, {os.cpu_count()} CPUs")
        timed(samples[:4], model, tok, vs, 'generate', 4, 0, os.path.join(tmp, 'warmup'))
        print('| mode | batch | workers | QA/s | vs one at a time |\n|---|---|---|---|---|')
        base = None
        for i, run in enumerate(runs.split(',')):
            mode, batch, workers = run.split(':')
            qps = timed(samples, model, tok, vs, mode, int(batch), int(workers), os.path.join(tmp, f'run{i}'))
            base = base or qps
            print(f"| {mode} | {batch} | {workers} | {qps:.2f} | {qps / base:.2f}x |", flush=True)


if __name__ == '__main__':
    main()
