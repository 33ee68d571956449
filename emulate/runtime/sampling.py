"""Choosing the next token from the logits: greedy, or a seeded draw after temperature and top-p.

The draw follows transformers' sampling path (generation/logits_process.py in transformers:
TemperatureLogitsWarper, then TopPLogitsWarper, then softmax and torch.multinomial), so the
distribution is the same as `model.generate(do_sample=True, temperature=T, top_p=P, top_k=0)`.
The random numbers come from a torch.Generator seeded with `seed` and owned by one generation, so a
run is reproducible run to run whatever else draws from torch's global generator; transformers
draws from torch's global generator, so after torch.manual_seed(seed) its draws are these where
the float32 probabilities agree bit for bit (docs/generation.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from emulate.errors import EmulateError


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (the highest logit, the first on a tie, as torch.argmax); > 0: a draw.

    top_p in (0, 1]: the draw is from the smallest set of tokens whose probability reaches top_p
    (1: every token). seed: the draws' generator seed.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise EmulateError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise EmulateError(f"top_p must be a number in (0, 1], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise EmulateError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """The next token of one generation, from its logits [vocab]."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        s = self.sampling
        if s.greedy:
            return int(torch.argmax(logits))
        # float32, as transformers samples (generation/utils.py casts the next-token logits), so that
        # equal logits give the same probabilities and, from the same seed, the same draws
        scores = logits[None].to(device="cpu", dtype=torch.float32) / s.temperature
        if s.top_p < 1:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - s.top_p)
            drop[..., -1:] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
