"""The paper's constructions, runnable: a small transformer oracle and the layouts that drive it.

    small      the oracle O itself (capacity guard, invocation counts)
    layouts    which key and query each row of a call holds (Lemma 3.1, Claim B.6, Thm 3.5, 5.1, Sec. 5, Thm 4.1)
    calls      inputs, padded weights and head packing (Lemma 3.1, Lemma 3.3) for one layout
    aggregate  adding and subtracting partials (weights A, averages B/A)
    oracle     PaperAttention: a pair call in, (o, lse) out, like the kernel oracle
               (the user-facing description is emulate.PaperOracle, emulate/runtime/oracles.py)
    sampling   Thm 4.1's estimator on inputs meeting its assumption
    theorems   the call counts and errors of each theorem, measured from runs

Importing the package costs nothing: torch loads with the first name used from it.
"""


def __getattr__(name):
    if name == "PaperAttention":
        from emulate.paper import oracle

        return getattr(oracle, name)
    if name in ("SmallTransformer", "CapacityError"):
        from emulate.paper import small

        return getattr(small, name)
    raise AttributeError(name)


__all__ = ["CapacityError", "PaperAttention", "SmallTransformer"]
