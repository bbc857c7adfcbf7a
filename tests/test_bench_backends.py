"""bench.py's other backends: transformers (hf) against our model on the tiny EgoWorld checkpoint, the OpenAI
backend against a real chat-completions HTTP server on 127.0.0.1 (429s, 5xx, timeouts, malformed JSON, dropped
connections, empty / refused / cut-off answers; resume; the key never written), and leaderboard.py."""
import base64
import csv
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

os.environ['HF_HUB_OFFLINE'] = '1'
import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import leaderboard
from model import Qwen2VL
from test_bench import ROOT, SETTINGS, oracle, samples, world  # noqa: F401  (module-scoped fixtures)

torch.set_num_threads(1)
VS = data.VisionSettings(nframes=16, min_pixels=56 * 56, max_pixels=56 * 56)


def run(samples, fn_prepare, out, settings=SETTINGS, **kw):
    fn, prepare = fn_prepare
    summ = bench.evaluate(samples, fn, str(out), settings, prepare=prepare, progress=False, **kw)
    return summ, {r['id']: r for r in map(json.loads, open(os.path.join(out, 'predictions.jsonl')))}


# ----------------------------------------------------------------------------- transformers backend

@pytest.fixture(scope='module')
def hf_noisy(world):
    return bench.hf_backend(str(world / 'noisy'), '', VS, 'cpu', max_new_tokens=6)


@pytest.fixture(scope='module')
def ours_preds(world, samples, tmp_path_factory):
    fn, prepare, _, _ = bench.ours_backend(str(world / 'noisy'), VS, 'cpu', max_new_tokens=6)
    return run(samples, (fn, prepare), tmp_path_factory.mktemp('ours'), batch_size=8)[1]


def test_hf_backend_gives_our_answers_under_the_released_rope(world, samples, ours_preds, hf_noisy, tmp_path):
    fn, prepare, info = hf_noisy
    assert info == dict(revision=bench.dir_revision(str(world / 'noisy')), video_input='video (qwen_inputs)',
                        pixels=True)  # no torchvision here: the Qwen processor's video step is qwen_inputs
    # transformers 5 puts text after a video max(h, w)/2 past it, the released rule (ours) after its largest
    # position: 16 frames of 4x4 patches end at temporal id 7, so text starts 6 positions apart
    _, hf = run(samples, (fn, prepare), tmp_path / 'hf', batch_size=8)
    differ = [k for k in ours_preds if hf[k]['raw'] != ours_preds[k]['raw']]
    assert differ, 'transformers now follows the released rope rule: update README and hf_rope'
    fn, prepare, _ = bench.hf_backend(str(world / 'noisy'), '', VS, 'cpu', max_new_tokens=6, rope='released')
    _, hf = run(samples, (fn, prepare), tmp_path / 'hf_released', batch_size=8)  # batched, left padded
    assert {k: r['raw'] for k, r in hf.items()} == {k: r['raw'] for k, r in ours_preds.items()}
    assert len({r['raw'] for r in hf.values()}) > 12  # the noisy model's answers differ: the equality bites
    assert {k: r.get('flag') for k, r in hf.items()} == {k: r.get('flag') for k, r in ours_preds.items()}


def test_released_rope_index_by_row_under_left_padding(world, samples):
    """released_rope_index on a left-padded batch of two prompts of different lengths: each row's positions are
    data.encode's (model.rope_positions), padding gets 0, and the delta is next_position - the row's length."""
    from transformers import AutoConfig, AutoTokenizer
    cfg, tok = AutoConfig.from_pretrained(str(world / 'noisy')), AutoTokenizer.from_pretrained(str(world / 'noisy'))
    ours = data.Tokenizer(str(world / 'noisy'))
    two = [samples[0], next(s for s in samples if s.task != samples[0].task)]
    texts = [tok.apply_chat_template(bench.chat_messages(data.build_user_text(s)), add_generation_prompt=True,
                                     tokenize=False) for s in two]
    x = bench.qwen_inputs(tok, cfg, VS, texts, [bench.load_clip(s, VS) for s in two])
    host = type('M', (), {'config': cfg})()
    pos, deltas = bench.released_rope_index(host, **x)
    for b, s in enumerate(two):
        e = data.encode(s, ours, VS)
        n = len(e['input_ids'])
        assert x['input_ids'][b, -n:].tolist() == e['input_ids'].tolist()  # the processor stand-in = our tokens
        assert torch.equal(pos[:, b, -n:], e['position_ids']) and not pos[:, b, :-n].any()
        assert int(deltas[b, 0]) == e['next_position'] - n
    assert x['attention_mask'][0].sum() != x['attention_mask'][1].sum()  # one row is padded: the case bites


