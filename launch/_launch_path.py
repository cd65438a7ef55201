"""The one place that handles the launch folder's name clash.

``launch/pretrain.py`` is the command users type (``deepspeed launch/pretrain.py ...``), and Python puts a
script's folder first on ``sys.path``, where that file would shadow the ``pretrain`` package. Every launch
script imports this module first: it takes the launch folder off ``sys.path`` (so ``import pretrain`` finds
the package) and, for a checkout that was not ``pip install``-ed, puts the repository root in front.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
