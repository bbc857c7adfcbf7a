"""reward.py: strict answer parsing, the format reward, the route language (parse / reverse / render
round trips), route similarity and rubric on hand-computed cases, the reverse-thinking reward,
the weighted total, and adversarial completions (long ones run under a hang guard: catastrophic
regex backtracking would take minutes; the guard is not a speed assertion)."""
import contextlib
import random
import signal
from types import SimpleNamespace

import pytest

import reward
from reward import (DEFAULT_WEIGHTS, accuracy_reward, format_reward, list_items, list_similarity, parse_answer,
                    parse_answer_text, parse_route, parse_think, reverse_route, reverse_thinking_reward,
                    route_reward, route_rubric, route_text, score_completion, total_reward)


@contextlib.contextmanager
def hang_guard(seconds=30):
    def fail(*_):
        raise TimeoutError(f"took more than {seconds}s: super-linear behaviour")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def wrap(answer, think='reasoning'):
    return f'<think>{think}</think><answer>{answer}</answer>'

# -----------------------------------------------------------------------------
# parse_answer


@pytest.mark.parametrize('content,letter', [
    ('B', 'B'), ('B.', 'B'), ('(B)', 'B'), ('(B).', 'B'), ('B)', 'B'), ('B:', 'B'), ('  B \n', 'B'),
    ('B. Turn left at the red door', 'B'), ('(C) glass window mural', 'C'), ('D)\nsecond line', 'D'),
    ('A', 'A'),
])
def test_parse_answer_accepts(content, letter):
    assert parse_answer(wrap(content)) == letter


@pytest.mark.parametrize('content', [
    'Based on the video, B', 'A lot of turns', 'A or B', 'AB', 'b', 'b.', '**B**', 'The answer is B', 'B C',
    'E', 'Bx', 'B.C', '(B', 'B text without delimiter', '', '   ', 'Option B', '1',
])
def test_parse_answer_rejects(content):
    assert parse_answer(wrap(content)) is None


@pytest.mark.parametrize('text,letter', [
    ('no tags at all, B', None),
    ('<think>x</think>B', None),
    ('<think>x</think><answer>B', None),                                   # unclosed
    ('<think>x</think>B</answer>', None),                                  # no opening tag
    ('<answer><answer>B</answer></answer>', None),                         # nested
    ('<answer>A</answer><answer>C</answer>', 'C'),                         # last complete block
    ('<answer>A</answer> then <answer>C', None),                           # revising when cut off
    ('<think>Use <answer> answer here </answer>. Probably B.</think><answer>B</answer>', 'B'),
    ('<think>maybe <answer>A</answer></think> <answer>D.</answer>', 'D'),
    ('<ANSWER>B</ANSWER>', None),                                          # tags are lower-case
    ('<answer> A </answer>\n', 'A'),
])
def test_parse_answer_blocks(text, letter):
    assert parse_answer(text) == letter


def test_parse_answer_letters_and_text():
    assert parse_answer(wrap('E')) is None and parse_answer(wrap('E'), letters='ABCDE') == 'E'
    assert parse_answer_text(wrap('  Turn left, go straight.  ')) == 'Turn left, go straight.'
    assert parse_answer_text(wrap('   ')) is None and parse_answer_text('<answer>x') is None
    assert parse_think('<think> a </think><think>b</think>') == ' a '
    assert parse_think('<think> a') is None


def test_accuracy_reward():
    assert accuracy_reward(wrap('B. the fireplace'), 'B') == 1.0
    assert accuracy_reward(wrap('Based on it, A'), 'B') == 0.0   # the released reward's hole: "B"ased
    assert accuracy_reward(wrap('A'), 'B') == 0.0
    assert accuracy_reward('B', 'B') == 0.0                       # no tags, no answer
    with pytest.raises(ValueError, match='answer_letter'):
        accuracy_reward(wrap('A'), 'Z')
    with pytest.raises(ValueError, match='answer_letter'):
        accuracy_reward(wrap('A'), '')
    # a reference of two letters is bad ground truth, not a letter of 'ABCD' that no answer can match
    for bad in ('AB', 'BCD', ' AB '):
        with pytest.raises(ValueError, match='answer_letter'):
            accuracy_reward(wrap('A'), bad)

# -----------------------------------------------------------------------------
# format_reward


