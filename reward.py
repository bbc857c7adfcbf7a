"""
Rewards and answer scoring for ST-R1: pure functions shared by grpo.py (the GRPO rewards) and bench.py
(accuracy, parse-failure rate, route rubric). No model, no I/O, no torch.

- answers: parse_answer reads the option letter of the last <answer> block strictly; parse_answer_text,
  parse_think; format_reward and accuracy_reward score them
- routes: parse_route reads route English into (kind, value) steps, reverse_route walks them back,
  route_text renders them; route_reward scores a route in [0, 1] and route_rubric gives the paper's
  0-5 rubric, made deterministic
- reverse_thinking_reward: the paper's reverse thinking made a reward
- score_completion: every component for one completion and their weighted total

    parse_answer('<think>...</think><answer>B. the red door</answer>')  # 'B'
    route_rubric(pred_text, ref_text)     # {'direction': 4, 'landmark': 5, 'logic': 4, 'score': 4.33}
    score_completion(text, sample, DEFAULT_WEIGHTS)  # {'format', 'accuracy', 'route', 'reverse', 'total'}

Deliberately left out: an LLM judge (the paper's GPT-4o), synonyms beyond the keyword lists, distances or
step counts ("walk 10 m"), part-of-speech tagging, and length or repetition penalties.
"""
import math
import re

# -----------------------------------------------------------------------------
# Reward weights: the names grpo.py's config uses. accuracy/route carry the task signal; format and
# reverse are shaping terms at half weight: a wrong MCQ answer earns at most 0.5 (format) + 0.5 * s
# with s < 1 (a fully right statement reversed picks the right option), so it stays below a correct
# answer alone (1.0).
DEFAULT_WEIGHTS = {'accuracy': 1.0, 'format': 0.5, 'reverse': 0.5, 'route': 1.0}
# Route similarity parts (route_parts): the direction sequence is what the task is about, landmarks anchor
# it, actions are rare. route_similarity renormalises over the parts the reference has.
ROUTE_WEIGHTS = {'direction': 0.5, 'landmark': 0.3, 'action': 0.2}
LANDMARK_MATCH = 0.5  # Jaccard threshold for two landmark names to be the same place
TASKS = ('route', 'direction', 'landmark', 'action')
LETTERS = 'ABCDEFGHIJ'  # option letters, the one alphabet: prompts (data.py), EgoWorld, parsing

# -----------------------------------------------------------------------------
# Tags and answers


def _blocks(text, open_tag, close_tag):
    """Complete open...close blocks, left to right, non-overlapping, with the position just past the
    last one. Linear time (str.find)."""
    out, pos = [], 0
    while True:
        i = text.find(open_tag, pos)
        if i < 0:
            return out, pos
        j = text.find(close_tag, i + len(open_tag))
        if j < 0:
            return out, pos
        out.append(text[i + len(open_tag):j])
        pos = j + len(close_tag)


def _final_answer_block(text):
    """Content of the LAST complete <answer>...</answer> block, or None. Tags are exact and lower-case.
    Why the last: untrained and baseline models often echo the instruction's template ("<answer> answer
    here </answer>") or draft an answer inside their reasoning before the final one. Reading the last
    block reads the final answer; listing several letters gains nothing (only one is read), and
    format_reward gives 0 to any completion with repeated tags."""
    blocks, end = _blocks(text, '<answer>', '</answer>')
    if not blocks or text.find('<answer>', end) >= 0:
        return None  # none, or a later <answer> left open: the model was revising when it stopped
    content = blocks[-1]
    if '<answer>' in content:
        return None  # nested tags: malformed
    return content


_BARE_LETTER = re.compile(r'\(([A-Z])\)[.:]?|([A-Z])[.:)]?')
_LETTER_THEN_TEXT = re.compile(r'(?:\(([A-Z])\)|([A-Z])[.:)])[.:]?\s')


def parse_answer(text, letters='ABCD'):
    """The option letter of the final <answer> block, or None. The block's content, stripped, is a letter
    only as `B`, `B.`, `B:`, `B)`, `(B)`, `(B).`, or one of those delimited forms followed by whitespace and
    text (`B. option text`, `(B) option text`); upper-case letters in `letters` only. Everything else is no
    answer: "Based on...", "A lot", "A or B", "AB", "b", "**B**", missing or unclosed tags. The released
    code's two holes stay closed: no "first A-D character anywhere" fallback (its evaluation read "Based"
    as B) and no first-character match (its reward scored "Based on..." as B)."""
    content = _final_answer_block(text)
    if content is None:
        return None
    s = content.strip()
    m = _BARE_LETTER.fullmatch(s) or _LETTER_THEN_TEXT.match(s)
    if m is None:
        return None
    letter = m.group(1) or m.group(2)
    return letter if letter in letters else None


def parse_answer_text(text):
    """The stripped content of the final <answer> block (open-ended answers); None when missing or blank."""
    content = _final_answer_block(text)
    if content is None or not content.strip():
        return None
    return content.strip()


