# bench.py on EgoWorld (any split, any checkpoint trained on it):
#   python bench.py out/sft-egoworld config/bench_egoworld.py --data=data_egoworld/ood
# EgoWorld clips are 16 frames of 56x56 px planned for 16-frame sampling; min = max = 56*56 keeps
# them unresized (the settings sft.py's EgoWorld preset trains with).
nframes = 16
min_pixels = 56 * 56
max_pixels = 56 * 56
# a tiny model's CoT is short; the paper's 512 would mostly decode padding on a CPU
max_new_tokens = 256
# decoding is bound by per-step overhead at this size: 128 prompts a call took the test split
# from 77 s (16) to 43 s on 2 cores, same predictions (measured)
batch_size = 128
num_workers = 1
