"""
EgoWorld: a procedurally rendered first-person world with exact ground truth, written in the Ego-ST Bench
layout. It is this project's "shakespeare_char": SFT, GRPO and bench run on it unchanged, and a ~2M-parameter
Qwen2-VL learns it on a CPU in minutes.

    python egoworld.py --out=data_egoworld --seed=0            # train/ test/ ood/ splits
    python egoworld.py --contact_sheet=egoworld.png            # frames of a few samples, for eyes
    python egoworld.py --make_model=out/egoworld-tiny          # tokenizer.json + tiny checkpoint
    python egoworld.py --make_model=out/egoworld-tiny25 --family=qwen2_5_vl   # the same, a tiny Qwen2.5-VL
    python egoworld.py --make_model=out/egoworld-tiny3 --family=qwen3_vl      # the same, a tiny Qwen3-VL

A video walks a one-cell corridor: straight segments joined by in-place turns, landmarks painted on the walls,
actions on the way (a door, stairs, an item picked up). Its eight questions (route, direction, landmark, action,
each forward and reverse) are answered from the route itself, so the ground truth is exact. Sizes were tuned by
a feasibility probe (../shared/egost/PROBE.md). The file reads top down: routes and their texts, questions,
rendering, the data set files, the tiny model. Only main() reads the settings; helpers take arguments.

Left out on purpose: textures beyond flat colours, lighting, rooms wider than a corridor, moving people, audio;
and a second camera height for stairs (the steps' shading carries up/down).
"""
import itertools
import json
import math
import os
import time
from multiprocessing import Pool

import numpy as np
import torch

import model
from common import atomic_path
from data import (BENCH_TASK, MCQ_INSTRUCTION, SYSTEM_PROMPT, Sample, VisionSettings, build_tokenizer, build_user_text,
                  write_preprocessor_config)
from reward import LETTERS, TASKS, cot_text

# -----------------------------------------------------------------------------
# data set size and layout
out = 'data_egoworld'   # output root; splits go to out/train, out/test, out/ood, out/ood_theme
seed = 0
# 1: the world every result in docs/results.md was measured on. 2: EgoWorld v2 (issue 25), perception a ~2M-param
# model can learn on a CPU so that the difficulty sits in reasoning: 6 landmark classes told apart by colour alone,
# always in the wall ahead at a segment's end (seen from the segment's start and large on a key frame; v1 paints
# 24 colour x shape classes on side walls, seen obliquely), items drawn ~2x larger, stairs up and down in two
# distinct colours (v1: a brightness gradient), and a caption file per split for a perception ("base") stage
version = 1
n_train = 2000          # videos; each gives 8 questions (route, direction, landmark, action x fwd/rev)
n_test = 200
n_ood = 200             # the harder OOD split: ood_segments-long routes in ood_theme
n_ood_theme = 200       # the paper-like OOD split (a held-out domain): the training route lengths in ood_theme
cold_start = 0          # v2, the paper's data regime: > 0 also writes train/cold_start.jsonl (the first cold_start
                        # videos' CoT, forward-only CoT in cold_start_forward.jsonl) and train/rl_mcq.jsonl (the
                        # other videos' MCQs, answer letter only: GRPO's questions)
workers = 2             # processes rendering and encoding videos (this machine has 2 cores)
generate = None         # None: generate unless only --contact_sheet / --make_model was asked for
# video: 56 px = 4x4 Qwen2-VL patches of 14 -> 2x2 merged tokens per temporal pair of frames
size = 56               # multiple of 28 so Qwen2-VL's resize is the identity (set min/max_pixels)
frames = 16             # frames per mp4
key_frames = 16         # frames the model samples (data.py nframes); planned views land on them
fps = 8
# routes
segments = (2, 4)       # straight segments per route in train/test
ood_segments = (5, 5)   # the ood split: longer routes than any in training ...
ood_theme = 'dusk'      # ... and, in both OOD splits, an unseen floor/ceiling/lighting theme
seg_len = (2, 4)        # cells per segment
n_options = 4
# chain of thought
cot_perception = True   # prefix "Headings: ..." (the probe: routes are learnable through headings)
cot_caption = False     # the perception step is the video's whole caption ("Headings: ... Route: ...", v2's
                        # perception-stage target) instead of the headings alone, so what the base stage learned
                        # to see is the first thing the CoT writes, and the lists follow from it by reading
cot_turns = True        # then "Turns: east to south clockwise, ...": each turn beside the two headings
                        # it comes from, so deriving left/right is a local lookup (see README's diagnosis)
cot_answer_text = True  # state the question's own answer text before the letter
cot_reverse = True      # state the opposite direction's route and reverse it (the paper's reverse thinking);
                        # False: the forward-only ablation, the same template stating the question's own route
cot_check = True        # then compare it with every option item by item: "Check A: turn left = turn right,
                        # nothing = turn left (no); B: ... (yes). So" (needs cot_answer_text). Without it the
                        # letter stays at chance even after 3,000 SFT steps (README, "what was measured")
cot_caption_turns = False  # v2: the caption (captions and the CoT's first line) writes the Turns line between the
                        # headings and the route, so the route's turn words follow from a derivation written just
                        # before them (after the route, a cold start wrote them wrong 46-51% of the time, the
                        # headings 5%: docs/egoworld_v2_notes.md, runs 21-22)
cot_judged = False      # v2: mark each Check pair "same" or "differ" before the option's yes/no ("A: turn left vs
                        # turn right differ, nothing vs turn left differ (no)"), so the verdict reads marks written
                        # one pair at a time; unmarked, a tiny model's verdicts agreed with its pairs 80% (measured)
# extras
contact_sheet = ''      # a PNG path: frames of a few train samples with their route text
make_model = ''         # a directory: tokenizer.json + tiny random Qwen2-VL checkpoint
family = 'qwen2_vl'     # its model_type: 'qwen2_vl', 'qwen2_5_vl' (Qwen2.5-VL's tower and time-scaled M-RoPE) or
                        # 'qwen3_vl' (Qwen3-VL's tower, DeepStack, interleaved M-RoPE, timestamped prompts)
# the tiny model (--make_model): PROBE.md's size, ~2M parameters, learns EgoWorld on 2 cores
vocab_size = 1024       # BPE vocabulary, Qwen2-VL's 14 special tokens included
tiny_phrases = True     # phrase tokens (data.PHRASE_SPLIT): samples ~2.2x shorter, ~2x faster training on a CPU
tiny_hidden = 128
tiny_layers = 4
tiny_heads = 4          # head_dim 32 -> mrope_section [4, 6, 6], Qwen2-VL's 16:24:24 scaled down
tiny_kv_heads = 2
tiny_intermediate = 512
# Initialisation. GPT-2's std 0.02 is for width 768; at width 128 it leaves attention logits near zero,
# and a tiny model trained on the CoT never learned to copy a token it had written (the option letter
# into <answer>, its own turns into the route): those stayed at chance for 1,000 steps while perception
# reached 96% (README: diagnosis). With weights at ~0.7/sqrt(width) the same copy is learned in ~200
# steps. Input embeddings are untied (as Qwen2-VL-7B) at std 1: tied, tokens predicted in the same
# contexts ("A".."D") are pulled together (cosine 0.95) and cannot be told apart as inputs.
tiny_init_std = 0.06
tiny_tied = False
tiny_embed_std = 1.0
tiny_vision_depth = 2
tiny_vision_dim = 128
tiny_vision_heads = 4
tiny_corpus = 2000      # videos' questions (text only) the tokenizer is trained on
# -----------------------------------------------------------------------------