def parse_think(text):
    """The content of the first complete <think> block, or None."""
    blocks, _ = _blocks(text, '<think>', '</think>')
    return blocks[0] if blocks else None


def format_reward(text):
    """1.0 iff the whole completion, up to surrounding whitespace, is <think>T</think> W <answer>X</answer>
    with W whitespace only, exactly one of each of the four tags, and T and X not blank; else 0.0.
    str.find/count, never a backtracking regex: a 100k-character completion costs linear time."""
    s = text.strip()
    if not (s.startswith('<think>') and s.endswith('</answer>')):
        return 0.0
    if any(s.count(tag) != 1 for tag in ('<think>', '</think>', '<answer>', '</answer>')):
        return 0.0
    t_end, a_start = s.find('</think>'), s.find('<answer>')
    if a_start < t_end or s[t_end + len('</think>'):a_start].strip():
        return 0.0
    think, answer = s[len('<think>'):t_end], s[a_start + len('<answer>'):-len('</answer>')]
    return 1.0 if think.strip() and answer.strip() else 0.0


def _check_letter(answer_letter, letters, where='answer_letter'):
    """The reference letter, stripped: exactly one of `letters` ('AB' is not a letter of 'ABCD')."""
    letter = answer_letter.strip() if isinstance(answer_letter, str) else None
    if not letter or len(letter) != 1 or letter not in letters:
        raise ValueError(f"{where}: expected one of {', '.join(letters)}, got {answer_letter!r}")
    return letter


def accuracy_reward(text, answer_letter, letters='ABCD'):
    """1.0 iff parse_answer(text) equals the reference letter; ValueError on a bad reference."""
    return 1.0 if parse_answer(text, letters) == _check_letter(answer_letter, letters) else 0.0

# -----------------------------------------------------------------------------
# Route language

_TOKEN = re.compile(r"[a-z]+|[,.;:!?()\[\]\n]")
_PUNCT = set(',.;:!?()[]\n')
_DETERMINERS = {'the', 'a', 'an', 'your', 'my', 'this', 'that', 'its', 'another', 'his', 'her', 'their', 'our'}
# a move: one of these, or "keep going", "carry on", "go on"
_MOVE_WORDS = {'straight', 'forward', 'forwards', 'ahead', 'onward', 'onwards', 'continue', 'continuing', 'proceed',
               'proceeding'}
# a turn-around: one of these verbs followed by one of these words ("turn around", "head back", "circle round")
_AROUND_VERBS = {'turn', 'turning', 'turned', 'go', 'going', 'head', 'heading', 'walk', 'walking', 'come', 'coming',
                 'went', 'headed', 'walked', 'spin', 'loop', 'circle', 'double'}
_AROUND_WORDS = {'around', 'round', 'back', 'backwards', 'backward'}
# verbs that make a following "left"/"right" a turn ("take a left", "bear right")
_MOTION_VERBS = {'turn', 'turning', 'turned', 'take', 'taking', 'make', 'making', 'go', 'going', 'head', 'heading',
                 'bear', 'veer', 'keep', 'hang', 'move', 'walk', 'walking', 'swing', 'steer', 'curve', 'went', 'took',
                 'made'}
# "right away", "right now", "right there", ...: the adverb, not a turn
_RIGHT_ADVERBS = {'away', 'now', 'there', 'here', 'before', 'after', 'behind', 'next', 'beside', 'in', 'by', 'under',
                  'above', 'below'}
# Landmarks: the noun phrase after "the" anywhere, after a place word with or without a determiner ("past red
# door", "past a red door"), or after a _PLACE_WORDS_DET word only with one ("to the lamp", not "to lamp").
# So "a"/"an"/"your" start a landmark only after a place word.
_PLACE_WORDS = {'past', 'passing', 'pass', 'passed', 'at', 'towards', 'toward', 'into', 'through', 'near', 'beside',
                'along', 'onto', 'across', 'reach', 'reaching', 'reached', 'until', 'till', 'follow', 'following',
                'followed', 'approach', 'approaching', 'under', 'behind', 'between', 'alongside', 'opposite'}
_PLACE_WORDS_DET = {'to', 'by', 'from', 'of', 'in', 'on', 'over', 'around', 'beyond', 'outside', 'inside'}
# Actions: canonical verb -> its inverse (a symmetric map). The words for each: open<->close (shut), pick up<->put
# down (grab, lift / put, place, drop, set down, put it back), climb up<->climb down (climb, ascend, go/walk/head
# up, upstairs / descend, go/walk/head down, downstairs), enter<->exit (leave, "left the"), switch on<->switch
# off (turn on/off); press, push, pull are their own inverse.
_INVERSE = {'open': 'close', 'close': 'open', 'pick up': 'put down', 'put down': 'pick up',
            'climb up': 'climb down', 'climb down': 'climb up', 'enter': 'exit', 'exit': 'enter',
            'switch on': 'switch off', 'switch off': 'switch on', 'press': 'press', 'push': 'push', 'pull': 'pull'}
