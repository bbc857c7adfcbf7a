"""
Ego-ST Bench evaluation of any model: the eight tasks (route, direction, landmark, action x forward,
reverse), a results table, resumable predictions. Three backends, the rest of the run the same:

    python bench.py CKPT                                  # our model.py (Qwen2/2.5/3-VL), EgoWorld v2's test split
    python bench.py CKPT --data /path/to/Ego-ST-Bench --judge_url=http://host:8000/v1
    python bench.py CKPT --mode=logits --tasks=direction,landmark,action
    torchrun --nproc_per_node 8 bench.py CKPT --data=...  # data parallel, rank 0 merges
    python bench.py --backend=hf --model=HUB_ID_OR_DIR --data=...         # any transformers image-text-to-text model
    python bench.py --backend=openai --api_url=http://host:8000/v1 --model=NAME --data=...   # any chat endpoint

Arguments: the first directory is the checkpoint (or --ckpt=), *.py files are config presets
(config/bench_egoworld.py), then --key=value or --key value overrides of the settings below.
Our backend's inputs go through data.encode (the one preprocessing function) in DataLoader workers; the
others get the same sampled frames (load_clip) and the same prompt text. Answers are scored by reward.py,
so bench and GRPO agree. A bad sample (missing video, unscorable ground truth, rejected by the reader, a
server error that outlived the retries) is counted and listed in results.json, and the run goes on; empty,
refused and cut-off answers are scored and listed (answer_flags). Every prediction is a JSONL record
carrying the run's settings (backend, model, revision, frames, pixels, prompt version); a re-run
evaluates only what is missing. leaderboard.py puts several runs' results.json side by side.

Left out on purpose: sampling-based self-consistency, parallel judge calls, caching decoded videos
between runs, the logits mode for the hf/openai backends, streaming replies, a per-model prompt (every
model gets the one prompt, as in the paper).
"""
import base64
import concurrent.futures
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import types
import urllib.error
import urllib.request

import numpy as np

import torch
import torch.distributed as dist
from tqdm import tqdm

import reward
from common import barrier, init_distributed, StopSignals, write_text
from data import (PROMPT_VERSION, TEMPORAL_PATCH, DataError, Tokenizer, VisionSettings, build_user_text, encode,
                  is_image, load_frames, load_image, pack, preprocess_frames, read_jsonl_log, read_samples,
                  second_per_grid, smart_resize)
from model import ModelConfig, Qwen2VL, rope_positions

# -----------------------------------------------------------------------------
# what to evaluate
backend = 'ours'          # 'ours' (model.py) | 'hf' (transformers' AutoModelForImageTextToText) | 'openai' (a server)
ckpt = ''                 # checkpoint dir (HF layout); usually given as the first positional directory
model = ''                # hf: a hub id or directory (else ckpt); openai: the model name the server serves
revision = ''             # hf: the hub revision to load; openai: recorded as given ('' = unknown)
hf_rope = 'transformers'  # hf, Qwen2-VL: 'released' = text after a video at its largest M-RoPE id + 1 (model.py,
                          # vLLM, the weights' training) instead of transformers 5's max(h, w)/2 past its start
data = 'data_egoworld_v2/test'  # EgoWorld v2's test split (demo.sh's); or a benchmark folder / .jsonl
tasks = 'route,direction,landmark,action'  # any subset; x directions = the eight tasks
directions = 'forward,reverse'
parts = ''                # '' = all; '1,3' keeps samples from Part1_*/Part3_* files (OOD = held-out parts)
limit = 0                 # >0: the first N samples after filtering (smoke runs)
out_dir = ''              # '' -> out/bench/<ckpt name>_<data name>
paired_with = ''          # another run's out_dir on the same questions (e.g. the SFT checkpoint's): MCQ answers
                          # that flip between the two runs, and McNemar's z of the difference
# preprocessing, data.VisionSettings. 0 = what the checkpoint was trained with (its
# vision_settings.json, written by sft.py/grpo.py); else EgoWorld's clips (16 frames of 56x56)
# for the EgoWorld default; else the paper's evaluation setting (8 frames, [128*28^2, 360*420] px)
nframes = 0
min_pixels = 0
max_pixels = 0
# decoding
mode = 'generate'         # 'generate' | 'logits' (MCQ letter from one forward pass; see docstring)
logits_prefix = '<think></think><answer>'  # assistant text before the letter in logits mode
batch_size = 8            # prompts per model call; generation is batched over one KV cache
max_new_tokens = 512      # the paper's setting; CoT answers need the room
temperature = 0.0         # 0 = greedy, the benchmark default
num_workers = 2           # DataLoader workers decoding videos while the model runs
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
# LLM judge for route descriptions (off when judge_url is '')
judge_url = ''            # OpenAI-compatible base url, e.g. http://localhost:8000/v1
judge_model = 'gpt-4o'    # the paper's judge
judge_key_env = 'OPENAI_API_KEY'  # env var holding the bearer key, if the endpoint needs one
judge_retries = 3         # extra attempts; a reply that is not the JSON asked for is retried too
judge_timeout = 60.0      # seconds per HTTP call
judge_backoff = 1.0       # seconds before the first retry, doubled each time
# OpenAI-compatible chat endpoint (backend='openai')
api_url = ''              # base url, e.g. http://localhost:8000/v1 (vllm serve, SGLang) or https://api.openai.com/v1
api_key_env = 'OPENAI_API_KEY'  # the env var holding the bearer key (the key itself is never written anywhere)
api_concurrency = 8       # requests in flight at once (a batch is at least this big)
api_timeout = 120.0       # seconds per HTTP call
api_retries = 5           # extra attempts after a 429, a 5xx, a timeout, a lost connection or a malformed reply
api_backoff = 1.0         # seconds before the first retry, doubled each time (a longer Retry-After wins, <= 60 s)
api_input = 'images'      # the clip as: 'images' (a PNG image_url per sampled frame), 'video_frames' (the sampled
                          # frames as ONE video_url, vLLM's frame-list data url), 'video_file' (the clip file as one
                          # video_url: the server samples and sizes its frames)
# -----------------------------------------------------------------------------

MCQ_TASKS = ('direction', 'landmark', 'action')
TASK_ORDER = ('route',) + MCQ_TASKS
PAPER_SETTINGS = dict(nframes=8, min_pixels=128 * 28 * 28, max_pixels=360 * 420)
DEFAULT_DATA = data
# writes data_egoworld_v2/{train,test,ood,ood_theme}, as demo.sh does
MAKE_DEFAULT = ('python egoworld.py --out=data_egoworld_v2 --version=2 --cot_caption=True --cot_judged=True '
                '--n_train=4000 --cold_start=250')


# ----------------------------------------------------------------------------- samples

