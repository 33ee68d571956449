"""Decoding on the Ray workers' blocks: the driver's view of a KV cache that stays where it was made.

The prefill (cluster/executor.py) runs on workers that keep the keys and values of every
projection they run (cluster/worker.py, a KVCache each); the cache is never gathered. RemoteKV
is the store emulate/runtime/decode.py's Decoder reads: it knows which worker holds each block
and how many tokens it holds, and each decode step, per layer, sends the new token's query to the
workers holding the blocks the layer's mask reaches (one Ray call per worker, all at once; the
pair calls run there, at most M keys each) and hands their partials (o, lse) back in block order,
to be merged by the prefill's merger on the driver. The new token's key and value travel with
the query to the worker holding the tail block; a new tail block goes to the worker that holds
the fewest of that layer's blocks, among those that hold some (under the layers placement, the
layer's one worker).

A worker that dies loses its blocks: its restarted process answers with LostLocal, and the store
raises KVLost; `rebuild` then runs the prefill again on the same workers (its tasks are pure, so
its blocks come back bit for bit) and the generation replays its decode steps (emulate/generation.py).
"""
from __future__ import annotations

import time

import torch

from emulate.errors import EmulateError
from emulate.runtime.contract import BoundOracle, CallCounts, PairCall, Partial
from emulate.runtime.decode import KVLost, tail_slot