def test_hf_backend_never_samples_visual_tokens(world, samples, tmp_path):
    """A checkpoint whose greedy first token is <|video_pad|>: the hf backend bans it (and vision start/end, the
    image pad) as model.generate's policy does; the next best token comes instead."""
    d = tmp_path / 'loud'
    shutil.copytree(world / 'noisy', d)
    m = Qwen2VL.from_pretrained(str(d)).eval()
    tok = data.Tokenizer(str(d))
    s = samples[0]
    x = data.encode(s, tok, VS, None, m.config)
    cu = torch.tensor([0, len(x['input_ids'])], dtype=torch.int32)
    with torch.no_grad():
        logits = m(x['input_ids'], x['position_ids'], cu, x['pixel_values'], x['grid_thw'])[-1]
        first = int(logits.argmax())
        m.lm_head.weight[tok.video_pad_id] = m.lm_head.weight[first] * 3  # now the video pad wins the first step
        m.save_pretrained(str(d))
        logits = m(x['input_ids'], x['position_ids'], cu, x['pixel_values'], x['grid_thw'])[-1]
    assert logits[first] > 0 and int(logits.argmax()) == tok.video_pad_id
    fn, prepare, _ = bench.hf_backend(str(d), '', VS, 'cpu', max_new_tokens=4)
    out = fn([s], [prepare(s)])[0]
    text = out['raw'] if isinstance(out, dict) else out
    assert text.startswith(tok.decode([first])) and not any(t in text for t in data.SPECIAL_TOKENS[9:])
    assert bench.visual_token_ids(Qwen2VLConfig(str(d))) == sorted([tok.vision_start_id, tok.vision_end_id,
                                                                     tok.image_pad_id, tok.video_pad_id])


