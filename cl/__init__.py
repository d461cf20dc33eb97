"""adaptsim.cl: data, scenario streams, backbones, training loop, metrics and the runner.

Importing this package first applies :mod:`adaptsim.cl.compat` so torchvision (and therefore
timm, open_clip and Avalanche) import on CPU-only machines.
"""

from adaptsim.cl import compat as _compat  # noqa: F401  (must run before torchvision imports)
