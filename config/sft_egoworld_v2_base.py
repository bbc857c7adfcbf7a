# EgoWorld v2's perception ("base") stage: the tiny model learns to caption train videos (headings, landmarks
# passed, actions done, in order; no question, no CoT), the nano analog of a pretrained VLM that already sees.
# Stack it on the EgoWorld preset (same pixels, optimiser and batch):
#   python egoworld.py --version=2 --out=data_egoworld_v2 --n_train=4000
#   python egoworld.py --version=2 --make_model=out/egoworld-v2-tiny
#   python sft.py config/sft_egoworld.py config/sft_egoworld_v2_base.py
# Measured (docs/egoworld_v2_notes.md, run 3): 600 steps -> test captions' landmark lists 82% exact, action
# lists 66%, headings 99.5%; with the v2 look of run 1 and 400 steps, landmark lists were 10%.
init_from = 'out/egoworld-v2-tiny'
data = 'data_egoworld_v2/train/captions.jsonl'
out_dir = 'out/base-egoworld-v2'
# 4,000 clips decoded once (4,000 x 16 x 56 x 56 x 3 B = 600 MB)
frame_cache_mb = 800
save_interval = 0
# a caption is ~80 tokens with its clip: ~50 captions a step, 600 steps = ~7.5 epochs of 4,000 videos; the
# train loss was still falling at 600 (0.08), the test landmark lists 82% right
max_steps = 600
