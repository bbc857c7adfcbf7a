"""
Speed of model.py against transformers' Qwen2VLForConditionalGeneration, side by side in one run,
same random weights (ours loaded from the checkpoint transformers saved) and the same inputs.

- training: forward + backward (cross-entropy over all tokens) of a batch of mixed-length
  sequences; ours runs it packed, transformers padded (right padding + attention_mask). Throughput
  counts real tokens only, for both.
- decoding: greedy generation of new_tokens for a batch of mixed-length prompts; ours uses its
  pre-allocated cache, transformers its generate() (left padding). tokens/s = batch * new_tokens / s.
  At this size both are bound by streaming the weights from memory once per step, so the ratio
  measures per-step overhead only.
- rollout (GRPO-shaped): num_samples sampled continuations per long prompt (temperature 1, no
  stop); ours prefills each prompt once and copies its cache (num_samples=G), transformers'
  num_return_sequences prefills every copy. tokens/s = rows * rollout_new_tokens / s.
Text only: the vision tower is the same work in both and not where the implementations differ.
Timings alternate ours/theirs and keep the best of `repeats`, because the CPU is shared.

    python benchmarks/model_speed.py                      # small config, 2 threads
    python benchmarks/model_speed.py --threads=1 --repeats=5
"""
import os
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
from model import ModelConfig, Qwen2VL