def part_of(sample):
    """The benchmark Part number from the sample's source file name (None when there is none)."""
    m = re.match(r'Part(\d+)_', os.path.basename(sample.source))
    return int(m.group(1)) if m else None


def load_samples(path, tasks='route,direction,landmark,action', directions='forward,reverse', parts='', limit=0):
    """Any data.py format, read leniently -> (samples, errors: one line per rejected item). Videos
    are checked later, in the loader's workers, in parallel with the model."""
    if not os.path.exists(path):
        raise SystemExit(f"bench: {path} not found." + (f" Make the EgoWorld default with\n    {MAKE_DEFAULT}"
                                                        if path == DEFAULT_DATA else ''))
    samples, errors = read_samples(path, strict=False, check_videos=False)
    keep_p = {int(p) for p in str(parts).split(',') if p.strip()}
    samples = [s for s in samples if s.task in tasks.split(',') and s.direction in directions.split(',')
               and (not keep_p or part_of(s) in keep_p)]
    seen, unique = set(), []
    for s in samples:
        if s.id in seen:
            errors.append(f"{s.source}: duplicate sample id {s.id!r}; the first one is kept")
        else:
            seen.add(s.id)
            unique.append(s)
    return (unique[:limit] if limit > 0 else unique), list(errors)


def vision_settings(model_dir, data_path, overrides):
    """data.VisionSettings: explicit overrides > CKPT/vision_settings.json > EgoWorld's clips for the
    EgoWorld default > the paper's evaluation setting."""
    base = dict(PAPER_SETTINGS)
    path = os.path.join(model_dir, 'vision_settings.json') if model_dir else ''
    if path and os.path.exists(path):
        with open(path) as f:
            trained = json.load(f)
        base.update({k: v for k, v in trained.items() if k in base})
        if trained.get('prompt_version', PROMPT_VERSION) != PROMPT_VERSION:
            print(f"bench: warning: {path} was trained with prompt {trained['prompt_version']!r}, "
                  f"data.py now builds {PROMPT_VERSION!r}", file=sys.stderr)
    elif data_path == DEFAULT_DATA:
        import egoworld  # its clips are key_frames frames of size x size, planned for that sampling
        base.update(nframes=egoworld.key_frames, min_pixels=egoworld.size ** 2, max_pixels=egoworld.size ** 2)
    base.update({k: v for k, v in overrides.items() if v})
    return VisionSettings(**base)


# ----------------------------------------------------------------------------- scoring

def score(sample, raw):
    """One prediction record (settings are added by the loop). MCQ: the letter reward.parse_answer reads
    (strict: no "first A-D character anywhere" fallback; an unparsable output is wrong and counts in the
    parse-failure rate). Route: route_rubric on the final <answer> block. ValueError: unscorable ground truth."""
    rec = dict(id=sample.id, task=sample.task, direction=sample.direction, source=sample.source,
               answer=sample.answer, raw=raw)
    if sample.task in MCQ_TASKS:
        letter = reward.parse_answer(raw, reward.option_letters(len(sample.options)))
        rec.update(parsed=letter, correct=letter == sample.answer, score=float(letter == sample.answer))
    else:
        text = reward.parse_answer_text(raw)
        rubric = reward.route_rubric(text, sample.answer)
        rec.update(parsed=text, rubric=rubric, score=rubric['score'])
    return rec


JUDGE_SYSTEM = "You are a strict evaluator of route descriptions. Reply with a JSON object only."
JUDGE_PROMPT = """Compare a predicted route description with the reference route of an egocentric video.
Score three aspects, each an integer from 0 (worst) to 5 (best):
- "direction": are the direction changes (go straight, turn left, turn right, turn around) and their
  order the same as in the reference? Penalise every direction change that is not in the reference,
  and every reference direction change that is missing or reversed.
- "landmark": does the prediction mention the reference's landmarks? Do NOT penalise extra landmarks;
  penalise reference landmarks that are missing.
- "logic": semantic and logical consistency: is the prediction a coherent route, similar overall in
  meaning to the reference?
Reference route: {reference}
Predicted route: {prediction}
Reply with exactly this JSON and nothing else: {{"direction": <0-5>, "landmark": <0-5>, "logic": <0-5>}}"""
JUDGE_KEYS = ('direction', 'landmark', 'logic')


def parse_judge_reply(content):
    """The judge's message -> {direction, landmark, logic} integers 0-5, or ValueError saying why."""
    try:
        obj = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        m = re.search(r'\{.*\}', content or '', re.S)  # tolerate ```json fences around the object
        try:
            obj = json.loads(m.group(0)) if m else None
        except json.JSONDecodeError:
            obj = None
    if not isinstance(obj, dict):
        raise ValueError(f"judge reply is not a JSON object: {content!r:.200}")
    out = {}
    for k in JUDGE_KEYS:
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 0 <= v <= 5:
            raise ValueError(f"judge reply: {k!r} must be an integer 0-5, got {v!r} in {content!r:.200}")
        out[k] = int(v)
    return out


def judge_route(prediction, reference, url, model, retries=3, timeout=60.0, backoff=1.0, api_key=None):
    """The paper's three-part rubric from an OpenAI-compatible /chat/completions endpoint (stdlib urllib),
    temperature 0, JSON output, retries -> dict(direction, landmark, logic, score, attempts, error). Fixed
    denominator: an empty prediction or a judge that fails every retry scores 0 and is counted, never
    skipped (the released evaluation skipped empty predictions and ran the judge at its default temperature)."""
    if not (prediction or '').strip():  # fixed denominator: no answer is a 0, not a skip
        return dict(direction=0, landmark=0, logic=0, score=0.0, attempts=0, error='empty prediction')
    endpoint = url.rstrip('/')
    endpoint += '' if endpoint.endswith('/chat/completions') else '/chat/completions'
    body = json.dumps(dict(model=model, temperature=0, response_format={'type': 'json_object'},
                           messages=[dict(role='system', content=JUDGE_SYSTEM),
                                     dict(role='user', content=JUDGE_PROMPT.format(reference=reference,
                                                                                   prediction=prediction))])).encode()
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {api_key}'} if api_key else {})}
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(endpoint, data=body, headers=headers, method='POST')
            with urllib.request.urlopen(req, timeout=timeout) as r:
                s = parse_judge_reply(json.loads(r.read().decode())['choices'][0]['message']['content'])
            return dict(s, score=sum(s.values()) / 3, attempts=attempt + 1, error=None)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # URLError, HTTPError, timeouts: OSError
            error = f"{type(e).__name__}: {e}"
    return dict(direction=0, landmark=0, logic=0, score=0.0, attempts=retries + 1, error=error)


# ----------------------------------------------------------------------------- predictions file

def _pred_files(out_dir):
    ranks = sorted(glob.glob(os.path.join(out_dir, 'predictions.rank*.jsonl')))
    return [os.path.join(out_dir, 'predictions.jsonl')] + ranks


