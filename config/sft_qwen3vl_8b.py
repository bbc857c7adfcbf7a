# Cold-start SFT of Qwen3-VL-8B-Instruct on 8 GPUs (FSDP2), next to config/sft_qwen25vl_7b.py:
#   torchrun --nproc_per_node 8 sft.py config/sft_qwen3vl_8b.py \
#       --init_from=/path/Qwen3-VL-8B-Instruct --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# Vision: 16 frames, as the Qwen2.5-VL preset (Video-R1's setting), at 128 * 32 * 32 pixels a frame: Qwen3-VL's
# merged token covers 32 x 32 pixels (16-pixel patches), so a frame pair is the same 128 tokens as the Qwen2.5-VL
# preset's 128 * 28 * 28. Each frame group's "<t seconds>" comes from the sampled indices and the clip's own fps
# (data.frame_timestamps); their range is recorded in vision_settings.json. Everything else: the ST-R1 recipe of
# the Qwen2-VL preset.
exec(open('config/sft_qwen2vl_7b.py').read())
init_from = 'Qwen3-VL-8B-Instruct'
out_dir = 'out/sft-qwen3vl-8b'
nframes = 16
min_pixels = 128 * 32 * 32
max_pixels = 128 * 32 * 32
# a sample is ~1,024 visual (8 x 128) + ~64 timestamp and vision-start/end + ~300 text tokens: 2800 tokens
# packs ~2 a batch, x 8 ranks x 1 = ~16 samples per optimizer step (as the Qwen2-VL preset)
token_budget = 2800
