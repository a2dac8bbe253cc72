"""The decode-speed helper the compression benchmarks share: the median of its runs, each a full generation."""

from __future__ import annotations

from types import SimpleNamespace

from edgewise.metrics.speed import median_decode_tok_s


class FakeModel:
    """Generates `tokens` ids per call and reports the next of `speeds` as that run's decode tok/s."""

    def __init__(self, speeds):
        self.speeds, self.calls = list(speeds), []
        self.tokenizer = SimpleNamespace(encode=lambda text: [1, 2, 3])
        self.last_stats = None

    def generate(self, ids, tokens, stop_at_eot=True):
        self.calls.append((list(ids), tokens, stop_at_eot))
        yield from range(tokens)
        self.last_stats = SimpleNamespace(decode_tok_s=self.speeds.pop(0))


def test_median_of_full_runs():
    lm = FakeModel([50.0, 10.0, 30.0])
    assert median_decode_tok_s(lm, runs=3, tokens=5) == 30.0
    assert lm.calls == [([1, 2, 3], 5, False)] * 3  # every run decodes the same count: no stop at end-of-text
    assert median_decode_tok_s(FakeModel([4.0, 2.0]), runs=2, tokens=1) == 3.0
