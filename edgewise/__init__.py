"""edgewise: AI models that learn and run on the device itself.

Shared cores: `edgewise.gguf_io` (GGUF files), `edgewise.lm` (the language-model runtime),
`edgewise.data` (datasets), `edgewise.metrics` (perplexity, memory). The pillars build on them.

One deliberate import-time setting: OpenMP reads its wait policy once, when torch first loads it,
and batch-1 decode is several times slower with idle workers sleeping between its many small
parallel regions. So, unless the user chose one or torch is already loaded, importing edgewise sets
OMP_WAIT_POLICY=ACTIVE for this process; the runtime's thread governor (`edgewise.lm.threads`)
then keeps spinning workers off cores that other processes need.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

__version__ = "0.1.0"
