"""edgewise: AI models that learn and run on the device itself.

Shared cores: `edgewise.gguf_io` (GGUF files), `edgewise.lm` (the language-model runtime),
`edgewise.data` (datasets), `edgewise.metrics` (perplexity, memory). The pillars build on them.
"""

__version__ = "0.1.0"
