# EgoWorld v2's CoT cold start in the paper's data regime: the reading base (config/sft_egoworld_v2_read.py) on
# the reverse-thinking CoT of the first 250 train videos only (egoworld.py --cold_start=250 writes it); GRPO then
# trains on the other 3,750 videos' answer letters (config/grpo_egoworld_v2.py). Stack on the EgoWorld preset:
#   python egoworld.py --version=2 --cot_caption=True --cot_judged=True --out=data_egoworld_v2 --n_train=4000 \
#     --cold_start=250
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2.py
# The size was measured (docs/egoworld_v2_notes.md, runs 16-19): 100 videos leave a policy too weak for GRPO to
# move (36.0, GRPO +0.4); 500 give 66.2, from where more SFT beats GRPO; 250 give 54.5 and GRPO's first gain.
# The --data of the forward-only ablation is cold_start_forward.jsonl.
init_from = 'out/read-egoworld-v2'
data = 'data_egoworld_v2/train/cold_start.jsonl'
out_dir = 'out/sft-egoworld-v2'
frame_cache_mb = 800
save_interval = 0
# ~4 epochs of 2,000 CoT lines; 400 steps left the judged Check unlearned (run 12)
max_steps = 800
