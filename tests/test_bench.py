"""bench.py: scoring with oracle/constant answer functions, resume, bad samples, the LLM judge
against a local HTTP server, the full CLI on the tiny EgoWorld checkpoint, torchrun == 1 process."""
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

os.environ['HF_HUB_OFFLINE'] = '1'
import pytest
import torch

import bench
import data
import egoworld
from conftest import make_tiny_world
import reward
from model import Qwen2VL, rope_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- judge server

class _Judge(http.server.BaseHTTPRequestHandler):
    replies = []      # (status, message content) served in order; the last one repeats
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        type(self).requests.append(dict(path=self.path, body=body))
        status, content = type(self).replies[min(len(type(self).requests), len(type(self).replies)) - 1]
        out = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': content}}]}).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server():
    def start(replies):
        _Judge.replies, _Judge.requests = list(replies), []
        srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Judge)
        threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", _Judge.requests
    servers = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_judge_retries_a_malformed_reply(judge_server):
    url, reqs = judge_server([(200, 'I would give it a 4.'), (200, '{"direction": 4, "landmark": 3, "logic": 5}')])
    j = bench.judge_route('Go straight, turn left.', 'Go straight, turn right.', url, 'judge-x', retries=2, backoff=0)
    assert (j['direction'], j['landmark'], j['logic'], j['score'], j['attempts'], j['error']) == (4, 3, 5, 4.0, 2, None)
    assert len(reqs) == 2 and reqs[0]['path'] == '/v1/chat/completions'
    b = reqs[0]['body']
    assert b['model'] == 'judge-x' and b['temperature'] == 0 and b['response_format'] == {'type': 'json_object'}
    assert 'Go straight, turn right.' in b['messages'][-1]['content'] and 'turn left.' in b['messages'][-1]['content']


def test_judge_failures_score_zero_and_are_reported(judge_server):
    url, reqs = judge_server([(500, 'overloaded')])
    j = bench.judge_route('Go straight.', 'Go straight.', url, 'm', retries=2, backoff=0)
    assert j['score'] == 0 and j['attempts'] == 3 and len(reqs) == 3 and 'HTTPError' in j['error']
    url, reqs = judge_server([(200, '{"direction": 7, "landmark": 3, "logic": 5}')])  # out of range: not accepted
    j = bench.judge_route('Go straight.', 'Go straight.', url, 'm', retries=1, backoff=0)
    assert j['score'] == 0 and len(reqs) == 2 and "'direction' must be an integer 0-5" in j['error']
    j = bench.judge_route('  ', 'Go straight.', url, 'm', retries=1, backoff=0)  # empty: 0, no call, not skipped
    assert j['score'] == 0 and j['error'] == 'empty prediction' and len(reqs) == 2
    j = bench.judge_route('Go.', 'Go.', 'http://127.0.0.1:1/v1', 'm', retries=0, backoff=0, timeout=2)  # nobody listens
    assert j['score'] == 0 and j['error']


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """3 EgoWorld videos (24 samples, all eight tasks) and egoworld's tiny model, shrunk for speed.
    tiny/ is egoworld's checkpoint as made; its init answers every prompt alike, which would make
    equality tests vacuous, so noisy/ is the same model with its matrices redrawn at std 0.2 (the
    untied input embeddings at 2): its outputs differ from sample to sample."""
    d = tmp_path_factory.mktemp('bench')
    make_tiny_world(d, 'test', 1, 3)
    shutil.copytree(d / 'tiny', d / 'noisy')
    m = Qwen2VL.from_pretrained(str(d / 'tiny'))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 2.0 if name == 'embed_tokens.weight' else 0.2, generator=g)
    m.save_pretrained(str(d / 'noisy'))
    return d


@pytest.fixture(scope='module')
def samples(world):
    s, errors = bench.load_samples(str(world / 'test'))
    assert errors == [] and len(s) == 24
    return s


SETTINGS = dict(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56, prompt_version='egost-v1', mode='generate')


def oracle(samples, inputs):
    return [f"<think>I remember.</think><answer>{s.answer}</answer>" for s in samples]


def rows(summary):
    return {(r['task'], r['direction']): r for r in summary['tasks'].values()}


# ----------------------------------------------------------------------------- scoring

