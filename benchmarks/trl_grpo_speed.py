"""
One whole GRPO step of grpo.py against TRL's GRPOTrainer, side by side in one run, on CPU: the same tiny
random Qwen2-VL checkpoint (egoworld.make_tiny_model, loaded by our model.py and by transformers), the same
image prompts, the same G, completion length, prompts per step, loss and optimizer settings, and one fixed
trivial reward. A step is everything from the prompts to the updated weights: rollout, reward and
advantages, the reference's log-probs, the policy's forward and backward, the optimizer.

    python benchmarks/trl_grpo_speed.py                     # 1 thread, 4 prompts x 8 completions of 64 tokens
    python benchmarks/trl_grpo_speed.py --threads=2 --steps=5

TRL is not a requirement of this project: `pip install trl` (1.16 measured) for this benchmark only.

The task in image form, as TRL's dataset takes images, not videos: an EgoWorld clip's 16 key frames tiled
4 x 4 into one 224 x 224 picture (64 merged visual tokens) with the clip's direction question; our side
reads the same PNG through data.encode (a still image is one frame repeated to Qwen2-VL's temporal patch,
as transformers' image processor does; the prompt ids are checked equal to TRL's). Ours: grpo.py's step
called function by function (encode, rollout, completion_texts, group_advantages, train_on_rollouts), one
prefill per prompt shared by its G rows, each prompt computed once in the training forward. TRL:
GRPOTrainer.train() with transformers' generate (G copies of every prompt, image included, through
prefill and training forward) and its padded batches.

Made equal: fp32, no activation checkpointing, no dropout, temperature 1, no top-k/top-p, loss 'grpo'
with beta 0.04 (so both run a reference model) and epsilon 0.2, group-scaled advantages, one update a
step over all P x G completions in one micro-batch, fused AdamW with grad clipping at 1.0, and every
completion exactly max_completion_length tokens (ours: no stop token; TRL: min_new_tokens, so EOS is
never sampled). Not equal: our sampler bans the visual special tokens (model.generate: an index_fill a
step), TRL does not; TRL also tokenises and processes the images twice a step (for generate and for the
training forward) and logs its metrics. The sides alternate step by step (one of ours before each of
TRL's) so both see the same load; the first step of each is warm-up; the median of `steps` timed steps is
reported, with where the time goes (medians per part).

Measured (defaults: 1 thread, 4 prompts x 8 x 64 tokens, 155-token prompts; 2-core machine, load 1-3),
three runs: a whole step ours 1.24-1.47 s, TRL 4.26-4.90 s = 3.33x, 3.44x, 3.52x. Per part (the 3.44x
run, ours / TRL s): rollout 0.47 / 1.26 (2.7x; 2.5-3.2x over the runs: one prefill and one image encode per
prompt instead of G), reference 0.25 / 0.75, policy forward 0.20 / 0.87, backward 0.31 / 1.16 (each prompt
computed once in the training batch, against 32 padded prompt + completion rows), optimizer 0.01 / 0.01,
prompt processing, rewards and the rest 0.03 / 0.25.
"""
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import data  # noqa: E402
import egoworld  # noqa: E402
import grpo  # noqa: E402
from common import make_optimizer  # noqa: E402
from model import Qwen2VL  # noqa: E402

# -----------------------------------------------------------------------------
threads = 1             # 2 threads on this 2-core machine, shared with other jobs, time the scheduler: every
                        # parallel region (a 32-row matmul) waits ~6 ms for a descheduled thread
prompts_per_step = 4
num_generations = 8
max_completion_length = 64
steps = 5                # timed steps a side, after one warm-up step
grid = 4                 # the picture: grid x grid key frames of one clip
beta = 0.04
epsilon = 0.2
lr = 2e-5
seed = 0
# -----------------------------------------------------------------------------
PARTS = ('prompts', 'rollout', 'reward', 'reference', 'policy fwd', 'backward', 'optimizer', 'other')


def trivial_reward(text):
    """A fixed reward that differs between completions (so advantages are not all zero)."""
    return float(sum(c in 'aeiou' for c in text)) / max(len(text), 1)


class Clock:
    """Seconds per part of the current step; `wrap` times every call of a function under a part's name
    (pick: the part from the call's arguments)."""
    def __init__(self):
        self.t = {}

    def add(self, part, dt):
        self.t[part] = self.t.get(part, 0.0) + dt

    def wrap(self, fn, pick):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(pick(*args, **kwargs), time.perf_counter() - t0)
        return timed


@contextmanager
def patched(obj, name, wrapper):
    """obj.name replaced by wrapper(obj.name) for the duration."""
    real = getattr(obj, name)
    setattr(obj, name, wrapper(real))
    try:
        yield
    finally:
        setattr(obj, name, real)


