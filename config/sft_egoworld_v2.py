# EgoWorld v2's CoT SFT from the perception stage (config/sft_egoworld_v2_base.py), on the caption-first CoT:
#   python egoworld.py --version=2 --cot_caption=True --out=data_egoworld_v2 --n_train=4000
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2.py
# Measured (docs/egoworld_v2_notes.md, run 5): after 1,000 steps the stated answer text is right for 67-97% of
# landmark and action questions and 75% of direction ones, but MCQ stays at chance (30.1): the options are
# copied right into the Check block in 20% of its lines. Not yet a recipe that passes issue 25's first gate.
init_from = 'out/base-egoworld-v2'
data = 'data_egoworld_v2/train/st_r1_cot.jsonl'
out_dir = 'out/sft-egoworld-v2'
frame_cache_mb = 800
save_interval = 250
max_steps = 1000