def make_tiny_llava(tiny, out):
    """A random tiny LLaVA (Qwen2 decoder, CLIP tower, PIL CLIP image processor, our tokenizer + <image>): a model
    of another family whose processor has no video processor, so frames go in as images."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.add_special_tokens({'additional_special_tokens': ['<image>']})
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=56, patch_size=14)
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                                                  image_token_index=tok.convert_tokens_to_ids('<image>')))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # outputs that differ from sample to sample
    m.save_pretrained(out)
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={'shortest_edge': 56}, crop_size=56), tokenizer=tok,
                   chat_template=template, patch_size=14, vision_feature_select_strategy='default',
                   num_additional_image_tokens=1).save_pretrained(out)
    return m.eval(), tok


def test_hf_backend_sends_frames_as_images_to_a_model_without_video(world, samples, tmp_path):
    net, tok = make_tiny_llava(str(world / 'tiny'), str(tmp_path / 'llava'))
    vs = data.VisionSettings(nframes=4, min_pixels=56 * 56, max_pixels=56 * 56)
    fn, prepare, info = bench.hf_backend(str(tmp_path / 'llava'), '', vs, 'cpu', max_new_tokens=5)
    assert info['video_input'] == 'images' and info['pixels'] is False  # the processor sizes frames its own way
    two = samples[:2]
    got = fn(two, [prepare(s) for s in two])
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(str(tmp_path / 'llava'))
    for s, out in zip(two, got):  # by hand, one at a time: the 4 sampled frames as 4 images, then the prompt
        frames = data.load_frames(s.video, 4)
        text = proc.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}] * 4 + [
            {'type': 'text', 'text': data.build_user_text(s)}]}], add_generation_prompt=True, tokenize=False)
        x = proc(text=[text], images=[[Image.fromarray(f) for f in frames]], return_tensors='pt')
        assert int((x['input_ids'] == net.config.image_token_index).sum()) == 4 * 16  # 4x4 patches an image
        ids = net.generate(**x, max_new_tokens=5, do_sample=False)[0, x['input_ids'].shape[1]:]
        assert (out['raw'] if isinstance(out, dict) else out) == tok.decode(ids)
    assert got[0] != got[1]


def Qwen2VLConfig(path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


# ----------------------------------------------------------------------------- a chat-completions server

class _Chat(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions. The test sets `behave(key, n_images, attempt) -> action`, per request content
    (key: content_key, as two samples of different videos may ask the same text) and its attempt number
    (deterministic whatever the concurrency): ('ok', content[, finish, refusal]),
    ('status', code[, retry_after]), ('sleep', s) then ok, ('garbage',), ('drop',)."""
    behave, log, key, lock = None, [], None, threading.Lock()
    answer = None  # (text, frames) -> content for 'ok' actions with content None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        parts = body['messages'][-1]['content']
        text = next(p['text'] for p in parts if p['type'] == 'text')
        urls = [p['image_url']['url'] for p in parts if p['type'] == 'image_url']
        cls, key = type(self), content_key(parts)
        with cls.lock:
            attempt = sum(k == key for k, _, _ in cls.log) + 1
            cls.log.append((key, self.headers.get('Authorization'), body))
        act = cls.behave(key, len(urls), attempt)
        if act[0] == 'status':
            self._send(act[1], b'{"error": {"message": "busy"}}', {'Retry-After': str(act[2])} if len(act) > 2 else {})
        elif act[0] == 'garbage':
            self._send(200, b'{"choices": [{"message": ')
        elif act[0] == 'drop':
            self.close_connection = True
            self.connection.shutdown(2)
        else:
            if act[0] == 'sleep':  # past the client's timeout: it has retried by then
                time.sleep(act[1])
                act = ('ok', act[2])
            content = act[1]
            if content is None:
                frames = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(',', 1)[1]))))
                                   for u in urls])
                with cls.lock:  # one model, one request at a time
                    content = cls.answer(text, frames)
            finish = act[2] if len(act) > 2 else 'stop'
            msg = {'role': 'assistant', 'content': content, **({'refusal': act[3]} if len(act) > 3 else {})}
            self._send(200, json.dumps({'model': body['model'], 'choices': [{'message': msg, 'finish_reason': finish}],
                                        'usage': {'prompt_tokens': 100 + len(urls), 'completion_tokens': 7}}).encode())

    def _send(self, code, raw, headers={}):
        self.send_response(code)
        for k, v in dict(headers, **{'Content-Type': 'application/json', 'Content-Length': str(len(raw))}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


def content_key(parts):
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@pytest.fixture
def chat_server():
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Chat)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    _Chat.log = []
    yield f'http://127.0.0.1:{srv.server_address[1]}/v1'
    srv.shutdown()
    srv.server_close()


def test_api_request_parts_round_trip(samples):
    """The three ways a clip goes to a server decode back to what they carry: the sampler's frames (PNG, lossless)
    as images or as one vLLM list-of-frames video_url, or the clip file's bytes."""
    s = samples[0]
    frames, fps = bench.load_clip(s, VS)
    assert frames.shape == (16, 56, 56, 3) and fps == 8.0
    png = lambda b64: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    parts = bench.api_request(s, VS, 'images')
    assert [p['type'] for p in parts] == ['image_url'] * 16 + ['text'] and parts[-1]['text'] == data.build_user_text(s)
    assert np.array_equal(np.stack([png(p['image_url']['url'].split(',', 1)[1]) for p in parts[:-1]]), frames)
    parts = bench.api_request(s, VS, 'video_frames')
    head, _, body = parts[0]['video_url']['url'].partition(';base64,')
    assert len(parts) == 2 and head == 'data:video/jpeg' and np.array_equal(np.stack([png(b) for b in body.split(',')]),
                                                                               frames)
    parts = bench.api_request(s, VS, 'video_file')
    url = parts[0]['video_url']['url']
    with open(s.video, 'rb') as f:
        assert url.startswith('data:video/mp4;base64,') and base64.b64decode(url.split(',', 1)[1]) == f.read()