def test_oracle_scores_100(samples, tmp_path):
    summ = bench.evaluate(samples, oracle, str(tmp_path / 'o'), SETTINGS, progress=False)
    assert len(summ['tasks']) == 8 and summ['evaluated'] == 24 and summ['bad'] == 0
    for (t, d), r in rows(summ).items():
        assert r['n'] == 3 and r['parse_fail'] == 0 and r['score'] == 100.0, (t, d)
        if t == 'route':
            assert (r['rubric_direction'], r['rubric_landmark'], r['rubric_logic']) == (5, 5, 5)
    assert summ['overall'] == summ['forward'] == summ['reverse'] == 100.0
    assert set(summ['categories']) == {'route', 'direction', 'landmark', 'action'}


def test_always_a_scores_the_letter_prior_and_unparsable_is_wrong(samples, tmp_path):
    summ = bench.evaluate(samples, lambda ss, xs: ['<think></think><answer>A</answer>'] * len(ss),
                          str(tmp_path / 'a'), SETTINGS, progress=False)
    for (t, d), r in rows(summ).items():
        if t != 'route':
            prior = [s.answer == 'A' for s in samples if (s.task, s.direction) == (t, d)]
            assert r['accuracy'] == pytest.approx(100 * sum(prior) / len(prior)) and r['parse_fail'] == 0
    # even samples answer right; odd ones say the right letter without tags or with a word: unparsable
    order = {s.id: i for i, s in enumerate(samples)}
    def half(ss, xs):
        return [oracle([s], None)[0] if order[s.id] % 2 == 0 else
                (f"The answer is {s.answer}" if order[s.id] % 4 == 1 else f"<answer>{s.answer} or A</answer>")
                for s in ss]
    summ = bench.evaluate(samples, half, str(tmp_path / 'h'), SETTINGS, progress=False)
    for (t, d), r in rows(summ).items():
        mine = [order[s.id] for s in samples if (s.task, s.direction) == (t, d)]
        if t == 'route':  # an answer block with extra words is a (worse) route, only a missing block fails to parse
            assert r['parse_fail'] == pytest.approx(100 * sum(i % 4 == 1 for i in mine) / 3), (t, d)
            continue
        assert r['score'] == pytest.approx(100 * sum(i % 2 == 0 for i in mine) / 3), (t, d)
        assert r['parse_fail'] == pytest.approx(100 * sum(i % 2 == 1 for i in mine) / 3), (t, d)
    recs = [json.loads(l) for l in open(tmp_path / 'h' / 'predictions.jsonl')]
    assert [r['id'] for r in recs] == [s.id for s in samples]
    r1 = next(r for r in recs if order[r['id']] == 1)
    assert r1['parsed'] is None and r1['score'] == 0 and r1['raw'].startswith('The answer is')
    assert r1['settings'] == SETTINGS


# ----------------------------------------------------------------------------- resume