HEADINGS = ['north', 'east', 'south', 'west']
DIRS = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])     # x east, y north; index = heading
COLOURS = {'white': (235, 235, 235), 'black': (25, 25, 25), 'orange': (255, 140, 0),
           'purple': (130, 40, 170), 'pink': (255, 130, 190), 'cyan': (0, 210, 220)}
KINDS = ['painting', 'window', 'clock', 'banner']
LANDMARKS = [f'{c} {k}' for c in COLOURS for k in KINDS]
# v2: one class per colour (the kind's marks stay, but colour alone tells them apart); a subset of LANDMARKS,
# so the renderer draws them unchanged
LANDMARKS_V2 = ['white painting', 'black window', 'orange clock', 'purple banner', 'pink painting', 'cyan window']
ITEMS = {'box': (190, 120, 40), 'ball': (240, 240, 240), 'book': (200, 40, 160)}
INVERSE = {'open the door': 'close the door', 'climb up the stairs': 'climb down the stairs',
           **{f'pick up the {i}': f'put down the {i}' for i in ITEMS}}
INVERSE.update({v: k for k, v in INVERSE.items()})
ACTIONS = ['open the door', 'climb up the stairs', 'climb down the stairs'] + [f'pick up the {i}' for i in ITEMS]
# Walls carry the compass: a corridor's north wall is red, east green, south blue, west yellow, so the heading
# is the colour straight ahead. Floor checker and ceiling colour set a theme apart (the OOD split's is unseen).
THEMES = {
    'default': dict(walls=[(200, 40, 40), (40, 170, 60), (50, 80, 210), (220, 200, 40)],
                    floor=[(120, 120, 120), (85, 85, 85)], ceiling=(55, 55, 65), light=1.0),
    'dusk': dict(walls=[(200, 40, 40), (40, 170, 60), (50, 80, 210), (220, 200, 40)],
                 floor=[(130, 100, 70), (95, 70, 45)], ceiling=(35, 35, 80), light=0.8)}
DOOR, LEAF = 100, 101   # face codes beside 1 + landmark index
FILES = {task: name for name, task in BENCH_TASK.items()}   # the benchmark's file name of each task
STEMS = {
    ('route', 'forward'): 'which route did you take to reach your destination?',
    ('route', 'reverse'): 'which route do you take to return to the starting point?',
    ('direction', 'forward'): 'what directions do you need to go through to get to your destination?',
    ('direction', 'reverse'): 'what directions do you need to go through to get to the starting point?',
    ('landmark', 'forward'): 'which landmarks (objects or scenery changes) did you pass by to reach your destination?',
    ('landmark', 'reverse'): ('which landmarks (objects or scenery changes) did you pass by to return to the '
                              'starting point?'),
    ('action', 'forward'): 'which actions did you perform to reach your destination?',
    ('action', 'reverse'): 'which actions did you perform to return to the starting point?'}
PREFIX = 'Please take an egocentric view to understand the following question. '
# v2's perception stage: what a pretrained VLM's caption data would hold about a walk (no question about it, no
# CoT): headings, landmarks passed and actions done, in order. 'task'/'direction' fields in the JSONL tell
# data.py to read it as an open-ended route item
CAPTION_QUESTION = ('Based on this video, describe your walk: the headings, the landmarks you passed and what you '
                    'did, in order.')
INSTRUCTION = '\n\n' + MCQ_INSTRUCTION
# v2's perception stage also reads: a text drill (no video question, no route reasoning) that compares a stated
# list with four options item by item, the skill a pretrained LLM brings and a random 2M-parameter model lacks
READING_QUESTION = 'Which option says the same as: {}?'

# -----------------------------------------------------------------------------
# routes: a route is a JSON-able dict; its meaning is the step list route_steps() derives

def sample_route(rng, segments=(2, 4), seg_len=(2, 4), version=1):
    """One route from the prior: a corridor of straight segments (their number drawn from `segments`, their
    cells from `seg_len`) joined by in-place 90-degree turns, and its carved cells. 1-3 segments carry a
    landmark, a wall face painted "<colour> <kind>" passed on the left or right or seen ahead at the segment's
    end; 1-3 segments an action at an inner cell, all actions distinct (at most one door). Rejection-samples
    until the corridor never touches itself. version=2: landmarks from LANDMARKS_V2, always 'ahead' (the route
    then carries version=2, which build_world reads for v2's look)."""
    for _ in range(10000):
        n = int(rng.integers(segments[0], segments[1] + 1))
        turns = [('left', 'right')[int(b)] for b in rng.integers(0, 2, n - 1)]
        headings = [int(rng.integers(4))]
        for t in turns:
            headings.append((headings[-1] + (1 if t == 'right' else -1)) % 4)
        lengths = [int(x) for x in rng.integers(seg_len[0], seg_len[1] + 1, n)]
        lm_segs = sorted(rng.choice(n, int(rng.integers(1, min(3, n) + 1)), replace=False).tolist())
        act_segs = sorted(rng.choice(n, int(rng.integers(1, min(3, n) + 1)), replace=False).tolist())
        pool = LANDMARKS if version == 1 else LANDMARKS_V2
        names = [pool[k] for k in rng.choice(len(pool), len(lm_segs), replace=False)]
        acts = rng.choice(len(ACTIONS), len(act_segs), replace=False)   # distinct: at most one door
        actions = [dict(seg=s, pos=int(rng.integers(1, lengths[s])), action=ACTIONS[a])
                   for s, a in zip(act_segs, acts)]
        landmarks = []
        for s, name in zip(lm_segs, names):
            side = ['left', 'right', 'ahead'][int(rng.integers(3))] if version == 1 else 'ahead'
            free = [j for j in range(1, lengths[s]) if all(a['pos'] != j for a in actions if a['seg'] == s)]
            if side != 'ahead' and not free:
                side = 'ahead'
            pos = lengths[s] + 0.5 if side == 'ahead' else int(rng.choice(free))
            landmarks.append(dict(seg=s, pos=pos, side=side, name=name))
        cells = carve(headings, lengths)
        if not touches(cells):
            route = dict(headings=headings, lengths=lengths, turns=turns, landmarks=landmarks,
                         actions=actions, cells=cells)
            return route if version == 1 else dict(route, version=version)
    raise ValueError(f'no corridor of segments={segments} seg_len={seg_len} avoids itself')


def carve(headings, lengths):
    """The corridor cells [x, y] walked from (0, 0), corners included once."""
    cells = [[0, 0]]
    for h, L in zip(headings, lengths):
        for _ in range(L):
            cells.append([cells[-1][0] + int(DIRS[h][0]), cells[-1][1] + int(DIRS[h][1])])
    return cells


