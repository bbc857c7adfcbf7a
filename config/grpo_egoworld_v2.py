# GRPO of EgoWorld v2's cold start (config/sft_egoworld_v2.py) in the paper's data regime: questions of the
# 3,750 train videos no CoT was written for, rewarded from their answer letter (train/rl_mcq.jsonl). Stack it on
# the EgoWorld preset:  python grpo.py config/grpo_egoworld.py config/grpo_egoworld_v2.py
init_from = 'out/sft-egoworld-v2'
data = 'data_egoworld_v2/train/rl_mcq.jsonl'
out_dir = 'out/grpo-egoworld-v2'
save_interval = 0
# every MCQ task: after this cold start landmark and action are well above chance (47 and 58), so their
# rewards carry signal (v1's direction-only choice was for answers at chance)
tasks = 'direction,landmark,action'
# the longest judged MCQ CoT of the train split is 135 tokens with its stop token (landmark; direction 129):
# room for a thought that repeats a segment, as cold starts' do, before the cut (runs 16-19 used 176)
max_completion_length = 176
# a constant 3e-5 (run 17-19); 1e-4 drifted below the cold start (run 10)
lr = 3e-5
min_lr = 3e-5
max_steps = 80