def test_rerun_after_interruption_evaluates_only_missing(samples, tmp_path):
    out = str(tmp_path / 'r')
    seen = []

    def dies_after_10(ss, xs):
        if len(seen) >= 10:
            raise KeyboardInterrupt  # not an Exception: ends the run like Ctrl-C or a kill
        seen.extend(s.id for s in ss)
        return oracle(ss, xs)
    with pytest.raises(KeyboardInterrupt):
        bench.evaluate(samples, dies_after_10, out, SETTINGS, batch_size=2, progress=False)
    with open(os.path.join(out, 'predictions.rank0.jsonl'), 'a') as f:
        f.write('{"id": "Part1_rev')  # a torn line, as a kill mid-write leaves it
    again = []
    summ = bench.evaluate(samples, lambda ss, xs: again.extend(s.id for s in ss) or oracle(ss, xs), out, SETTINGS,
                          batch_size=2, progress=False)
    assert len(seen) == 10 and sorted(again) == sorted(s.id for s in samples[10:])
    assert summ['evaluated'] == 24 and summ['overall'] == 100.0
    recs = [json.loads(l) for l in open(os.path.join(out, 'predictions.jsonl'))]
    assert [r['id'] for r in recs] == [s.id for s in samples]    # merged, in sample order
    assert not [p for p in os.listdir(out) if 'rank' in p]
    none = []
    bench.evaluate(samples, lambda ss, xs: none.extend(ss) or oracle(ss, xs), out, SETTINGS, progress=False)
    assert none == []  # everything done: nothing is evaluated twice
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: .*nframes: file 16 vs now 8"):
        bench.evaluate(samples, oracle, out, dict(SETTINGS, nframes=8), progress=False)
    with open(os.path.join(out, 'predictions.jsonl'), 'a') as f:
        f.write('garbage\n{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:25: not a JSON record"):
        bench.evaluate(samples, oracle, out, SETTINGS, progress=False)


# ----------------------------------------------------------------------------- bad samples

def test_bad_samples_are_counted_listed_and_skipped(world, tmp_path):
    d = tmp_path / 'data'
    shutil.copytree(world / 'test', d)
    videos = sorted(os.listdir(d / 'part1'))
    os.remove(d / 'part1' / videos[0])                             # missing: its 8 samples are bad
    (d / 'part1' / videos[1]).write_bytes(b'\x00not an mp4' * 50)  # corrupt: 8 more
    f = d / 'Part1_forward_mcq_landmark.json'
    items = json.loads(f.read_text())
    items[sorted(items)[2]]['forward_mcq']['answer'] = 'Z'         # malformed item: the reader rejects it
    f.write_text(json.dumps(items))
    f = d / 'Part1_reverse_qa.json'
    items = json.loads(f.read_text())
    items[sorted(items)[2]]['reverse_answer'] = '???'              # a reference route with nothing to score
    f.write_text(json.dumps(items))
    ss, errors = bench.load_samples(str(d))
    assert len(ss) == 23 and len(errors) == 1 and 'Part1_forward_mcq_landmark.json' in errors[0] and "'Z'" in errors[0]
    tok = data.Tokenizer(str(world / 'tiny'))
    vs = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    prepare = functools.partial(bench.prepare_sample, tok, vs, None)
    boom = f'Part1_reverse_mcq#{videos[2][:-4]}'  # a sample with a good video and ground truth

    def answer(samples, inputs):  # one sample makes the model fail: only it is lost, not its batch
        assert all(x['grid_thw'].tolist() == [[8, 4, 4]] for x in inputs)
        if any(s.id == boom for s in samples):
            raise RuntimeError('out of memory')
        return oracle(samples, inputs)
    summ = bench.evaluate(ss, answer, str(tmp_path / 'o'), SETTINGS, prepare=prepare, batch_size=4, num_workers=2,
                          reader_errors=errors, progress=False)
    bad = {b['id']: b['error'] for b in summ['bad_samples']}
    v0, v1 = videos[0][:-4], videos[1][:-4]
    assert len(bad) == 16 + 1 + 1 and summ['bad'] == 19 and summ['reader_errors'] == errors
    assert all('video not found' in e for i, e in bad.items() if i.endswith(v0))
    assert all('cannot' in e for i, e in bad.items() if i.endswith(v1))
    assert 'no parseable step' in bad[f'Part1_reverse_qa#{sorted(items)[2]}']
    assert bad[boom] == 'RuntimeError: out of memory'
    assert summ['evaluated'] == 23 - 18 and summ['overall'] == 100.0
    assert sum(r['bad'] for r in summ['tasks'].values()) == 18
    # ... but a model that fails on its very first sample is broken: fail fast, do not mark all bad
    with pytest.raises(RuntimeError, match='broken'):
        bench.evaluate(ss, lambda s_, x: (_ for _ in ()).throw(RuntimeError('broken')), str(tmp_path / 'x'), SETTINGS,
                       batch_size=4, progress=False)
    # bad samples are not "done": a re-run with the videos back evaluates exactly them
    shutil.copy(world / 'test' / 'part1' / videos[0], d / 'part1' / videos[0])
    shutil.copy(world / 'test' / 'part1' / videos[1], d / 'part1' / videos[1])
    again = []
    summ = bench.evaluate(ss, lambda s_, x: again.extend(s.id for s in s_) or oracle(s_, x), str(tmp_path / 'o'),
                          SETTINGS, prepare=prepare, progress=False)
    assert sorted(again) == sorted(bad) and summ['bad'] == 1 and summ['evaluated'] == 22


# ----------------------------------------------------------------------------- judge inside the loop

def test_judge_fixed_denominator(samples, tmp_path, judge_server):
    ok = lambda k: (200, json.dumps({'direction': k, 'landmark': k, 'logic': k}))
    url, reqs = judge_server([ok(5), (200, 'not json'), ok(3), (500, 'x'), (500, 'x'), ok(4)])
    route = [s for s in samples if s.task == 'route']
    first_rev = next(s.id for s in route if s.direction == 'reverse')
    judge = functools.partial(bench.judge_route, url=url, model='m', retries=1, backoff=0)
    ans = lambda ss, xs: ['' if s.id == first_rev else oracle([s], None)[0] for s in ss]
    summ = bench.evaluate(route, ans, str(tmp_path / 'j'), dict(SETTINGS, judge_model='m'), judge=judge, progress=False)
    fwd, rev = rows(summ)['route', 'forward'], rows(summ)['route', 'reverse']
    assert (fwd['n'], fwd['judge'], fwd['judge_fail'], fwd['judge_empty']) == (3, pytest.approx(8 / 3), 1, 0)
    assert (rev['n'], rev['judge'], rev['judge_fail'], rev['judge_empty']) == (3, pytest.approx(8 / 3), 0, 1)
    assert fwd['score'] == pytest.approx(20 * 8 / 3) and fwd['rubric_score'] == 5.0
    assert len(reqs) == 7  # 5 calls for the forward routes (1 retry after bad JSON, 2 failures), 2 reverse
    recs = [json.loads(l) for l in open(tmp_path / 'j' / 'predictions.jsonl')]
    assert [r['judge']['attempts'] for r in recs] == [1, 2, 2, 0, 1, 1]
    assert 'HTTPError' in recs[2]['judge']['error'] and recs[2]['judge']['score'] == 0


# ----------------------------------------------------------------------------- settings, args

def test_settings_and_arguments(world, tmp_path):
    assert bench.split_args([str(world / 'tiny'), '--data', 'x', '--limit=3', 'config/bench_egoworld.py']) == \
        (str(world / 'tiny'), ['--data=x', '--limit=3', 'config/bench_egoworld.py'])
    with pytest.raises(SystemExit, match='neither a checkpoint directory'):
        bench.split_args(['no/such/dir'])
    tiny = str(world / 'tiny')
    assert bench.vision_settings(tiny, 'elsewhere', {}).nframes == 8                       # the paper's
    vs = bench.vision_settings(tiny, bench.DEFAULT_DATA, {})                               # EgoWorld's clips
    assert (vs.nframes, vs.min_pixels, vs.max_pixels) == (egoworld.key_frames, egoworld.size ** 2, egoworld.size ** 2)
    ck = tmp_path / 'ck'
    ck.mkdir()
    (ck / 'vision_settings.json').write_text(json.dumps(dict(nframes=12, min_pixels=784, max_pixels=6272,
                                                             prompt_version='egost-v1')))
    vs = bench.vision_settings(str(ck), bench.DEFAULT_DATA, dict(nframes=0, min_pixels=0, max_pixels=5000))
    assert (vs.nframes, vs.min_pixels, vs.max_pixels) == (12, 784, 5000)                   # trained with, overridden
    missing = str(tmp_path / 'data_egoworld' / 'test')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, 'DEFAULT_DATA', missing)
        with pytest.raises(SystemExit, match='python egoworld.py --out=data_egoworld'):
            bench.load_samples(missing)
    pick = lambda **kw: [(s.task, s.direction) for s in bench.load_samples(str(world / 'test'), **kw)[0]]
    assert len(pick(parts='1')) == 24 and pick(parts='2,3') == []                        # EgoWorld is Part1
    assert sorted(set(pick(tasks='landmark', directions='reverse'))) == [('landmark', 'reverse')]
    assert len(pick(tasks='route,action', limit=5)) == 5
    with pytest.raises(SystemExit, match='nowhere not found'):
        bench.load_samples(str(tmp_path / 'nowhere'))