# one-word action tokens -> canonical verb; _action reads the multi-word ones (pick up, put down, climb, switch)
_SIMPLE_ACTIONS = {'open': 'open', 'opens': 'open', 'opening': 'open', 'opened': 'open',
                   'close': 'close', 'closes': 'close', 'closing': 'close', 'closed': 'close', 'shut': 'close',
                   'enter': 'enter', 'enters': 'enter', 'entering': 'enter', 'entered': 'enter',
                   'exit': 'exit', 'exits': 'exit', 'exiting': 'exit', 'exited': 'exit',
                   'leave': 'exit', 'leaves': 'exit', 'leaving': 'exit',
                   'ascend': 'climb up', 'ascends': 'climb up', 'descend': 'climb down', 'descends': 'climb down',
                   'press': 'press', 'push': 'push', 'pull': 'pull', 'grab': 'pick up', 'lift': 'pick up',
                   'drop': 'put down', 'place': 'put down'}
_ACTION_VERBS = set(_SIMPLE_ACTIONS) | {'pick', 'picks', 'picked', 'picking', 'put', 'puts', 'putting', 'set',
                                        'climb', 'climbs', 'climbing', 'climbed', 'switch', 'upstairs', 'downstairs'}
# generic words: a phrase made only of these is not a landmark ("the starting point", "the way")
_GENERIC = {'starting', 'start', 'point', 'destination', 'end', 'way', 'beginning', 'place', 'spot', 'location',
            'answer', 'correct', 'option', 'options', 'question', 'questions', 'video', 'moment', 'while', 'bit',
            'step', 'steps', 'few', 'time', 'first', 'last', 'next', 'other', 'side', 'direction', 'directions',
            'route', 'landmark', 'landmarks', 'action', 'actions', 'following', 'same', 'one', 'lot', 'couple',
            'meter', 'meters', 'metre', 'metres', 'distance', 'original', 'initial', 'final', 'goal',
            'objects', 'object', 'scenery', 'changes', 'change'}  # the last: Ego-ST's landmark stem
_FUNCTION = {
    'and', 'then', 'or', 'but', 'so', 'if', 'when', 'while', 'after', 'before', 'once', 'as', 'than', 'also',
    'is', 'are', 'was', 'were', 'be', 'been', 'being', 'am', 'do', 'does', 'did', 'done', 'have', 'has', 'had',
    'will', 'would', 'can', 'could', 'should', 'shall', 'may', 'might', 'must', 'need', 'needs', 'let', 's', 't',
    'i', 'you', 'he', 'she', 'it', 'we', 'they', 'me', 'him', 'them', 'us', 'yourself', 'itself',
    'what', 'which', 'who', 'whom', 'where', 'how', 'why', 'there', 'here', 'not', 'no', 'yes', 'very', 'just',
    'for', 'with', 'without', 'about', 'up', 'down', 'off', 'out', 'away', 'again', 'until', 'till', 'all', 'any',
    'some', 'each', 'every', 'both', 'few', 'more', 'most', 'now', 'only', 'own', 'such', 'too', 'into', 'within',
    'get', 'gets', 'got', 'reach', 'reached', 'return', 'returns', 'returned', 'returning', 'arrive', 'arrived',
    'see', 'saw', 'seen', 'look', 'looks', 'looking', 'observe', 'observed', 'watch', 'glance', 'sing', 'stop',
    'stopped', 'wait', 'sit', 'stand', 'use', 'find', 'found', 'come', 'came', 'run', 'ran', 'cross', 'crossed',
    'think', 'thinking', 'thought', 'reverse', 'backward', 'backwards', 'hence', 'therefore', 'thus', 'perform',
    'performed', 'know', 'knowing', 'based', 'please', 'take', 'took', 'taken', 'make', 'made', 'keep', 'kept',
    'hold', 'held', 'carry', 'carried', 'bring', 'brought', 'check', 'touch', 'stay', 'remain', 'pass', 'passed',
    'passing', 'past', 'follow', 'followed', 'following', 'approach', 'approaching', 'travel', 'travelled',
    'traveled', 'walks', 'walked', 'moved', 'moves', 'moving', 'goes', 'gone', 'went', 'headed', 'heads',
}
# words that end a noun phrase: function words and route keywords
_STOP = (_FUNCTION | _DETERMINERS | _MOVE_WORDS | _AROUND_VERBS | _AROUND_WORDS | _MOTION_VERBS | _PLACE_WORDS
         | _PLACE_WORDS_DET | _ACTION_VERBS | {'left', 'right', 'turn', 'u', 'uturn', 'on'})
MAX_PHRASE_WORDS = 5  # longer noun phrases are cut: route landmarks are short names
# parse_route stops after this many steps: real routes have a few dozen, and the bound keeps every
# edit distance between two model-written routes (answer vs reversed statement) at most 256 x 256.
MAX_ROUTE_STEPS = 256


