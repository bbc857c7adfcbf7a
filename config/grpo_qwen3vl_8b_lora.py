# ST-R1's GRPO of Qwen3-VL-8B-Instruct on ONE GPU with LoRA, from the cold-start SFT checkpoint:
#   python grpo.py config/grpo_qwen3vl_8b_lora.py \
#       --init_from=out/sft-qwen3vl-8b --data=/path/st_r1_mcq_630.jsonl --video_root=/path/videos
# config/grpo_qwen2vl_7b_lora.py's LoRA recipe (r = 32 on the 7 projections, lr 1e-4, the adapters off as the
# KL reference) at config/grpo_qwen3vl_8b.py's frames: 16 at 128 * 32 * 32 pixels.
#
# Memory budget (GiB = 2^30; estimated from Qwen3-VL-8B-Instruct's released config.json, tests/test_model_qwen3.py
# RELEASED_3_8B_CONFIG, not measured: no GPU has run it yet):
#   weights      8.77B parameters: the matmuls (nn.Linear incl. lm_head, patch Conv3d) 8.14B x 2 B (bf16) = 15.2
#                + embeddings 151,936 x 4,096, vision positions, norms and biases in fp32: 0.626B x 4 B = 2.3 -> 17.5
#   adapters     r = 32 on q,k,v,o,gate,up,down of 36 layers: 36 x 32 x (in + out summed over the 7:
#                8,192 + 5,120 + 5,120 + 8,192 + 3 x 16,384 = 75,776) = 87.3M; fp32 weight + grad + AdamW m, v
#                = 16 B each                                                                        ->  1.3
#   KV cache     a token: 36 layers x 2 (K, V) x 8 KV heads x 128 x 2 B = 144 KiB (2.6x Qwen2-VL-7B's 56 KiB:
#                more layers and KV heads); a row: ~1,390 prompt tokens (8 frame groups x 128 merged tokens +
#                8 x ~8 timestamp and vision-start/end tokens + ~300 text) + 256 completion = 1,646 tokens =
#                231 MiB; the step's 8 prompts x G = 8 roll out together: 64 rows = 14.5, + 1.8 for the 8-row
#                prefill cache while it is copied                                                  -> 16.3
#   activations  a training micro-batch: 16,384 / 1,646 = 9 completions ~ 2 prompts (each computed once) +
#                9 x 256 = ~5,100 tokens. Checkpointed block inputs 36 x 5,100 x 4,096 x 4 B (fp32 residual)
#                = 2.8; one block recomputed in backward (gate, up, silu, product: 4 x 5,100 x 12,288 x 2 B =
#                0.47, with attention, LoRA and their gradients) ~2; logits at the 2,304 completion tokens:
#                2,304 x 151,936 x 4 B = 1.3 an fp32 copy, ~3 alive at the peak = 3.9. The vision tower (and
#                its DeepStack features, 3 x 1,024 x 4,096 x 2 B = 24 MiB a prompt) is frozen: transient  -> ~8.7
#   total        ~44 GiB + CUDA context and allocator slack: one 80 GB GPU with room; on a 48 GB card set
#                nframes=8 (the KV cache 16.3 -> ~10.9) and halve train_token_budget (-3.4). Loading
#                builds the fp32 model (32.7 GiB) before the base is cast: a one-time peak of the same size.
#   Full weights for comparison: fp32 weights + grads + AdamW = 16 B x 8.77B = 131 GiB, + the reference:
#   config/grpo_qwen3vl_8b.py shards it over 8 GPUs.
exec(open('config/grpo_qwen2vl_7b_lora.py').read())
init_from = 'out/sft-qwen3vl-8b'
out_dir = 'out/grpo-qwen3vl-8b-lora'
nframes = 16
min_pixels = 128 * 32 * 32
max_pixels = 128 * 32 * 32