# ----------------------------------------------------------------------------- the real model

class _MergingTok:
    """A tokenizer whose BPE merges some letters with the prefix's last token and splits others,
    as a real vocabulary may: after the prefix's last token ('>' or '<answer>'), 'B' is one merged
    token, 'C' two tokens, A and D plain."""
    def __init__(self, tok):
        self.tok, self.last, self.x = tok, tok.encode(bench.logits_prefix)[-1], tok.encode('x')[-1]

    def encode(self, text):
        ids = self.tok.encode(text)
        if text.endswith('>B') and ids[-2] == self.last:
            return ids[:-2] + [ids[-1]]                  # last token + 'B' as one token (stands in for a merge)
        if text.endswith('>C'):
            return ids[:-1] + [self.x, ids[-1]]          # 'C' as two tokens
        return ids


@pytest.mark.parametrize('merging', [False, True])
def test_logits_mode_matches_per_candidate_forward(world, samples, merging):
    m = Qwen2VL.from_pretrained(str(world / 'noisy')).eval()
    tok = data.Tokenizer(str(world / 'noisy'))
    vs = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)
    mcq = [s for s in samples if s.task != 'route'][:6]
    xs = [bench.prepare_sample(tok, vs, m.config, s) for s in mcq]
    ltok = _MergingTok(tok) if merging else tok
    if merging:
        _, tails = bench.letter_tokens(ltok, bench.logits_prefix, 4)
        assert [len(t) for t in tails] == [2, 1, 3, 2]
    with torch.no_grad():
        got = bench.make_logits_fn(m, ltok, bench.logits_prefix, None)(mcq, xs)
        lps = bench.letter_logprobs(m, ltok, bench.logits_prefix, mcq, xs)
        for s, x, out, lp_bench in zip(mcq, xs, got, lps):
            encs = [ltok.encode(bench.logits_prefix + L) for L in 'ABCD'[:len(s.options)]]
            k = next(i for i in range(min(map(len, encs))) if len({e[i] for e in encs}) > 1)
            scores = []
            for e in encs:  # each candidate alone, whole: the sum of its own tokens' log-probs after the shared part
                ids = torch.cat([x['input_ids'], torch.tensor(e)])
                pos, _ = rope_positions(ids, x['grid_thw'], m.config, x['second_per_grid_ts'])
                lp = m(ids, pos, torch.tensor([0, len(ids)], dtype=torch.int32), x['pixel_values'],
                       x['grid_thw']).log_softmax(-1)
                n = len(e) - k
                scores.append(float(lp[len(ids) - n - 1:-1].gather(1, ids[-n:, None]).sum()))
            assert lp_bench == pytest.approx(scores, abs=1e-4)
            assert out == f"{bench.logits_prefix}{'ABCD'[max(range(len(scores)), key=scores.__getitem__)]}</answer>"
            assert reward.parse_answer(out) in 'ABCD'
        spread = max(abs(a - b) for x, y in zip(lps, lps[1:]) for a, b in zip(x, y))
    assert spread > 0.05  # the noisy model's letter scores differ from sample to sample: the comparison bites


