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