def read_predictions(out_dir, settings):
    """Records of earlier runs (any world size, possibly interrupted) -> ({id: record}, [bad records]).
    Each rank appends to its own predictions.rank<r>.jsonl; merge_predictions folds them into one file.
    A torn last line (killed mid-write) is dropped and re-evaluated; any other bad line, or a record
    written with other settings, is an error naming the file and line."""
    done, bad = {}, []
    for path in _pred_files(out_dir):
        if not os.path.exists(path):
            continue
        rows, torn = read_jsonl_log(path)
        if torn:
            print(f"bench: {path}:{torn}: incomplete last line (interrupted write), re-evaluating it", file=sys.stderr)
        for n, rec in rows:
            old = rec.get('settings') or {}
            if old != settings:
                diff = ', '.join(f"{k}: file {old.get(k)!r} vs now {settings.get(k)!r}"
                                 for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
                raise DataError(f"{path}:{n}: predictions were made with other settings ({diff}); "
                                 f"use another --out_dir or delete the file")
            if rec.get('bad'):
                bad.append(rec)  # bad samples are retried by the next run
            else:
                done[rec['id']] = rec
    return done, bad


def merge_predictions(out_dir, settings, order):
    """Rank 0: fold the per-rank files into predictions.jsonl, records in `order` (ids), others after, so
    the merged file does not depend on the number of ranks. Returns (done, bad) as read_predictions."""
    done, bad = read_predictions(out_dir, settings)
    pos = {k: i for i, k in enumerate(order)}
    recs = sorted(done.values(), key=lambda r: (pos.get(r['id'], len(pos)), r['id']))
    write_text(os.path.join(out_dir, 'predictions.jsonl'), ''.join(json.dumps(r) + '\n' for r in recs))
    for path in _pred_files(out_dir)[1:]:
        os.remove(path)
    return done, bad


# ----------------------------------------------------------------------------- the loop

def _prepare_batch(prepare, samples):
    """DataLoader collate, run in the workers: each sample -> (sample, inputs, error)."""
    out = []
    for s in samples:
        try:
            out.append((s, prepare(s) if prepare else None, None))
        except Exception as e:  # a missing/corrupt video must not end the run
            out.append((s, None, f"{type(e).__name__}: {e}"))
    return out


def _answer(answer_fn, samples, inputs, fail_fast):
    """[(raw, error)] for a batch; when the batch fails, one at a time, so only the culprit is lost.
    fail_fast (nothing answered yet): a sample that fails alone re-raises, because a model that
    cannot answer its first sample is broken, and hours of "bad" samples would hide it."""
    try:
        outs = list(answer_fn(samples, inputs))
        if len(outs) != len(samples):
            raise RuntimeError(f"answer_fn returned {len(outs)} outputs for {len(samples)} samples")
        return [(o, None) for o in outs]
    except Exception as e:
        if len(samples) == 1:
            if fail_fast:
                raise
            return [(None, f"{type(e).__name__}: {e}")]
    out = []
    for s, x in zip(samples, inputs):
        out += _answer(answer_fn, [s], [x], fail_fast)
        fail_fast = fail_fast and out[-1][1] is not None
    return out


def _unpack(out):
    """One answer_fn output -> (raw, fields for the record, error). A str is the answer; a dict carries the
    answer as 'raw' and fields to record beside it (usage, attempts, flag: 'empty' | 'refusal' | 'cut off',
    an answer that is scored and counted), or 'error': no answer (a server that failed every retry), a bad
    sample like a missing video, asked again by the next run."""
    if not isinstance(out, dict):
        return out, {}, None
    extra = {k: v for k, v in out.items() if k not in ('raw', 'error')}
    return (None, extra, out['error']) if out.get('error') else (out['raw'], extra, None)


def _record(s, raw, err, judge):
    if err is None:
        try:
            rec = score(s, raw)
            if judge is not None and s.task not in MCQ_TASKS:
                rec['judge'] = judge(rec['parsed'], s.answer)
            return rec
        except ValueError as e:  # e.g. a reference route with no parseable step
            err = f"{type(e).__name__}: {e}"
    return dict(id=s.id, task=s.task, direction=s.direction, source=s.source, bad=True, error=err)


def evaluate(samples, answer_fn, out_dir, settings, prepare=None, batch_size=8, num_workers=0,
             judge=None, reader_errors=(), rank=0, world_size=1, progress=True, paired_with='', signals=None,
             device='cpu'):
    """Answer and score every sample not yet in out_dir/predictions.jsonl; rank 0 merges and writes
    results.json and results.md. answer_fn(samples, inputs) -> an output per sample (_unpack); prepare(sample)
    -> inputs, run in DataLoader workers (raising marks the sample bad); judge(prediction,
    reference) -> dict with 'score' and 'error', for route samples; paired_with: another run's out_dir to
    compare MCQ answers with (mcnemar); signals: a common.StopSignals, after which every rank finishes its batch
    and the run ends without a table (a re-run evaluates the rest). Returns the summary on rank 0."""
    os.makedirs(out_dir, exist_ok=True)
    ids = [s.id for s in samples]
    read_predictions(out_dir, settings)  # every rank validates first, so a mismatch fails on all alike
    barrier()                 # ... and nobody is still reading when rank 0 rewrites
    if rank == 0:
        merge_predictions(out_dir, settings, ids)
    barrier()
    done, _ = read_predictions(out_dir, settings)
    todo = [s for s in samples if s.id not in done]
    mine = todo[rank::world_size]
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=functools.partial(_prepare_batch, prepare))
    if progress and rank == 0:
        print(f"bench: {len(todo)} of {len(samples)} samples to evaluate ({len(done)} done by an earlier run)")
    bar = tqdm(total=len(mine), unit='QA', disable=not progress or rank != 0, dynamic_ncols=True, desc='bench')
    answered = False
    with open(os.path.join(out_dir, f'predictions.rank{rank}.jsonl'), 'a') as f:
        for batch in loader:
            good = [(s, x) for s, x, err in batch if err is None]
            answers = _answer(answer_fn, [s for s, _ in good], [x for _, x in good], not answered) if good else []
            answers = [_unpack(raw) if err is None else (None, {}, err) for raw, err in answers]
            answered = answered or any(err is None for _, _, err in answers)
            answers = iter(answers)
            for s, x, err in batch:
                raw, extra, err = next(answers) if err is None else (None, {}, err)
                rec = dict(_record(s, raw, err, judge), **extra, settings=settings)
                if isinstance(x, dict) and 'second_per_grid_ts' in x:  # this clip's own time base
                    rec['second_per_grid_ts'] = float(x['second_per_grid_ts'][0])
                if isinstance(x, dict) and 'timestamps' in x:  # Qwen3-VL: the seconds its prompt wrote
                    rec['timestamps'] = x['timestamps']
                f.write(json.dumps(rec) + '\n')
                f.flush()  # an interruption loses at most the line being written
            bar.update(len(batch))
            if signals is not None and signals.signum is not None:
                break
    bar.close()
    if signals is not None and signals.agreed(device):
        if rank == 0:
            print(f'bench: stopped by SIGTERM/SIGUSR1; the predictions so far are kept in {out_dir}; run the same '
                  f'command again to evaluate the rest')
        return None
    barrier()
    if rank != 0:
        return None
    done, bad = merge_predictions(out_dir, settings, ids)
    bad = [b for b in bad if b['id'] not in done]
    summary = summarize([done[k] for k in ids if k in done], bad, reader_errors, judged=judge is not None)
    summary['settings'] = settings
    if paired_with:
        summary['paired'] = dict(mcnemar(done, read_records(paired_with)), with_=paired_with)
    write_text(os.path.join(out_dir, 'results.json'), json.dumps(summary, indent=1) + '\n')
    write_text(os.path.join(out_dir, 'results.md'), markdown(summary))
    return summary