def _phrase(toks, i, need_det):
    """Noun phrase starting at toks[i]: (words, next index). Up to MAX_PHRASE_WORDS words not in _STOP;
    punctuation ends it. Leading determiners are skipped; if need_det and there is none, the phrase is empty.
    A phrase made only of _GENERIC words is dropped (empty)."""
    j, n = i, len(toks)
    had_det = False
    while j < n and toks[j] in _DETERMINERS and j < i + 2:  # bounded: "the the the ..." stays linear
        j, had_det = j + 1, True
    if need_det and not had_det:
        return [], i
    words = []
    while j < n and toks[j] not in _STOP and toks[j] not in _PUNCT and len(words) < MAX_PHRASE_WORDS:
        words.append(toks[j])
        j += 1
    if all(w in _GENERIC for w in words):
        return [], j
    return words, j


def _motion_before(toks, i, k=2):
    return any(t in _MOTION_VERBS for t in toks[max(0, i - k):i])


def _is_position(toks, i):
    """'on your left', 'at the right', 'to your left': where something is, not a turn."""
    p1 = toks[i - 1] if i >= 1 else ''
    p2 = toks[i - 2] if i >= 2 else ''
    if p1 in ('on', 'at'):
        return not _motion_before(toks, i - 1)
    if p1 in _DETERMINERS and p2 in ('on', 'at', 'to', 'from'):
        if p2 == 'to' and p1 == 'the':  # "turn to the left" is a turn, "the exit to the left" is not
            return not _motion_before(toks, i - 2, 3)
        return not _motion_before(toks, i - 2)
    return False


def _action(toks, i):
    """Parse an action at toks[i] (an _ACTION_VERBS token): (verb, words, next index) or None."""
    t, n = toks[i], len(toks)
    nxt = toks[i + 1] if i + 1 < n else ''
    if t in ('upstairs', 'downstairs'):
        return ('climb up' if t == 'upstairs' else 'climb down'), ['stairs'], i + 1
    if t in ('pick', 'picks', 'picked', 'picking'):
        j = i + 2 if nxt == 'up' else i + 1
        words, j = _phrase(toks, j, need_det=False)
        if nxt != 'up':
            if j < n and toks[j] == 'up':
                j += 1
            elif not words:
                return None  # "pick" alone is not an action we know
        return 'pick up', words, j
    if t in ('put', 'puts', 'putting', 'set'):
        j = i + 1
        if nxt in ('down', 'back', 'away'):
            j += 1
        if j < n and toks[j] in ('it', 'them'):
            j += 1
        words, j = _phrase(toks, j, need_det=False)
        if j < n and toks[j] in ('down', 'back', 'away'):
            j += 1
        return 'put down', words, j
    if t in ('climb', 'climbs', 'climbing', 'climbed'):
        verb, j = 'climb up', i + 1
        if nxt in ('up', 'down'):
            verb, j = 'climb ' + nxt, i + 2
        words, j = _phrase(toks, j, need_det=False)
        return verb, words, j
    if t == 'switch':
        if nxt not in ('on', 'off'):
            return None
        words, j = _phrase(toks, i + 2, need_det=False)
        return 'switch ' + nxt, words, j
    if t in _SIMPLE_ACTIONS:
        words, j = _phrase(toks, i + 1, need_det=False)
        return _SIMPLE_ACTIONS[t], words, j
    return None


