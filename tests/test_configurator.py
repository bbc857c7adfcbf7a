import pytest
from configurator import configure


def _globals():
    return {'lr': 1e-3, 'steps': 10, 'name': 'x', 'flag': False, 'opt': None, '_private': 1, 'TABLE': {'a': 1}}


def test_overrides_and_types(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("steps = 20\nname = 'from_file'\n")
    g = _globals()
    out = configure(g, [str(cfg), '--lr=2', '--flag=True', '--name=123', '--opt=[1,2]'])
    assert g['steps'] == 20 and g['lr'] == 2.0 and isinstance(g['lr'], float)
    assert g['flag'] is True and g['name'] == '123' and g['opt'] == [1, 2]
    assert '_private' not in out and 'TABLE' not in out and out['steps'] == 20


def test_unknown_key_rejected(tmp_path):
    with pytest.raises(KeyError, match='stepz'):
        configure(_globals(), ['--stepz=3'])
    cfg = tmp_path / 'c.py'
    cfg.write_text("typo = 1\n")
    with pytest.raises(KeyError, match='typo'):
        configure(_globals(), [str(cfg)])
    with pytest.raises(KeyError, match='TABLE'):  # a constant, not a setting
        configure(_globals(), ['--TABLE={}'])


def test_type_mismatch_rejected():
    with pytest.raises(TypeError, match='steps'):
        configure(_globals(), ['--steps=1.5'])
    with pytest.raises(TypeError, match='flag'):
        configure(_globals(), ['--flag=3'])


@pytest.mark.parametrize('script,family', [('sft', 'sft_qwen25vl_7b'), ('grpo', 'grpo_qwen25vl_7b'),
                                           ('sft', 'sft_qwen3vl_8b'), ('grpo', 'grpo_qwen3vl_8b')])
def test_qwen25_qwen3_presets_are_the_qwen2_recipe_at_video_r1_frames(script, family, monkeypatch):
    """The Qwen2.5-VL-7B and Qwen3-VL-8B presets (run from the repository root, as the usage lines say) take the
    Qwen2-VL preset's recipe and change only the model, the output and the frames: 16 at 128 merged tokens a
    frame pair (128*28*28 pixels; Qwen3-VL's 16-pixel patches: 128*32*32)."""
    import importlib
    import os
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mod = importlib.import_module(script)
    base = configure(dict(vars(mod)), [f'config/{script}_qwen2vl_7b.py'])
    new = configure(dict(vars(mod)), [f'config/{family}.py'])
    changed = {k for k in base if base[k] != new[k]}
    assert changed <= {'init_from', 'out_dir', 'nframes', 'min_pixels', 'max_pixels', 'token_budget'}
    side = 32 if 'qwen3' in family else 28
    assert (new['nframes'], new['min_pixels'], new['max_pixels']) == (16, 128 * side * side, 128 * side * side)
    tag, name = ('qwen3vl', '3-VL-8B') if 'qwen3' in family else ('qwen25vl', '2.5-VL')
    assert tag in new['out_dir'] and (name in new['init_from'] or tag in new['init_from'])
