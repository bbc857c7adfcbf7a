# GRPO of the tiny EgoWorld Qwen2-VL on a CPU (2 cores, minutes), from its SFT checkpoint:
#   python egoworld.py --out=data_egoworld && python egoworld.py --make_model=out/egoworld-tiny
#   python sft.py config/sft_egoworld.py && python grpo.py config/grpo_egoworld.py
# The recipe is scaled to a ~2M-parameter model that SFT already taught the CoT format: full weights,
# a learning rate 3x the 7B preset's, short runs.
init_from = 'out/sft-egoworld'
data = 'data_egoworld/train/st_r1_cot.jsonl'
out_dir = 'out/grpo-egoworld'
save_interval = 50
# EgoWorld clips as SFT saw them: 16 frames of 56x56 px, unresized (32 merged visual tokens a clip)
nframes = 16
min_pixels = 56 * 56
max_pixels = 56 * 56
# RL trains on the direction questions only: after SFT, sampled landmark and action answers are right at
# chance (pass@8 histograms fit a binomial with p = 0.25), so their reward is noise that only moves the
# weights (measured from the 1,200-step SFT, MCQ 44.2: all MCQ tasks, 30 steps: 42.1; direction only: 45.2;
# docs/results.md has every run)
tasks = 'direction'
# 8 prompts x 8 generations = 64 rollouts a step (16 prompts for 40 steps was no better: +0.9, 3 min)
prompts_per_step = 8
num_generations = 8
# the longest reference direction CoT is 133 tokens with its stop token: 128 cut 16% of them (scored 0,
# so GRPO learned to cut its Check block short)
max_completion_length = 160
# the SFT policy is peaked (entropy ~0.01 nat a token): 0.6 beat 1.0 (42.4) and 0.4 (44.2) at 60 steps
temperature = 0.6
# all reward components (reward.DEFAULT_WEIGHTS): accuracy/route, format, reverse thinking
reward_weights = {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}
beta = 0.04              # a light KL leash (beta = 0 was no better: 45.8 against 46.4 at 150 steps)
loss_type = 'grpo'
scale_rewards = 'group'
num_iterations = 1
train_token_budget = 16384
# 1e-4 is noise-dominated at this batch size: the shuffled-reward null (benchmarks/grpo_null.py: rewards
# shuffled within each group) drops MCQ 44.2 -> 36.2, the drift alone hurts; at 2e-5 that null costs 1 point
lr = 2e-5
min_lr = 2e-6
warmup_frac = 0.0
weight_decay = 0.0
grad_clip = 1.0
max_steps = 30           # the demo's budget: ~3 s a step on 2 idle cores (rollouts ~half of it)
# tiny activations: recomputing them would only cost time
activation_checkpointing = False