def parse_route(text, max_steps=MAX_ROUTE_STEPS):
    """Route text -> list of (kind, value) steps, in text order ("turn left at the mural" = turn, landmark):
      ('move', 'straight')               consecutive moves merge: "go straight ahead" is one move, and so
                                         is "go straight, go straight"
      ('turn', 'left'|'right'|'around')  "turn/take a/make a/go/bear/veer left", "left turn", a bare "left";
                                         around: _AROUND_VERBS + _AROUND_WORDS, "u turn", "uturn", "backtrack"
      ('landmark', 'red door')           a noun phrase after "the" or a place word (_PLACE_WORDS)
      ('action', 'open blue door')       verb [object] (_INVERSE); the object is the noun phrase after the verb
    A keyword scan over word tokens: clause separators (commas, periods, "then", "and") need not be present,
    as the released options run steps together ("Turn back go straight turn left ..."). Reads at most
    max_steps steps and ignores the rest. Never raises on text; unknown words are skipped; linear in the
    text length. Landmark names containing route keywords ("left door") are not representable."""
    toks = _TOKEN.findall(text.lower())
    steps, n, i = [], len(toks), 0

    def add(step):
        if step == ('move', 'straight') and steps and steps[-1] == step:
            return  # "go straight ahead", "continue straight": one move
        steps.append(step)

    while i < n and len(steps) < max_steps:
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < n else ''
        if t in ('think', 'thinking', 'thought'):  # "thinking forward/reverse": the CoT template's words
            i += 2 if nxt in ('forward', 'forwards', 'reverse', 'reversely', 'backward', 'backwards', 'about') else 1
            continue
        # turn around. "return" is not one: the Ego-ST stems say "to return to the starting point"
        if (t in _AROUND_VERBS and nxt in _AROUND_WORDS) or (t == 'u' and nxt == 'turn'):
            add(('turn', 'around'))
            i += 2
            continue
        if t in ('uturn', 'backtrack', 'backtracking'):
            add(('turn', 'around'))
            i += 1
            continue
        if t in ('turn', 'turning', 'turned') and nxt in ('on', 'off') and not any(
                w in ('left', 'right') for w in toks[i + 2:i + 4]):
            words, j = _phrase(toks, i + 2, need_det=False)
            add(('action', ' '.join(['switch ' + nxt] + words)))
            i = j
            continue
        if t in ('go', 'going', 'walk', 'walking', 'head', 'heading', 'went', 'walked') and nxt in ('up', 'down'):
            words, j = _phrase(toks, i + 2, need_det=False)
            add(('action', ' '.join(['climb ' + nxt] + words)))
            i = j
            continue
        if t in ('left', 'right'):
            if _is_position(toks, i):
                i += 1
                continue
            motion = _motion_before(toks, i) or nxt == 'turn'
            if not motion and t == 'right' and nxt in _RIGHT_ADVERBS:
                i += 1
                continue
            if not motion and t == 'left' and nxt in _DETERMINERS:  # "left the house": the verb leave
                words, j = _phrase(toks, i + 1, need_det=True)
                add(('action', ' '.join(['exit'] + words)))
                i = j
                continue
            add(('turn', t))
            i += 2 if nxt == 'turn' else 1
            continue
        if t in _MOVE_WORDS or (t in ('keep', 'carry') and nxt in ('going', 'on')) or (t == 'go' and nxt == 'on'):
            add(('move', 'straight'))
            i += 1 if t in _MOVE_WORDS else 2
            continue
        if t in _ACTION_VERBS:
            parsed = _action(toks, i)
            if parsed is not None:
                verb, words, j = parsed
                add(('action', ' '.join([verb] + words)))
                i = j
                continue
        if t == 'the' or t in _PLACE_WORDS or t in _PLACE_WORDS_DET:
            words, j = _phrase(toks, i if t == 'the' else i + 1, need_det=t in _PLACE_WORDS_DET)
            if words:
                add(('landmark', ' '.join(words)))
                i = j
                continue
        i += 1
    return steps


_VERBS_LONGEST_FIRST = sorted(_INVERSE, key=len, reverse=True)


def _split_action(value):
    """'open blue door' -> ('open', 'blue door'); the verb is one of _INVERSE's keys."""
    for verb in _VERBS_LONGEST_FIRST:
        if value == verb or value.startswith(verb + ' '):
            return verb, value[len(verb):].strip()
    raise ValueError(f"unknown action {value!r}: the verb must be one of {sorted(_INVERSE)}")


def _invert(step):
    kind, value = step
    if kind == 'turn':
        return (kind, {'left': 'right', 'right': 'left'}.get(value, value))
    if kind == 'action':
        verb, obj = _split_action(value)
        return (kind, ' '.join(w for w in (_INVERSE[verb], obj) if w))
    return step


def reverse_route(steps):
    """The route walked back: reverse the order, swap left/right, invert actions (_INVERSE), and toggle the
    leading turn-around: a route that does not start with ('turn', 'around') gets one (you arrived facing away
    from the start), one that does loses it (it was itself a walk back). A trailing turn-around is dropped
    first (the way you face on arrival carries no route information). So reverse_route(reverse_route(s)) == s
    for every route that neither ends with a turn-around nor starts with two (a no-op pair)."""
    steps = list(steps)
    for s in steps:
        if not (isinstance(s, tuple) and len(s) == 2 and s[0] in ('move', 'turn', 'landmark', 'action')):
            raise ValueError(f"reverse_route: bad step {s!r}, expected (kind, value) with kind in "
                             "move/turn/landmark/action")
    around = ('turn', 'around')
    lead = [] if steps and steps[0] == around else [around]
    body = steps[1:] if not lead else steps
    end = len(body)
    while end and body[end - 1] == around:
        end -= 1
    return lead + [_invert(s) for s in reversed(body[:end])]


def route_text(steps):
    """Steps -> English the parser reads back: 'Go straight past the red door, turn left, ...'.
    parse_route(route_text(s)) == s for canonical steps (no adjacent moves, names free of keywords)."""
    parts = []
    for kind, value in steps:
        if kind == 'move':
            parts.append('go straight')
        elif kind == 'turn':
            parts.append(f'turn {value}')
        elif kind == 'landmark':
            if parts and parts[-1] == 'go straight':
                parts[-1] += f' past the {value}'
            else:
                parts.append(f'pass the {value}')
        elif kind == 'action':
            verb, obj = _split_action(value)
            parts.append(f'{verb} the {obj}' if obj else verb)
        else:
            raise ValueError(f"route_text: bad step kind {kind!r} in {(kind, value)!r}")
    text = ', '.join(parts)
    return (text[:1].upper() + text[1:] + '.') if text else ''

