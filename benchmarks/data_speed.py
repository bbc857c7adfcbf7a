"""
Speed of data.py's video path: decode + preprocess of `nframes` frames from a synthetic 30 s 480p
h264 clip (written with PyAV into a temp dir), in one process and with DataLoader workers.

Side by side in one run:
- decode time vs number of sampled frames, against decoding every frame of the clip: data.py
  seeks and decodes from the key frame before each sampled index, so the cost follows
  nframes x (GOP / 2), not the clip length; the clip is encoded twice, with a 1 s GOP and with
  x264's default 250-frame GOP, to show that dependence;
- preprocess (resize, normalise, patchify) against transformers' Qwen2-VL PIL image processor;
- the PIL-bicubic vs torch-bicubic (torchvision's tensor kernel, used by transformers' video
  processor and qwen-vl-utils) difference on the same frames, the number quoted in data.py.

    python benchmarks/data_speed.py                 # torch/decord use 1 thread per process
    python benchmarks/data_speed.py --workers=4 --iters=40
"""
import os
import sys
import tempfile
import time

import av
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import data
from configurator import configure

# -----------------------------------------------------------------------------
seconds, fps, width, height = 30, 30, 854, 480  # the clip: 900 frames of 480p
gops = [30, 250]        # key frame every 1 s (typical of camera/streaming encodes) and x264's default
nframes = 8             # the paper's setting
iters = 20              # clips per timing
workers = 2             # DataLoader worker processes (this machine has 2 cores)
threads = 1             # torch threads per process
# -----------------------------------------------------------------------------


def make_clip(path, gop):
    """Moving gradients and boxes, so the encoder produces real P/B frames."""
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(path, 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.width, s.height, s.pix_fmt = width, height, 'yuv420p'
        s.options = {'g': str(gop), 'preset': 'veryfast'}
        for i in range(seconds * fps):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
            x0 = (13 * i) % (width - 80)
            img[100:180, x0:x0 + 80] = (255, 255 - i % 256, i % 256)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def timed(fn, n):
    fn()  # warm-up (page cache, lazy init)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def decode_all(path):
    vr = data.decord.VideoReader(path, num_threads=data.DECODE_THREADS)
    for i in range(0, len(vr), 64):  # chunks: the whole clip as RGB would be 1.1 GB
        vr.get_batch(list(range(i, min(i + 64, len(vr)))))


class Clips(torch.utils.data.Dataset):
    def __init__(self, path, n, settings):
        self.path, self.n, self.settings = path, n, settings

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return data.preprocess_frames(data.load_frames(self.path, self.settings.nframes), self.settings)


def loader_rate(path, settings, n, num_workers):
    dl = torch.utils.data.DataLoader(Clips(path, n + num_workers, settings), batch_size=None, num_workers=num_workers)
    it = iter(dl)
    for _ in range(num_workers):  # let the workers start before timing
        next(it)
    t = time.perf_counter()
    for _ in it:
        pass
    return n / (time.perf_counter() - t)


def kernel_difference(frames, settings):
    """PIL bicubic (ours) vs torch bicubic + antialias on uint8 (torchvision's tensor resize)."""
    from PIL import Image
    H, W = data.smart_resize(*frames.shape[1:3], settings.min_pixels, settings.max_pixels)
    pil = np.stack([np.asarray(Image.fromarray(f).resize((W, H), Image.BICUBIC)) for f in frames]).astype(np.float32)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    tv = torch.nn.functional.interpolate(x, size=(H, W), mode='bicubic', antialias=True, align_corners=False)
    tv = tv.round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    d = np.abs(pil - tv)
    return d.max(), d.mean(), (d > 2).mean(), d.max() / 255 / data.CLIP_STD.min()


def main():
    config = configure(globals())
    torch.set_num_threads(threads)
    settings = data.VisionSettings(nframes=nframes)
    print(f'config: {config}\nsettings: {settings.asdict()}, torch threads {threads}, '
          f'decord threads {data.DECODE_THREADS}')
    with tempfile.TemporaryDirectory() as tmp:
        for gop in gops:
            path = os.path.join(tmp, f'clip_gop{gop}.mp4')
            t = time.perf_counter()
            make_clip(path, gop)
            print(f'\n== {seconds} s {width}x{height} @ {fps} fps, GOP {gop}: {os.path.getsize(path) / 1e6:.1f} MB, '
                  f'written in {time.perf_counter() - t:.1f} s')
            full = timed(lambda: decode_all(path), 1)
            print(f'decode all {seconds * fps} frames: {full * 1e3:8.1f} ms')
            for n in (1, 2, 4, 8, 16, 32):
                s = timed(lambda: data.load_frames(path, n), max(3, iters // 4))
                print(f'decode {n:2d} sampled frames: {s * 1e3:8.1f} ms  ({full / s:5.1f}x faster than all frames)')
            one = timed(lambda: data.preprocess_frames(data.load_frames(path, nframes), settings), iters)
            print(f'decode + preprocess {nframes} frames: one process {1 / one:.1f} clips/s; '
                  f'DataLoader with {workers} workers {loader_rate(path, settings, iters, workers):.1f} clips/s')
        frames = data.load_frames(path, nframes)
        ours = timed(lambda: data.preprocess_frames(frames, settings), iters)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        ip = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
        peer = timed(lambda: ip(images=list(frames), return_tensors='pt'), iters)
        pv, grid = data.preprocess_frames(frames, settings)
        print(f'\npreprocess only, {nframes} frames -> grid {grid.tolist()[0]}, {tuple(pv.shape)}: '
              f'ours {ours * 1e3:.1f} ms, '
              f'transformers PIL image processor {peer * 1e3:.1f} ms (ratio {peer / ours:.2f}x)')
        mx, mean, frac, norm = kernel_difference(frames, settings)
        print(f'\nPIL vs torch bicubic (antialias) on these frames: max {mx:.0f} grey levels, mean {mean:.3f}, '
              f'{100 * frac:.2f}% of values differ by > 2; max after normalisation {norm:.3f}')


if __name__ == '__main__':
    main()