def touches(cells):
    """True if two cells more than two steps apart are neighbours (incl. diagonal): walls would be
    missing between corridors and one view could show two places."""
    P = np.array(cells)
    cheb = np.abs(P[:, None] - P[None]).max(-1)
    far = np.abs(np.arange(len(P))[:, None] - np.arange(len(P))[None]) >= 3
    return bool((far & (cheb < 2)).any())


def route_steps(route):
    """The forward step list, in the order things happen along the way."""
    steps = []
    for s, L in enumerate(route['lengths']):
        if s:
            steps.append(('turn', route['turns'][s - 1]))
        events = sorted([(l['pos'], 'lm', l['name']) for l in route['landmarks'] if l['seg'] == s] +
                        [(a['pos'], 'do', a['action']) for a in route['actions'] if a['seg'] == s])
        landmark = None
        for _, kind, what in events:
            if kind == 'lm':
                landmark = what
            else:
                steps += [('go', landmark), ('do', what)]
                landmark = None
        steps.append(('go', landmark))
    return steps


def reverse_steps(steps):
    """Retrace: reverse the order, swap left and right, invert actions (INVERSE), and prefix "turn around". A
    route that starts with "turn around" loses it instead, so reversing twice gives the route back."""
    flip = {'left': 'right', 'right': 'left', 'around': 'around'}
    around = [('turn', 'around')]
    body, lead = (steps[1:], []) if steps[:1] == around else (steps, around)
    rev = [('turn', flip[v]) if k == 'turn' else ('do', INVERSE[v]) if k == 'do' else (k, v)
           for k, v in reversed(body)]
    return lead + rev


def step_text(step):
    kind, v = step
    if kind == 'go':
        return 'go straight' + (f' past the {v}' if v else '')
    return f'turn {v}' if kind == 'turn' else v


def route_to_text(steps, end='.'):
    """Steps -> text in this grammar (reward.py parses the same words):

        route    := step (", " step)* "."
        step     := "go straight" [" past the " LANDMARK] | "turn left" | "turn right" | "turn around" | ACTION
        LANDMARK := COLOUR " " KIND          ACTION := "open the door" | "climb up the stairs" | ...
    """
    return ', '.join(step_text(s) for s in steps) + end


def text_to_steps(text):
    """The inverse of route_to_text (strict: unknown words are an error)."""
    steps = []
    for part in text.strip().rstrip('.').split(', '):
        if part.startswith('go straight'):
            rest = part[len('go straight'):]
            if rest and not rest.startswith(' past the '):
                raise ValueError(f'bad route step {part!r} in {text!r}')
            steps.append(('go', rest[len(' past the '):] or None))
        elif part in ('turn left', 'turn right', 'turn around'):
            steps.append(('turn', part[5:]))
        elif part in INVERSE:
            steps.append(('do', part))
        else:
            raise ValueError(f'bad route step {part!r} in {text!r}')
    return steps


def moves(steps):
    """Movement only: actions dropped, the walks they split merged again."""
    merged = []
    for k, v in steps:
        if k == 'do':
            continue
        if k == 'go' and merged and merged[-1][0] == 'go':
            merged[-1] = ('go', merged[-1][1] or v)
        else:
            merged.append((k, v))
    return merged


def answer_texts(steps):
    """The ground-truth text of every task for one direction of travel: the route without its actions, the
    turn steps ("turn left, turn right"), the landmark names in order, the actions in order."""
    return {'route': route_to_text(moves(steps)),
            'direction': route_to_text([s for s in steps if s[0] == 'turn'], end=''),
            'landmark': ', '.join(v for k, v in steps if k == 'go' and v),
            'action': ', '.join(v for k, v in steps if k == 'do')}


def make_questions(rng, segments=(2, 4), seg_len=(2, 4), n_options=4, version=1):
    """One video's route and its eight questions, without rendering anything.
    Returns (route, {(task, direction): dict(question, options, answer, answer_text, opposite)}).

    MCQ distractors: the options are the texts of n_options routes drawn i.i.d. from the same prior, redrawn
    together until every task's texts are distinct, then shuffled. The video's route is one of them, so the
    options are exchangeable and no text-only rule beats chance."""
    for _ in range(1000):
        routes = [sample_route(rng, segments, seg_len, version) for _ in range(n_options)]
        texts = [answer_texts(route_steps(r)) for r in routes]
        if all(len({t[task] for t in texts}) == n_options for task in TASKS[1:]):
            break
    else:
        raise ValueError(f'segments={segments} seg_len={seg_len}: too few distinct routes for {n_options} options')
    route = routes[0]
    both = {'forward': texts, 'reverse': [answer_texts(reverse_steps(route_steps(r))) for r in routes]}
    qs = {}
    for task in TASKS:
        for d, o in (('forward', 'reverse'), ('reverse', 'forward')):
            q = dict(question='Based on this video, ' + STEMS[task, d], options=[],
                     answer=both[d][0][task], answer_text=both[d][0][task], opposite=both[o][0][task])
            if task != 'route':
                perm = rng.permutation(n_options)
                q['options'] = [both[d][k][task] for k in perm]
                q['answer'] = LETTERS[int(np.flatnonzero(perm == 0)[0])]
            qs[task, d] = q
    return route, qs

# -----------------------------------------------------------------------------
# rendering

def build_world(route):
    """Grid arrays for the raycaster (indexed [y, x]) and the timeline of the walk: rock everywhere but the
    corridor, landmark faces, a closed door that opens (its leaf then lies against the left wall), stairs cells,
    items on the floor. Time: segment s is walked during [T_s, T_s + L_s], then the turn takes one unit."""
    cells = np.array(route['cells'])
    off = 3 - cells.min(0)
    gw, gh = cells.max(0) + off + 4
    solid = np.ones((gh, gw), bool)
    solid[cells[:, 1] + off[1], cells[:, 0] + off[0]] = False
    tex = np.zeros((gh, gw, 4), np.int16)     # face code by the heading a ray travels when it hits
    stair = np.full((gh, gw), -1, np.int8)    # uphill heading of a stairs cell
    climb = np.zeros((gh, gw), np.int8)       # 1: climbed up, 2: climbed down (v2 colours them apart)
    starts = np.cumsum([0] + route['lengths'])
    T = np.cumsum([0] + [L + 1 for L in route['lengths']])
    door, items = None, []

    def cell(s, j):
        return cells[starts[s] + j] + off
    for lm in route['landmarks']:
        s, h = lm['seg'], route['headings'][lm['seg']]
        if lm['side'] == 'ahead':
            c, k = cell(s, route['lengths'][s]) + DIRS[h], h
        else:
            k = (h - 1) % 4 if lm['side'] == 'left' else (h + 1) % 4
            c = cell(s, lm['pos']) + DIRS[k]
        tex[c[1], c[0], k] = 1 + LANDMARKS.index(lm['name'])
        if route.get('version', 1) >= 2:   # v2: the end cell's side walls too, so the landmark fills the view
            for k in ((h - 1) % 4, (h + 1) % 4):
                c = cell(s, route['lengths'][s]) + DIRS[k]
                tex[c[1], c[0], k] = 1 + LANDMARKS.index(lm['name'])
    for a in route['actions']:
        s, j, h, act = a['seg'], a['pos'], route['headings'][a['seg']], a['action']
        c = cell(s, j)
        if act == 'open the door':   # solid until opened; then its leaf lies on the left wall
            door = dict(cell=c, t_open=T[s] + j - 0.9)
            tex[c[1], c[0], :] = DOOR
            leaf = c + DIRS[(h - 1) % 4]
            tex[leaf[1], leaf[0], (h - 1) % 4] = LEAF
        elif act.startswith('climb'):
            stair[c[1], c[0]] = h if 'up' in act else (h + 2) % 4
            climb[c[1], c[0]] = 1 if 'up' in act else 2
        else:
            items.append(dict(pos=c + 0.5, name=act.split()[-1], t_pick=T[s] + j - 0.4))
    return dict(solid=solid, tex=tex, stair=stair, climb=climb, door=door, items=items, T=T,
                seg_start=cells[starts[:-1]] + off + 0.5, version=route.get('version', 1))


