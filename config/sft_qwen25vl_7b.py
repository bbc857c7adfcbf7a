# Cold-start SFT of Qwen2.5-VL-7B-Instruct on 8 GPUs (FSDP2), next to config/sft_qwen2vl_7b.py:
#   torchrun --nproc_per_node 8 sft.py config/sft_qwen25vl_7b.py \
#       --init_from=/path/Qwen2.5-VL-7B-Instruct --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# Vision: Video-R1's published training setting for this model, 16 frames at 128*28*28 pixels a frame
# (qwen-vl-utils' video minimum is the same 128*28*28, so every frame lands at that area). Each clip's
# second_per_grid_ts (2 * mean spacing of the 16 sampled indices / its fps) sets the absolute-time M-RoPE
# and is recorded in vision_settings.json. Everything else: the ST-R1 recipe of the Qwen2-VL preset.
exec(open('config/sft_qwen2vl_7b.py').read())
init_from = 'Qwen2.5-VL-7B-Instruct'
out_dir = 'out/sft-qwen25vl-7b'
nframes = 16
min_pixels = 128 * 28 * 28
max_pixels = 128 * 28 * 28
# a sample is ~1,024 visual (8 x 128) + ~300 text tokens: 2800 tokens packs ~2 a batch,
# x 8 ranks x 1 = ~16 samples per optimizer step (as the Qwen2-VL preset)
token_budget = 2800