def test_chat_completion_backoff_and_retry_after(chat_server):
    plan = iter([('status', 429, 3), ('status', 503), ('ok', 'fine')])
    _Chat.behave = lambda text, n, attempt: next(plan)
    slept = []
    body = dict(model='m', messages=[{'role': 'user', 'content': [{'type': 'text', 'text': 'q'}]}])
    r = bench.chat_completion(chat_server, body, 'k', retries=3, backoff=1.0, sleep=slept.append)
    assert (r['raw'], r['attempts'], r['usage'], slept) == ('fine', 3, {'prompt_tokens': 100, 'completion_tokens': 7},
                                                           [3.0, 2.0])  # Retry-After 3 > 1 s; then 2 x 1 s
    _Chat.behave = lambda text, n, attempt: ('status', 401)
    with pytest.raises(bench.FatalAPIError, match='HTTP 401'):
        bench.chat_completion(chat_server, body, 'wrong', retries=3, backoff=0)
    _Chat.behave = lambda text, n, attempt: ('status', 400)
    r = bench.chat_completion(chat_server, body, None, retries=3, backoff=0)
    assert r['attempts'] == 1 and r['error'].startswith('HTTP 400')  # this request is wrong: not retried


def test_openai_backend_counts_every_fault_and_resumes(world, samples, chat_server, tmp_path, monkeypatch):
    ss = samples[:12]
    text_of = {content_key(bench.api_request(s, VS)): i for i, s in enumerate(ss)}
    plans = {0: [('status', 429, 0), ('status', 429, 0)], 1: [('status', 500)] * 9, 2: [('sleep', 1.5, 'late')],
             3: [('garbage',)], 4: [('ok', '   ')], 5: [('ok', '', 'stop', 'I cannot help with that.')],
             6: [('ok', '<think>Going', 'length')], 7: [('drop',)], 8: [('status', 400)], 9: [('status', 502)]}
    truth = {i: oracle([s], None)[0] for i, s in enumerate(ss)}

    def behave(text, n_images, attempt):
        i = text_of[text]
        assert n_images == 16  # the sampler's 16 frames, each an image
        p = plans.get(i, [])
        return p[attempt - 1] if attempt <= len(p) else ('ok', truth[i])
    _Chat.behave = behave
    monkeypatch.setenv('NANOST_TEST_KEY', 'sk-test-DO-NOT-WRITE')
    backend = bench.openai_backend(chat_server, 'served-x', VS, os.environ['NANOST_TEST_KEY'], max_new_tokens=32,
                                   concurrency=4, timeout=0.5, retries=2, backoff=0)
    out = tmp_path / 'api'
    settings = dict(SETTINGS, backend='openai', model='served-x', video_input='images')
    summ, recs = run(ss, backend, out, settings, batch_size=4, num_workers=1)
    ids = [s.id for s in ss]
    # nothing lost: 10 answered and scored, the two whose errors outlived the retries (or were not retryable) bad
    assert summ['evaluated'] == 10 and summ['bad'] == 2
    bad = {b['id']: b['error'] for b in summ['bad_samples']}
    assert set(bad) == {ids[1], ids[8]}
    assert bad[ids[1]].startswith('HTTP 500') and bad[ids[1]].endswith('(after 3 attempts)')
    assert bad[ids[8]].startswith('HTTP 400')
    assert summ['answer_flags'] == {'empty': [ids[4]], 'refusal': [ids[5]], 'cut off': [ids[6]]}
    attempts = {i: recs[ids[i]]['attempts'] for i in (0, 2, 3, 4, 7, 9, 10)}
    assert attempts == {0: 3, 2: 2, 3: 2, 4: 1, 7: 2, 9: 2, 10: 1}  # 429 x2, timeout, bad JSON, dropped, 502
    assert len(_Chat.log) == 3 + 3 + 2 + 2 + 1 + 1 + 1 + 2 + 1 + 2 + 2 == 20  # every request, none lost or doubled
    assert summ['usage'] == {'prompt_tokens': 10 * 116, 'completion_tokens': 10 * 7}
    assert recs[ids[0]]['served_model'] == 'served-x' and recs[ids[0]]['score'] == (5.0 if ss[0].task == 'route' else 1)
    assert recs[ids[6]]['raw'] == '<think>Going' and recs[ids[6]]['score'] == 0
    assert all(auth == 'Bearer sk-test-DO-NOT-WRITE' for _, auth, _ in _Chat.log)
    assert {b['model'] for _, _, b in _Chat.log} == {'served-x'} and _Chat.log[0][2]['max_tokens'] == 32
    table = (out / 'results.md').read_text()
    assert 'answers flagged (scored, listed in results.json): cut off 1, empty 1, refusal 1' in table
    # the re-run asks again exactly the two bad samples, now answered; nothing else is sent
    _Chat.log = []
    _Chat.behave = lambda text, n, attempt: ('ok', truth[text_of[text]])
    summ, _ = run(ss, backend, out, settings, batch_size=4)
    assert sorted(text_of[t] for t, _, _ in _Chat.log) == [1, 8]
    assert summ['evaluated'] == 12 and summ['bad'] == 0 and len(summ['answer_flags']['empty']) == 1
    for f in out.iterdir():  # the key is in no file written
        assert 'DO-NOT-WRITE' not in f.read_text()