def key_times(route, world, n):
    """The n moments the model must see, in time order: the start of every segment and a mid-turn (45 degree)
    view of every turn, then while there is room the goal, a view before/after every action and beside every
    landmark, then walking views in the largest gaps. clip_times puts them exactly on the frame indices data.py
    samples, so with nframes = key_frames the model sees every segment."""
    T, Ls, last = world['T'], route['lengths'], len(route['lengths']) - 1
    must = [T[s] for s in range(last + 1)] + [T[s] + Ls[s] + 0.5 for s in range(last)]
    extra = [T[last] + Ls[last]]
    for a in route['actions']:
        t0 = T[a['seg']] + a['pos']
        extra.append(t0 - 0.75 if a['action'].startswith('open') else t0 - 0.7 if 'climb' in a['action'] else t0 - 0.2)
    for lm in route['landmarks']:
        j = Ls[lm['seg']] if lm['side'] == 'ahead' else lm['pos']
        extra.append(T[lm['seg']] + j - (1 if route.get('version', 1) == 1 else 0.7))   # v2: closer
    if len(must) > n:
        raise ValueError(f'key_frames={n} cannot show {last + 1} segments and {last} turns: use more frames')
    times = sorted(set(must))
    for t in extra:
        if len(times) < n and t not in times:
            times = sorted(times + [t])
    while len(times) < n:   # fill the largest gaps with walking views
        g = int(np.argmax(np.diff(times)))
        times.insert(g + 1, (times[g] + times[g + 1]) / 2)
    return np.array(times, float)


def poses(route, world, times):
    """Camera position (x, y) and angle (radians clockwise from north) at each time."""
    T, Ls, hs = world['T'], route['lengths'], route['headings']
    xy, ang = [], []
    for t in times:
        s = min(int(np.searchsorted(T, t, side='right')) - 1, len(Ls) - 1)
        start, u = world['seg_start'][s], t - T[s]
        if u <= Ls[s]:
            xy.append(start + DIRS[hs[s]] * u)
            ang.append(hs[s] * math.pi / 2)
        else:   # turning in place at the corner
            sign = 1 if route['turns'][s] == 'right' else -1
            xy.append(start + DIRS[hs[s]] * Ls[s])
            ang.append(hs[s] * math.pi / 2 + sign * (u - Ls[s]) * math.pi / 2)
    return np.array(xy, float), np.array(ang, float)


def _patterns(u, v):
    """Masks of the landmark kinds' dark marks on a wall face, u along the wall, v up."""
    return [(u < 0.18) | (u > 0.82) | (v < 0.2) | (v > 0.8),                      # painting: frame
            (np.abs(u - 0.5) < 0.1) | (np.abs(v - 0.55) < 0.1),                     # window: cross
            (u - 0.5) ** 2 + (v - 0.55) ** 2 < 0.09,                               # clock: disc
            (np.floor(u * 4) % 2 == 0)]                                            # banner: stripes