# ----------------------------------------------------------------------------- the table

def read_records(out_dir):
    """{id: record} of a finished run's predictions.jsonl, whatever its settings (for comparisons)."""
    path = os.path.join(out_dir, 'predictions.jsonl')
    if not os.path.exists(path):
        raise DataError(f'{path}: no predictions to pair with (run bench.py on that checkpoint first)')
    return {rec['id']: rec for _, rec in read_jsonl_log(path)[0] if not rec.get('bad')}


def mcnemar(records, baseline):
    """Paired comparison of two runs on the MCQ questions both answered: the questions that flip
    (wrong_to_right: right here and wrong in the baseline, right_to_wrong: the other way) and McNemar's
    z = (wrong_to_right - right_to_wrong) / sqrt(their sum), ~N(0, 1) when the two are equally good."""
    ids = [k for k, r in records.items() if r['task'] in MCQ_TASKS and k in baseline]
    up = sum(records[k]['correct'] and not baseline[k]['correct'] for k in ids)
    down = sum(baseline[k]['correct'] and not records[k]['correct'] for k in ids)
    acc = lambda recs: 100 * _mean(recs[k]['correct'] for k in ids)
    return dict(n=len(ids), accuracy=acc(records), baseline_accuracy=acc(baseline), wrong_to_right=up,
                right_to_wrong=down, z=(up - down) / math.sqrt(up + down) if up + down else 0.0)


def _mean(xs):
    xs = [x for x in xs if x == x]  # a row whose every sample was bad has no score (NaN): left out
    return sum(xs) / len(xs) if xs else float('nan')


def summarize(records, bad=(), reader_errors=(), judged=False):
    """Rows per task x direction, per category, forward/reverse averages. Scores are percent: MCQ accuracy;
    route = mean 0-5 score / 5 * 100 (the judge's when a judge ran, else the rubric's). A category is the
    mean of its forward and reverse rows; forward / reverse / overall the mean over the rows present (a row
    with no evaluated sample has no score and is left out; its bad count shows)."""
    rows = {}
    for t in TASK_ORDER:
        for d in ('forward', 'reverse'):
            rs = [r for r in records if r['task'] == t and r['direction'] == d]
            nbad = sum(b['task'] == t and b['direction'] == d for b in bad)
            if not rs and not nbad:
                continue
            row = dict(task=t, direction=d, n=len(rs), bad=nbad,
                       parse_fail=100 * _mean(r['parsed'] is None for r in rs))
            if t in MCQ_TASKS:
                row['accuracy'] = row['score'] = 100 * _mean(r['correct'] for r in rs)
            else:
                for k in ('direction', 'landmark', 'logic', 'score'):
                    row[f'rubric_{k}'] = _mean(r['rubric'][k] for r in rs)
                row['score'] = 20 * row['rubric_score']
                if judged:
                    js = [r['judge'] for r in rs]
                    row['judge'] = _mean(j['score'] for j in js)  # failures are in, as 0
                    row['judge_fail'] = sum(j['error'] not in (None, 'empty prediction') for j in js)
                    row['judge_empty'] = sum(j['error'] == 'empty prediction' for j in js)
                    row['score'] = 20 * row['judge']
            rows[f'{t}_{d}'] = row
    flags = {}  # answers that came back empty, refused or cut off: scored like any answer, and listed
    for r in records:
        if r.get('flag'):
            flags.setdefault(r['flag'], []).append(r['id'])
    usage = {}  # tokens a server billed, summed over the answered samples
    for r in records:
        for k, v in (r.get('usage') or {}).items():
            if isinstance(v, (int, float)):
                usage[k] = usage.get(k, 0) + v
    cats = {t: _mean(r['score'] for r in rows.values() if r['task'] == t)
            for t in TASK_ORDER if any(r['task'] == t for r in rows.values())}
    return dict(tasks=rows, categories=cats,
                forward=_mean(r['score'] for r in rows.values() if r['direction'] == 'forward'),
                reverse=_mean(r['score'] for r in rows.values() if r['direction'] == 'reverse'),
                overall=_mean(r['score'] for r in rows.values()), evaluated=len(records),
                bad=len(bad) + len(reader_errors),
                bad_samples=[dict(id=b['id'], source=b['source'], error=b['error']) for b in bad],
                reader_errors=list(reader_errors), answer_flags=flags, usage=usage)


def _f(x, fmt='.1f'):
    return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(s):
    out = ['| task | dir | n | bad | score % | parse fail % | rubric 0-5 (dir/lmk/logic) | judge 0-5 (fail/empty) |',
           '|---|---|---|---|---|---|---|---|']
    for r in s['tasks'].values():
        rub = (f"{_f(r['rubric_score'], '.2f')} ({_f(r['rubric_direction'], '.2f')}/{_f(r['rubric_landmark'], '.2f')}/"
               f"{_f(r['rubric_logic'], '.2f')})" if 'rubric_score' in r else '-')
        jud = f"{_f(r['judge'], '.2f')} ({r['judge_fail']}/{r['judge_empty']})" if 'judge' in r else '-'
        out.append(f"| {r['task']} | {r['direction']} | {r['n']} | {r['bad']} | {_f(r['score'])} | "
                   f"{_f(r['parse_fail'])} | {rub} | {jud} |")
    heads = list(s['categories']) + ['forward', 'reverse', 'overall']
    vals = list(s['categories'].values()) + [s['forward'], s['reverse'], s['overall']]
    out += ['', '| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads), '| ' + ' | '.join(map(_f, vals)) + ' |',
            '', f"evaluated {s['evaluated']}, bad {s['bad']} (listed in results.json)"]
    if s.get('answer_flags'):
        out += ['', 'answers flagged (scored, listed in results.json): ' +
                ', '.join(f"{k} {len(v)}" for k, v in sorted(s['answer_flags'].items()))]
    if s.get('usage'):
        out += ['', 'tokens: ' + ', '.join(f"{k} {v:,}" for k, v in sorted(s['usage'].items()))]
    if 'paired' in s:
        p = s['paired']
        out += ['', f"paired with {p['with_']} on {p['n']} MCQs: {_f(p['baseline_accuracy'])} -> "
                    f"{_f(p['accuracy'])}; {p['wrong_to_right']} wrong -> right, {p['right_to_wrong']} right -> wrong, "
                    f"McNemar z = {p['z']:+.2f}"]
    return '\n'.join(out) + '\n'