def test_cli_openai_backend_through_a_server_answers_like_hf(world, samples, hf_noisy, chat_server, tmp_path):
    """The noisy tiny checkpoint served through the hf backend: bench --backend=openai (frames as PNGs over HTTP,
    4 in flight, a 429 and a 500 on the way) gives the hf backend's answers sample for sample."""
    fn, prepare, _ = hf_noisy

    def answer(text, frames):
        out = fn.from_texts([text], [(frames, 8.0)])[0]
        return out['raw'] if isinstance(out, dict) else out
    _Chat.answer = staticmethod(answer)
    _Chat.behave = lambda key, n, attempt: (('status', 429, 0) if attempt == 1 and int(key, 16) % 3 == 0 else
                                            ('status', 500) if attempt == 1 and int(key, 16) % 3 == 1 else ('ok', None))
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', MY_KEY='sk-cli-SECRET')
    common = [sys.executable, os.path.join(ROOT, 'bench.py'), os.path.join(ROOT, 'config', 'bench_egoworld.py'),
              f'--data={world / "test"}', '--max_new_tokens=6', '--num_workers=1']
    p = subprocess.run(common + ['--backend=openai', f'--api_url={chat_server}', '--model=tiny-served',
                                 '--api_key_env=MY_KEY', '--api_concurrency=4', '--api_backoff=0',
                                 f'--out_dir={tmp_path / "api"}'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'sk-cli-SECRET' not in p.stdout + p.stderr
    api, (_, hf) = bench.read_records(str(tmp_path / 'api')), run(samples, (fn, prepare), tmp_path / 'hf')
    assert len(api) == 24 and {k: r['raw'] for k, r in api.items()} == {k: r['raw'] for k, r in hf.items()}
    assert sorted({r['attempts'] for r in api.values()}) == [1, 2]
    st = json.loads((tmp_path / 'api' / 'results.json').read_text())['settings']
    assert (st['backend'], st['model'], st['video_input'], st['nframes'], st['revision']) == \
        ('openai', 'tiny-served', 'images', 16, None)
    assert all('sk-cli-SECRET' not in f.read_text() for f in (tmp_path / 'api').iterdir())


# ----------------------------------------------------------------------------- leaderboard

def _results(d, scores, **settings):
    """A bench results.json with the given task scores (task_dir: %) and averages computed as bench does."""
    d.mkdir()
    rows = {k: dict(task=k.split('_')[0], direction=k.split('_')[1], score=v) for k, v in scores.items()}
    mean = lambda xs: sum(xs) / len(xs)
    s = dict(tasks=rows, forward=mean([v for k, v in scores.items() if k.endswith('forward')]),
             reverse=mean([v for k, v in scores.items() if k.endswith('reverse')]), overall=mean(list(scores.values())),
             settings=dict(dict(SETTINGS, backend='ours', model=f'/x/{d.name}', revision='sha256:abc'), **settings))
    (d / 'results.json').write_text(json.dumps(s))
    return str(d)


def test_leaderboard_table_csv_and_chart(tmp_path):
    cols = leaderboard.COLUMNS[:8]
    a = _results(tmp_path / 'sft', {c: 10.0 * (i + 1) for i, c in enumerate(cols)})                # 10 ... 80
    b = _results(tmp_path / 'grpo', {c: 50.0 for c in cols if c != 'action_reverse'})               # one task missing
    c = _results(tmp_path / 'hf8', {c: 100.0 for c in cols}, nframes=8, backend='hf')               # other frames
    md = leaderboard.build([a, b, c], str(tmp_path / 'lb'), names=['SFT', None, 'SFT hf'])
    assert md.splitlines() == [
        '| model | route f | route r | direction f | direction r | landmark f | landmark r | action f | action r | '
        'forward | reverse | overall |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
        '| SFT | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 | 70.0 | 80.0 | 40.0 | 50.0 | 45.0 |',
        '| ours:grpo | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | - | 50.0 | 50.0 | 50.0 |',
        '| SFT hf * | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |',
        '',
        '\\* SFT hf: settings differ: nframes 8 (others: 16)']
    assert (tmp_path / 'lb.md').read_text() == md
    rows = list(csv.DictReader(open(tmp_path / 'lb.csv')))
    assert [r['model'] for r in rows] == ['SFT', 'ours:grpo', 'SFT hf'] and rows[2]['backend'] == 'hf'
    assert (rows[0]['route_reverse'], rows[1]['action_reverse'], rows[2]['settings_differ']) == \
        ('20.0000', '', 'nframes 8 (others: 16)')
    img = Image.open(tmp_path / 'lb.png').convert('RGB')
    L, G = leaderboard.LEFT, leaderboard.group_width(3)
    bar = lambda g, i: L + g * G + leaderboard.GAP // 2 + i * leaderboard.BAR + 4  # x inside run i's bar in group g
    y = lambda v: leaderboard.TOP + leaderboard.PLOT_H - v / 100 * leaderboard.PLOT_H
    from curves import COLOURS
    assert img.getpixel((bar(0, 0), y(10) + 2)) == COLOURS[0]       # SFT route f: 10 %
    assert img.getpixel((bar(0, 0), y(10) - 4)) != COLOURS[0]       # ... and no higher
    assert img.getpixel((bar(7, 1), y(0) - 3)) != COLOURS[1]        # grpo action r: none
    assert img.getpixel((bar(10, 2), y(100) + 2)) == COLOURS[2]     # hf overall: 100 %
    with pytest.raises(SystemExit, match='not a bench.py results.json'):
        (tmp_path / 'broken').mkdir()
        (tmp_path / 'broken' / 'results.json').write_text('{"tasks": 3}')
        leaderboard.build([a, str(tmp_path / 'broken')], str(tmp_path / 'x'))
    with pytest.raises(SystemExit, match='nowhere/results.json not found'):
        leaderboard.build([str(tmp_path / 'nowhere')], str(tmp_path / 'x'))


def test_leaderboard_split_columns_and_paired_z(tmp_path):
    cols = leaderboard.COLUMNS[2:8]   # MCQ tasks only, as the v2 table benches them
    a = _results(tmp_path / 'cold_test', {c: 50.0 for c in cols})
    b = _results(tmp_path / 'grpo_test', {c: 60.0 for c in cols})
    for name, v in (('cold', 40.0), ('grpo', 45.0)):
        for split in ('ood', 'ood_theme'):
            _results(tmp_path / f'{name}_{split}', {c: v + (split == 'ood') for c in cols})
    s = json.loads((tmp_path / 'grpo_test' / 'results.json').read_text())
    s['paired'] = dict(n=1200, z=3.949, with_=a)   # bench --paired_with writes this
    (tmp_path / 'grpo_test' / 'results.json').write_text(json.dumps(s))
    md = leaderboard.build([a, b], str(tmp_path / 'lb'), names=['cold start', 'GRPO'], splits=['ood', 'ood_theme'])
    head, _, cold, grpo = md.splitlines()[:4]
    assert head.startswith('| model | direction f |')            # no row has route: its columns are left out
    assert head.endswith('| overall | ood | ood_theme | paired z |')
    assert cold.endswith('| 50.0 | 41.0 | 40.0 | - |') and grpo.endswith('| 60.0 | 46.0 | 45.0 | +3.95 vs cold start |')
    rows = list(csv.DictReader(open(tmp_path / 'lb.csv')))
    assert (rows[1]['ood'], rows[1]['paired_z'], rows[0]['paired_z']) == ('46.0000', '3.9490', '')
    assert Image.open(tmp_path / 'lb.png').size[0] == leaderboard.LEFT + leaderboard.group_width(2) * 11 + 10
    with pytest.raises(SystemExit, match='cold_ood_theme/results.json not found'):
        (tmp_path / 'cold_ood_theme' / 'results.json').unlink()
        leaderboard.build([a], str(tmp_path / 'x'), splits=['ood_theme'])
    with pytest.raises(SystemExit, match=r'needs run dirs named \*_test'):
        leaderboard.build([str(tmp_path / 'cold_ood')], str(tmp_path / 'x'), splits=['ood'])


def test_leaderboard_pairs_rows_with_mcnemar(tmp_path):
    cols = leaderboard.COLUMNS[2:8]
    runs = [_results(tmp_path / n, {c: 50.0 for c in cols}) for n in ('a', 'b')]
    # 10 MCQs: a right on 0-6, b right on 4-9 -> a wins 4 (0-3), b wins 3 (7-9): z = (4 - 3) / sqrt(7)
    for run, right in zip(runs, (range(0, 7), range(4, 10))):
        recs = [dict(id=f'q{k}', task='landmark', direction='forward', correct=k in right) for k in range(10)]
        (tmp_path / run / 'predictions.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    md = leaderboard.build(runs, str(tmp_path / 'lb'), names=['A', 'B'], pairs=[(1, 2), (2, 1)])
    assert '| A (1) vs B (2) | 70.0 vs 60.0 | 4 / 3 | +0.38 |' in md.splitlines()
    assert '| B (2) vs A (1) | 60.0 vs 70.0 | 3 / 4 | -0.38 |' in md.splitlines()
    with pytest.raises(SystemExit, match='--pairs 1:3: rows are 1 to 2'):
        leaderboard.build(runs, str(tmp_path / 'x'), pairs=[(1, 3)])
    with pytest.raises(SystemExit, match='want ROW:ROW pairs'):
        leaderboard.main(runs + ['--pairs=1-2'])
    (tmp_path / 'b' / 'predictions.jsonl').unlink()
    with pytest.raises(SystemExit, match='no predictions to pair with'):
        leaderboard.build(runs, str(tmp_path / 'x'), pairs=[(1, 2)])