@pytest.mark.parametrize('text,expected', [
    ('<think>r</think><answer>A</answer>', 1.0),
    ('  \n<think> r\n r </think>\n\n <answer> A </answer>  \n', 1.0),
    ('<think>r</think> x <answer>A</answer>', 0.0),           # text between the blocks
    ('Sure! <think>r</think><answer>A</answer>', 0.0),         # text before
    ('<think>r</think><answer>A</answer> done', 0.0),          # text after
    ('<think>r</think><think>r</think><answer>A</answer>', 0.0),
    ('<think>r</think><answer>A</answer><answer>B</answer>', 0.0),
    ('<think>r<think>r</think></think><answer>A</answer>', 0.0),  # nested
    ('<think>r</think><answer>A', 0.0),                       # unclosed
    ('<think>r<answer>A</answer>', 0.0),
    ('<answer>A</answer><think>r</think>', 0.0),               # wrong order
    ('<think>   </think><answer>A</answer>', 0.0),             # blank think
    ('<think>r</think><answer> </answer>', 0.0),               # blank answer
    ('<answer>A</answer>', 0.0),
    ('', 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected

# -----------------------------------------------------------------------------
# route language

EXAMPLE = "Go straight past the red door, turn left, go straight, turn right and open the blue door."
EXAMPLE_STEPS = [('move', 'straight'), ('landmark', 'red door'), ('turn', 'left'), ('move', 'straight'),
                 ('turn', 'right'), ('action', 'open blue door')]


def test_parse_route_example_and_render():
    assert parse_route(EXAMPLE) == EXAMPLE_STEPS
    assert route_text(EXAMPLE_STEPS) == ("Go straight past the red door, turn left, go straight, turn right, "
                                         "open the blue door.")
    # reverse: turn around, undo the last action first, swap the turns, then walk back past the door
    assert reverse_route(EXAMPLE_STEPS) == [
        ('turn', 'around'), ('action', 'close blue door'), ('turn', 'left'), ('move', 'straight'),
        ('turn', 'right'), ('landmark', 'red door'), ('move', 'straight')]


@pytest.mark.parametrize('text,steps', [
    # the released options run steps together with no separators
    ("Turn back go straight turn left straight ahead turn left go to the glass window",
     [('turn', 'around'), ('move', 'straight'), ('turn', 'left'), ('move', 'straight'), ('turn', 'left'),
      ('landmark', 'glass window')]),
    ("Take a right continue forward.", [('turn', 'right'), ('move', 'straight')]),
    ("Head back, then make a U-turn and bear left", [('turn', 'around'), ('turn', 'around'), ('turn', 'left')]),
    ("spin around, backtrack, circle back past the fountain", [('turn', 'around')] * 3 + [('landmark', 'fountain')]),
    # where a landmark is, not a turn; "right away" is not a turn; "turn to the left" is
    ("Walk past the red door on your left, then turn to the left right away",
     [('landmark', 'red door'), ('turn', 'left')]),
    ("You left the kitchen, climbed the stairs, pick the key up and put it down",
     [('action', 'exit kitchen'), ('action', 'climb up stairs'), ('action', 'pick up key'), ('action', 'put down')]),
    ("Go downstairs, turn on the lamp, go up the ramp, descend the ladder",
     [('action', 'climb down stairs'), ('action', 'switch on lamp'), ('action', 'climb up ramp'),
      ('action', 'climb down ladder')]),
    ("Walk straight for a few steps, then go straight again until the end of the corridor",
     [('move', 'straight'), ('landmark', 'corridor')]),
    ("turn right at the mural, follow the couch", [('turn', 'right'), ('landmark', 'mural'), ('landmark', 'couch')]),
])
def test_parse_route_phrasings(text, steps):
    assert parse_route(text) == steps


@pytest.mark.parametrize('stem', [
    "Let's start by thinking forward what directions do you need to go through to get to your destination?",
    ("And then think about what directions do you need to go through to get to starting point ? "
     "Hence, the correct answer is A"),
    ("Let's start by thinking reverse which landmarks (objects or scenery changes) did you pass by "
     "to return to the starting point?"),
    "which landmarks (objects or scenery changes) did you pass by to reach your destination?",
    "which actions did you perform to return to the starting point?",
    "Please take a egocentric view to understand the following questions. Based on this video,",
])
def test_cot_template_stems_parse_to_nothing(stem):
    assert parse_route(stem) == []


_COLOURS = ['red', 'green', 'blue', 'yellow', 'white', 'striped']
_OBJECTS = ['door', 'lamp', 'pillar', 'plant', 'box', 'window']
_ACTIONS = ['open', 'close', 'pick up', 'put down', 'climb up', 'climb down', 'enter', 'exit', 'switch on',
            'switch off', 'press', 'push', 'pull']


def _random_route(rng):
    steps = []
    for _ in range(rng.randint(0, 10)):
        kind = rng.choice(['move', 'turn', 'turn', 'landmark', 'action'])
        if kind == 'move':
            if steps and steps[-1] == ('move', 'straight'):
                continue  # canonical: moves never adjacent
            steps.append(('move', 'straight'))
        elif kind == 'turn':
            steps.append(('turn', rng.choice(['left', 'right', 'around'])))
            if steps[:2] == [('turn', 'around')] * 2:
                steps.pop()  # canonical: no leading no-op pair of turn-arounds
        elif kind == 'landmark':
            steps.append(('landmark', f'{rng.choice(_COLOURS)} {rng.choice(_OBJECTS)}'))
        else:
            obj = rng.choice(['', f'{rng.choice(_COLOURS)} {rng.choice(_OBJECTS)}', rng.choice(_OBJECTS)])
            steps.append(('action', f'{rng.choice(_ACTIONS)} {obj}'.strip()))
    while len(steps) > 1 and steps[-1] == ('turn', 'around'):
        steps.pop()  # canonical: no trailing turn-around
    return steps


def test_round_trips_on_random_routes():
    rng = random.Random(0)
    for _ in range(500):
        s = _random_route(rng)
        assert parse_route(route_text(s)) == s, route_text(s)
        assert reverse_route(reverse_route(s)) == s, s
        r = reverse_route(s)
        assert parse_route(route_text(r)) == r
        # left/right swap: the reverse has as many lefts as the route has rights
        assert sum(x == ('turn', 'left') for x in r) == sum(x == ('turn', 'right') for x in s)


def test_reverse_route_turn_around_convention():
    fwd = [('move', 'straight'), ('turn', 'left')]
    rev = reverse_route(fwd)
    assert rev == [('turn', 'around'), ('turn', 'right'), ('move', 'straight')]
    assert reverse_route(rev) == fwd                          # the leading turn-around toggles
    assert reverse_route(fwd + [('turn', 'around')]) == rev   # a trailing one carries no information
    assert reverse_route([]) == [('turn', 'around')] and reverse_route([('turn', 'around')]) == []
    with pytest.raises(ValueError, match='bad step'):
        reverse_route([('jump', 'high')])
    with pytest.raises(ValueError, match='unknown action'):
        reverse_route([('action', 'dance wildly')])

# -----------------------------------------------------------------------------
# route_reward and route_rubric


def test_route_reward_hand_computed():
    # ref: directions [S, L, S, R]; landmarks [red door, blue door (action object)]; actions [open blue door]
    # pred swaps the first turn: direction 1 - 1/4 = .75, landmarks recall 1 and order 1, action 1
    # -> .5 * .75 + .3 * 1 + .2 * 1 = .875
    pred = "Go straight past the red door, turn right, go straight, turn right, open the blue door"
    assert route_reward(pred, EXAMPLE) == pytest.approx(0.875)
    # rubric: direction round(5 * .75 = 3.75) = 4; landmark 5 (all found);
    # logic: 6 steps, 1 substitution -> 5 * 5/6 = 4.17 -> 4; score 13/3
    assert route_rubric(pred, EXAMPLE) == {'direction': 4, 'landmark': 5, 'logic': 4, 'score': pytest.approx(13 / 3)}
    assert route_reward(EXAMPLE, EXAMPLE) == 1.0
    assert route_rubric(EXAMPLE, EXAMPLE) == {'direction': 5, 'landmark': 5, 'logic': 5, 'score': 5.0}


def test_route_reward_landmarks_recall_order_and_extras():
    ref = "Walk past the fountain and the bronze statue, then reach the fireplace."
    # no direction or action part: landmark only. pred has all three ("statue" ~ "bronze statue":
    # Jaccard 1/2) in reverse order: only the middle one aligns, 2 edits of 3 -> 1/3
    pred = "Pass the fireplace, the statue, the fountain"
    assert route_reward(pred, ref) == pytest.approx(1 / 3)
    # an extra landmark costs one edit of 4 (a reward must not pay for listing more); a repeated list half;
    # a different colour is a different place
    assert route_reward(ref + " Then past the green lamp.", ref) == pytest.approx(3 / 4)
    assert route_reward(ref + " " + ref, ref) == pytest.approx(1 / 2)
    assert route_reward("Go straight past the blue door", "Go straight past the red door") == pytest.approx(0.5 / 0.8)
    # rubric: missing landmarks cost, extra ones do not; extra turns cost
    r = route_rubric("Pass the fountain, turn left, pass the fireplace", ref)
    assert r['landmark'] == 3 and r['direction'] == 0   # 2/3 -> 3.33 -> 3; a turn not in the reference


def test_route_reward_empty_and_bad_reference():
    assert route_reward(None, EXAMPLE) == 0.0
    assert route_reward('I do not know.', EXAMPLE) == 0.0
    assert route_rubric('', EXAMPLE) == {'direction': 0, 'landmark': 0, 'logic': 0, 'score': 0.0}
    with pytest.raises(ValueError, match='no parseable step'):
        route_reward(EXAMPLE, 'Return to the starting point.')


def test_list_items_and_similarity():
    assert list_items("['fireplace', 'couch', 'glass windows']") == [['fireplace'], ['couch'], ['glass', 'window']]
    # without separators it is one item: a multi-word landmark ("toy birdhouse") must not be split up
    assert list_items("glass window mural fireplace") == [['glass', 'window', 'mural', 'fireplace']]
    # word-level edit similarity: a missing item costs, and so do wrong order, extra and repeated items
    ref = list_items("fireplace, couch, mural")
    assert list_similarity(list_items("fireplace, couch"), ref) == pytest.approx(2 / 3)
    assert list_similarity(list_items("fireplace, mural"), list_items("mural, couch, fireplace")) == 0.0
    assert list_similarity(list_items("fireplace, couch, mural, fireplace, couch, mural"), ref) == pytest.approx(0.5)
    assert list_similarity(list_items("fireplace, couch, mural, lamp, rug, sofa"), ref) == pytest.approx(0.5)

# -----------------------------------------------------------------------------
# reverse_thinking_reward

STEM_F = "what directions do you need to go through to get to your destination?"
STEM_R = "what directions do you need to go through to get to starting point ?"
FWD = "Go straight, turn left, go straight past the red door, turn right."
REV = "Turn around, turn left, go straight past the red door, turn right, go straight."
OPTS_REV = [REV, "Turn around, turn right, go straight past the red door, turn left, go straight.", FWD,
            "Turn around, go straight past the blue door, turn left."]
OPTS_FWD = [FWD, "Go straight, turn right, go straight past the red door, turn left.", REV,
            "Go straight past the blue door, turn left."]


def cot(opposite_route, letter, first='forward', stems=(STEM_F, STEM_R)):
    return (f"<think>Let's start by thinking {first} {stems[0]} {opposite_route} And then think about {stems[1]} "
            f"Hence, the correct answer is {letter}</think> <answer>{letter}</answer>")


def test_reverse_thinking_direction_mcq_hand_computed():
    # the reverse question; the thought states the forward route exactly: s = 1; reversing it gives
    # option A exactly (similarity 1); B and C score .75 (two turns wrong / no turn-around), D less
    assert reverse_thinking_reward(cot(FWD, 'A'), 'reverse', FWD, OPTS_REV) == 1.0
    assert reverse_thinking_reward(cot(FWD, 'B'), 'reverse', FWD, OPTS_REV) == 0.5     # s (1 + 0) / 2
    # a wrong statement (first turn right): directions [S,R,S,R] vs [S,L,S,R] -> .75, landmark 1
    # -> s = (.5 * .75 + .3) / .8 = .84375; its reverse ties A and B (.875 each) -> c = 0
    wrong = "Go straight, turn right, go straight past the red door, turn right."
    assert reverse_thinking_reward(cot(wrong, 'A'), 'reverse', FWD, OPTS_REV) == pytest.approx(0.84375 / 2)
    # no think, or a think that states nothing: 0, whatever the answer
    assert reverse_thinking_reward('<answer>A</answer>', 'reverse', FWD, OPTS_REV) == 0.0
    assert reverse_thinking_reward(wrap('A', 'I am sure it is A.'), 'reverse', FWD, OPTS_REV) == 0.0
    # the route after "Hence" is not the statement
    assert reverse_thinking_reward(wrap('A', f'Hence {FWD}'), 'reverse', FWD, OPTS_REV) == 0.0
    # chosen given explicitly instead of parsed
    assert reverse_thinking_reward(cot(FWD, 'B'), 'reverse', FWD, OPTS_REV, chosen='A') == 1.0


def test_reverse_thinking_forward_question_normalises_turn_around():
    # the forward question; the thought states the reverse route; reversing drops the turn-around
    assert reverse_thinking_reward(cot(REV, 'A', 'reverse', (STEM_R, STEM_F)), 'forward', REV, OPTS_FWD) == 1.0
    # a stated reverse route that forgets "turn around": s < 1 (direction 4/5 -> (.4 + .3) / .8),
    # but the answer derived from it is still option A (the forward answer never starts with one)
    no_around = "Turn left, go straight past the red door, turn right, go straight."
    got = reverse_thinking_reward(cot(no_around, 'A', 'reverse', (STEM_R, STEM_F)), 'forward', REV, OPTS_FWD)
    assert got == pytest.approx(0.875)


def test_reverse_thinking_landmark_list():
    stem = "which landmarks (objects or scenery changes) did you pass by to reach your destination?"
    opts = ["mural couch fireplace", "fireplace couch mural", "glass window lounge"]
    think = f"Let's start by thinking forward {stem}['fireplace', 'couch', 'mural'] And then think about it."
    assert reverse_thinking_reward(wrap('A', think), 'reverse', 'fireplace, couch, mural', opts, task='landmark') == 1.0
    assert reverse_thinking_reward(wrap('B', think), 'reverse', 'fireplace, couch, mural', opts, task='landmark') == 0.5
    # one landmark missing: s = 1 - 1/3; reversed [mural, fireplace] is closest to A (2/3) over B (0) -> c = 1
    think = f"{stem} fireplace, mural. Hence A"
    got = reverse_thinking_reward(wrap('A', think), 'reverse', 'fireplace, couch, mural', opts, task='landmark')
    assert got == pytest.approx(2 / 3)


def test_reverse_thinking_subset_option_does_not_tie():
    # option C lists part of the derived list: 2 of its 4 words missing, .5 < 1 for B; the headings before
    # the template are perception notes, not part of the statement
    opts = ['black banner, orange banner', 'black painting, orange painting', 'black painting', 'white clock']
    stem = "which landmarks (objects or scenery changes) did you pass by to reach your destination?"
    think = (f"Headings: south, west. Let's start by thinking forward {stem} orange painting, black painting "
             f"And then think about {stem} Hence")
    for letter, expected in (('B', 1.0), ('C', 0.5)):
        got = reverse_thinking_reward(wrap(letter, think), 'reverse', 'orange painting, black painting', opts,
                                      task='landmark')
        assert got == expected


def test_reverse_thinking_route_task():
    # open-ended reverse question: c is the similarity of the answer to the reversed statement
    good = f"<think>Forward: {FWD} Hence the reverse.</think><answer>{REV}</answer>"
    assert reverse_thinking_reward(good, 'reverse', FWD, []) == 1.0
    # the answer swaps both turns: directions [A,R,S,L,S] vs [A,L,S,R,S] -> .6, landmark 1 ->
    # c = (.3 + .3) / .8 = .75, reward = (1 + .75) / 2
    bad = good.replace(REV, OPTS_REV[1])
    assert reverse_thinking_reward(bad, 'reverse', FWD, []) == pytest.approx(0.875)
    assert reverse_thinking_reward(good.replace(REV, ''), 'reverse', FWD, []) == 0.5  # no answer: c = 0
    # open forward question, statement forgets the reverse route's "turn around": s = .875 as above;
    # its reversal gets no leading turn-around (a forward answer never starts with one) -> c = 1
    no_around = "Turn left, go straight past the red door, turn right, go straight."
    comp = f"<think>Reverse: {no_around} Hence the forward route.</think><answer>{FWD}</answer>"
    assert reverse_thinking_reward(comp, 'forward', REV, []) == pytest.approx(0.875)


def test_reverse_thinking_bad_input():
    with pytest.raises(ValueError, match='sample_direction'):
        reverse_thinking_reward(cot(FWD, 'A'), 'backwards', FWD, OPTS_REV)
    with pytest.raises(ValueError, match='opposite_text'):
        reverse_thinking_reward(cot(FWD, 'A'), 'reverse', '', OPTS_REV)
    with pytest.raises(ValueError, match='no parseable step'):
        reverse_thinking_reward(cot(FWD, 'A'), 'reverse', 'the the', OPTS_REV)
    with pytest.raises(ValueError, match='needs options'):
        reverse_thinking_reward(cot(FWD, 'A'), 'reverse', FWD, [], task='direction')

# -----------------------------------------------------------------------------
# totals


def _sample(**kw):
    base = dict(id='s1', source='Part1_reverse_mcq.json#s1', task='direction', direction='reverse',
                question='q', options=OPTS_REV, answer='A', answer_text=REV, opposite=FWD, solution=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_score_completion_mcq_route_and_weights():
    out = score_completion(cot(FWD, 'A'), _sample())
    assert out == {'format': 1.0, 'accuracy': 1.0, 'route': None, 'reverse': 1.0, 'total': 2.0}  # 1 + .5 + .5
    w = {'accuracy': 1.0, 'format': 0.0, 'reverse': 2.0, 'route': 1.0}
    assert score_completion(cot(FWD, 'B'), _sample(), w) == {
        'format': 1.0, 'accuracy': 0.0, 'route': None, 'reverse': 0.5, 'total': 1.0}
    # unpaired sample: reverse does not apply
    assert score_completion(cot(FWD, 'A'), _sample(opposite=None))['reverse'] is None
    # route task: accuracy does not apply; route = 1, reverse = 1, format = 1
    good = f"<think>Forward: {FWD}</think><answer>{REV}</answer>"
    out = score_completion(good, _sample(task='route', options=[], answer=REV))
    assert out == {'format': 1.0, 'accuracy': None, 'route': 1.0, 'reverse': 1.0, 'total': 2.0}
    assert DEFAULT_WEIGHTS == {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}


def test_total_and_sample_errors_name_the_sample():
    assert total_reward({'accuracy': 1.0, 'format': 0.0, 'route': None}, {'accuracy': 2.0, 'route': 5.0}) == 2.0
    with pytest.raises(KeyError, match='acuracy'):
        total_reward({'accuracy': 1.0}, {'acuracy': 1.0})
    with pytest.raises(ValueError, match='Part1_reverse_mcq.json#s1'):
        score_completion(cot(FWD, 'A'), _sample(answer='Q'))
    with pytest.raises(ValueError, match='Part1_reverse_mcq.json#s1'):
        score_completion(cot(FWD, 'A'), _sample(task='route', options=[], answer='Return to the start.'))
    with pytest.raises(ValueError, match='task'):
        score_completion(cot(FWD, 'A'), _sample(task='counting'))

# -----------------------------------------------------------------------------
# adversarial long completions (100k characters)


def test_long_adversarial_completions():
    n = 100_000
    with hang_guard():
        assert parse_answer('<answer>' * (n // 8)) is None
        assert format_reward('<answer>' * (n // 8)) == 0.0
        assert parse_answer('<answer>' + 'A' * n + '</answer>') is None
        assert parse_answer('<answer>B. ' + 'x ' * (n // 2) + '</answer>') == 'B'
        assert parse_answer('<think>' * (n // 7) + '<answer>C</answer>') == 'C'
        assert format_reward('<think>' + 'a' * n + '</think><answer>A</answer>') == 1.0
        assert format_reward('<think>' + '<think>' * (n // 7) + '</think><answer>A</answer>') == 0.0
        assert parse_answer(wrap('(' * n)) is None and parse_answer(wrap('A' + '.' * n)) is None
        long_route = 'turn left past the red door, ' * (n // 29)
        assert len(parse_route(long_route)) == 256                       # MAX_ROUTE_STEPS
        assert len(parse_route(long_route, max_steps=10 ** 6)) == 2 * (n // 29)
        assert 0.0 <= route_reward(long_route, EXAMPLE) < 0.5
        assert route_rubric(long_route, EXAMPLE)['direction'] == 0
        junk = ' '.join(['the'] * (n // 4))
        assert parse_route(junk) == []
        comp = f'<think>{long_route}</think><answer>A</answer>'
        assert 0.0 <= reverse_thinking_reward(comp, 'reverse', FWD, OPTS_REV) < 0.5
        comp = f'<think>{long_route}</think><answer>{long_route}</answer>'   # route task: answer vs statement
        assert 0.0 <= reverse_thinking_reward(comp, 'reverse', FWD, []) < 0.5
        comp = f"<think>{'fireplace, ' * (n // 11)}</think><answer>A</answer>"
        assert 0 < reverse_thinking_reward(comp, 'reverse', 'fireplace, couch', ['couch fireplace', 'lamp'],
                                           task='landmark') <= 1
        assert score_completion('Based ' * (n // 6), _sample()) == {
            'format': 0.0, 'accuracy': 0.0, 'route': None, 'reverse': 0.0, 'total': 0.0}

# -----------------------------------------------------------------------------
# reward integrity: adversarial thoughts on real EgoWorld questions

def egoworld_mcqs(n=150, seed=123):
    """(question dict, its reverse-thinking CoT writer) for n EgoWorld videos' six MCQs."""
    import numpy as np
    import egoworld
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        _, qs = egoworld.make_questions(rng)
        for (task, d), q in qs.items():
            if task != 'route':
                o = 'reverse' if d == 'forward' else 'forward'
                write = (lambda text, d=d, o=o, task=task, q=q: reward.cot_text(
                    o, egoworld.STEMS[task, o], text, egoworld.STEMS[task, d], f"the correct answer is {q['answer']}",
                    q['answer']))
                out.append((task, d, q, write))
    return out


def reverse_reward(task, d, q, completion):
    return reward.reverse_thinking_reward(completion, d, q['opposite'], q['options'], task=task)


def similarity(task, stated, truth):
    """What a stated opposite route is worth at best (the reward is s * (1 + c) / 2 <= s)."""
    if task == 'landmark':
        return reward.list_similarity(reward.list_items(stated), reward.list_items(truth))
    return reward.route_similarity(reward.parse_route(stated), reward.parse_route(truth))


def items(text):
    return [x.strip() for x in text.split(',')]


FILLER = {'direction': 'turn left', 'landmark': 'grey statue', 'action': 'press the grey button'}  # wrong items
# each adversary: (name, thought text from the question, the bound on its mean, the bound on any one question)
ADVERSARIES = [
    ('copy every option', lambda q: ', '.join(q['options']), 0.15, 0.5),
    ('every option, then every option reversed',
     lambda q: ', '.join(q['options'] + [', '.join(items(o)[::-1]) for o in q['options']]), 0.1, 0.3),
    ('the right list three times', lambda q: ', '.join([q['opposite']] * 3), 1 / 3, 1 / 3),
]


@pytest.mark.parametrize('name,make,mean_bound,max_bound', ADVERSARIES, ids=[a[0] for a in ADVERSARIES])
def test_reverse_reward_does_not_pay_for_copying(name, make, mean_bound, max_bound):
    """Listing more than the route (every option, every option reversed, the right list repeated) is bounded
    on ~900 real EgoWorld MCQs, and never earns more than the right statement padded with as many wrong
    items as the adversary adds is worth at best (the similarity counts edits, not what was copied); the
    honest thought scores 1. (Recall-only similarity paid ~0.55 on average for a copy of the landmark options.)"""
    got = []
    for task, d, q, write in egoworld_mcqs():
        adv = reverse_reward(task, d, q, write(make(q)))
        honest = reverse_reward(task, d, q, write(q['opposite']))
        extra = max(0, len(items(make(q))) - len(items(q['opposite'])))
        padded = similarity(task, ', '.join(items(q['opposite']) + [FILLER[task]] * extra), q['opposite'])
        assert honest == 1.0 and adv <= max_bound + 1e-9 and adv <= padded + 1e-9, (name, task, q, adv, padded)
        got.append(adv)
    assert sum(got) / len(got) <= mean_bound, (name, sum(got) / len(got))


def test_reverse_reward_needs_a_statement_from_the_video():
    """The question restated, an empty thought, and a thought without the template's statement earn 0;
    another video's route (a guess from the prior, not from this video) earns far less than the truth."""
    qs = egoworld_mcqs()
    others = [reverse_reward(task, d, q, write(qs[(i + 7) % len(qs)][2]['opposite']))
              for i, (task, d, q, write) in enumerate(qs) if qs[(i + 7) % len(qs)][0] == task]
    assert sum(others) / len(others) < 0.4
    for task, d, q, _ in qs:
        letter = q['answer']
        for thought in (q['question'], '', f"{q['question']} {q['question']}"):
            assert reverse_reward(task, d, q, f'<think>{thought}</think> <answer>{letter}</answer>') == 0.0
