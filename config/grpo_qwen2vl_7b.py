# ST-R1's GRPO of Qwen2-VL-7B-Instruct on 8 GPUs (FSDP2), from the cold-start SFT checkpoint:
#   torchrun --nproc_per_node 8 grpo.py config/grpo_qwen2vl_7b.py \
#       --init_from=out/sft-qwen2vl-7b --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# Settings as released (../shared/egost/REFERENCE.md): lr 1e-5, beta 0.1 (k3 KL), G = 8, at most
# 256 completion tokens, temperature 1.0, one update per rollout batch, 1 epoch over the 630 items,
# 8 frames of at most 360*420 px. Differences on purpose: top-p/top-k off and temperature set
# explicitly (the release inherited generation defaults), the strict answer parser (the release
# scored the first character of <answer>), and the format + reverse-thinking rewards switched on;
# the release's reward is --reward_weights="{'accuracy': 1.0, 'format': 0.0, 'reverse': 0.0, 'route': 1.0}".
init_from = 'out/sft-qwen2vl-7b'
data = 'st_r1_mcq_630.jsonl'
out_dir = 'out/grpo-qwen2vl-7b'
save_interval = 20
nframes = 8
min_pixels = 128 * 28 * 28
max_pixels = 360 * 420
# one prompt per GPU (the release: one per GPU on 4 GPUs) x 8 generations = 64 rollouts a step, ~78 steps an epoch
prompts_per_step = 8
num_generations = 8
max_completion_length = 256
temperature = 1.0
top_p = 1.0
top_k = 0
reward_weights = {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}
beta = 0.1
epsilon = 0.2
loss_type = 'grpo'       # per-sequence mean, the paper's GRPO
scale_rewards = 'group'
num_iterations = 1
num_minibatches = 1
# 8 sequences of ~1,100 prompt (~800 visual) + <= 256 completion tokens per rank: one micro-batch
train_token_budget = 16384
lr = 1e-5
min_lr = 0.0
warmup_frac = 0.0
weight_decay = 0.0
grad_clip = 1.0
freeze_vision = False
epochs = 1
dtype = 'bfloat16'
save_dtype = 'bfloat16'
activation_checkpointing = True