def _cli(world, out, *extra, nproc=1, kill_after=None, ckpt='noisy'):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    argv = [str(world / ckpt), os.path.join(ROOT, 'config', 'bench_egoworld.py'), '--data', str(world / 'test'),
            f'--out_dir={out}', '--max_new_tokens=6', '--batch_size=4', '--num_workers=1', *extra]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--standalone',
               os.path.join(ROOT, 'bench.py')]
    else:  # kill_after=k: the process dies (os._exit) right after writing its k-th record; -k: SIGTERM then
        cmd = [sys.executable, '-c', KILLER % (kill_after or -999)]
    p = subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p


KILLER = """
import os, signal, sys
sys.argv = ['bench.py'] + sys.argv[1:]
import bench
k, n, record = %d, [0], bench._record
def dies(*a):
    if n[0] == k:  # k records are written and flushed: die like a kill -9
        os._exit(3)
    if n[0] == -k:  # a scheduler's SIGTERM arrives while record -k is made
        os.kill(os.getpid(), signal.SIGTERM)
    n[0] += 1
    return record(*a)
bench._record = dies
bench.main()
"""


def test_cli_complete_table_on_the_tiny_checkpoint(world, tmp_path):
    p = _cli(world, tmp_path / 'one', ckpt='tiny')
    assert p.returncode == 0, p.stderr[-3000:]
    summ = json.loads((tmp_path / 'one' / 'results.json').read_text())
    assert [(r['task'], r['direction'], r['n'], r['bad']) for r in summ['tasks'].values()] == \
        [(t, d, 3, 0) for t in ('route', 'direction', 'landmark', 'action') for d in ('forward', 'reverse')]
    assert all(r['score'] == r['score'] for r in summ['tasks'].values())  # not NaN
    table = (tmp_path / 'one' / 'results.md').read_text()
    assert table in p.stdout and '| route | direction | landmark | action | forward | reverse | overall |' in table
    for t in ('route', 'direction', 'landmark', 'action'):
        for d in ('forward', 'reverse'):
            assert sum(l.startswith(f'| {t} | {d} | 3 | 0 | ') for l in table.splitlines()) == 1
    assert summ['settings']['nframes'] == 16 and summ['settings']['max_new_tokens'] == 6
    st = summ['settings']  # which model made these answers, told apart by content
    assert (st['backend'], st['model'], st['revision'], st['video_input']) == \
        ('ours', str(world / 'tiny'), bench.dir_revision(str(world / 'tiny')), 'video')
    preds = [json.loads(l) for l in (tmp_path / 'one' / 'predictions.jsonl').read_text().splitlines()]
    assert len(preds) == 24
    # EgoWorld clips: 16 frames at 8 fps, all 16 sampled -> 2 / 8 s a frame group, in the settings and each record
    assert summ['settings']['second_per_grid_ts'] == [0.25, 0.25] and {r['second_per_grid_ts'] for r in preds} == {0.25}