# ----------------------------------------------------------------------------- the model side

def prepare_sample(tok, settings, cfg, sample):
    """Video decode + prompt tokens of one sample (in a DataLoader worker): data.py's one pipeline."""
    return encode(sample, tok, settings, None, cfg)


def _to(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_generate_fn(model, tok, max_new_tokens, temperature=0.0, device='cpu'):
    """answer_fn: one batched generate over a KV cache; greedy when temperature == 0."""
    stop = [tok.im_end_id, tok.pad_id]  # Qwen2-VL's generation_config eos ids: <|im_end|>, <|endoftext|>

    def answer(samples, inputs):
        b = _to(pack(inputs), device)
        toks, _, lens = model.generate(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'],
                                       b['grid_thw'], max_new_tokens=max_new_tokens, temperature=temperature,
                                       stop_tokens=stop)
        rows = [t[:n].tolist() for t, n in zip(toks, lens.tolist())]
        return [tok.decode(r[:-1]) if r and r[-1] in stop else cut_off(tok.decode(r)) for r in rows]
    return answer


def cut_off(text):
    """An answer that ran into max_new_tokens: scored as it is, and counted (results.json answer_flags)."""
    return dict(raw=text, flag='cut off')


def letter_tokens(tok, prefix, n):
    """(tokens shared by prefix+'A' ... prefix+<n-th letter>, each letter's remaining tokens). The
    letters' tokens are those of the joint tokenisation, as in training: BPE may merge a letter
    with the prefix's last character ('>A'), for some letters and not others."""
    encs = [tok.encode(prefix + L) for L in reward.option_letters(n)[:n]]
    k = 0
    while all(len(e) > k for e in encs) and len({e[k] for e in encs}) == 1:
        k += 1
    if any(len(e) == k for e in encs):
        raise ValueError(f"logits_prefix {prefix!r}: one option letter's tokens are a prefix of another's")
    return encs[0][:k], [e[k:] for e in encs]


def letter_logprobs(model, tok, prefix, samples, inputs, device='cpu'):
    """Per MCQ sample, log p(letter tokens | prompt + prefix) for each valid letter, from one packed
    forward pass. Usually every letter is one token after the shared part: one sequence per sample,
    read at its last position. Letters of several tokens add a sequence per distinct context (the
    vision tower runs again for it) and score the sum of their tokens' log-probs."""
    seqs, reads = [], []  # reads[j]: per letter of sample j, (sequence index, its length, the letter's tokens)
    for s, inp in zip(samples, inputs):
        shared, tails = letter_tokens(tok, prefix, len(s.options))
        ctx = {}
        for tail in tails:
            if tuple(tail[:-1]) not in ctx:
                x = torch.cat([inp['input_ids'], torch.tensor(shared + tail[:-1], dtype=torch.long)])
                pos, nxt = rope_positions(x, inp['grid_thw'], model.config, inp['second_per_grid_ts'])
                ctx[tuple(tail[:-1])] = (len(seqs), len(x))
                seqs.append(dict(inp, input_ids=x, labels=torch.full_like(x, -100), position_ids=pos,
                                 next_position=nxt))
        reads.append([(*ctx[tuple(t[:-1])], t) for t in tails])
    b = _to(pack(seqs), device)
    cu = b['cu_seqlens'].tolist()
    # token j of a letter's tail is predicted at position len(x) - len(tail) + j of its sequence
    rows = [cu[q] + n - len(t) + j for r in reads for q, n, t in r for j in range(len(t))]
    toks = torch.tensor([tid for r in reads for _, _, t in r for tid in t])
    h = model(b['input_ids'], b['position_ids'], b['cu_seqlens'], b['pixel_values'], b['grid_thw'], return_hidden=True)
    lp = iter(model.logits(h[rows]).float().log_softmax(-1)[torch.arange(len(rows)), toks.to(h.device)].tolist())
    return [[sum(next(lp) for _ in t) for _, _, t in r] for r in reads]


def make_logits_fn(model, tok, prefix, generate_fn, device='cpu'):
    """answer_fn for mode='logits': an MCQ letter from ONE forward pass, the valid letter of highest
    letter_logprobs after the assistant text `prefix` (default "<think></think><answer>": an empty thought,
    so the next token is where the letter goes), written as prefix + letter + '</answer>' so parse_answer
    reads it like any output. Much faster and never unparsable: compare it with generate-mode numbers only
    knowingly. Route samples go to generate_fn."""
    def answer(samples, inputs):
        outs = [None] * len(samples)
        route = [i for i, s in enumerate(samples) if s.task not in MCQ_TASKS]
        for i, o in zip(route, generate_fn([samples[i] for i in route], [inputs[i] for i in route]) if route else []):
            outs[i] = o
        mcq = [i for i, s in enumerate(samples) if s.task in MCQ_TASKS]
        if mcq:
            scores = letter_logprobs(model, tok, prefix, [samples[i] for i in mcq], [inputs[i] for i in mcq], device)
            for i, sc in zip(mcq, scores):
                outs[i] = f"{prefix}{reward.option_letters(len(sc))[max(range(len(sc)), key=sc.__getitem__)]}</answer>"
        return outs
    return answer


# ----------------------------------------------------------------------------- other people's models

def ours_backend(model_dir, vs, dev, max_new_tokens, temperature=0.0, dtype_name='float32'):
    """This project's model.py on a Qwen2/2.5/3-VL checkpoint directory -> (answer_fn, prepare, model, tok):
    data.encode in the loader's workers, a packed batched generate (make_generate_fn)."""
    tok = Tokenizer(model_dir)
    net = Qwen2VL.from_pretrained(model_dir, dtype=getattr(torch, dtype_name), device=dev).eval()
    return (make_generate_fn(net, tok, max_new_tokens, temperature, dev),
            functools.partial(prepare_sample, tok, vs, net.config), net, tok)


def dir_revision(path):
    """'sha256:<12 hex>' of a checkpoint directory's config.json and weight files, by content: two runs of
    different weights under one name are told apart (reads every weight byte: ~10 s for a 7B)."""
    h = hashlib.sha256()
    for n in sorted(n for n in os.listdir(path) if n == 'config.json' or n.endswith(('.safetensors', '.bin'))):
        h.update(n.encode())
        with open(os.path.join(path, n), 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 24), b''):
                h.update(chunk)
    return 'sha256:' + h.hexdigest()[:12]


