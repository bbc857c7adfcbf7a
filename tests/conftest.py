import os
import sys

# Tests import the flat top-level scripts (model.py, data.py, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
