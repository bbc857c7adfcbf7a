# EgoWorld v2's perception ("base") stage, the nano analog of a pretrained VLM: the tiny model learns to caption
# train videos (headings, landmarks passed, actions done, in order; no question, no CoT) and to read (a text drill:
# which option says the same as a given list, answered with the CoT's Check block; egoworld.reading_item).
# Stack it on the EgoWorld preset (same pixels, optimiser and batch):
#   python egoworld.py --version=2 --cot_caption=True --cot_judged=True --out=data_egoworld_v2 --n_train=4000
#   python egoworld.py --version=2 --cot_caption=True --cot_judged=True --make_model=out/egoworld-v2-tiny
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2_base.py
# Measured (docs/egoworld_v2_notes.md, run 12, 8 min 10 s on two idle cores): test captions' landmark lists 97%
# exact, action lists 76%, turns 80%; drills read right 85.7%. The caption file is listed twice: with one caption
# a drill, the captions' action lists fell to 8.5% exact at 900 steps (run 11).
init_from = 'out/egoworld-v2-tiny'
data = ('data_egoworld_v2/train/captions.jsonl,data_egoworld_v2/train/captions.jsonl,'
        'data_egoworld_v2/train/reading.jsonl')
out_dir = 'out/base-egoworld-v2'
# 4,000 clips decoded once (4,000 x 16 x 56 x 56 x 3 B = 600 MB)
frame_cache_mb = 800
save_interval = 0
max_steps = 1200
