import os
import sys

# Tests import the flat top-level scripts (model.py, data.py, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# egoworld's tiny tokenizer + model, shrunk further so that test runs take seconds
SMALL_TINY = dict(tiny_corpus=20, tiny_hidden=64, tiny_layers=2, tiny_intermediate=128, tiny_vision_dim=32,
                  tiny_vision_heads=2, tiny_vision_depth=1, vocab_size=512)


def make_tiny_world(d, split, seed, n_videos):
    """d/tiny (a shrunk egoworld checkpoint) and d/<split> (n_videos EgoWorld videos, 8 QA each, from the RNG
    streams [0, seed, i])."""
    import egoworld
    egoworld.make_tiny_model(str(d / 'tiny'), **SMALL_TINY)
    egoworld.generate_split(str(d / split), seed, n_videos)
    return d
