# EgoWorld v2's CoT SFT from the perception stage (config/sft_egoworld_v2_base.py), on the caption-first CoT:
#   python egoworld.py --version=2 --cot_caption=True --cot_judged=True --out=data_egoworld_v2 --n_train=4000
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2.py
# Measured with the unjudged Check (no --cot_judged) and a caption-only base (docs/egoworld_v2_notes.md, runs 5
# and 7): after these 1,000 steps the stated answer text is right for 67-97% of landmark and action questions and
# 75% of direction ones, but MCQ stays at chance (30.1): the options are copied right into the Check block in 20%
# of its lines. 500 more steps (--init_from=out/sft-egoworld-v2 --lr=3e-4 --min_lr=1e-4 --warmup_frac=0
# --max_steps=500) copy 75% right: MCQ 46.3, landmark 48.8, action 47.2. With the judged Check and the reading base
# (runs 10-17) a small cold start does better; the best, run 16: this base + 300 steps of reading.jsonl alone,
# then 800 steps on the first 500 videos' CoT, MCQ 66.2.
init_from = 'out/base-egoworld-v2'
data = 'data_egoworld_v2/train/st_r1_cot.jsonl'
out_dir = 'out/sft-egoworld-v2'
frame_cache_mb = 800
save_interval = 250
max_steps = 1000
