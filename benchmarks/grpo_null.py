"""
The null control of a GRPO run: grpo.py exactly as configured, except that each group's rewards are
shuffled among its G completions before the advantages are computed. The reward statistics of every
group stay the same (so does the size of every update); which completion earned which reward does not.
Whatever this run does to the policy, the weights' drift under that update size does too; a real run
must beat it, not only the starting checkpoint.
    python benchmarks/grpo_null.py config/grpo_egoworld.py --out_dir=out/grpo-null
then bench both checkpoints the same way (docs/results.md, "GRPO: what was tried").
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402

real_scores = grpo.score_rollouts


def shuffle_within_groups(r, G):
    """r (N, k) with rows grouped G by G: each group's rows permuted, seeded by the values themselves (a run
    stays deterministic)."""
    g = torch.Generator().manual_seed(int(1000 * float(torch.nan_to_num(r[:, 0]).sum())) % (2 ** 31))
    return r[torch.cat([torch.randperm(G, generator=g) + b * G for b in range(len(r) // G)])]


def shuffled_scores(samples, texts, num_generations, weights):
    return shuffle_within_groups(real_scores(samples, texts, num_generations, weights), num_generations)


if __name__ == '__main__':
    grpo.score_rollouts = shuffled_scores
    grpo.main(sys.argv[1:])