class RemoteKV:
    """The keys and values of `layers` layers in blocks of `block_size`, held by the pool's workers.

    prefill_again(first) runs the prefill again from submission `first` and returns its last one
    (cluster/executor.py, `_prefill_again`); `submission` is the prefill's last. `owned`: this
    process started the Ray instance, stopped when the store closes (at exit).
    """

    def __init__(self, pool, opts, layers: int, block_size: int, prompt_tokens: int, prefill_again,
                 submission: int, owned: bool):
        self.pool, self.opts, self.layers, self.block_size = pool, opts, layers, block_size
        self.prompt_tokens = prompt_tokens
        self._prefill_again, self._submission, self._owned = prefill_again, submission, owned
        self.owner: list[dict[int, int]] = [{} for _ in range(layers)]  # layer -> block -> worker
        self.filled: list[dict[int, int]] = [{} for _ in range(layers)]  # layer -> block -> tokens
        self.worker_bytes = [0] * pool.size  # as each worker last reported them
        self.rebuilds = 0  # every rebuild, the one a worker lost during the prefill included
        self._pending: dict[int, tuple[int, int, object, object]] = {}  # layer -> (worker, position, k, v)
        self._closed = False
        if not self._take_inventory():  # a worker restarted during the prefill lost blocks already
            self.rebuild()

    def _take_inventory(self) -> bool:
        """Owners and fill from what each worker says it holds; False when a prompt block is held nowhere."""
        import ray

        from cluster.failures import get

        held = get(ray, [a.kv_inventory.remote(self.pool.shared) for a in self.pool.actors],
                    "the workers' keys and values", self.pool)
        self.owner = [{} for _ in range(self.layers)]
        self.filled = [{} for _ in range(self.layers)]
        for w, h in enumerate(held):
            self.worker_bytes[w] = h["bytes"]
            for (layer, block), n in h["blocks"].items():
                self.owner[layer][block] = w
                self.filled[layer][block] = n
        self._pending.clear()
        M, N = self.block_size, self.prompt_tokens
        want = {j: min(M, N - j * M) for j in range(-(-N // M))}
        return all(self.filled[layer] == want for layer in range(self.layers))

    def append(self, layer: int, position: int, k, v) -> None:
        """The new token's k, v [Hkv, 1, dh] at `position`: sent with the layer's next attend to the tail's worker."""
        block, row = tail_slot(self.filled[layer], layer, position, self.block_size)
        if row == 0:
            self.owner[layer][block] = self._new_owner(layer)
        self.filled[layer][block] = row + 1
        self._pending[layer] = (self.owner[layer][block], position, k, v)

    def _new_owner(self, layer: int) -> int:
        count: dict[int, int] = {}
        for w in self.owner[layer].values():
            count[w] = count.get(w, 0) + 1
        return min(count, key=lambda w: (count[w], w)) if count else 0

    def attend(self, layer: int, pairs: list[tuple[int, PairCall]], q, scale: float, oracle: BoundOracle,
               counts: CallCounts) -> Partial:
        """The partials of q against each (block, pair call), from the workers holding the blocks,
        stacked in the order of `pairs` (o [n, H, 1, dh], lse [n, H, 1], as KVCache.attend); the calls counted where they ran, added to `counts`. `oracle` and
        `scale` are the workers' own (each bound the run's oracle when it loaded the model)."""
        import ray

        from cluster.failures import Lost, get
        from cluster.worker import from_wire, to_wire

        by_worker: dict[int, list[tuple[int, PairCall]]] = {}
        for j, pair in pairs:
            by_worker.setdefault(self.owner[layer][j], []).append((j, pair))
        pending = self._pending.pop(layer, None)
        append = {}
        if pending is not None:
            w, position, k, v = pending
            by_worker.setdefault(w, [])
            append[w] = (position, to_wire(k), to_wire(v))
        wire_q = to_wire(q)
        asks = {w: self.pool.actors[w].decode.remote(self.pool.shared, layer, append.get(w), wire_q, calls)
                for w, calls in by_worker.items()}
        self._wait(list(asks.values()))
        got: dict[int, tuple] = {}
        for w, ref in asks.items():
            try:
                partials, ran, held = get(ray, ref, f"layer {layer}'s decode calls", self.pool)
            except Lost as err:
                raise KVLost(str(err)) from None
            counts.add(ran)
            self.worker_bytes[w] = held
            if not by_worker[w]:
                continue  # the tail's worker, sent only the new token's keys
            o, lse = from_wire(partials, q.device)
            for i, (j, _) in enumerate(by_worker[w]):
                got[j] = (o[i], lse[i])
        # stacked in the order of `pairs` (copies: the received arrays stay the object store's)
        return (torch.stack([got[j][0] for j, _ in pairs]), torch.stack([got[j][1] for j, _ in pairs]))

    def _wait(self, refs: list) -> None:
        """Until every call has answered, checking the workers' health as the executor does."""
        import ray

        from cluster.failures import HEALTH_EVERY_S, check_health

        since = time.monotonic()
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=HEALTH_EVERY_S)
            if len(ready) == len(refs):
                return
            check_health(self.pool, self.opts, time.monotonic() - since)

    def rebuild(self) -> None:
        """Make every block again: clear what the workers hold and run the prefill again on them.

        Only the dead worker's blocks are lost, but a lost block's keys come from the prefill's
        block-query calls (its prompt rows, through every layer below it) and from one-row decode
        steps at the cache as it stood then (its generated rows); the plan's tasks re-run in part
        would write into blocks the survivors have since extended. Running the whole prefill again
        and replaying the decode steps (emulate/generation.py) repeats the very calls of the
        uninterrupted run, in the same order, so the blocks and every logit after come back bit for bit.
        """
        import ray

        from cluster.failures import get

        limit = self.pool.size * (self.opts.max_restarts + 1)
        while True:
            self.rebuilds += 1
            if self.rebuilds > limit:
                raise EmulateError(f"keys and values lost with dead workers {self.rebuilds - 1} times; generation "
                                   f"stops (at most {limit} rebuilds for {self.pool.size} worker(s))")
            get(ray, [a.kv_clear.remote(self.pool.shared) for a in self.pool.actors], "clearing the workers' blocks",
                 self.pool)
            self._submission = self._prefill_again(self._submission + 1)
            if self._take_inventory():
                return

    def nbytes(self) -> int:
        """Bytes the workers hold (the tails' unused room included), as they last reported them."""
        return sum(self.worker_bytes)

    def close(self) -> None:
        """Stop the workers; a private Ray instance stops when this process exits (its shutdown takes seconds)."""
        if self._closed:
            return
        self._closed = True
        from cluster.session import disconnect

        self.pool.close()
        if self._owned:
            import atexit

            atexit.register(disconnect, True)
