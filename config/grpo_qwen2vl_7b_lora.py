# ST-R1's GRPO of Qwen2-VL-7B-Instruct on ONE GPU with LoRA, from the cold-start SFT checkpoint:
#   python grpo.py config/grpo_qwen2vl_7b_lora.py \
#       --init_from=out/sft-qwen2vl-7b --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# config/grpo_qwen2vl_7b.py's recipe (the release's settings, 8 prompts x G = 8 a step) with only LoRA adapters
# trained: the frozen base is held once, in bf16 (what autocast computes with anyway), the rollouts sample the
# adapted policy unmerged, and the KL reference is the same weights with the adapters switched off.
#
# Memory budget (GiB = 2^30; estimated from Qwen2-VL-7B's config, not measured: no GPU has run it yet):
#   weights      8.29B parameters: the matmuls (nn.Linear, patch Conv3d) 7.75B x 2 B (bf16) = 14.4
#                + embeddings 152,064 x 3,584 and norms in fp32: 0.545B x 4 B = 2.0            -> 16.5
#   adapters     r = 32 on q,k,v,o,gate,up,down of 28 layers: 28 x 32 x (in + out summed over the 7:
#                7,168 + 4,096 + 4,096 + 7,168 + 3 x 22,528 = 90,112) = 80.7M; fp32 weight + grad +
#                AdamW m, v = 16 B each                                                          ->  1.2
#   KV cache     a token: 28 layers x 2 (K, V) x 4 KV heads x 128 x 2 B = 56 KiB; a row: ~1,100 prompt
#                tokens (8 frames at <= 360x420 px: 4 frame pairs x <= 190 merged tokens + text) + 256
#                completion = 1,356 tokens = 74 MiB; G = 8 rows = 0.59 a prompt; the step's 8 prompts roll
#                out together: 64 rows = 4.6, + 0.6 for the 8-row prefill cache while it is copied   ->  5.2
#   activations  a training micro-batch: train_token_budget counts each completion with its prompt, so
#                16,384 / 1,356 = 12 completions ~ 2 prompts (each computed once) + 12 x 256 = ~5,300 tokens.
#                Checkpointed block inputs 28 x 5,300 x 3,584 x 4 B (fp32 residual) = 2.0; one block
#                recomputed in backward (gate, up, silu, product: 4 x 5,300 x 18,944 x 2 B = 0.75, with
#                attention, LoRA and their gradients) ~2; logits only at the 3,072 completion tokens, but
#                3,072 x 152,064 x 4 B = 1.74 an fp32 copy, ~3 alive at the peak = 5.2. The vision tower is
#                frozen and needs no gradient: transient only                                     -> ~9.5
#   total        ~32 GiB + CUDA context and allocator slack: one 80 GB GPU with room, a 48 GB card too; on
#                40 GB halve train_token_budget (block inputs and logits halve: -3.6). Loading builds the
#                fp32 model (33 GB) before the base is cast: a one-time peak of the same size.
#   Full weights for comparison: fp32 weights + grads + AdamW = 16 B x 8.29B = 124 GiB, + the reference:
#   config/grpo_qwen2vl_7b.py shards it over 8 GPUs.
init_from = 'out/sft-qwen2vl-7b'
data = 'st_r1_mcq_630.jsonl'
out_dir = 'out/grpo-qwen2vl-7b-lora'
save_interval = 20
nframes = 8
min_pixels = 128 * 28 * 28
max_pixels = 360 * 420
prompts_per_step = 8     # the release's global batch: 8 prompts x 8 generations = 64 rollouts a step
num_generations = 8
max_completion_length = 256
temperature = 1.0
top_p = 1.0
top_k = 0
reward_weights = {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}
beta = 0.1               # the reference is the base: the adapters off, no second model
epsilon = 0.2
loss_type = 'grpo'
scale_rewards = 'group'
num_iterations = 1
num_minibatches = 1
train_token_budget = 16384
# LoRA on the attention and MLP projections of the LLM (the vision tower stays as released). RL moves few
# bits a step, so a moderate rank suffices; LoRA wants ~10x the full-weight lr (the 7B preset's 1e-5).
# No dropout: it would make the training forward a noisier policy than the one that sampled
lora_rank = 32
lora_alpha = 64.0
lora_dropout = 0.0
lora_targets = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
lr = 1e-4
min_lr = 0.0
warmup_frac = 0.0
weight_decay = 0.0
grad_clip = 1.0
epochs = 1
dtype = 'bfloat16'
save_dtype = 'bfloat16'  # the merged model (merged in fp32, then cast)
activation_checkpointing = True
