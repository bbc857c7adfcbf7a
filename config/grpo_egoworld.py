# GRPO of the tiny EgoWorld Qwen2-VL on a CPU (2 cores, minutes), from its SFT checkpoint:
#   python egoworld.py --out=data_egoworld && python egoworld.py --make_model=out/egoworld-tiny
#   python sft.py config/sft_egoworld.py && python grpo.py config/grpo_egoworld.py
# The recipe is scaled to a ~2M-parameter model that SFT already taught the CoT format: full weights,
# a learning rate ~30x the 7B's, short runs.
init_from = 'out/sft-egoworld'
data = 'data_egoworld/train/st_r1_cot.jsonl'
out_dir = 'out/grpo-egoworld'
save_interval = 50
# EgoWorld clips as SFT saw them: 16 frames of 56x56 px, unresized (32 merged visual tokens a clip)
nframes = 16
min_pixels = 56 * 56
max_pixels = 56 * 56
# 8 prompts x 8 generations = 64 rollouts a step; with phrase tokens the CoT is ~80-110 tokens (the
# Check block lists every option), so 128 only cuts runaway samples. ~3.4 s a step on 2 idle cores
prompts_per_step = 8
num_generations = 8
max_completion_length = 128
temperature = 1.0
# all reward components (reward.DEFAULT_WEIGHTS): accuracy/route, format, reverse thinking
reward_weights = {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}
beta = 0.04              # a light KL leash: the tiny policy is far from converged after SFT
loss_type = 'grpo'
scale_rewards = 'group'
num_iterations = 1
train_token_budget = 16384
# 3e-4 collapsed route answers into "turn left, ..." loops within 30 steps (an earlier tiny model);
# 1e-4 keeps the format (measured: format reward 0.9-1.0 over 12 steps)
lr = 1e-4
min_lr = 1e-5
warmup_frac = 0.0
weight_decay = 0.0
grad_clip = 1.0
max_steps = 30           # the demo's budget: 91-102 s (measured in two demo runs)
# tiny activations: recomputing them would only cost time
activation_checkpointing = False
