"""
Rollout speed of grpo.py's engine against transformers' generate, side by side in one run: G = 8
sampled completions of one EgoWorld video prompt, on the same random weights (transformers loads the
checkpoint model.py saved), same prompt, same sampling settings (temperature 1, no top-k/top-p), and
no stop token, so both produce exactly G * new_tokens tokens. tokens/s = G * new_tokens / seconds,
prefill (vision tower included) counted.

- ours: grpo.rollout — one prefill of the prompt (video encoded once), KV cache copied into the G
  rows (KVCache.repeat), all rows decoded together, per-row seeded inverse-CDF sampling.
  model.generate(num_samples=G) is timed too (same engine, one torch generator for all rows).
- transformers: Qwen2VLForConditionalGeneration.generate(num_return_sequences=G, do_sample=True),
  which expands the inputs G times before the prefill (video encoded G times) and decodes with its
  dynamic cache and logits-processor pipeline.
Two models x two prompts: the EgoWorld tiny model (~2M parameters) and a ~40M one with a 32k
vocabulary (per-token compute closer to a real LM head); EgoWorld's own clips (16 frames of 56x56:
32 visual tokens) and the same clip resized to the paper's pixel budget (8 frames at <= 360*420:
676 visual tokens, the size of an Ego-ST prompt). Timings alternate ours/theirs and keep the best
of `repeats`, because the CPU is shared. TRL's GRPOTrainer takes images, not videos: a whole GRPO step
against it, on an image form of the task, is benchmarks/trl_grpo_speed.py.

    python benchmarks/grpo_speed.py                        # 2 threads
    python benchmarks/grpo_speed.py --threads=1 --new_tokens=64 --repeats=3

Measured on the 2-core dev machine, --new_tokens=64 --repeats=3, threads=1, tokens/s (ours / model.generate /
transformers, ratio ours/transformers), load average 1-2:
  tiny+egoworld 2929/2717/1230 2.38x, tiny+paper 1632/1301/512 3.19x,
  small+egoworld 205/160/115 1.78x, small+paper 131/123/54 2.44x
(before the decode-path trims of issue 16, at load 4-7: 1.40x, 2.67x, 1.56x, 2.50x; the same trims measured
alone, best process time of 8 alternating runs: 1.34x faster, tiny+egoworld 1.8x -> 2.4x.)
Where the time of tiny+egoworld goes (1 thread): the decode steps 85% (in the profiler: 29 linears a step
~2/5, 4 SDPA calls ~1/5, 9 RMSNorms ~1/5 -- each a composite of ~15 small ops on a CPU -- the rest elementwise
ops, copies and views), the one prefill (video through the tower included) 8%, sampling 5%. At this size a step
is ~190 dispatched ops, so the time is per-op overhead, and what is left cannot go without changing the
numbers (fused q/k/v or gate/up weights, a hand-written attention or norm): the >= 3x goal is reached with
the paper's prompt size (one prefill, not G), not with the 181-token one. 2 threads on this shared 2-core
machine measure the scheduler (a parallel region waits ~6 ms for a descheduled thread). Not measured on a GPU.
"""
import json
import os
import sys
import tempfile
import time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import data
import egoworld
import grpo
from model import ModelConfig, Qwen2VL

# -----------------------------------------------------------------------------
num_generations = 8
new_tokens = 128        # per row; no stop token, so every row decodes exactly this many
repeats = 2
threads = 2             # the dev machine has 2 shared cores
seed = 0
# models: name -> (hidden, layers, heads, kv heads, intermediate, vision dim, vision depth, vocab (0: the tokenizer's))
models = {'egoworld-tiny': (128, 4, 4, 2, 512, 128, 2, 0), 'small-32k': (512, 8, 8, 2, 1536, 256, 4, 32000)}
# prompts: name -> VisionSettings (frames, min_pixels, max_pixels) applied to one EgoWorld clip
prompts = {'egoworld 16x56x56': (16, 56 * 56, 56 * 56), 'paper budget 8x<=360*420': (8, 360 * 420, 360 * 420)}
# -----------------------------------------------------------------------------