# -----------------------------------------------------------------------------
# Similarities


def _stem(w):
    return w[:-1] if len(w) > 3 and w.endswith('s') and not w.endswith('ss') else w


def landmark_match(a, b):
    """Two landmark names are the same place: word-set Jaccard >= LANDMARK_MATCH, plural 's' stripped
    ("door" ~ "red door", "red door" !~ "blue door")."""
    A, B = {_stem(w) for w in a.split()}, {_stem(w) for w in b.split()}
    if not A or not B:
        return False
    return len(A & B) / len(A | B) >= LANDMARK_MATCH


def _action_match(a, b):
    va, oa = _split_action(a)
    vb, ob = _split_action(b)
    return va == vb and (not oa or not ob or landmark_match(oa, ob))


def _step_match(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == 'landmark':
        return landmark_match(a[1], b[1])
    if a[0] == 'action':
        return _action_match(a[1], b[1])
    return a[1] == b[1]


def edit_distance(a, b, eq=None):
    """Levenshtein distance between sequences (unit costs); O(len(a) * len(b)) time, O(len(b)) memory."""
    eq = eq or (lambda x, y: x == y)
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (0 if eq(x, y) else 1))
        prev = cur
    return prev[-1]


def edit_similarity(a, b, eq=None):
    """1 - lev / max(len); 1.0 for two empty sequences."""
    m = max(len(a), len(b))
    return 1.0 if m == 0 else 1.0 - edit_distance(a, b, eq) / m


def landmark_recall(pred, ref, eq=landmark_match):
    """Fraction of ref items matched one-to-one (greedy, in ref order) by pred items; 1.0 if ref is empty."""
    if not ref:
        return 1.0
    used = [False] * len(pred)
    hit = 0
    for r in ref:
        for k, p in enumerate(pred):
            if not used[k] and eq(p, r):
                used[k] = True
                hit += 1
                break
    return hit / len(ref)


def _directions(steps):
    return [v for k, v in steps if k in ('move', 'turn')]


def _landmarks(steps):
    out = []
    for k, v in steps:
        if k == 'landmark':
            out.append(v)
        elif k == 'action':
            obj = _split_action(v)[1]
            if obj:
                out.append(obj)
    return out


def _actions(steps):
    return [v for k, v in steps if k == 'action']


def route_parts(pred_steps, ref_steps):
    """The parts of route similarity the reference has, each in [0, 1]: a dict with some of
      direction = 1 - lev(D_pred, D_ref) / max(|D_pred|, |D_ref|), D = the move and turn values in order
      landmark  = 1 - lev(L_pred, L_ref) / max(|L_pred|, |L_ref|), L = landmark steps and action objects,
                  matched by landmark_match. Unlike the paper's rubric (route_rubric), extra and repeated
                  landmarks cost: a reward must not pay for listing every landmark there could be.
      action    = 1 - normalised lev over action values (verbs equal, objects matching or missing)
    Directions and landmarks are separate sequences, so a landmark's order relative to a turn never matters."""
    parts = {}
    D_ref, L_ref, A_ref = _directions(ref_steps), _landmarks(ref_steps), _actions(ref_steps)
    if D_ref:
        parts['direction'] = edit_similarity(_directions(pred_steps), D_ref)
    if L_ref:
        parts['landmark'] = edit_similarity(_landmarks(pred_steps), L_ref, landmark_match)
    if A_ref:
        parts['action'] = edit_similarity(_actions(pred_steps), A_ref, _action_match)
    return parts


def route_similarity(pred_steps, ref_steps, weights=None):
    """Mean of route_parts weighted by ROUTE_WEIGHTS, renormalised over the parts the reference has: in [0, 1].
    ValueError if ref_steps has no direction, landmark or action step (bad ground truth, not a bad answer)."""
    weights = ROUTE_WEIGHTS if weights is None else weights
    parts = route_parts(pred_steps, ref_steps)
    keys = [k for k in ('direction', 'landmark', 'action') if k in parts]
    if not keys:
        raise ValueError(f"reference route has no direction, landmark or action step: {ref_steps!r}")
    wsum = sum(weights[k] for k in keys)
    return sum(weights[k] * parts[k] for k in keys) / wsum


def _ref_steps(ref_text):
    steps = parse_route(ref_text)
    if not steps:
        raise ValueError(f"reference route text has no parseable step: {ref_text[:200]!r}")
    return steps


def route_reward(pred_text, ref_text):
    """route_similarity of a predicted route description to the reference one, in [0, 1]. pred_text None
    (no answer) scores 0; a reference with no parseable step raises ValueError."""
    ref = _ref_steps(ref_text)
    return route_similarity(parse_route(pred_text or ''), ref)


def _round5(x):
    return int(math.floor(5.0 * x + 0.5))