# -----------------------------------------------------------------------------
# model: ~35M parameters, Qwen2-VL shape (GQA 3:1, untied head) at small width
vocab_size = 32000
hidden_size = 384
intermediate_size = 1024
num_hidden_layers = 6
num_attention_heads = 6
num_key_value_heads = 2
# workload
train_lengths = [384, 320, 256, 192, 128, 96, 64, 32]  # mixed lengths, as SFT batches are
prompt_lengths = [96, 64, 48, 32]
new_tokens = 32
rollout_prompt_lengths = [256, 192]  # stand-ins for video prompts
num_samples = 4
rollout_new_tokens = 16
repeats = 2
threads = 2  # the dev machine has 2 shared cores
seed = 0
# -----------------------------------------------------------------------------


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from configurator import configure
    configure(globals(), sys.argv[1:])
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, mrope_section=[8, 12, 12], vision_depth=1,
                      vision_embed_dim=64, vision_num_heads=2, image_token_id=vocab_size - 5,
                      video_token_id=vocab_size - 4, vision_start_token_id=vocab_size - 3,
                      vision_end_token_id=vocab_size - 2, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf()))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Qwen2VL.from_pretrained(d)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f'config: {n_params / 1e6:.1f}M params, {num_hidden_layers} layers, hidden {hidden_size}, '
          f'vocab {vocab_size}; torch {torch.__version__}, {threads} threads')

    # ----- training step: forward + backward -----
    seqs = [torch.randint(0, vocab_size - 8, (n,)) for n in train_lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in train_lengths]).expand(3, -1)
    cu = F.pad(torch.tensor(train_lengths).cumsum(0), (1, 0)).to(torch.int32)
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])  # next token within each sequence
    L = max(train_lengths)
    pad_ids = torch.stack([F.pad(s, (0, L - len(s))) for s in seqs])
    pad_mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (0, L - len(s))) for s in seqs])
    pad_labels = torch.stack([F.pad(torch.cat([s[1:], torch.tensor([-100])]), (0, L - len(s)), value=-100)
                              for s in seqs])

    def ours_step():
        loss = F.cross_entropy(ours(ids, pos, cu), labels, ignore_index=-100)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        logits = hf(input_ids=pad_ids, attention_mask=pad_mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1), pad_labels.flatten(), ignore_index=-100)
        loss.backward()
        hf.zero_grad(set_to_none=True)

    ours.train(); hf.train()
    ours_step(); hf_step()  # warm-up
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(best_time(ours_step, 1)); t_hf.append(best_time(hf_step, 1))
    n_tok = sum(train_lengths)
    tr_ours, tr_hf = n_tok / min(t_ours), n_tok / min(t_hf)
    print(f'train fwd+bwd, {len(seqs)} seqs, {n_tok} tokens (padded: {len(seqs) * L}):')
    print(f'  ours (packed)        {tr_ours:9.0f} tok/s')
    print(f'  transformers (padded){tr_hf:9.0f} tok/s')
    print(f'  ratio                {tr_ours / tr_hf:9.2f}x')

    # ----- decoding -----
    ours.eval(); hf.eval()
    prompts = [torch.randint(0, vocab_size - 8, (n,)) for n in prompt_lengths]
    p_ids = torch.cat(prompts)
    p_pos = torch.cat([torch.arange(n) for n in prompt_lengths]).expand(3, -1)
    p_cu = F.pad(torch.tensor(prompt_lengths).cumsum(0), (1, 0)).to(torch.int32)
    P = max(prompt_lengths)
    left_ids = torch.stack([F.pad(p, (P - len(p), 0)) for p in prompts])
    left_mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (P - len(p), 0)) for p in prompts])

    def ours_gen():
        return ours.generate(p_ids, p_pos, p_cu, max_new_tokens=new_tokens)[0]

    def hf_gen():
        return hf.generate(input_ids=left_ids, attention_mask=left_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, P:]

    with torch.no_grad():
        same = torch.equal(ours_gen(), hf_gen())  # also the warm-up
        t_ours, t_hf = [], []
        for _ in range(repeats):
            t_ours.append(best_time(ours_gen, 1)); t_hf.append(best_time(hf_gen, 1))
    n_new = len(prompts) * new_tokens
    dec_ours, dec_hf = n_new / min(t_ours), n_new / min(t_hf)
    print(f'greedy decode, {len(prompts)} prompts ({prompt_lengths}), {new_tokens} new tokens each '
          f'(same tokens as transformers: {same}):')
    print(f'  ours                 {dec_ours:9.0f} tok/s')
    print(f'  transformers         {dec_hf:9.0f} tok/s')
    print(f'  ratio                {dec_ours / dec_hf:9.2f}x')

    # ----- GRPO-shaped rollout: G samples per prompt -----
    prompts = [torch.randint(0, vocab_size - 8, (n,)) for n in rollout_prompt_lengths]
    r_ids, r_cu = torch.cat(prompts), F.pad(torch.tensor(rollout_prompt_lengths).cumsum(0), (1, 0)).to(torch.int32)
    r_pos = torch.cat([torch.arange(n) for n in rollout_prompt_lengths]).expand(3, -1)
    P = max(rollout_prompt_lengths)
    left_ids = torch.stack([F.pad(p, (P - len(p), 0)) for p in prompts])
    left_mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (P - len(p), 0)) for p in prompts])

    def ours_roll():
        ours.generate(r_ids, r_pos, r_cu, max_new_tokens=rollout_new_tokens, temperature=1.0, num_samples=num_samples)

    def hf_roll():
        hf.generate(input_ids=left_ids, attention_mask=left_mask, max_new_tokens=rollout_new_tokens,
                    min_new_tokens=rollout_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    num_return_sequences=num_samples, pad_token_id=0)

    with torch.no_grad():
        t_ours, t_hf = [], []
        for _ in range(repeats):
            t_ours.append(best_time(ours_roll, 1)); t_hf.append(best_time(hf_roll, 1))
    n_new = len(prompts) * num_samples * rollout_new_tokens
    ro_ours, ro_hf = n_new / min(t_ours), n_new / min(t_hf)
    print(f'rollout, {len(prompts)} prompts ({rollout_prompt_lengths}) x {num_samples} samples, '
          f'{rollout_new_tokens} new tokens, prefill included:')
    print(f'  ours (prefill once)  {ro_ours:9.0f} tok/s')
    print(f'  transformers         {ro_hf:9.0f} tok/s')
    print(f'  ratio                {ro_ours / ro_hf:9.2f}x')


if __name__ == '__main__':
    main()
