# GRPO of Qwen3-VL-8B-Instruct on 8 GPUs (FSDP2) from its cold-start SFT checkpoint, next to
# config/grpo_qwen25vl_7b.py:
#   torchrun --nproc_per_node 8 grpo.py config/grpo_qwen3vl_8b.py \
#       --init_from=out/sft-qwen3vl-8b --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# Vision: the SFT preset's 16 frames at 128 * 32 * 32 pixels a frame (bench.py reads it back from the
# checkpoint's vision_settings.json). Everything else: the ST-R1 recipe of the Qwen2-VL preset.
exec(open('config/grpo_qwen2vl_7b.py').read())
init_from = 'out/sft-qwen3vl-8b'
out_dir = 'out/grpo-qwen3vl-8b'
nframes = 16
min_pixels = 128 * 32 * 32
max_pixels = 128 * 32 * 32
# 8 sequences of ~1,400 prompt (~1,024 visual) + <= 256 completion tokens per rank: one micro-batch
train_token_budget = 16384
