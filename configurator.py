"""
nanoGPT-style configuration: a script declares its hyper-parameters as module-level globals,
then calls `configure(globals())`. Arguments are applied left to right:

    python sft.py config/sft_egoworld.py --lr=3e-4 --init_from=out/base

- a bare path `config/x.py` is executed and may set any existing global;
- `--key=value` overrides one global; the value is parsed as a Python literal when it parses,
  otherwise taken as a string, and must have the type of the default (int promotes to float;
  a None default accepts anything).
Unknown keys and type mismatches are errors: a typo must not silently train the wrong thing.
UPPER_CASE globals are the script's constants (tables, prompts), not settings: they cannot be
overridden and are not written into the resolved config.
"""
import ast
import sys


def _check(key, old, new, where):
    if old is None or new is None or type(old) is type(new):
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    raise TypeError(f"{where}: {key} must be {type(old).__name__}, got {type(new).__name__} ({new!r})")


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the dict `g` (a script's globals).
    Returns the resolved config: every overridable global (int/float/bool/str/None/tuple/list/dict)."""
    argv = sys.argv[1:] if argv is None else argv
    keys = {k for k, v in g.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))}
    for arg in argv:
        if not arg.startswith('--'):
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), scope)
            for k, v in scope.items():
                if k.startswith('_') or k in ('__builtins__',) or callable(v) or type(v).__name__ == 'module':
                    continue
                if k not in keys:
                    raise KeyError(f"{arg}: unknown config key {k!r}")
                g[k] = _check(k, g[k], v, arg)
        else:
            if '=' not in arg:
                raise ValueError(f"expected --key=value, got {arg!r}")
            k, s = arg[2:].split('=', 1)
            if k not in keys:
                raise KeyError(f"unknown config key {k!r} (from {arg!r})")
            try:
                v = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                v = s
            if isinstance(g[k], str) and not isinstance(v, str):
                v = s  # a str default keeps the text as typed (e.g. --out_dir=123)
            g[k] = _check(k, g[k], v, arg)
    return {k: g[k] for k in sorted(keys)}