def one_for_all(fn, rank, world):
    """fn() on rank 0, its result on every rank (a 7B's weights hashed once, not once per GPU)."""
    out = [fn() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


def load_clip(sample, settings):
    """The frames this project's sampler takes (data.load_frames: nframes spread over the whole clip, as
    every backend sees them) -> (uint8 (N, H, W, 3), frames per second of the sampled frames; None for a
    still image). Run in the loader's workers."""
    try:
        if is_image(sample.video):
            return load_image(sample.video), None
        # second_per_grid = temporal patch (2 frames) x the sampled frames' spacing in seconds
        return load_frames(sample.video, settings.nframes), TEMPORAL_PATCH / second_per_grid(sample, settings)
    except DataError as e:
        raise DataError(f'{sample.source} ({sample.id}): {e}') from e


def chat_messages(user_text, n_images=0):
    """The prompt (data.build_user_text) as chat messages, the clip first as data.chat_tokens lays it out:
    one video, or n_images images for a model that takes no video."""
    visual = [{'type': 'image'}] * n_images if n_images else [{'type': 'video'}]
    return [{'role': 'user', 'content': visual + [{'type': 'text', 'text': user_text}]}]


VISUAL_TOKEN_KEYS = ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id',
                     'image_token_index', 'video_token_index')  # Qwen-VL's names and LLaVA's


def visual_token_ids(cfg):
    """A transformers config's image/video placeholder and vision start/end ids (top level or text_config):
    never sampled, the policy model.generate follows for our backend."""
    ids = {getattr(c, k) for c in (cfg, getattr(cfg, 'text_config', None)) for k in VISUAL_TOKEN_KEYS
           if c is not None and isinstance(getattr(c, k, None), int) and getattr(c, k) >= 0}
    return sorted(ids)