def make_model(path, tok, spec):
    hidden, layers, heads, kv, inter, vdim, vdepth, vocab = spec
    hd = hidden // heads
    mrope = [hd // 8, hd * 3 // 16, hd // 2 - hd // 8 - hd * 3 // 16]
    cfg = ModelConfig(vocab_size=vocab or tok.vocab_size, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, mrope_section=mrope,
                      tie_word_embeddings=False, max_position_embeddings=4096, vision_depth=vdepth,
                      vision_embed_dim=vdim, vision_num_heads=4, **tok.model_ids())
    torch.manual_seed(seed)
    m = Qwen2VL(cfg)
    m.save_pretrained(path)
    return Qwen2VL.from_pretrained(path).eval(), sum(p.numel() for p in m.parameters())


def best_of(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    from configurator import configure
    from transformers import Qwen2VLForConditionalGeneration
    configure(globals())
    torch.set_num_threads(threads)
    G, N = num_generations, new_tokens
    with tempfile.TemporaryDirectory() as d:
        # one EgoWorld clip and its direction MCQ (the longest prompt text), egoworld's tokenizer
        egoworld.generate_split(os.path.join(d, 'world'), 0, 1, 'default', egoworld.segments)
        tok = data.build_tokenizer(egoworld.corpus_texts(50), egoworld.vocab_size, os.path.join(d, 'tok'))
        sample = next(s for s in data.read_samples(os.path.join(d, 'world', 'st_r1_cot.jsonl'))
                      if s.task == 'direction')
        results = []
        for mname, spec in models.items():
            path = os.path.join(d, mname)
            ours, n_params = make_model(path, tok, spec)
            hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            for pname, (nf, lo, hi) in prompts.items():
                settings = data.VisionSettings(nframes=nf, min_pixels=lo, max_pixels=hi)
                p = data.encode(sample, tok, settings, None, ours.config)
                batch = data.pack([p])
                n_vis = int((p['input_ids'] == tok.video_pad_id).sum())
                seeds = [grpo.row_seed(seed, 0, 0, g) for g in range(G)]

                def run_ours():
                    grpo.rollout(ours, batch, G, seeds, N, 1.0, 0, 1.0, (), tok.pad_id)

                def run_generate():
                    ours.generate(batch['input_ids'], batch['position_ids'], batch['cu_seqlens'], batch['pixel_values'],
                                  batch['grid_thw'], max_new_tokens=N, temperature=1.0, num_samples=G,
                                  generator=torch.Generator().manual_seed(seed))

                def run_hf():
                    out = hf.generate(input_ids=p['input_ids'][None],
                                      attention_mask=torch.ones(1, len(p['input_ids']), dtype=torch.long),
                                      pixel_values_videos=p['pixel_values'], video_grid_thw=p['grid_thw'],
                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
                                      max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.pad_id)
                    assert out.shape == (G, len(p['input_ids']) + N), out.shape

                with torch.no_grad():
                    run_ours(), run_hf()  # warm-up
                    t = {'ours': [], 'generate': [], 'hf': []}
                    for _ in range(repeats):
                        t['ours'].append(best_of(run_ours))
                        t['generate'].append(best_of(run_generate))
                        t['hf'].append(best_of(run_hf))
                tps = {k: G * N / min(v) for k, v in t.items()}
                r = dict(model=mname, params_M=round(n_params / 1e6, 1), prompt=pname,
                         prompt_tokens=len(p['input_ids']), visual_tokens=n_vis, G=G, new_tokens=N,
                         ours_tok_s=round(tps['ours']),
                         model_generate_tok_s=round(tps['generate']), transformers_tok_s=round(tps['hf']),
                         ratio=round(tps['ours'] / tps['hf'], 2))
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f'\nrollout tokens/s, G={G}, {N} new tokens a row, {threads} threads (ratio = grpo.rollout / transformers):')
    print(f"{'model':15} {'prompt':26} {'tokens':>6} {'ours':>8} {'generate':>9} {'HF':>8} {'ratio':>6}")
    for r in results:
        print(f"{r['model']:15} {r['prompt']:26} {r['prompt_tokens']:6d} {r['ours_tok_s']:8d} "
              f"{r['model_generate_tok_s']:9d} {r['transformers_tok_s']:8d} {r['ratio']:5.2f}x")


if __name__ == '__main__':
    main()