def make_world(root, n):
    """n EgoWorld clips -> n frame-grid PNGs with their direction questions (data.Sample), and the tiny
    model whose processor config takes the picture unresized."""
    from PIL import Image
    egoworld.generate_split(os.path.join(root, 'world'), 0, n, 'default', egoworld.segments)
    side = 56 * grid
    settings = data.VisionSettings(nframes=grid * grid, min_pixels=side * side, max_pixels=side * side)
    egoworld.make_tiny_model(os.path.join(root, 'tiny'), tiny_corpus=200)
    data.write_preprocessor_config(os.path.join(root, 'tiny'), settings)  # the picture's pixel budget
    samples = []
    for s in data.read_samples(os.path.join(root, 'world', 'st_r1_cot.jsonl')):
        if s.task != 'direction' or len(samples) == n:
            continue
        f = data.load_frames(s.video, grid * grid)  # (16, 56, 56, 3) uint8
        tiles = f.reshape(grid, grid, *f.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(side, side, 3)
        png = os.path.join(root, f'grid_{s.id}.png')
        Image.fromarray(np.ascontiguousarray(tiles)).save(png)
        samples.append(data.Sample(id=s.id, video=png, task=s.task, direction=s.direction, question=s.question,
                                   options=s.options, answer=s.answer, answer_text=s.answer_text))
    return samples, settings


def our_step_fn(ckpt, samples, settings, clock):
    """grpo.py main()'s step, one function call at a time, single process on CPU (grpo.main minus the
    config, checkpoints and logging): returns step(i) -> that step's part times. The caller times the
    log-prob forwards, the backward and the optimizer (grpo.completion_logps, Tensor.backward,
    grpo.clip_and_step) into `clock`; grpo.completion_logps(net=ref) is the reference's."""
    G, L = num_generations, max_completion_length
    tok = data.Tokenizer(ckpt)
    model = Qwen2VL.from_pretrained(ckpt)
    model.gradient_checkpointing = False
    model.train()
    ref = Qwen2VL.from_pretrained(ckpt).requires_grad_(False).eval()
    optimizer = make_optimizer(model, lr)
    loss_kw = dict(beta=beta, epsilon=epsilon, epsilon_high=None, loss_type='grpo', max_completion_length=L)

    def step(i):
        clock.t = {}
        t0 = time.perf_counter()
        prompts = [data.encode(s, tok, settings, None, model.config) for s in samples]
        seeds = [grpo.row_seed(seed, 0, i * len(samples) + b, g) for b in range(len(samples)) for g in range(G)]
        t1 = time.perf_counter()
        tokens, sampler_logp, lengths, stopped = grpo.rollout(model, data.pack(prompts), G, seeds, L, 1.0, 0, 1.0,
                                                              (), tok.pad_id)  # no stop: L tokens a row
        t2 = time.perf_counter()
        texts = grpo.completion_texts(tok, tokens, lengths, stopped)
        adv, _ = grpo.group_advantages(torch.tensor([trivial_reward(t) for t in texts]), G, 'group')
        t3 = time.perf_counter()
        grpo.train_on_rollouts(model, ref, optimizer, prompts, tokens, lengths, sampler_logp, adv,
                               torch.ones(len(texts), dtype=torch.bool), G=G, num_iterations=1, num_minibatches=1,
                               token_budget=1 << 30, temperature=1.0, grad_clip=1.0, loss_kw=loss_kw,
                               device=torch.device('cpu'), autocast=nullcontext, world=1)
        t4 = time.perf_counter()
        assert int(lengths.min()) == int(lengths.max()) == L, lengths
        clock.add('prompts', t1 - t0), clock.add('rollout', t2 - t1), clock.add('reward', t3 - t2)
        clock.add('other', t4 - t3 - sum(clock.t.get(p, 0.0) for p in ('reference', 'policy fwd', 'backward',
                                                                        'optimizer')))
        return dict(clock.t, step=t4 - t0)
    return step, ref


def image_processor(ckpt):
    """transformers' Qwen2VLProcessor for the checkpoint (tokenizer, chat template, PIL image processor).
    AutoProcessor would also build its video processor, which needs torchvision (not installed here, and
    no video is processed): a stand-in that refuses videos takes its place, as in tests/test_data.py."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class NoVideo:
        merge_size = data.MERGE

        def __call__(self, *args, **kwargs):
            raise ValueError('trl_grpo_speed: this benchmark has image prompts only')
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
    try:
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(ckpt),
                                tokenizer=AutoTokenizer.from_pretrained(ckpt), video_processor=NoVideo(),
                                chat_template=data.CHAT_TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def run_both(root, ckpt, samples, settings, n_steps, clock):
    """n_steps of GRPOTrainer.train(), each preceded by one step of ours (so both sides see the same load on a
    shared machine). Part times: wrappers on TRL's generate, prompt tokenisation, rewards and log-prob forward
    (reference or policy by the model it is given), on ours (our_step_fn), on Tensor.backward for both, and
    the optimizer callback (clipping and the step, from the end of the backward). Returns both sides' records."""
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    G, L = num_generations, max_completion_length
    processor = image_processor(ckpt)
    rows = [dict(prompt=[dict(role='user', content=[dict(type='image'),
                                                    dict(type='text', text=data.build_user_text(s))])],
                 image=Image.open(s.video).convert('RGB')) for s in samples]
    args = GRPOConfig(output_dir=os.path.join(root, 'trl'), report_to='none', use_cpu=True, bf16=False, seed=seed,
                      per_device_train_batch_size=len(samples) * G, gradient_accumulation_steps=1,
                      num_generations=G, max_completion_length=L, generation_kwargs=dict(min_new_tokens=L),
                      temperature=1.0, top_k=0, top_p=1.0, beta=beta, epsilon=epsilon, loss_type='grpo',
                      scale_rewards='group', num_iterations=1, learning_rate=lr, lr_scheduler_type='constant',
                      max_grad_norm=1.0, optim='adamw_torch_fused', gradient_checkpointing=False, disable_dropout=True,
                      max_steps=n_steps, logging_steps=10 ** 6, save_strategy='no', dataloader_num_workers=0,
                      shuffle_dataset=False, model_init_kwargs=dict(dtype=torch.float32))

    def reward_fn(completions, completion_ids, **kwargs):
        assert all(len(c) == L for c in completion_ids), [len(c) for c in completion_ids]  # lengths forced equal
        return [trivial_reward(c[-1]['content'] if isinstance(c, list) else c) for c in completions]

    trainer = GRPOTrainer(model=ckpt, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor)
    torch.set_num_threads(threads)  # in case anything on the way set its own
    our_step, our_ref = our_step_fn(ckpt, samples, settings, clock)
    ours, theirs, marks = [], [], {}

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            ours.append(our_step(len(ours)))
            clock.t, marks['start'] = {}, time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            clock.add('optimizer', time.perf_counter() - marks['backward_end'])

        def on_step_end(self, *a, **k):
            dt = time.perf_counter() - marks['start']
            theirs.append(dict(clock.t, step=dt, other=dt - sum(clock.t.values())))

    def backward_end(*a, **k):
        marks['backward_end'] = time.perf_counter()
        return 'backward'

    trainer.add_callback(Steps())
    refs = (our_ref, trainer.ref_model)
    with ExitStack() as patches:
        for obj, name, part in ((trainer.model, 'generate', lambda *a, **k: 'rollout'),
                                (trainer, '_tokenize_prompts', lambda *a, **k: 'prompts'),
                                (trainer, '_calculate_rewards', lambda *a, **k: 'reward'),
                                (trainer, '_get_per_token_logps_and_entropies',
                                 lambda net, *a, **k: 'reference' if net in refs else 'policy fwd'),
                                (grpo, 'completion_logps', lambda net, *a, **k: 'reference' if net in refs else
                                 'policy fwd'),
                                (grpo, 'clip_and_step', lambda *a, **k: 'optimizer'),
                                (torch.Tensor, 'backward', backward_end)):
            patches.enter_context(patched(obj, name, lambda f, part=part: clock.wrap(f, part)))
        trainer.train()
    return ours, theirs, processor


def median_parts(records):
    timed = records[1:]  # the first step is warm-up
    return {k: statistics.median(r.get(k, 0.0) for r in timed) for k in ('step',) + PARTS}


def main():
    from configurator import configure
    configure(globals())
    torch.set_num_threads(threads)
    P, G, L = prompts_per_step, num_generations, max_completion_length
    with tempfile.TemporaryDirectory() as root:
        samples, settings = make_world(root, P)
        ckpt = os.path.join(root, 'tiny')
        tok = data.Tokenizer(ckpt)
        ours_prompt = data.encode(samples[0], tok, settings)
        ours, theirs, processor = run_both(root, ckpt, samples, settings, steps + 1, Clock())
        msg = [dict(role='user', content=[dict(type='image', image=samples[0].video),
                                          dict(type='text', text=data.build_user_text(samples[0]))])]
        trl_prompt = processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors='pt')
    same = trl_prompt['input_ids'][0].tolist() == ours_prompt['input_ids'].tolist()
    pixels = float((trl_prompt['pixel_values'] - ours_prompt['pixel_values']).abs().max())
    a, b = median_parts(ours), median_parts(theirs)
    n_vis = int(ours_prompt['grid_thw'].prod()) // data.MERGE ** 2
    print(f"\nGRPO step, {P} image prompts x G={G} x {L} tokens ({len(ours_prompt['input_ids'])}-token prompts, "
          f"{n_vis} visual), {threads} threads, median of {steps} steps after a warm-up")
    print(f"prompt ids equal to TRL's: {same}; pixel values max |difference| {pixels:.1e}")
    print(f"{'part':12} {'ours s':>8} {'TRL s':>8}")
    for k in PARTS + ('step',):
        print(f'{k:12} {a[k]:8.3f} {b[k]:8.3f}')
    print(f"one whole step: ours {a['step']:.2f} s, TRL GRPOTrainer {b['step']:.2f} s = {b['step'] / a['step']:.2f}x; "
          f"rollout alone {b['rollout'] / a['rollout']:.2f}x")
    print('all steps (s): ours', [round(r['step'], 2) for r in ours], 'TRL', [round(r['step'], 2) for r in theirs])


if __name__ == '__main__':
    main()
