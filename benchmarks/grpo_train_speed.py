"""
GRPO's training forward + backward on one step's rollouts, two ways side by side in one run:
- shared: grpo.group_batch, each prompt once (its clip through the vision tower once) and its G
  completions attending to it (model.shared_prefix_attention) — what grpo.py does;
- alone: each completion packed with its own copy of its prompt (how grpo.py did it before, and how
  TRL's GRPOTrainer builds its batch: prompt + completion per row).
Same rollouts (G completions of each prompt, sampled as grpo.py samples them), same weights; the
log-probs of the two agree (printed: max abs difference). Times are the best of `repeats`.
    python benchmarks/grpo_train_speed.py --ckpt=out/sft-egoworld --data_path=data_egoworld/train/st_r1_cot.jsonl
(v1's SFT makes both: README, "Before v2", has its commands). Left out: the optimizer step (the same in both).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import grpo  # noqa: E402
from configurator import configure  # noqa: E402
from model import Qwen2VL, rope_positions  # noqa: E402

ckpt = 'out/sft-egoworld'
data_path = 'data_egoworld/train/st_r1_cot.jsonl'
prompts_per_step = 8
num_generations = 8
max_completion_length = 160
temperature = 0.6
threads = 2
repeats = 3


def alone_item(prompt, completion, cfg):
    """One completion packed with its own copy of its prompt, labelled on the completion."""
    ids = torch.cat([prompt['input_ids'], completion])
    labels = torch.full_like(ids, -100)
    labels[len(prompt['input_ids']):] = completion
    position_ids, next_position = rope_positions(ids, prompt['grid_thw'], cfg, prompt['second_per_grid_ts'])
    return dict(prompt, input_ids=ids, labels=labels, position_ids=position_ids, next_position=next_position)


def timed(model, batch):
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logp, _ = grpo.completion_logps(model, batch, temperature, 'cpu')
    logp.sum().backward()
    return time.perf_counter() - t0, logp.detach()


def main():
    c = configure(globals(), sys.argv[1:])
    torch.set_num_threads(c['threads'])
    tok, model = data.Tokenizer(c['ckpt']), Qwen2VL.from_pretrained(c['ckpt'])
    samples = [s for s in data.read_samples(c['data_path']) if s.task == 'direction'][:c['prompts_per_step']]
    settings = data.VisionSettings(16, 56 * 56, 56 * 56)
    prompts = [data.encode(s, tok, settings, None, model.config) for s in samples]
    G, P = c['num_generations'], len(prompts)
    seeds = [grpo.row_seed(0, 0, i, g) for i in range(P) for g in range(G)]
    tokens, _, lengths, _ = grpo.rollout(model, data.pack(prompts), G, seeds, c['max_completion_length'],
                                         c['temperature'], 0, 1.0, sorted({tok.im_end_id, tok.pad_id}),
                                         tok.pad_id)
    completions = [tokens[j, :int(lengths[j])] for j in range(P * G)]
    shared = grpo.group_batch([(p, completions[b * G:(b + 1) * G]) for b, p in enumerate(prompts)])
    alone = data.pack([alone_item(prompts[j // G], completions[j], model.config) for j in range(P * G)])
    best = {'shared': float('inf'), 'alone': float('inf')}
    for _ in range(c['repeats']):
        for name, batch in (('shared', shared), ('alone', alone)):
            dt, logp = timed(model, batch)
            best[name] = min(best[name], dt)
            best[name + '_logp'] = logp
    diff = float((best['shared_logp'] - best['alone_logp']).abs().max())
    print(f"{P} prompts x {G} completions ({int(lengths.sum())} completion tokens), {c['threads']} threads")
    print(f"tokens in the batch: shared {len(shared['input_ids'])}, alone {len(alone['input_ids'])}")
    ratio = best['alone'] / best['shared']
    print(f"fwd+bwd: shared {best['shared']:.3f} s, alone {best['alone']:.3f} s = {ratio:.2f}x; "
          f"max |logp difference| {diff:.1e}")


if __name__ == '__main__':
    main()
