# SFT of the tiny EgoWorld Qwen2-VL on a CPU (2 cores, minutes). Make the data and model first:
#   python egoworld.py --out=data_egoworld && python egoworld.py --make_model=out/egoworld-tiny
#   python sft.py config/sft_egoworld.py
# The recipe is the feasibility probe's (../shared/egost/PROBE.md), not the paper's: a random
# ~2M-parameter model has everything to learn, so it is fully fine-tuned at a high learning rate.
init_from = 'out/egoworld-tiny'
data = 'data_egoworld/train/st_r1_cot.jsonl'
out_dir = 'out/sft-egoworld'
save_interval = 100
# EgoWorld clips are 16 frames of 56x56 px, planned so that the 16 sampled frames see every segment;
# min = max = 56*56 px keeps them unresized: 4x4 patches -> 32 merged visual tokens per clip
nframes = 16
min_pixels = 56 * 56
max_pixels = 56 * 56
# with phrase tokens a sample is ~200 tokens -> ~20 samples a step (the probe's batch was 32); more,
# smaller steps learned faster than 8192-token steps in the same time (measured)
token_budget = 4096
grad_accum = 1
# every clip is read once per question about it (8 a video): decoded once and kept (2,000 clips x
# 16 x 56 x 56 x 3 B = 301 MB), a batch's data costs ~0.03 s against ~0.42 s of compute, so it is
# done in this process, where the cache outlives the epoch and no worker competes for the 2 cores
# (measured, steps 100-200: 0.47 s a step vs 0.52 with one worker; 0.58 with no cache)
num_workers = 0
frame_cache_mb = 512
# full fine-tune, everything trains (the tower is random too)
lora_rank = 0
freeze_vision = False
lr = 1e-3
min_lr = 1e-4
warmup_frac = 0.05
weight_decay = 0.05
grad_clip = 1.0
epochs = 1
# the demo's budget: 1,000 steps (~1.25 epochs) took 571 s on 2 idle cores, leaving GRPO its share of
# the 15 minutes. Option matching (the Check block) is learned last: MCQ avg 36.2 at 1,000 steps, 44.2 at
# 1,200 (docs/results.md), so SFT leaves RL room, and more SFT is a measured row of its own
max_steps = 1000
# tiny activations: recomputing them would only cost time
activation_checkpointing = False