def qwen_inputs(tok, cfg, settings, texts, clips):
    """What Qwen2/2.5-VL's transformers processor returns for chat texts + clips, computed with
    data.preprocess_frames (Qwen2-VL's pixels and patch order, equal to transformers' processors: test_data).
    transformers 5 builds no video processor without torchvision, and this project's machines have none
    (the registry's torchvision is a CUDA build that does not load beside CPU torch). Left padded."""
    merge = cfg.vision_config.spatial_merge_size
    ids = dict(video=cfg.video_token_id, image=cfg.image_token_id)
    rows, vis = [], dict(video=([], [], []), image=([], [], []))
    for text, (frames, fps) in zip(texts, clips):
        kind = 'image' if fps is None else 'video'
        x, grid = preprocess_frames(frames, settings)
        pad = tok.convert_ids_to_tokens(ids[kind])
        rows.append(text.replace(pad, pad * (int(grid.prod()) // merge ** 2), 1))
        for lst, v in zip(vis[kind], (x, grid, TEMPORAL_PATCH / fps if fps else 0.0)):
            lst.append(v)
    tok.padding_side = 'left'  # generation continues every row from its last column
    out = dict(tok(rows, padding=True, return_tensors='pt'))
    out['mm_token_type_ids'] = ((out['input_ids'] == ids['image']).int() + 2 * (out['input_ids'] == ids['video']).int())
    for kind, (xs, grids, secs) in vis.items():
        if xs:
            out[f'pixel_values{"_videos" if kind == "video" else ""}'] = torch.cat(xs)
            out[f'{kind}_grid_thw'] = torch.cat(grids)
            if kind == 'video' and cfg.model_type == 'qwen2_5_vl':
                out['second_per_grid_ts'] = torch.tensor(secs)
    return out


def released_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                        attention_mask=None, **kw):
    """transformers' Qwen2VLModel.get_rope_index computed with model.rope_positions, the released rule, on each
    row's unpadded tokens -> (positions (3, B, L), deltas (B, 1)): bound to one model by hf_backend(rope='released')."""
    c = self.config
    cfg = ModelConfig(image_token_id=c.image_token_id, video_token_id=c.video_token_id,  # a Qwen2-VL's rule
                      spatial_merge_size=c.vision_config.spatial_merge_size)
    grids = {c.image_token_id: iter(image_grid_thw if image_grid_thw is not None else []),
             c.video_token_id: iter(video_grid_thw if video_grid_thw is not None else [])}
    pos = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    deltas = []
    for b, row in enumerate(input_ids):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(row, dtype=torch.bool)
        ids = row[keep].cpu()
        starts = [i for i in range(len(ids)) if int(ids[i]) in grids and (i == 0 or ids[i - 1] != ids[i])]
        p, nxt = rope_positions(ids, torch.stack([next(grids[int(ids[i])]).cpu() for i in starts]) if starts else None,
                                cfg)
        pos[:, b, keep] = p.to(pos.device)
        deltas.append(nxt - len(ids))  # decoding continues at (real tokens so far) + delta
    return pos, torch.tensor(deltas, device=input_ids.device)[:, None]


def hf_backend(name, revision_, vs, dev, max_new_tokens, temperature=0.0, dtype_name='float32', rope='transformers',
               rank=0, world=1):
    """Any checkpoint AutoModelForImageTextToText + AutoProcessor load (a hub id or directory) -> (answer_fn,
    prepare, info). The clip goes in as the model's video (as images where the processor has no video
    processor), through the model's own chat template; greedy (temperature 0), visual tokens never sampled.
    info: what the settings record: revision, how the clip went in, the pixel budget actually applied."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    rev = revision_ or None
    net = AutoModelForImageTextToText.from_pretrained(name, revision=rev, dtype=getattr(torch, dtype_name)).to(dev)
    net.eval()
    cfg = net.config
    qwen = getattr(cfg, 'model_type', '') in ('qwen2_vl', 'qwen2_5_vl')
    if rope == 'released':
        if cfg.model_type != 'qwen2_vl':
            raise SystemExit(f"bench: hf_rope='released' is for Qwen2-VL checkpoints, {name} is {cfg.model_type!r}")
        net.model.get_rope_index = types.MethodType(released_rope_index, net.model)
    elif rope != 'transformers':
        raise SystemExit(f"bench: hf_rope must be 'transformers' or 'released', got {rope!r}")
    try:
        proc = AutoProcessor.from_pretrained(name, revision=rev)
        tok = proc.tokenizer
        video_in = 'video' if getattr(proc, 'video_processor', None) is not None else 'images'
    except ImportError as e:
        if 'torchvision' not in str(e).lower() or not qwen:
            raise
        proc, tok, video_in = None, AutoTokenizer.from_pretrained(name, revision=rev), 'video (qwen_inputs)'
    tok.padding_side = 'left'
    sub = proc and (getattr(proc, 'video_processor', None) or getattr(proc, 'image_processor', None))
    size = getattr(sub, 'size', None) or {}
    # the pixel budget applies where the processor counts pixels as Qwen's do (shortest/longest_edge in px)
    pixels = proc is None or (qwen and 'shortest_edge' in size and 'longest_edge' in size)
    stops = set(net.generation_config.eos_token_id if isinstance(net.generation_config.eos_token_id, list)
                else [net.generation_config.eos_token_id]) | {tok.eos_token_id, tok.pad_token_id}
    stops.discard(None)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, suppress_tokens=visual_token_ids(cfg),
               eos_token_id=sorted(stops),
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else min(stops))
    if temperature > 0:
        gen['temperature'] = temperature
    templ = proc or tok

    def inputs_of(user_texts, clips):
        texts = [templ.apply_chat_template(chat_messages(u, len(f) if video_in == 'images' else 0),
                                           add_generation_prompt=True, tokenize=False)
                 for u, (f, _) in zip(user_texts, clips)]
        if proc is None:
            return qwen_inputs(tok, cfg, vs, texts, clips)
        kw = dict(text=texts, padding=True, return_tensors='pt')
        budget = dict(size={'shortest_edge': vs.min_pixels, 'longest_edge': vs.max_pixels}) if pixels else {}
        if video_in == 'images':
            from PIL import Image
            return proc(images=[[Image.fromarray(x) for x in f] for f, _ in clips], **kw, **budget)
        meta = [dict(total_num_frames=len(f), fps=fps or 1.0, frames_indices=list(range(len(f)))) for f, fps in clips]
        return proc(videos=[f for f, _ in clips], video_metadata=meta, do_sample_frames=False, **kw, **budget)

    def from_texts(user_texts, clips):
        x = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in dict(inputs_of(user_texts, clips)).items()}
        out = net.generate(**x, **gen)[:, x['input_ids'].shape[1]:].tolist()
        res = []
        for row in out:
            k = next((i for i, t in enumerate(row) if t in stops), None)
            res.append(tok.decode(row[:k]) if k is not None else cut_off(tok.decode(row)))
        return res

    def answer(samples, clips):
        return from_texts([build_user_text(s) for s in samples], clips)
    answer.from_texts = from_texts  # (prompt texts, clips) -> outputs: what a server in front of it is sent
    info = dict(revision=getattr(cfg, '_commit_hash', None) or
                (one_for_all(lambda: dir_revision(name), rank, world) if os.path.isdir(name) else rev),
                video_input=video_in, pixels=pixels)
    return answer, functools.partial(load_clip, settings=vs), info


# ----------------------------------------------------------------------------- OpenAI-compatible servers

def _png_data_url(frame):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format='PNG')  # lossless: the server sees our pixels
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def api_request(sample, settings, api_input='images'):
    """One sample -> the user message's content parts (in a loader worker), then the prompt text: the sampled
    frames resized to the pixel budget (data.smart_resize, bicubic as data.preprocess_frames) as PNG image_url
    parts ('images') or as one video_url 'data:video/jpeg;base64,<frame>,<frame>,...' ('video_frames': vLLM's
    list-of-frames form, each frame any image format; here PNG, lossless), or the clip file as one video_url
    ('video_file')."""
    if api_input == 'video_file':
        with open(sample.video, 'rb') as f:  # a missing file raises: the sample is bad, the run goes on
            mime = 'image/' + sample.video.rsplit('.', 1)[-1].lower() if is_image(sample.video) else 'video/mp4'
            url = f'data:{mime};base64,' + base64.b64encode(f.read()).decode()
        parts = [{'type': 'video_url' if mime.startswith('video') else 'image_url',
                  ('video_url' if mime.startswith('video') else 'image_url'): {'url': url}}]
    else:
        from PIL import Image
        frames, _ = load_clip(sample, settings)
        h, w = smart_resize(frames.shape[1], frames.shape[2], settings.min_pixels, settings.max_pixels)
        if (h, w) != frames.shape[1:3]:
            frames = [np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames]
        urls = [_png_data_url(f) for f in frames]
        if api_input == 'video_frames' and not is_image(sample.video):
            url = 'data:video/jpeg;base64,' + ','.join(u.split(',', 1)[1] for u in urls)
            parts = [{'type': 'video_url', 'video_url': {'url': url}}]
        else:
            parts = [{'type': 'image_url', 'image_url': {'url': u}} for u in urls]
    return parts + [{'type': 'text', 'text': build_user_text(sample)}]


class FatalAPIError(RuntimeError):
    """401/403/404: a wrong key, url or model name fails every sample alike; the run stops."""


def _retry_after(err):
    try:
        return float(err.headers.get('Retry-After'))
    except (TypeError, ValueError, AttributeError):
        return 0.0


def chat_completion(url, body, api_key=None, timeout=120.0, retries=5, backoff=1.0, sleep=time.sleep):
    """POST body to url/chat/completions -> dict(raw, attempts, usage, finish_reason, [flag]) or
    dict(error, attempts). Retried with backoff (doubling; a longer Retry-After wins, at most 60 s): 429,
    5xx, timeouts, lost connections, a reply that is not chat-completions JSON. Not retried: other 4xx
    (this sample's request is wrong: an error), 401/403/404 (FatalAPIError). Flags on an answered sample:
    'refusal' (a refusal field or finish_reason content_filter), 'empty', 'cut off' (finish_reason length)."""
    endpoint = url.rstrip('/')
    endpoint += '' if endpoint.endswith('/chat/completions') else '/chat/completions'
    data_ = json.dumps(body).encode()
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {api_key}'} if api_key else {})}
    error, wait = None, 0.0
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(60.0, max(backoff * 2 ** (attempt - 1), wait)))
        wait = 0.0
        try:
            req = urllib.request.Request(endpoint, data=data_, headers=headers, method='POST')
            with urllib.request.urlopen(req, timeout=timeout) as r:
                reply = json.loads(r.read().decode())
            choice = reply['choices'][0]
            msg, finish = choice['message'], choice.get('finish_reason')
            content = msg.get('content') or ''
            if isinstance(content, list):  # content parts
                content = ''.join(p.get('text', '') for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise ValueError(f'message content is {type(content).__name__}')
        except urllib.error.HTTPError as e:
            error = f'HTTP {e.code}: {e.read()[:200].decode(errors="replace")}'
            if e.code in (401, 403, 404):
                raise FatalAPIError(f'{endpoint}: {error}') from None
            if e.code != 429 and e.code < 500:
                return dict(error=error, attempts=attempt + 1)
            wait = _retry_after(e)
            continue
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            error = f'{type(e).__name__}: {e}'  # timeouts and lost connections are OSErrors; bad JSON a ValueError
            continue
        rec = dict(raw=content, attempts=attempt + 1, usage=reply.get('usage') or {}, finish_reason=finish,
                   served_model=reply.get('model'))
        flag = ('refusal' if msg.get('refusal') or finish == 'content_filter' else
                'empty' if not content.strip() else 'cut off' if finish == 'length' else None)
        return dict(rec, flag=flag) if flag else rec
    return dict(error=f'{error} (after {retries + 1} attempts)', attempts=retries + 1)


def openai_backend(url, model_name, vs, api_key, max_new_tokens, temperature=0.0, concurrency=8, timeout=120.0,
                   retries=5, backoff=1.0, api_input='images'):
    """An OpenAI-compatible chat endpoint -> (answer_fn, prepare): a batch's requests go out together, up to
    `concurrency` at a time; temperature and max_tokens as bench's settings. The key only goes into the
    Authorization header."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)

    def ask(parts):
        body = dict(model=model_name, messages=[{'role': 'user', 'content': parts}], max_tokens=max_new_tokens,
                    temperature=temperature)
        return chat_completion(url, body, api_key, timeout, retries, backoff)

    def answer(samples, requests):
        return list(pool.map(ask, requests))
    if api_input not in ('images', 'video_frames', 'video_file'):
        raise SystemExit(f"bench: api_input must be 'images', 'video_frames' or 'video_file', got {api_input!r}")
    return answer, functools.partial(api_request, settings=vs, api_input=api_input)


# ----------------------------------------------------------------------------- CLI

def split_args(argv):
    """`CKPT [config.py ...] [--key=value | --key value ...]` -> (checkpoint dir or None, configurator args)."""
    ck, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith('--') and '=' not in a and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            rest.append(f"{a}={argv[i + 1]}")  # `--data DIR` as well as `--data=DIR`
            i += 1
        elif not a.startswith('--') and ck is None and os.path.isdir(a):
            ck = a
        elif not a.startswith('--') and not a.endswith('.py'):
            raise SystemExit(f"bench: {a!r} is neither a checkpoint directory nor a config file (*.py)")
        else:
            rest.append(a)
        i += 1
    return ck, rest


def main(argv=None):
    ck, rest = split_args(sys.argv[1:] if argv is None else argv)
    from configurator import configure
    configure(globals(), rest)
    model_dir = ck or ckpt
    name = model or model_dir  # hf: a hub id or directory; openai: the served model's name
    if backend not in ('ours', 'hf', 'openai'):
        raise SystemExit(f"bench: backend must be 'ours', 'hf' or 'openai', got {backend!r}")
    if backend == 'ours' and (not model_dir or not os.path.isdir(model_dir)):
        raise SystemExit(f"usage: python bench.py CKPT [config/bench_x.py] [--key=value ...]\n"
                         f"bench: checkpoint directory {model_dir!r} not found (EgoWorld's: bash demo.sh "
                         f"writes out/cold, out/grpo; the base is assets/egoworld_v2_base)")
    if backend == 'hf' and not name or backend == 'openai' and not (api_url and model):
        raise SystemExit("bench: --backend=hf needs CKPT or --model=HUB_ID; --backend=openai needs --api_url and "
                         "--model (README: Benchmarking other models)")
    if mode not in ('generate', 'logits') or mode == 'logits' and backend != 'ours':
        raise SystemExit(f"bench: mode must be 'generate' or 'logits' (logits: backend 'ours' only), got {mode!r}")
    rank, world, _, dev = init_distributed(torch.device(device).type)
    samples, errors = load_samples(data, tasks, directions, parts, limit)
    local = name if backend != 'openai' and os.path.isdir(name) else ''
    vs = vision_settings(local, data, dict(nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels))
    settings = dict(backend=backend, model=os.path.abspath(local) if local else name,
                    revision=revision or None, video_input='video', mode=mode, max_new_tokens=max_new_tokens,
                    temperature=temperature, logits_prefix=logits_prefix if mode == 'logits' else None,
                    judge_model=judge_model if judge_url else None)
    bs = batch_size
    if backend == 'ours':
        answer_fn, prepare, net, tok = ours_backend(model_dir, vs, dev, max_new_tokens, temperature, dtype)
        settings.update(vs.record(samples, net.config))  # with a Qwen3-VL's prompts' timestamps
        if mode == 'logits':
            answer_fn = make_logits_fn(net, tok, logits_prefix, answer_fn, dev)
        settings['revision'] = one_for_all(lambda: dir_revision(model_dir), rank, world)
    else:
        settings.update(vs.record(samples))
    if backend == 'hf':
        answer_fn, prepare, info = hf_backend(name, revision, vs, dev, max_new_tokens, temperature, dtype, hf_rope,
                                              rank, world)
        settings.update(revision=info['revision'], video_input=info['video_input'], hf_rope=hf_rope)
        if not info['pixels']:  # the processor sizes frames its own way: the budget did not apply
            settings.update(min_pixels=None, max_pixels=None)
    elif backend == 'openai':
        answer_fn, prepare = openai_backend(api_url, model, vs, os.environ.get(api_key_env), max_new_tokens,
                                            temperature, api_concurrency, api_timeout, api_retries, api_backoff,
                                            api_input)
        bs = max(batch_size, api_concurrency)  # a batch's requests are what is in flight together
        settings['video_input'] = api_input
        if api_input == 'video_file':  # the server samples and sizes the frames of the clip it is sent
            settings.update(nframes=None, min_pixels=None, max_pixels=None, second_per_grid_ts=None)
    judge = None
    if judge_url:
        judge = functools.partial(judge_route, url=judge_url, model=judge_model, retries=judge_retries,
                                  timeout=judge_timeout, backoff=judge_backoff, api_key=os.environ.get(judge_key_env))
    tag = '' if backend == 'ours' else f'{backend}-'
    out = out_dir or os.path.join('out', 'bench', f"{tag}{os.path.basename(os.path.normpath(name))}_"
                                  f"{os.path.basename(os.path.normpath(data))}")
    if rank == 0:
        print(f"bench: {len(samples)} samples from {data}, {len(errors)} rejected by the reader; {backend} "
              f"{settings['model']}; {vs.nframes} frames, {vs.min_pixels}-{vs.max_pixels} px, {mode} -> {out}")
    try:
        with torch.inference_mode():
            summary = evaluate(samples, answer_fn, out, settings, prepare=prepare,
                               batch_size=bs, num_workers=num_workers, judge=judge, reader_errors=errors,
                               rank=rank, world_size=world, paired_with=paired_with, signals=StopSignals(),
                               device=dev)
    except DataError as e:  # an unusable predictions file: say which line and why, no traceback
        raise SystemExit(f"bench: {e}")
    if rank == 0 and summary is not None:
        print(markdown(summary), end='')
        print(f"bench: {out}/predictions.jsonl, results.json, results.md")
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == '__main__':
    main()