def route_rubric(pred_text, ref_text):
    """The paper's GPT-4o rubric made deterministic: integers 0-5, rounded half up, and their mean.
      direction = 5 * the direction part of route_parts (a turn not in the reference costs an edit)
      landmark  = 5 * landmark recall (missing landmarks cost, extra ones do not; 5 when the reference has none)
      logic     = 5 * edit similarity over the whole step sequence, landmarks and actions matching softly
      score     = mean of the three, a float in [0, 5]"""
    ref = _ref_steps(ref_text)
    pred = parse_route(pred_text or '')
    direction = _round5(edit_similarity(_directions(pred), _directions(ref)))
    landmark = _round5(landmark_recall(_landmarks(pred), _landmarks(ref)))
    logic = _round5(edit_similarity(pred, ref, _step_match))
    return {'direction': direction, 'landmark': landmark, 'logic': logic,
            'score': (direction + landmark + logic) / 3.0}

# -----------------------------------------------------------------------------
# Landmark lists (the landmark MCQ: "fireplace, couch, mural" / "glass window mural fireplace")

_WORD = re.compile(r"[a-z]+")
_ITEM_SPLIT = re.compile(r"[,;.:!?()\[\]\n]+|\b(?:and|then)\b")


def list_items(text):
    """Items of a landmark list, each a list of content words (plurals folded), split at , ; . : ! ? ( ) [ ]
    newline "and" "then". A chunk without separators is one item: "toy birdhouse" is one landmark."""
    items = []
    for c in _ITEM_SPLIT.split(text.lower()):
        words = [_stem(w) for w in _WORD.findall(c) if w not in _STOP and w not in _GENERIC]
        if words:
            items.append(words)
    return items


def list_similarity(pred_items, ref_items):
    """1 - lev / max(len) over the content words of a predicted landmark list and a reference, in order:
    missing, wrong, extra and repeated words all cost (listing every option does not pay)."""
    pred = [w for item in pred_items for w in item]
    ref = [w for item in ref_items for w in item]
    if not ref:
        raise ValueError("reference landmark list has no content word")
    return edit_similarity(pred, ref)

# -----------------------------------------------------------------------------
# Reverse thinking

# The reverse-thinking CoT, the paper's template: state the route of the opposite-direction question first,
# then answer this one from it. cot_text writes it (egoworld.py, data.cot_target); COT reads it back
# (data.parse_st_r1_item takes the opposite ground truth from it).
COT = re.compile(r"Let's start by thinking (forward|reverse) (.*?\?)\s*(.*?)\s*And then think about (.*?\?)\s*Hence",
                 re.S)


def cot_text(thinking, stated_question, stated, question, conclusion, answer, prefix=''):
    """<think>{prefix}Let's start by thinking {thinking} {stated_question} {stated} And then think about
    {question} Hence, {conclusion}</think> <answer>{answer}</answer>. Reverse thinking states the opposite
    direction's question and route: thinking = the other direction than the question's."""
    return (f"<think>{prefix}Let's start by thinking {thinking} {stated_question} {stated} And then think about "
            f"{question} Hence, {conclusion}</think> <answer>{answer}</answer>")


_CONCLUSION = re.compile(r"\b(?:and then think|hence|therefore|thus|so the answer|the answer is|the correct answer)\b")


def _statement(think):
    """The stated opposite-direction route: in the template (COT), what follows the opposite question; in any
    other thought, the text before the first conclusion marker and after its last question mark, so that a
    restated question is no statement (and perception notes before it, such as EgoWorld's headings, are
    not part of the route)."""
    m = COT.search(think)
    if m:
        return m.group(3)
    c = _CONCLUSION.search(think.lower())
    head = think if c is None else think[:c.start()]
    return head[head.rfind('?') + 1:]


def _with_leading_around(steps, want):
    around = ('turn', 'around')
    has = bool(steps) and steps[0] == around
    if want and not has:
        return [around] + steps
    if not want and has:
        return steps[1:]
    return steps


def _safe_route_similarity(pred, ref):
    try:
        return route_similarity(pred, ref)
    except ValueError:
        return 0.0  # an option with nothing parseable can't be the consistent one


def _safe_list_similarity(pred, ref):
    try:
        return list_similarity(pred, ref)
    except ValueError:
        return 0.0


def _symmetric(sim, a, b):
    return 0.5 * (sim(a, b) + sim(b, a))


def _pick_option(sims):
    """Index of the unique best option with similarity > 0, else None."""
    best = max(sims)
    if best <= 0 or sims.count(best) != 1:
        return None
    return sims.index(best)


