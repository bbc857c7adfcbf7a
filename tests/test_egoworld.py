"""EgoWorld: answers recomputed from the route's geometry, the reverse rule, MCQ construction, text-only
baselines at chance, the renderer's cues, mp4 round trips through data.py, determinism, the tiny model."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import egoworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# -----------------------------------------------------------------------------
# an independent recomputation of every answer from the carved cells (not from the step list)

FLIP = {'left': 'right', 'right': 'left'}
INV = {'open the door': 'close the door', 'climb up the stairs': 'climb down the stairs',
       'climb down the stairs': 'climb up the stairs', 'pick up the box': 'put down the box',
       'pick up the ball': 'put down the ball', 'pick up the book': 'put down the book'}


def expected(route):
    """{(task, direction): text} from cells, landmarks and actions alone."""
    cells = np.array(route['cells'])
    d = np.diff(cells, axis=0)
    corners = [0] + [i for i in range(1, len(d)) if (d[i] != d[i - 1]).any()] + [len(d)]
    segs = [d[a] for a in corners[:-1]]                                 # unit vector of each segment
    # x east, y north: a clockwise (right) turn has a negative cross product
    turns = ['right' if a[0] * b[1] - a[1] * b[0] < 0 else 'left' for a, b in zip(segs, segs[1:])]
    lms = {l['seg']: l['name'] for l in route['landmarks']}
    acts = [a['action'] for a in sorted(route['actions'], key=lambda a: a['seg'])]
    n = len(segs)
    go = lambda s: 'go straight' + (f" past the {lms[s]}" if s in lms else '')
    fwd = [go(0)] + [x for s in range(1, n) for x in (f'turn {turns[s - 1]}', go(s))]
    rev = ['turn around', go(n - 1)] + [x for s in range(n - 2, -1, -1) for x in (f'turn {FLIP[turns[s]]}', go(s))]
    lm_order = [lms[s] for s in range(n) if s in lms]
    return {('route', 'forward'): ', '.join(fwd) + '.', ('route', 'reverse'): ', '.join(rev) + '.',
            ('direction', 'forward'): ', '.join(f'turn {t}' for t in turns),
            ('direction', 'reverse'): ', '.join(['turn around'] + [f'turn {FLIP[t]}' for t in reversed(turns)]),
            ('landmark', 'forward'): ', '.join(lm_order), ('landmark', 'reverse'): ', '.join(lm_order[::-1]),
            ('action', 'forward'): ', '.join(acts), ('action', 'reverse'): ', '.join(INV[a] for a in reversed(acts))}


def questions(n, seed=0, segments=(2, 4)):
    rng = np.random.default_rng(seed)
    return [egoworld.make_questions(rng, segments, (2, 4), 4) for _ in range(n)]


def test_answers_recomputed_from_geometry():
    for route, qs in questions(200) + questions(50, 1, (5, 5)):
        assert egoworld.carve(route['headings'], route['lengths']) == route['cells']
        assert not egoworld.touches(route['cells'])
        want = expected(route)
        for key, q in qs.items():
            assert q['answer_text'] == want[key], key
            other = (key[0], 'reverse' if key[1] == 'forward' else 'forward')
            assert q['opposite'] == want[other]


def test_reverse_twice_and_grammar_round_trip():
    for route, qs in questions(200):
        steps = egoworld.route_steps(route)
        rev = egoworld.reverse_steps(steps)
        assert rev[0] == ('turn', 'around') and egoworld.reverse_steps(rev) == steps
        assert len([s for s in steps if s[0] == 'go']) >= len(route['lengths'])
        for s in (steps, rev, egoworld.moves(steps)):
            assert egoworld.text_to_steps(egoworld.route_to_text(s)) == s
        assert egoworld.route_to_text(egoworld.moves(rev)) == qs['route', 'reverse']['answer']
    for bad in ('go straight past', 'turn back', 'go straightish', 'open the window'):
        with pytest.raises(ValueError, match='bad route step'):
            egoworld.text_to_steps(bad)


def test_actions_split_walks_in_order():
    route = dict(headings=[0, 1], lengths=[3, 2], turns=['right'], cells=egoworld.carve([0, 1], [3, 2]),
                 landmarks=[dict(seg=0, pos=2, side='left', name='white clock'),
                            dict(seg=1, pos=2.5, side='ahead', name='cyan window')],
                 actions=[dict(seg=0, pos=1, action='open the door'), dict(seg=1, pos=1, action='pick up the ball')])
    steps = egoworld.route_steps(route)
    assert egoworld.route_to_text(steps) == (
        'go straight, open the door, go straight past the white clock, turn right, '
        'go straight, pick up the ball, go straight past the cyan window.')
    assert egoworld.route_to_text(egoworld.reverse_steps(steps)) == (
        'turn around, go straight past the cyan window, put down the ball, go straight, turn left, '
        'go straight past the white clock, close the door, go straight.')
    assert egoworld.answer_texts(steps)['route'] == ('go straight past the white clock, turn right, '
                                               'go straight past the cyan window.')


def test_mcq_one_correct_distinct_balanced():
    letters = Counter()
    for route, qs in questions(300):
        for (task, d), q in qs.items():
            if task == 'route':
                assert q['options'] == []
                continue
            assert len(q['options']) == 4 and len(set(q['options'])) == 4
            assert [o == q['answer_text'] for o in q['options']].count(True) == 1
            assert q['options'][egoworld.LETTERS.index(q['answer'])] == q['answer_text']
            letters[q['answer']] += 1
    n = sum(letters.values())
    assert set(letters) == set('ABCD') and all(abs(c / n - 0.25) < 0.03 for c in letters.values()), letters


def _baselines(train, test):
    """Text-only answerers; each maps (question dict) -> option index."""
    prior = Counter(q['answer'] for q in train).most_common(1)[0][0]
    freq = Counter(o for q in train for o in q['options'])
    correct = Counter(q['answer_text'] for q in train)
    often_correct = lambda o: correct[o] / (1 + freq[o])
    same = lambda a, b: sum(x == y for x, y in zip(a.split(', '), b.split(', ')))

    def central(q):  # the option agreeing most, step by step, with the others: catches perturbed copies
        return max(range(4), key=lambda i: sum(same(q['options'][i], o) for o in q['options']))
    rules = {'letter prior': lambda q: egoworld.LETTERS.index(prior),
             'longest': lambda q: max(range(4), key=lambda i: len(q['options'][i])),
             'shortest': lambda q: min(range(4), key=lambda i: len(q['options'][i])),
             'most common option': lambda q: max(range(4), key=lambda i: freq[q['options'][i]]),
             'most often correct': lambda q: max(range(4), key=lambda i: often_correct(q['options'][i])),
             'central': central}
    return {name: np.mean([egoworld.LETTERS[r(q)] == q['answer'] for q in test]) for name, r in rules.items()}


def test_text_only_baselines_at_chance():
    mcq = [q for _, qs in questions(600, seed=7) for (t, _), q in qs.items() if t != 'route']
    accs = _baselines(mcq[:1800], mcq[1800:])    # 1800 questions to fit on, 1800 to score
    assert all(abs(a - 0.25) < 0.045 for a in accs.values()), accs
    # the check has teeth: distractors made by perturbing the answer (one turn flipped) leak
    leaky = []
    for q in mcq:
        if q['answer_text'].count('turn') < 3 or 'turn around' in q['answer_text']:
            continue
        parts = q['answer_text'].split(', ')
        flip = lambda p: 'turn left' if p == 'turn right' else 'turn right'
        flips = [', '.join(p if j != i else flip(p) for j, p in enumerate(parts)) for i in range(len(parts))]
        opts = [q['answer_text']] + flips[:3]
        k = len(leaky) % 4
        opts[0], opts[k] = opts[k], opts[0]
        leaky.append(dict(options=opts, answer=egoworld.LETTERS[k], answer_text=q['answer_text']))
    assert len(leaky) > 100 and _baselines(leaky, leaky)['central'] > 0.6


def test_cot_states_the_opposite_route():
    (route, qs), = questions(1, seed=3)
    for (task, d), q in qs.items():
        sol = egoworld.cot_solution(route, qs, task, d)
        o = 'reverse' if d == 'forward' else 'forward'
        hs = [egoworld.HEADINGS[h] for h in route['headings']]
        turns = [{'clockwise': 'right', 'anticlockwise': 'left'}[t.split()[-1]]
                 for t in sol.split('Turns: ')[1].split('. ')[0].split(', ')]
        assert sol.startswith('<think>Headings: ' + ', '.join(hs) + '. Turns: ' + hs[0] + ' to ' + hs[1] + ' ')
        assert turns == route['turns'] == [t for k, t in egoworld.route_steps(route) if k == 'turn']
        assert (f"Let's start by thinking {o} {egoworld.STEMS[task, o]} {qs[task, o]['answer_text']} "
                f"And then think about {egoworld.STEMS[task, d]} Hence, ") in sol
        assert '[' not in sol and sol.endswith(f"</think> <answer>{q['answer']}</answer>")
        assert egoworld.cot_solution(route, qs, task, d, cot=False) == f"<answer>{q['answer']}</answer>"


def test_check_compares_every_option_item_by_item():
    # hand-written: B is the answer; A is shorter, C longer and different
    options = ['turn right', 'turn right, turn left', 'turn left, turn left, turn right']
    assert egoworld.check_text('turn right, turn left', options) == (
        'A: turn right = turn right, nothing = turn left (no); '
        'B: turn right = turn right, turn left = turn left (yes); '
        'C: turn left = turn right, turn left = turn left, turn right = nothing (no)')
    (route, qs), = questions(1, seed=3)
    for (task, d), q in qs.items():
        sol = egoworld.cot_solution(route, qs, task, d, cot_check=True)
        if task == 'route':
            assert 'Check' not in sol
            continue
        check = sol.split(f"reversing it gives: {q['answer_text']}. Check ")[1].split('. So the correct answer is ')[0]
        verdicts = [line.rsplit('(', 1)[1].rstrip(')') for line in check.split('; ')]
        assert verdicts == ['yes' if L == q['answer'] else 'no' for L in egoworld.LETTERS[:len(q['options'])]]
        assert sol.endswith(f"So the correct answer is {q['answer']}</think> <answer>{q['answer']}</answer>")
    q = qs['direction', 'forward']   # the earlier recipe (README's results): no Check block
    assert egoworld.cot_solution(route, qs, 'direction', 'forward', cot_check=False).endswith(
        f"reversing it gives: {q['answer_text']}, so the correct answer is {q['answer']}"
        f"</think> <answer>{q['answer']}</answer>")
    with pytest.raises(ValueError, match='cot_check=True needs cot_answer_text'):
        egoworld.check_config(cot_check=True, cot_answer_text=False)


def _hand_route():
    """North 3 cells (white clock on the left at cell 1, box at cell 2), turn right, east 3 cells."""
    return dict(headings=[0, 1], lengths=[3, 3], turns=['right'], cells=egoworld.carve([0, 1], [3, 3]),
                landmarks=[dict(seg=0, pos=1, side='left', name='white clock')],
                actions=[dict(seg=0, pos=2, action='pick up the box')])


def test_renderer_shows_heading_landmark_item_and_turn():
    route = _hand_route()
    world = egoworld.build_world(route)
    times = [0.0, 0.5, 1.2, 2.8, 3.5, 4.0, 5.5]     # start, walking x2, box taken, mid-turn, east x2
    img = egoworld.render(route, np.array(times), 56, 'default', world).astype(int)
    red, green, white, box = map(np.array, ([200, 40, 40], [40, 170, 60], [235, 235, 235], egoworld.ITEMS['box']))
    near = lambda px, c, tol=60: np.abs(px - c).max(-1) < tol
    centre = lambda f: img[f, 26:30, 26:30].reshape(-1, 3).mean(0)
    assert near(centre(0) / centre(0).max() * 200, red, 80)          # heading north: the far wall is red
    assert near(centre(5) / centre(5).max() * 170, green, 80)        # heading east after the turn: green
    assert near(img[0, :, :20], white).sum() > 40 and near(img[0, :, 36:], white).sum() == 0   # clock on the left
    assert near(img[2], white).sum() == 0                            # ... and behind once passed
    assert near(img[0, 28:, 20:36], box, 40).sum() > 4               # the box lies ahead on the floor ...
    assert near(img[3, -9:, -10:], box, 10).sum() > 20               # ... and is in the hand once picked up
    assert near(img[0, -9:, -10:], box, 10).sum() == 0
    half = lambda f: (img[f, :, :28].mean(), img[f, :, 28:].mean())
    assert not np.array_equal(img[4], img[3]) and not np.array_equal(img[4], img[5])   # the turn is its own view
    assert half(0) != half(1)                                         # walking changes the view


def test_key_frames_cover_every_segment():
    for route, _ in questions(100) + questions(30, 2, (5, 5)):
        world = egoworld.build_world(route)
        t = egoworld.clip_times(route, world, 32, 16)
        keys = t[np.round(np.linspace(0, 31, 16)).astype(int)]
        assert np.array_equal(keys, egoworld.key_times(route, world, 16))
        for s, T in enumerate(world['T'][:-1]):
            assert ((keys >= T) & (keys <= T + route['lengths'][s])).any()
            if s < len(route['lengths']) - 1:   # a mid-turn view of every turn
                assert ((keys > T + route['lengths'][s]) & (keys < world['T'][s + 1])).any()
    with pytest.raises(ValueError, match='key_frames=4'):
        egoworld.key_times(questions(1, 0, (5, 5))[0][0], egoworld.build_world(questions(1, 0, (5, 5))[0][0]), 4)


def _generate(out, seed=0, n=(3, 2, 2, 2)):
    cmd = [sys.executable, os.path.join(ROOT, 'egoworld.py'), f'--out={out}', f'--seed={seed}', '--workers=1',
           f'--n_train={n[0]}', f'--n_test={n[1]}', f'--n_ood={n[2]}', f'--n_ood_theme={n[3]}']
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)


def test_cli_output_is_deterministic_and_readable(tmp_path):
    data = pytest.importorskip('data')
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    _generate(a)
    _generate(b)
    _generate(c, seed=1, n=(3, 0, 0, 0))
    assert not (c / "test").exists()
    for split in ('train', 'test', 'ood', 'ood_theme'):
        names = sorted(os.listdir(a / split))
        assert names == sorted(os.listdir(b / split))
        for name in names:
            if name.endswith('json') or name.endswith('jsonl'):
                assert (a / split / name).read_text() == (b / split / name).read_text(), name
        for v in sorted(os.listdir(a / split / 'part1')):
            fa = data.load_frames(str(a / split / 'part1' / v), 16)
            assert fa.shape == (16, 56, 56, 3)
            assert np.array_equal(fa, data.load_frames(str(b / split / 'part1' / v), 16))
    assert (a / 'train' / 'routes.jsonl').read_text() != (c / 'train' / 'routes.jsonl').read_text()
    # data.py reads every output with no special case, and both layouts agree
    routes = {json.loads(l)['id']: json.loads(l) for l in (a / 'ood' / 'routes.jsonl').read_text().splitlines()}
    assert all(len(r['lengths']) == 5 and r['theme'] == 'dusk' for r in routes.values())
    theme = [json.loads(l) for l in (a / 'ood_theme' / 'routes.jsonl').read_text().splitlines()]
    assert all(2 <= len(r['lengths']) <= 4 and r['theme'] == 'dusk' for r in theme)   # training lengths, new look
    bench = data.read_benchmark(str(a / 'ood'))
    want = Counter({(t, d): 2 for t in egoworld.TASKS for d in ('forward', 'reverse')})
    assert Counter((s.task, s.direction) for s in bench) == want
    by_key = {(s.id.split('#')[1], s.task, s.direction): s for s in bench}
    for s in bench:
        truth = expected(routes[s.id.split('#')[1]])
        assert s.answer_text == truth[s.task, s.direction]
        assert s.opposite == truth[s.task, 'reverse' if s.direction == 'forward' else 'forward']
    fields = lambda x: (x.video, x.question, x.options, x.answer, x.opposite)
    for name in ('st_r1_cot.jsonl', 'st_r1_nocot.jsonl'):
        items = data.read_st_r1_jsonl(str(a / 'ood' / name))
        assert len(items) == 16
        for s in items:
            t = by_key[os.path.basename(s.video)[:-4], s.task, s.direction]
            assert fields(s) == fields(t)
    # frames on disk are the rendered ones, up to H.264 loss
    sid = sorted(routes)[0]
    r = routes[sid]
    world = egoworld.build_world(r)
    want = egoworld.render(r, egoworld.clip_times(r, world, 16, 16), 56, 'dusk', world).astype(int)
    got = data.load_frames(str(a / 'ood' / 'part1' / f'{sid}.mp4'), 16).astype(int)
    assert np.abs(got - want).mean() < 6


def test_cli_refuses_to_overwrite(tmp_path):
    _generate(tmp_path, n=(1, 0, 0, 0))
    with pytest.raises(subprocess.CalledProcessError) as e:
        _generate(tmp_path, n=(1, 0, 0, 0))
    assert b'already holds a split' in e.value.stderr


def test_tiny_model_runs_on_egoworld(tmp_path):
    torch = pytest.importorskip('torch')
    data = pytest.importorskip('data')
    model = pytest.importorskip('model')
    m, tok = egoworld.make_tiny_model(str(tmp_path / 'tiny'), tiny_corpus=30)
    n = sum(p.numel() for p in m.parameters())
    assert 1.5e6 < n < 5e6 and m.config.vocab_size == tok.vocab_size
    for t in data.SPECIAL_TOKENS:
        assert tok.tk.token_to_id(t) is not None
    loaded = model.Qwen2VL.from_pretrained(str(tmp_path / 'tiny'))
    route, qs = questions(1, seed=4)[0]
    world = egoworld.build_world(route)
    clip = egoworld.render(route, egoworld.clip_times(route, world, 16, 16), 56, 'default', world)
    egoworld.write_mp4(str(tmp_path / 'v.mp4'), clip)
    q = qs['direction', 'reverse']
    s = data.Sample(id='x', video=str(tmp_path / 'v.mp4'), task='direction', direction='reverse',
                    question=q['question'], options=q['options'], answer=q['answer'])
    settings = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    enc = data.encode(s, tok, settings, egoworld.cot_solution(route, qs, 'direction', 'reverse'), loaded.config)
    assert enc['grid_thw'].tolist() == [[8, 4, 4]]                   # 56 px frames reach the model unresized
    assert (enc['input_ids'] == tok.video_pad_id).sum() == 32
    assert tok.decode(enc['input_ids'][enc['labels'] >= 0]).startswith('<think>Headings:')
    b = data.pack([enc])
    with torch.no_grad():
        logits = loaded(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'])
    assert logits.shape == (len(enc['input_ids']), tok.vocab_size) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:-1], b['labels'][1:], ignore_index=-100)
    assert abs(loss.item() - np.log(tok.vocab_size)) < 1.0           # near-uniform start
    # the tiny model's init (egoworld.tiny_init_std): untied input embeddings at std 1, weights at 0.06
    assert not loaded.config.tie_word_embeddings and loaded.lm_head is not None
    assert abs(loaded.embed_tokens.weight.std().item() - egoworld.tiny_embed_std) < 0.05 * egoworld.tiny_embed_std
    for name in ('layers.0.self_attn.q_proj.weight', 'layers.3.mlp.down_proj.weight', 'lm_head.weight'):
        std = dict(loaded.named_parameters())[name].std().item()
        assert abs(std - egoworld.tiny_init_std) < 0.1 * egoworld.tiny_init_std

# -----------------------------------------------------------------------------
# EgoWorld v2 (--version=2): salient perception, same layout and guarantees


def questions_v2(n, seed=0, segments=(2, 4)):
    rng = np.random.default_rng(seed)
    return [egoworld.make_questions(rng, segments, (2, 4), 4, version=2) for _ in range(n)]


def test_v2_answers_exact_landmarks_ahead_and_text_only_at_chance():
    qv = questions_v2(600, seed=7)
    for route, qs in qv[:200] + questions_v2(30, 2, (5, 5)):
        assert route['version'] == 2
        assert all(l['side'] == 'ahead' and l['name'] in egoworld.LANDMARKS_V2 for l in route['landmarks'])
        truth = expected(route)   # recomputed from the carved cells, as for v1
        assert all(qs[k]['answer_text'] == truth[k] for k in truth)
    mcq = [q for _, qs in qv for (t, _), q in qs.items() if t != 'route']
    accs = _baselines(mcq[:1800], mcq[1800:])
    assert all(abs(a - 0.25) < 0.045 for a in accs.values()), accs
    # v1 stays as it was: no version key, side walls used
    v1 = [r for r, _ in questions(100)]
    assert all('version' not in r for r in v1) and any(l['side'] != 'ahead' for r in v1 for l in r['landmarks'])


def test_v2_caption_lists_every_step_in_order():
    (route, qs), = questions_v2(1, seed=5)
    cap = egoworld.caption_text(route)
    hs = ', '.join(egoworld.HEADINGS[h] for h in route['headings'])
    assert cap == f'Headings: {hs}. Route: ' + egoworld.route_to_text(egoworld.route_steps(route))
    steps = egoworld.text_to_steps(cap.split('. Route: ')[1])
    assert ', '.join(v for k, v in steps if k == 'go' and v) == qs['landmark', 'forward']['answer_text']
    assert ', '.join(v for k, v in steps if k == 'do') == qs['action', 'forward']['answer_text']
    assert ', '.join(f'turn {v}' for k, v in steps if k == 'turn') == qs['direction', 'forward']['answer_text']


def test_v2_renderer_landmark_fills_the_view_and_stairs_differ():
    route = dict(headings=[0, 1], lengths=[3, 3], turns=['right'], cells=egoworld.carve([0, 1], [3, 3]), version=2,
                 landmarks=[dict(seg=0, pos=3.5, side='ahead', name='purple banner')],
                 actions=[dict(seg=1, pos=1, action='climb up the stairs')])
    world = egoworld.build_world(route)
    img = egoworld.render(route, np.array([0.0, 2.3, 4.3]), 56, 'default', world).astype(int)
    purple = np.array(egoworld.COLOURS['purple'])
    near = lambda px, c, tol=60: np.abs(px - c).max(-1) < tol
    assert near(img[0], purple).sum() < near(img[1], purple).sum()      # larger as it comes closer ...
    assert near(img[1], purple).sum() > 0.15 * 56 * 56                  # ... and a large part of the key view
    down = dict(route, actions=[dict(seg=1, pos=1, action='climb down the stairs')])
    img_down = egoworld.render(down, np.array([4.3]), 56, 'default', egoworld.build_world(down)).astype(int)
    floor_up, floor_down = img[2, 40:, 20:36].reshape(-1, 3).mean(0), img_down[0, 40:, 20:36].reshape(-1, 3).mean(0)
    assert floor_up[2] < floor_up[0] and floor_down[2] > floor_down[0]   # up: yellow steps; down: blue


def test_v2_split_writes_captions_that_data_reads(tmp_path):
    data = pytest.importorskip('data')
    egoworld.generate_split(str(tmp_path / 's'), 0, 2, version=2)
    caps = data.read_st_r1_jsonl(str(tmp_path / 's' / 'captions.jsonl'))
    routes = [json.loads(l) for l in (tmp_path / 's' / 'routes.jsonl').read_text().splitlines()]
    assert [(c.task, c.direction) for c in caps] == [('route', 'forward')] * 2
    assert [c.solution for c in caps] == [egoworld.caption_text(r) for r in routes]
    assert len(data.read_benchmark(str(tmp_path / 's'))) == 16
    egoworld.generate_split(str(tmp_path / 'v1'), 0, 1)
    assert not (tmp_path / 'v1' / 'captions.jsonl').exists()


def test_cot_caption_starts_the_thought_with_the_caption_and_reads_back():
    reward = pytest.importorskip('reward')
    (route, qs), = questions_v2(1, seed=6)
    for (task, d), q in qs.items():
        sol = egoworld.cot_solution(route, qs, task, d, cot_caption=True)
        plain = egoworld.cot_solution(route, qs, task, d)
        assert sol.startswith('<think>' + egoworld.caption_text(route) + ' Turns: ')
        assert sol.split(' Turns: ', 1)[1] == plain.split(' Turns: ', 1)[1]   # the rest of the thought as before
        m = reward.COT.search(sol)   # what data.parse_st_r1_item reads the opposite ground truth with
        o = 'reverse' if d == 'forward' else 'forward'
        assert m.group(3) == qs[task, o]['answer_text']   # the reader takes the opposite ground truth from it


def test_judged_check_marks_each_pair_and_says_yes_only_for_the_right_option():
    text = egoworld.check_text('turn left, turn right', ['turn left', 'turn left, turn right'], judged=True)
    assert text == ('A: turn left vs turn left same, nothing vs turn right differ (no); '
                    'B: turn left vs turn left same, turn right vs turn right same (yes)')
    assert egoworld.check_text('turn left', ['turn left']) == 'A: turn left = turn left (yes)'   # unjudged: as before


def test_reading_drill_is_text_only_and_answers_with_the_cot_check(tmp_path):
    data = pytest.importorskip('data')
    egoworld.generate_split(str(tmp_path / 's'), 0, 3, version=2, cot_opts=dict(cot_judged=True))
    drills = data.read_st_r1_jsonl(str(tmp_path / 's' / 'reading.jsonl'))
    routes = [json.loads(l) for l in (tmp_path / 's' / 'routes.jsonl').read_text().splitlines()]
    for i, (s, r) in enumerate(zip(drills, routes)):
        # video i's drill comes from its own stream [seed, split, i, 1]: the clip's questions are untouched
        assert s.solution == egoworld.reading_item(np.random.default_rng([0, 0, i, 1]), judged=True)[3]
        stated = s.question.split('says the same as: ')[1].rstrip('?')
        assert s.options[egoworld.LETTERS.index(s.answer)] == stated   # the right option is the stated list
        assert s.solution == (f"<think>It says: {stated}. Check {egoworld.check_text(stated, s.options, True)}. "
                              f"So the correct answer is {s.answer}</think> <answer>{s.answer}</answer>")
        assert s.video.endswith(r['video'])                            # the split's own clip rides along
    assert len({s.solution for s in drills}) == 3
    egoworld.generate_split(str(tmp_path / 'v1'), 0, 3, version=1)
    assert not (tmp_path / 'v1' / 'reading.jsonl').exists()


def test_read_samples_concatenates_comma_separated_files(tmp_path):
    data = pytest.importorskip('data')
    egoworld.generate_split(str(tmp_path / 's'), 0, 2, version=2)
    caps, drills = (str(tmp_path / 's' / f) for f in ('captions.jsonl', 'reading.jsonl'))
    both = data.read_samples(f'{caps},{drills}')
    assert [s.solution for s in both] == [s.solution for s in data.read_samples(caps) + data.read_samples(drills)]
    with pytest.raises(FileNotFoundError, match='nope.jsonl'):   # as for one missing file
        data.read_samples(f'{caps},{tmp_path}/nope.jsonl')


def test_cold_start_split_is_the_first_videos_cot_and_rl_the_others_mcq_labels(tmp_path):
    data = pytest.importorskip('data')
    d = tmp_path / 's'
    egoworld.generate_split(str(d), 0, 3, version=2, cot_opts=dict(cot_judged=True), cold_start=1)
    read = lambda name: (d / name).read_text().splitlines()
    assert read('cold_start.jsonl') == read('st_r1_cot.jsonl')[:8]          # video 0's 8 CoT lines, verbatim
    fwd = [json.loads(l) for l in read('cold_start_forward.jsonl')]
    rev = [json.loads(l) for l in read('cold_start.jsonl')]
    assert [f['problem'] for f in fwd] == [r['problem'] for r in rev]
    for f, r in zip(fwd, rev):  # forward-only: the question's own route is stated, nothing is reversed
        assert 'reversing it gives' in r['solution'] and 'reversing' not in f['solution']
    nocot = [json.loads(l) for l in read('st_r1_nocot.jsonl')]
    want = [json.dumps(x) for x in nocot[8:] if 'Options:' in x['problem']]   # videos 1-2, MCQs only
    assert read('rl_mcq.jsonl') == want and len(want) == 12
    rl = data.read_samples(str(d / 'rl_mcq.jsonl'))
    assert {s.task for s in rl} == {'direction', 'landmark', 'action'} and all('<think>' not in s.solution for s in rl)
    egoworld.generate_split(str(tmp_path / 'plain'), 0, 1, version=2)
    assert not (tmp_path / 'plain' / 'rl_mcq.jsonl').exists()
    with pytest.raises(ValueError, match='cold_start=4 > 3 videos'):
        egoworld.generate_split(str(tmp_path / 'bad'), 0, 3, version=2, cold_start=4)


def test_caption_turns_puts_the_turns_line_before_the_route_in_captions_and_cot(tmp_path):
    route = dict(headings=[0, 1, 0], turns=['right', 'left'], lengths=[2, 2, 2], landmarks=[], actions=[])
    assert egoworld.caption_text(route, turns=True) == (
        'Headings: north, east, north. Turns: north to east clockwise, east to north anticlockwise. '
        'Route: go straight, turn right, go straight, turn left, go straight.')
    (route, qs), = questions_v2(1, seed=6)
    for (task, d) in qs:
        sol = egoworld.cot_solution(route, qs, task, d, cot_caption=True, cot_caption_turns=True)
        plain = egoworld.cot_solution(route, qs, task, d, cot_caption=True)
        assert sol.startswith('<think>' + egoworld.caption_text(route, turns=True) + " Let's start")
        assert sol.count('Turns: ') == 1 and sol.split(" Let's start")[1] == plain.split(" Let's start")[1]
    egoworld.generate_split(str(tmp_path / 's'), 0, 1, version=2, cot_opts=dict(cot_caption=True,
                                                                                    cot_caption_turns=True))
    cap = json.loads((tmp_path / 's' / 'captions.jsonl').read_text())
    route = json.loads((tmp_path / 's' / 'routes.jsonl').read_text())
    assert cap['solution'] == egoworld.caption_text(route, turns=True)
    cot = json.loads((tmp_path / 's' / 'st_r1_cot.jsonl').read_text().splitlines()[0])['solution']
    assert cot.startswith('<think>' + cap['solution'] + ' ')


def test_committed_v2_base_fits_the_world_the_demo_generates(tmp_path):
    """assets/egoworld_v2_base, the default demo's base, was trained on the tokenizer and model shape that
    `egoworld.py --make_model` builds for v2 today: a change to the world's text or to the tiny model's settings
    fails here (rebuild the base: BASE=train bash demo.sh, README), not as a silently worse demo."""
    model = pytest.importorskip('model')
    torch = pytest.importorskip('torch')
    fresh, base = tmp_path / 'tiny', os.path.join(ROOT, 'assets', 'egoworld_v2_base')
    subprocess.run([sys.executable, 'egoworld.py', f'--make_model={fresh}', '--version=2', '--cot_caption=True',
                    '--cot_judged=True'], cwd=ROOT, check=True, capture_output=True)
    for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.json', 'preprocessor_config.json'):
        assert (fresh / name).read_bytes() == open(os.path.join(base, name), 'rb').read(), name
    cfg = {k: v for k, v in json.load(open(os.path.join(base, 'config.json'))).items() if k != 'torch_dtype'}
    assert cfg == {k: v for k, v in json.loads((fresh / 'config.json').read_text()).items() if k != 'torch_dtype'}
    a, b = model.Qwen2VL.from_pretrained(str(fresh)), model.Qwen2VL.from_pretrained(base)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert {k: v.shape for k, v in pa.items()} == {k: v.shape for k, v in pb.items()}
    assert pb['lm_head.weight'].dtype == torch.float32       # stored in bf16, trained and loaded in fp32
    # trained, not the seeded init: every matrix moved
    assert all(not torch.equal(pa[k], pb[k]) for k in pa if pa[k].dim() >= 2)