def render(route, times, size=56, theme='default', world=None):
    """All frames of a clip at once, uint8 (len(times), size, size, 3), by a numpy DDA raycaster over every ray
    of every frame. Cell edges are darkened and the floor is a checker, so forward motion shows; stairs' steps
    brighten uphill."""
    world = world or build_world(route)
    th = THEMES[theme]
    n, H = len(times), size
    f, eye = size / 2, 0.5                                      # 90 degree field of view
    xy, ang = poses(route, world, times)
    fwd = np.stack([np.sin(ang), np.cos(ang)], -1)
    right = np.stack([np.cos(ang), -np.sin(ang)], -1)
    cam = (np.arange(size) + 0.5) / f - 1
    ray = fwd[:, None] + right[:, None] * cam[None, :, None]   # (n, W, 2)
    solid = np.repeat(world['solid'][None], n, 0)
    door = world['door']
    opened = np.array([door is not None and t >= door['t_open'] for t in times])
    if door is not None:
        solid[~opened, door['cell'][1], door['cell'][0]] = True
    # DDA over every ray of every frame together
    fr = np.repeat(np.arange(n), size)
    px, py = np.repeat(xy[:, 0], size), np.repeat(xy[:, 1], size)
    rx, ry = ray[..., 0].ravel(), ray[..., 1].ravel()
    with np.errstate(divide='ignore'):
        ddx, ddy = np.abs(1 / rx), np.abs(1 / ry)
    mx, my = np.floor(px).astype(int), np.floor(py).astype(int)
    sx, sy = np.where(rx < 0, -1, 1), np.where(ry < 0, -1, 1)
    distx = np.where(rx < 0, px - mx, mx + 1 - px) * ddx
    disty = np.where(ry < 0, py - my, my + 1 - py) * ddy
    hit, side = np.zeros(len(rx), bool), np.zeros(len(rx), int)
    for _ in range(sum(solid.shape[1:])):
        gx = ~hit & (distx < disty)
        gy = ~hit & ~gx
        distx[gx] += ddx[gx]; mx[gx] += sx[gx]; side[gx] = 0
        disty[gy] += ddy[gy]; my[gy] += sy[gy]; side[gy] = 1
        hit |= solid[fr, my, mx]
        if hit.all():
            break
    perp = np.where(side == 0, distx - ddx, disty - ddy)
    k = np.where(side == 0, np.where(sx > 0, 1, 3), np.where(sy > 0, 0, 2))
    u = np.where(side == 0, py + perp * ry, px + perp * rx) % 1.0
    code = world['tex'][my, mx, k]
    code = np.where((code == LEAF) & ~opened[fr], 0, code)
    perp, k, u, code = (a.reshape(n, 1, size) for a in (perp, k, u, code))
    yc = np.arange(H) + 0.5 - H / 2
    v = eye - yc[None, :, None] * perp / f                        # height on the wall, (n, H, W)
    wall = (v >= 0) & (v <= 1)
    base = np.array(th['walls'], np.float32)[k] * np.where(k % 2 == 1, 0.85, 1.0).astype(np.float32)[..., None]
    colour = np.broadcast_to(base, (n, H, size, 3)).copy()
    lm = (code >= 1) & (code <= len(LANDMARKS))
    if lm.any():
        lid = np.clip(code - 1, 0, len(LANDMARKS) - 1)
        lmcol = np.array(list(COLOURS.values()), np.float32)[lid // len(KINDS)]
        marks = np.select([lid % len(KINDS) == i for i in range(len(KINDS))], _patterns(u, v), False)
        mark = np.where(lid // len(KINDS) == 1, 200, 35).astype(np.float32)[..., None]   # dark; light on black
        colour = np.where(lm[..., None], np.where(marks[..., None], mark, lmcol), colour)
    if ((code == DOOR) | (code == LEAF)).any():
        dmark = (u < 0.12) | (u > 0.88) | (v > 0.9) | ((np.abs(u - 0.75) < 0.06) & (np.abs(v - 0.45) < 0.06))
        colour = np.where(((code == DOOR) | (code == LEAF))[..., None],
                          np.where(dmark[..., None], np.float32([70, 40, 15]), np.float32([140, 85, 40])), colour)
    edge = (u < 0.05) | (u > 0.95) | (v < 0.04)                # cell edges: motion cues
    colour *= (np.where(edge, 0.5, 1.0) / (1 + 0.12 * perp)).astype(np.float32)[..., None]
    # floor and ceiling: where on the plane each pixel's ray lands
    dist = np.where(yc > 0, eye * f / np.abs(yc), (1 - eye) * f / np.abs(yc))[None, :, None]
    wx = xy[:, 0, None, None] + dist * ray[:, None, :, 0]
    wy = xy[:, 1, None, None] + dist * ray[:, None, :, 1]
    cx = np.clip(np.floor(wx).astype(int), 0, solid.shape[2] - 1)
    cy = np.clip(np.floor(wy).astype(int), 0, solid.shape[1] - 1)
    fx, fy = wx - np.floor(wx), wy - np.floor(wy)
    floor = np.array(th['floor'], np.float32)[(cx + cy) % 2]
    up = world['stair'][cy, cx]
    if (up >= 0).any():
        along = np.select([up == 0, up == 1, up == 2, up == 3], [fy, fx, 1 - fy, 1 - fx], 0)
        step = np.where((along * 4) % 1 < 0.15, 30, 60 + 45 * np.floor(along * 4))   # steps brighten uphill
        tint = np.float32([1, 0.9, 0.7])
        if world['version'] >= 2:   # v2: up and down in two colours a tiny model tells apart on one frame
            tint = np.where((world['climb'][cy, cx] == 1)[..., None], np.float32([1.2, 1.2, 0.3]),
                            np.float32([0.3, 0.6, 1.3]))
            step = np.where((along * 4) % 1 < 0.15, 30, 170)
        floor = np.where((up >= 0)[..., None], (step[..., None] * tint).astype(np.float32), floor)
    ceil = np.float32(th['ceiling']) * np.where((fx < 0.06) | (fy < 0.06), 0.6, 1).astype(np.float32)[..., None]
    plane = np.where((yc > 0)[None, :, None, None], floor, ceil) * (1 / (1 + 0.12 * dist)).astype(np.float32)[..., None]
    img = np.where(wall[..., None], colour, plane)
    _draw_items(img, world, times, xy, fwd, right, perp[:, 0], f, eye)
    return np.clip(img * th['light'], 0, 255).astype(np.uint8)


def _draw_items(img, world, times, xy, fwd, right, zbuf, f, eye):
    """Items as floor sprites until picked up, then as a square in the hand (bottom right)."""
    n, H, W, _ = img.shape
    rows, cols = np.arange(H) + 0.5, np.arange(W) + 0.5
    big = world['version'] >= 2   # v2: items ~2x as wide and tall, and a larger square in the hand
    for i, it in enumerate(world['items']):
        colour = np.array(ITEMS[it['name']], float)
        for t in range(n):
            if times[t] >= it['t_pick']:
                s = H // 5 if big else H // 7
                img[t, H - s - 1:H - 1, W - (i + 1) * (s + 2):W - i * (s + 2) - 2] = colour
                continue
            rel = it['pos'] - xy[t]
            depth, lat = rel @ fwd[t], rel @ right[t]
            if depth < 0.3:
                continue
            x0, half = W / 2 + lat / depth * f, (0.3 if big else 0.16) * f / depth
            y1, y0 = H / 2 + eye * f / depth, H / 2 + (eye - (0.6 if big else 0.32)) * f / depth
            inside = (np.abs(cols - x0) < half)[None] & ((rows > y0) & (rows < y1))[:, None]
            if it['name'] == 'ball':
                inside &= ((cols[None] - x0) / half) ** 2 + ((rows[:, None] - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 < 1
            inside &= (depth < zbuf[t])[None]
            img[t][inside] = colour / (1 + 0.12 * depth)


def clip_times(route, world, frames, key_frames):
    """Times of all video frames: the key times on the indices data.py samples
    (round(linspace(0, frames - 1, key_frames))), the rest interpolated between."""
    keys = key_times(route, world, key_frames)
    idx = np.round(np.linspace(0, frames - 1, key_frames)).astype(int)
    return np.interp(np.arange(frames), idx, keys)


def write_mp4(path, clip, fps=8):
    """An H.264 mp4 that decord (data.py) reads back; libx264, no B-frames, one thread: byte-identical output
    for identical frames."""
    import av
    with atomic_path(path) as tmp, av.open(tmp, 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.width, s.height, s.pix_fmt = clip.shape[2], clip.shape[1], 'yuv420p'
        s.codec_context.options = {'crf': '16', 'preset': 'veryfast', 'bf': '0', 'threads': '1'}
        for frame in clip:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')))
        c.mux(s.encode())

# -----------------------------------------------------------------------------
# data set files

def cot_solution(route, qs, task, d, cot=True, cot_perception=True, cot_turns=True, cot_answer_text=True,
                 cot_check=True, cot_reverse=True, cot_caption=False, cot_judged=False, cot_caption_turns=False):
    """The ST-R1 target of one question. No CoT: "<answer>X</answer>" (X: the letter, or a route question's
    text). CoT: the paper's reverse-thinking template (reward.cot_text), cleaned of Python list reprs, with up to
    four additions of ours (the cot_* settings say why). A forward MCQ with all four:

        <think>Headings: north, east, north. Turns: north to east clockwise, east to north anticlockwise.
        Let's start by thinking reverse {reverse stem} {reverse ground truth} And then think about {forward stem}
        Hence, reversing it gives: {forward ground truth}. Check A: turn left = turn right, nothing = turn left
        (no); B: turn right = turn right, turn left = turn left (yes); C: ... (no); D: ... (no). So the correct
        answer is B</think> <answer>B</answer>

    "Headings" (cot_perception): each segment's compass heading. "Turns" (cot_turns): each turn beside the two
    headings it comes from. "reversing it gives: ..." (cot_answer_text): the derived answer's text. "Check"
    (cot_check): every option beside it, item by item (check_text). A reverse question thinks "forward" first;
    a route question ends "Hence, reversing it gives the route.</think> <answer>{route text}</answer>".
    reward.COT reads the opposite ground truth back exactly. cot_reverse=False is the forward-only ablation:
    the same template stating the question's own route ("thinking forward" for a forward question, "Hence, it
    gives: ...")."""
    q = qs[task, d]
    answer = q['answer']
    if not cot:
        return f'<answer>{answer}</answer>'
    o = 'reverse' if d == 'forward' else 'forward'
    hs = [HEADINGS[h] for h in route['headings']]
    head = f"Headings: {', '.join(hs)}. " if cot_perception else ''
    if cot_caption:
        head = caption_text(route, cot_caption_turns) + ' '
    if cot_turns and not (cot_caption and cot_caption_turns):
        head += turns_text(route) + '. '
    gives = 'reversing it gives' if cot_reverse else 'it gives'
    conclusion = f'the correct answer is {answer}'
    if task == 'route':
        conclusion = f'{gives} the route.'
    elif cot_answer_text:
        check = f". Check {check_text(q['answer_text'], q['options'], cot_judged)}. So " if cot_check else ', so '
        conclusion = f"{gives}: {q['answer_text']}{check}{conclusion}"
    thinking, stated = (o, q['opposite']) if cot_reverse else (d, q['answer_text'])
    return cot_text(thinking, STEMS[task, thinking], stated, STEMS[task, d], conclusion, answer, prefix=head)


def check_text(answer_text, options, judged=False):
    """'A: o1 = x1, o2 = x2 (no); B: ... (yes)': each option beside the derived answer item by item
    ('nothing' pads the shorter list), so that telling the matching option is a local comparison. judged:
    'A: o1 vs x1 same, o2 vs x2 differ (no); ...', each pair marked before the verdict."""
    items = lambda text: [x.strip() for x in text.split(',')]
    xs, lines = items(answer_text), []
    for letter, o in zip(LETTERS, options):
        ys = items(o)
        pairs = ', '.join(f"{a} vs {b} {'same' if a == b else 'differ'}" if judged else f'{a} = {b}'
                          for a, b in itertools.zip_longest(ys, xs, fillvalue='nothing'))
        lines.append(f"{letter}: {pairs} ({'yes' if ys == xs else 'no'})")
    return '; '.join(lines)


def turns_text(route):
    """'Turns: north to east clockwise, east to north anticlockwise': each turn beside the two headings it comes
    from. No left/right words: reward.py would read them as part of a stated route."""
    hs = [HEADINGS[h] for h in route['headings']]
    return 'Turns: ' + ', '.join(f"{a} to {b} {'clockwise' if t == 'right' else 'anticlockwise'}"
                                 for a, b, t in zip(hs, hs[1:], route['turns']))


def caption_text(route, turns=False):
    """A video's caption: "Headings: north, east. Route: go straight past the orange clock, open the door, go
    straight, turn right, go straight." (every step of route_steps, in the order it happens). turns: the
    turns_text line between the headings and the route."""
    hs = ', '.join(HEADINGS[h] for h in route['headings'])
    mid = f' {turns_text(route)}.' if turns else ''
    return f'Headings: {hs}.{mid} Route: {route_to_text(route_steps(route))}'


def caption_line(route, video, turns=False):
    """One captions.jsonl line (ST-R1 JSONL fields, the caption as both answer and target)."""
    p, c = PREFIX + CAPTION_QUESTION, caption_text(route, turns)
    return json.dumps(dict(problem=p, solution=c, video=video, original_question=p, original_answer=c,
                           task='route', direction='forward'))


def reading_item(rng, segments=(2, 4), seg_len=(2, 4), n_options=4, version=2, judged=False):
    """One text drill: "Which option says the same as: <list>?" over the four MCQ options of a route drawn from
    the prior, answered with the CoT's own Check block ("<think>It says: <list>. Check A: ... (no); B: ...
    (yes); ... So the correct answer is B</think> <answer>B</answer>"; judged: check_text's). Its list is a
    direction, landmark or action answer, at random. Returns (task, direction, q: question/options/answer, solution)."""
    _, qs = make_questions(rng, segments, seg_len, n_options, version)
    task, d = TASKS[1 + int(rng.integers(3))], ('forward', 'reverse')[int(rng.integers(2))]
    text, options, answer = qs[task, d]['answer_text'], qs[task, d]['options'], qs[task, d]['answer']
    sol = (f"<think>It says: {text}. Check {check_text(text, options, judged)}. So the correct answer is {answer}"
           f"</think> <answer>{answer}</answer>")
    return task, d, dict(question=READING_QUESTION.format(text), options=options, answer=answer), sol


def reading_line(item, video):
    """One reading.jsonl line (ST-R1 JSONL fields) of a reading_item; the video's clip only rides along (every
    data.py sample has one): the drill is about the text."""
    task, d, q, sol = item
    p = problem_text(q)
    return json.dumps(dict(problem=p, solution=sol, video=video, original_question=p, original_answer=q['answer'],
                           task=task, direction=d))


def problem_text(q):
    """The ST-R1 problem: the release's prefix, the question, and for an MCQ its options and instruction."""
    if not q['options']:
        return PREFIX + q['question']
    opts = ', '.join(f'{LETTERS[i]}. {o}' for i, o in enumerate(q['options']))
    return PREFIX + q['question'] + ' Options: ' + opts + INSTRUCTION


def make_sample(job):
    """One video: questions, frames, mp4. A job is (split dir, split index, i, settings)."""
    split_dir, split_idx, i, cfg = job
    rng = np.random.default_rng([cfg['seed'], split_idx, i])
    route, qs = make_questions(rng, cfg['segments'], cfg['seg_len'], cfg['n_options'], cfg['version'])
    world = build_world(route)
    times = clip_times(route, world, cfg['frames'], cfg['key_frames'])
    clip = render(route, times, cfg['size'], cfg['theme'], world)
    sid = f"{os.path.basename(split_dir)}_{i:05d}"
    write_mp4(os.path.join(split_dir, 'part1', sid + '.mp4'), clip, cfg['fps'])
    return sid, route, qs


def generate_split(split_dir, split_idx, n, theme='default', segments=(2, 4), pool=None, seed=0, seg_len=(2, 4),
                   n_options=4, frames=16, key_frames=16, size=56, fps=8, cot_opts=None, version=1, cold_start=0):
    """Write one split of n videos, video i from the RNG stream [seed, split_idx, i], in the released benchmark
    layout (data.read_benchmark reads it) plus the ground truth and the ST-R1 training files (their CoT written
    with cot_opts, cot_solution's cot_* flags):

        split_dir/Part1_{forward,reverse}_{qa,mcq,mcq_landmark,mcq_action}.json
        split_dir/part1/<id>.mp4
        split_dir/routes.jsonl                          each video's route, with its steps and theme
        split_dir/st_r1_cot.jsonl, st_r1_nocot.jsonl    8 items a video
        split_dir/captions.jsonl                        version >= 2: one caption a video (caption_line)
        split_dir/reading.jsonl                         version >= 2: one text drill a video (reading_line)
        split_dir/cold_start.jsonl, cold_start_forward.jsonl   cold_start > 0: the CoT lines of videos < cold_start,
                                                        reverse-thinking and forward-only (cot_reverse=False)
        split_dir/rl_mcq.jsonl                          cold_start > 0: the no-CoT MCQ lines of the other videos
    """
    if cold_start > n:
        raise ValueError(f'cold_start={cold_start} > {n} videos in {split_dir}: GRPO would have no questions')
    os.makedirs(os.path.join(split_dir, 'part1'), exist_ok=True)
    cfg = dict(seed=seed, segments=segments, seg_len=seg_len, n_options=n_options, frames=frames,
               key_frames=key_frames, size=size, theme=theme, fps=fps, version=version)
    jobs = [(split_dir, split_idx, i, cfg) for i in range(n)]
    results = pool.imap(make_sample, jobs, chunksize=8) if pool else map(make_sample, jobs)
    files = {(t, d): {} for t in TASKS for d in ('forward', 'reverse')}
    lines = {True: [], False: [], 'meta': [], 'caption': [], 'reading': [], 'cold': [], 'cold_fwd': [], 'rl': []}
    opts = cot_opts or {}
    judged = opts.get('cot_judged', False)           # the drills' Check is written as the CoT's
    turns = opts.get('cot_caption_turns', False)     # and the captions as the CoT's first line
    fwd = dict(opts, cot_reverse=False)              # the cold start's forward-only twin
    for i, (sid, route, qs) in enumerate(results):
        video = sid + '.mp4'
        lines['meta'].append(json.dumps(dict(id=sid, video=video, theme=theme, steps=route_steps(route), **route)))
        lines['caption'].append(caption_line(route, 'part1/' + video, turns))
        if version >= 2:  # its own RNG stream: the videos and questions stay those of [seed, split_idx, i]
            item = reading_item(np.random.default_rng([seed, split_idx, i, 1]), segments, seg_len, n_options, version,
                                judged)
            lines['reading'].append(reading_line(item, 'part1/' + video))
        for (task, d), q in qs.items():
            if task == 'route':
                files[task, d][sid] = {'video': video, 'question': q['question'], f'{d}_answer': q['answer']}
            else:
                mcq = {k: q[k] for k in ('question', 'options', 'answer')}
                files[task, d][sid] = {'video': video, f'{d}_mcq': mcq}
            p = problem_text(q)
            line = lambda solution: json.dumps(dict(problem=p, solution=solution, video='part1/' + video,
                                                    original_question=p, original_answer=q['answer']))
            for cot in (True, False):
                lines[cot].append(line(cot_solution(route, qs, task, d, cot, **opts)))
            if i < cold_start:
                lines['cold'].append(lines[True][-1])
                lines['cold_fwd'].append(line(cot_solution(route, qs, task, d, True, **fwd)))
            elif cold_start and task != 'route':
                lines['rl'].append(lines[False][-1])
    for (task, d), obj in files.items():
        with open(os.path.join(split_dir, f'Part1_{d}_{FILES[task]}.json'), 'w') as fh:
            json.dump(obj, fh, indent=1)
    names = ((True, 'st_r1_cot.jsonl'), (False, 'st_r1_nocot.jsonl'), ('meta', 'routes.jsonl'))
    v2 = (('caption', 'captions.jsonl'), ('reading', 'reading.jsonl')) if version >= 2 else ()
    regime = (('cold', 'cold_start.jsonl'), ('cold_fwd', 'cold_start_forward.jsonl'), ('rl', 'rl_mcq.jsonl'))
    for key, name in names + v2 + (regime if cold_start else ()):
        with open(os.path.join(split_dir, name), 'w') as fh:
            fh.write('\n'.join(lines[key]) + '\n')


def write_contact_sheet(path, n=3, seed=0, segments=(2, 4), ood_segments=(5, 5), ood_theme='dusk',
                        seg_len=(2, 4), n_options=4, frames=16, key_frames=16, size=56, version=1):
    """A PNG: the frames of the first n train videos and the first OOD video, one row each, with the
    segment headings, the forward route and the actions underneath."""
    from PIL import Image, ImageDraw
    pad, cell = 14, size * 2
    rows = [(0, i, 'default', segments) for i in range(n)] + [(2, 0, ood_theme, ood_segments)]
    sheet = Image.new('RGB', (frames * (cell + 2), len(rows) * (cell + pad + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (split_idx, i, theme, segs) in enumerate(rows):
        route, qs = make_questions(np.random.default_rng([seed, split_idx, i]), segs, seg_len, n_options, version)
        world = build_world(route)
        clip = render(route, clip_times(route, world, frames, key_frames), size, theme, world)
        y = r * (cell + pad + 2)
        for c, im in enumerate(clip):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (c * (cell + 2), y))
        text = (f"[{('train', 'test', 'ood')[split_idx]} {i}] " + ', '.join(HEADINGS[h] for h in route['headings'])
                + ' :: ' + qs['route', 'forward']['answer'] + ' :: ' + qs['action', 'forward']['answer_text'])
        draw.text((2, y + cell + 1), text, fill=(0, 0, 0))
    sheet.save(path)

# -----------------------------------------------------------------------------
# the tiny model

def corpus_texts(n, seed=0, segments=(2, 4), seg_len=(2, 4), n_options=4, cot_opts=None, version=1):
    """Every kind of text the model reads or writes over n train videos' questions: prompts
    (data.build_user_text), chat roles, CoT and no-CoT targets (and v2's caption prompt and captions).
    Text only: nothing is rendered."""
    texts, opts = [SYSTEM_PROMPT, 'system\n', 'user\n', 'assistant\n'], cot_opts or {}
    for i in range(n):
        rng = np.random.default_rng([seed, 0, i])
        route, qs = make_questions(rng, segments, seg_len, n_options, version)
        if version >= 2:
            cap = Sample(id=str(i), video='', task='route', direction='forward', question=CAPTION_QUESTION)
            texts += [build_user_text(cap), caption_text(route, opts.get('cot_caption_turns', False))]
            task, d, q, sol = reading_item(np.random.default_rng([seed, 0, i, 1]), segments, seg_len, n_options,
                                           version, opts.get('cot_judged', False))
            drill = Sample(id=str(i), video='', task=task, direction=d, question=q['question'], options=q['options'])
            texts += [build_user_text(drill), sol]
        for (task, d), q in qs.items():
            s = Sample(id=str(i), video='', task=task, direction=d, question=q['question'],
                       options=q['options'], answer=q['answer'], answer_text=q['answer_text'])
            texts += [build_user_text(s), cot_solution(route, qs, task, d, True, **opts),
                      cot_solution(route, qs, task, d, False)]
    return texts


def make_tiny_model(path, vocab_size=1024, key_frames=16, size=56, seed=0, segments=(2, 4), seg_len=(2, 4),
                    n_options=4, cot_opts=None, tiny_corpus=2000, tiny_phrases=True, tiny_hidden=128, tiny_layers=4,
                    tiny_heads=4, tiny_kv_heads=2, tiny_intermediate=512, tiny_init_std=0.06, tiny_tied=False,
                    tiny_embed_std=1.0, tiny_vision_depth=2, tiny_vision_dim=128, tiny_vision_heads=4,
                    family='qwen2_vl', version=1):
    """tokenizer.json (+ chat template, preprocessor config with this world's pixel budget) trained on the text
    of tiny_corpus train videos (corpus_texts), and a random-initialised Qwen2-VL (family 'qwen2_vl'),
    Qwen2.5-VL ('qwen2_5_vl') or Qwen3-VL ('qwen3_vl') of PROBE.md's size on it, in the HF layout. The tiny_*
    arguments are the settings of the same name."""
    qwen3 = family == 'qwen3_vl'
    # Qwen3-VL's 16-pixel patches: frames resized to the next multiple of 32 (56 -> 64), so a frame group
    # is the same 2 x 2 merged tokens as Qwen2-VL's 56 pixels in 14-pixel patches (demo.sh passes the same)
    side = -(-size // 32) * 32 if qwen3 else size
    texts = corpus_texts(tiny_corpus, seed, segments, seg_len, n_options, cot_opts, version)
    settings = VisionSettings(nframes=key_frames, min_pixels=side * side, max_pixels=side * side)
    tok = build_tokenizer(texts, vocab_size, path, settings, phrases=tiny_phrases)
    head_dim, pairs = tiny_hidden // tiny_heads, tiny_hidden // tiny_heads // 2
    # t:h:w pairs: Qwen2-VL's 16:24:24 scaled down, or Qwen3-VL's (interleaved) 24:20:20
    mrope = ([pairs - 2 * (pairs * 5 // 16), pairs * 5 // 16, pairs * 5 // 16] if qwen3 else
             [head_dim // 8, head_dim * 3 // 16, head_dim // 2 - head_dim // 8 - head_dim * 3 // 16])
    # Qwen3-VL: a learned position per patch of the frame (the 8B: 48 x 48 for 768 pixels) and DeepStack from
    # the first vision block (the 8B: blocks 8, 16, 24 of 27)
    qwen3_keys = dict(patch_size=16, head_dim=head_dim, num_position_embeddings=(side // 16) ** 2,
                      deepstack_visual_indexes=[0]) if qwen3 else {}
    cfg = model.ModelConfig(vocab_size=tok.vocab_size, hidden_size=tiny_hidden, intermediate_size=tiny_intermediate,
                            num_hidden_layers=tiny_layers, num_attention_heads=tiny_heads,
                            num_key_value_heads=tiny_kv_heads, mrope_section=mrope, tie_word_embeddings=tiny_tied,
                            max_position_embeddings=4096, vision_depth=tiny_vision_depth,
                            vision_embed_dim=tiny_vision_dim, vision_num_heads=tiny_vision_heads, **tok.model_ids(),
                            # Qwen2.5-VL: its SwiGLU width ratio (3420 / 1280), full attention in the last
                            # block as in the release's every 8th; windows and time base as released
                            model_type=family, vision_intermediate_size=tiny_vision_dim * 8 // 3,
                            fullatt_block_indexes=[tiny_vision_depth - 1], **qwen3_keys)
    if qwen3:
        write_preprocessor_config(path, settings, cfg)  # its patch size and normalisation
    torch.manual_seed(seed)
    m = model.Qwen2VL(cfg)
    for name, p in m.named_parameters():   # the settings' comment above tiny_init_std says why
        if p.dim() >= 2:
            untied_embedding = name == 'embed_tokens.weight' and not tiny_tied
            torch.nn.init.normal_(p, std=tiny_embed_std if untied_embedding else tiny_init_std)
    m.save_pretrained(path)
    n = sum(p.numel() for p in m.parameters())
    print(f'tiny model: {n / 1e6:.2f}M parameters, vocab {tok.vocab_size}, '
          f'frames {side}x{side} x {key_frames} -> {path}')
    return m, tok

# -----------------------------------------------------------------------------
# main: the one reader of the settings

def check_config(size=56, frames=16, key_frames=16, segments=(2, 4), ood_segments=(5, 5), seg_len=(2, 4),
                 ood_theme='dusk', n_options=4, cot_answer_text=True, cot_check=True):
    """Settings that cannot make a valid world fail here, naming the key."""
    bad = [(size % 2, f'size={size}: H.264 needs an even frame side (a multiple of 28 avoids resizing)'),
           (frames < key_frames, f'frames={frames} < key_frames={key_frames}'),
           (min(segments[0], ood_segments[0]) < 2,
            'segments/ood_segments: a route needs at least 2 segments (a turn)'),
           (seg_len[0] < 2, f'seg_len={seg_len}: segments need an inner cell for actions and landmarks'),
           (ood_theme not in THEMES, f'ood_theme={ood_theme!r}: one of {sorted(THEMES)}'),
           (not 2 <= n_options <= 4, f'n_options={n_options}: 2 to 4 (the prompt names letters A-D)'),
           (cot_check and not cot_answer_text,
            'cot_check=True needs cot_answer_text=True (it compares the options with that text)')]
    for failed, msg in bad:
        if failed:
            raise ValueError(msg)


def main():
    from configurator import configure
    configure(globals())
    check_config(size, frames, key_frames, segments, ood_segments, seg_len, ood_theme, n_options,
                 cot_answer_text, cot_check)
    cot_opts = dict(cot_perception=cot_perception, cot_caption=cot_caption, cot_judged=cot_judged,
                    cot_caption_turns=cot_caption_turns, cot_turns=cot_turns, cot_answer_text=cot_answer_text,
                    cot_check=cot_check, cot_reverse=cot_reverse)
    shared = dict(seed=seed, seg_len=seg_len, n_options=n_options, frames=frames, key_frames=key_frames, size=size)
    if generate if generate is not None else not (contact_sheet or make_model):
        splits = [('train', n_train, 'default', segments), ('test', n_test, 'default', segments),
                  ('ood', n_ood, ood_theme, ood_segments), ('ood_theme', n_ood_theme, ood_theme, segments)]
        for name, *_ in splits:
            if os.path.exists(os.path.join(out, name, 'routes.jsonl')):
                raise FileExistsError(f'{os.path.join(out, name)} already holds a split: '
                                      f'pick another --out or delete it')
        t0, total = time.time(), sum(n for _, n, _, _ in splits)
        pool = Pool(workers) if workers > 1 else None
        try:
            for idx, (name, n, theme, segs) in enumerate(splits):
                if n == 0:
                    continue
                generate_split(os.path.join(out, name), idx, n, theme, segs, pool, fps=fps, cot_opts=cot_opts,
                               version=version, cold_start=cold_start if name == 'train' else 0, **shared)
                print(f'{name}: {n} videos -> {os.path.join(out, name)}')
        finally:
            if pool:
                pool.close()
        dt = time.time() - t0
        print(f'{total} videos in {dt:.1f}s ({total / dt:.1f} videos/s, {workers} workers)')
    if contact_sheet:
        write_contact_sheet(contact_sheet, segments=segments, ood_segments=ood_segments, ood_theme=ood_theme,
                            version=version, **shared)
        print(f'contact sheet -> {contact_sheet}')
    if make_model:
        tiny = {k: v for k, v in globals().items() if k.startswith('tiny_')}   # the tiny_* settings by name
        make_tiny_model(make_model, vocab_size=vocab_size, key_frames=key_frames, size=size, seed=seed,
                        segments=segments, seg_len=seg_len, n_options=n_options, cot_opts=cot_opts, family=family,
                        version=version, **tiny)


if __name__ == '__main__':
    main()