def reverse_thinking_reward(completion, sample_direction, opposite_text, options, chosen=None, task=None,
                            letters='ABCD'):
    """The paper's reverse thinking made a reward, in [0, 1]. The first complete <think> block must state the
    route of the paired opposite-direction question (the reverse route for a forward question and vice
    versa), then derive the answer from it:
      1. the statement is _statement(think)
      2. s = similarity of the statement to opposite_text: route_similarity for the route, direction and
         action tasks, list_similarity for landmark lists
      3. derived = the statement reversed: reverse_route, then a leading turn-around forced for a reverse
         question and removed for a forward one; for landmark lists, the list_items in reverse order
      4. c = consistency of the chosen answer with derived. MCQ: 1.0 iff the chosen option is the unique
         most similar option to derived, with similarity > 0, else 0; the similarity is step 2's averaged
         over both directions, so an option listing only part of derived ("black painting" against "black
         painting, orange painting") does not tie with the full one. Route task: c = route_similarity of
         the chosen answer text to derived.
    reward = s * (1 + c) / 2: consistency pays only as far as the statement is right, so a model cannot earn
    it by stating any route and answering its reverse. No <think> block: 0.
    sample_direction: 'forward' | 'reverse', the direction of the question being answered.
    opposite_text: ground truth of the paired opposite-direction question (route text or option text).
    options: the question's option texts ([] for the open route task).
    chosen: the completion's answer (letter for MCQ, text for route); parsed from completion if None.
    task: 'route' | 'direction' | 'landmark' | 'action'; None means 'route' without options, else
    'direction'."""
    if sample_direction not in ('forward', 'reverse'):
        raise ValueError(f"sample_direction must be 'forward' or 'reverse', got {sample_direction!r}")
    task = task or ('direction' if options else 'route')
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not opposite_text or not opposite_text.strip():
        raise ValueError("opposite_text is empty: the sample has no paired opposite-direction ground truth")
    if task != 'route' and not options:
        raise ValueError(f"task {task!r} needs options")
    think = parse_think(completion)
    if think is None:
        return 0.0
    statement = _statement(think)

    if task == 'landmark':
        ref = list_items(opposite_text)
        if not ref:
            raise ValueError(f"opposite landmark list has no content word: {opposite_text[:200]!r}")
        stated = list_items(statement)
        s = list_similarity(stated, ref)
        derived = stated[::-1]
        sims = [_symmetric(_safe_list_similarity, derived, list_items(o)) for o in options] if derived else None
    else:
        ref = _ref_steps(opposite_text)
        stated = parse_route(statement)
        s = route_similarity(stated, ref)
        derived = _with_leading_around(reverse_route(stated), want=sample_direction == 'reverse') if stated else []
        sims = ([_symmetric(_safe_route_similarity, derived, parse_route(o)) for o in options]
                if derived and options else None)

    if task == 'route':
        answer = chosen if chosen is not None else parse_answer_text(completion)
        c = _safe_route_similarity(parse_route(answer), derived) if (answer and derived) else 0.0
    else:
        letter = chosen if chosen is not None else parse_answer(completion, letters)
        k = _pick_option(sims) if sims else None
        c = 1.0 if (k is not None and letter is not None and letters.find(letter) == k) else 0.0
    return s * (1.0 + c) / 2.0

# -----------------------------------------------------------------------------
# Totals


def total_reward(components, weights):
    """sum(weights[k] * components[k]) over components that apply (value not None), no renormalisation.
    Every weight key must name a component (a typo must not silently drop a reward)."""
    total = 0.0
    for k, w in weights.items():
        if k not in components:
            raise KeyError(f"reward weight {k!r} names no component; components are {sorted(components)}")
        if components[k] is not None:
            total += w * components[k]
    return total


def option_letters(num_options):
    """Letters parse_answer accepts for a question: A-D, or more when it has more than 4 options."""
    return LETTERS[:max(num_options, 4)]


def _where(sample):
    return getattr(sample, 'source', None) or getattr(sample, 'id', None) or '<sample>'


def score_completion(completion, sample, weights=None):
    """Every reward component of one completion for one sample, and their weighted 'total' (total_reward):
    {'format', 'accuracy', 'route', 'reverse', 'total'}. accuracy applies to MCQ tasks, route to the route task,
    reverse to samples with a paired opposite; a component that does not apply is None and left out of the
    total. Applicability depends only on the sample, so it is constant within a GRPO group and moves no
    advantage. sample is duck-typed (data.Sample): task, direction, options, answer, opposite."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    task = sample.task
    if task not in TASKS:
        raise ValueError(f"{_where(sample)}: task must be one of {TASKS}, got {task!r}")
    comps = {'format': format_reward(completion), 'accuracy': None, 'route': None, 'reverse': None}
    if task == 'route':
        try:
            comps['route'] = route_reward(parse_answer_text(completion), sample.answer)
        except ValueError as e:
            raise ValueError(f"{_where(sample)}: {e}") from None
    else:
        letters = option_letters(len(sample.options))
        _check_letter(sample.answer, letters, where=f"{_where(sample)}: answer")
        comps['accuracy'] = accuracy_reward(completion, sample.answer, letters)
    if sample.opposite:
        try:
            comps['reverse'] = reverse_thinking_reward(completion, sample.direction, sample.opposite,
                                                       sample.options, task=task,
                                                       letters=option_letters(len(sample.options)))
        except ValueError as e:
            raise ValueError(f"{_where(sample)}: {e}") from None
    comps['total'] = total_reward(comps, weights)
    return comps
