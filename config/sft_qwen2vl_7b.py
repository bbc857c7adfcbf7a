# The paper's cold-start SFT of Qwen2-VL-7B-Instruct on 8 GPUs (FSDP2):
#   torchrun --nproc_per_node 8 sft.py config/sft_qwen2vl_7b.py \
#       --init_from=/path/Qwen2-VL-7B-Instruct --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# Settings as released (../shared/egost/REFERENCE.md): LoRA r=8, alpha=8, dropout 0.1 on q,k,v,o
# of the LLM, lr 8e-5, cosine, warmup 10%, 1 epoch, grad clip 0.3, effective batch 16, bf16,
# gradient checkpointing. Differences on purpose: loss on the answer only (the release also trained
# on the prompt), an fp32 base instead of 4-bit (QLoRA), 8 frames with rounded (not truncated) indices.
init_from = 'Qwen2-VL-7B-Instruct'
data = 'st_r1_mcq_630.jsonl'
out_dir = 'out/sft-qwen2vl-7b'
save_interval = 0
nframes = 8
min_pixels = 128 * 28 * 28
max_pixels = 360 * 420
# a sample is ~800 visual (4 x <=190) + ~300 text tokens: 2200 tokens packs ~2 a batch,
# x 8 ranks x 1 = ~16 samples per optimizer step (the release: 16)
token_budget = 2200
grad_accum = 1
num_workers = 4
lora_rank = 8
lora_alpha = 8.0
lora_dropout = 0.1
lora_targets = 'q_proj,k_proj,v_proj,o_proj'
freeze_vision = True
lr = 8e-5
min_lr = 0.0
warmup_frac = 0.1
weight_decay = 0.0
grad_clip = 0.3
epochs = 1
dtype = 'bfloat16'
save_dtype = 'bfloat16'
activation_checkpointing = True