def test_cli_resume_torchrun_and_logits(world, tmp_path):
    p = _cli(world, tmp_path / 'one')
    assert p.returncode == 0, p.stderr[-3000:]
    summ = json.loads((tmp_path / 'one' / 'results.json').read_text())
    one = (tmp_path / 'one' / 'predictions.jsonl').read_text()
    assert len({json.loads(l)['raw'] for l in one.splitlines()}) > 12  # outputs differ: the comparisons below bite
    # killed after 8 records (two batches of 4), then resumed: only the 16 missing are evaluated
    p = _cli(world, tmp_path / 'kill', kill_after=8)
    assert p.returncode == 3, p.stderr[-3000:]
    assert len((tmp_path / 'kill' / 'predictions.rank0.jsonl').read_text().splitlines()) == 8
    p = _cli(world, tmp_path / 'kill')
    assert p.returncode == 0, p.stderr[-3000:]
    assert '16 of 24 samples to evaluate (8 done by an earlier run)' in p.stdout
    assert (tmp_path / 'kill' / 'predictions.jsonl').read_text() == one
    # SIGTERM while the 7th record is written: the batch in flight (4 records) is finished, the run exits 0
    # without a table, and the re-run evaluates the 16 others
    p = _cli(world, tmp_path / 'term', kill_after=-6)
    assert p.returncode == 0 and 'stopped by SIGTERM/SIGUSR1' in p.stdout, p.stderr[-3000:]
    assert len((tmp_path / 'term' / 'predictions.rank0.jsonl').read_text().splitlines()) == 8
    assert not (tmp_path / 'term' / 'results.json').exists()
    p = _cli(world, tmp_path / 'term')
    assert p.returncode == 0 and '16 of 24 samples to evaluate (8 done by an earlier run)' in p.stdout
    assert (tmp_path / 'term' / 'predictions.jsonl').read_text() == one
    # two ranks (gloo): disjoint shards, rank 0 merges; the same predictions and table as one process
    p = _cli(world, tmp_path / 'two', nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '| 12/12 [' in p.stderr and '24/24' not in p.stderr  # rank 0's bar: its half of the samples
    assert (tmp_path / 'two' / 'predictions.jsonl').read_text() == one
    two = json.loads((tmp_path / 'two' / 'results.json').read_text())
    assert two == summ
    # logits mode: every MCQ answer parses
    p = _cli(world, tmp_path / 'lg', '--mode=logits', '--tasks=direction,landmark,action')
    assert p.returncode == 0, p.stderr[-3000:]
    lg = json.loads((tmp_path / 'lg' / 'results.json').read_text())
    assert len(lg['tasks']) == 6 and all(r['parse_fail'] == 0 and r['n'] == 3 for r in lg['tasks'].values())


def test_mcnemar_by_hand():
    """Only MCQs both runs answered count; z = (wrong->right - right->wrong) / sqrt(their sum)."""
    base = {f'q{i}': dict(task='direction', correct=i < 4) for i in range(10)}        # q0-q3 right
    new = {f'q{i}': dict(task='landmark', correct=i in (0, 4, 5, 6, 7, 8)) for i in range(10)}
    new['route'] = dict(task='route', correct=None)
    new['only_here'] = dict(task='action', correct=True)
    p = bench.mcnemar(new, base)
    # q4-q8 wrong -> right (5), q1-q3 right -> wrong (3): z = 2 / sqrt(8)
    assert (p['n'], p['wrong_to_right'], p['right_to_wrong']) == (10, 5, 3)
    assert p['z'] == pytest.approx(2 / 8 ** 0.5) and (p['accuracy'], p['baseline_accuracy']) == (60.0, 40.0)
    assert bench.mcnemar(base, base)['z'] == 0.0
