# EgoWorld v2's perception stage, second part: the base (config/sft_egoworld_v2_base.py) on the reading drills
# alone, so that it reads an option list as reliably as a pretrained LLM would (drills read right: 85.7% after the
# base, ~98% after these 300 steps; docs/egoworld_v2_notes.md, runs 15-16). Stack on the EgoWorld preset:
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2_read.py
init_from = 'out/base-egoworld-v2'
data = 'data_egoworld_v2/train/reading.jsonl'
out_dir = 'out/read-egoworld-v2'
save_interval = 0
max_steps = 300
# a short continuation of a trained model: no warmup, a lower peak than the base's 1e-3
lr = 5e-4
min_lr = 1e-4
warmup_frac = 0.0
