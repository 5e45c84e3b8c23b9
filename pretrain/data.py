"""Tokenised, packed, shuffled and mixed pretraining data, resumable to the exact sequence.

1. `pack_source` tokenises a source once into fixed-length rows on disk (`tokens.npy`, a memmap of
   shape (rows, seq_len)): documents are concatenated with EOS after each and cut into rows. The
   document boundaries are the EOS positions, from which `position_ids` restart at 0 after every
   EOS, so the model's block-diagonal mask (core/modeling.py) keeps documents apart. The last
   `validation_rows` rows of a source are held out for its validation loss. The cache key hashes
   what decides the documents (core.sources.data_identity: the file's bytes or a built-in's code,
   never the mixture weight), the tokenizer and the row length, so a change re-tokenises and
   nothing else does.
2. `MixtureStream` decides which row every sample of every optimizer step is. Sample k of step s
   goes to the source with the largest deficit `w_i * n - count_i` under step s's weights (a
   deterministic weighted round robin: every prefix of the stream is within one row per source of
   the weights, and a new curriculum stage takes effect exactly at its start step). Within a
   source, rows are read in a permutation drawn from (seed, source, epoch). The state is a few
   counters per source, so building it costs the same at step 10 as at step 10 million, and the
   stream resumes exactly from `state_dict()`.
3. Ranks split every global batch (`rank::world_size`), so each rank reads different rows while
   the set of rows of a step does not depend on the number of processes.
"""

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from core.faults import fault
from core.sources import DataSourceError, SourceSpec, data_identity, iter_documents


# --- 1. tokenise and pack once -------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def pack_source(spec: SourceSpec, tokenizer, seq_len: int, cache_dir: str | Path, batch_docs: int = 256) -> Path:
    """Tokenise `spec` into `cache_dir/<name>-<key>/tokens.npy`; return that directory (reused if built)."""
    # The key is what the rows are made of: the source's documents (its content, not its mixture
    # weight), the tokenizer and the row length (issue 11: an edited file must not reuse a cache).
    key = hashlib.sha256(json.dumps([data_identity(spec), tokenizer_fingerprint(tokenizer), seq_len],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"{spec.name}-{key}"
    if (out / "meta.json").exists():
        return out
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataSourceError("the tokenizer has no eos_token; packing needs it between documents")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n_docs, n_tokens = 0, 0
    # Stream to a flat file first: total length is unknown until every document is tokenised.
    with open(tmp / "flat.bin", "wb") as flat:
        batch: list[str] = []

        def flush():
            nonlocal n_tokens
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            arr = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)
            flat.write(arr.tobytes())
            n_tokens += arr.size
            batch.clear()

        stats: dict = {}
        for doc in iter_documents(spec, stats):
            batch.append(doc)
            n_docs += 1
            if len(batch) == batch_docs:
                flush()
        if batch:
            flush()
    rows = n_tokens // seq_len
    if rows < 2:
        raise DataSourceError(f"source {spec.name!r} has {n_tokens} tokens: fewer than two rows of seq_len={seq_len}; "
                              "give it more documents or shorten seq_len")
    flat_arr = np.memmap(tmp / "flat.bin", dtype=dtype, mode="r")
    packed = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(rows, seq_len))
    packed[:] = flat_arr[: rows * seq_len].reshape(rows, seq_len)  # the tail shorter than a row is dropped
    packed.flush()
    del packed, flat_arr
    (tmp / "flat.bin").unlink()
    (tmp / "meta.json").write_text(json.dumps({"source": data_identity(spec), "documents": n_docs, "filter_stats": stats,
                                               "tokens": n_tokens,
                                               "rows": rows, "seq_len": seq_len, "dtype": np.dtype(dtype).name}))
    try:
        tmp.rename(out)
    except OSError:  # another process built the same cache first: use theirs
        if not (out / "meta.json").exists():
            raise
    return out


class PackedSource:
    """Rows of one packed source: training rows first, the last `validation_rows` held out."""

    def __init__(self, name: str, directory: Path, validation_rows: int):
        self.name = name
        self.tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        self.meta = json.loads((directory / "meta.json").read_text())
        rows = self.tokens.shape[0]
        if rows <= validation_rows:
            raise DataSourceError(f"source {name!r} has {rows} rows of seq_len {self.tokens.shape[1]}, not more than "
                                  f"validation_rows={validation_rows}; give it more documents")
        self.n_train = rows - validation_rows
        self.validation = range(self.n_train, rows)

    def unigram_counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(np.asarray(self.tokens[: self.n_train]).ravel(), minlength=vocab_size)


def position_ids_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) positions restarting at 0 after every EOS: one document's tokens never see another's."""
    b, t = input_ids.shape
    idx = torch.arange(t).expand(b, t)
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_id
    starts = torch.where(after_eos, idx, torch.zeros_like(idx))
    return idx - torch.cummax(starts, dim=1).values


def make_batch(rows: list[tuple[int, int]], sources: list[PackedSource], eos_id: int) -> dict[str, torch.Tensor]:
    """rows: (source index, row index) pairs -> model inputs plus the ids needed to audit the stream."""
    input_ids = torch.from_numpy(np.stack([sources[s].tokens[r] for s, r in rows]).astype(np.int64))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids_from_eos(input_ids, eos_id),
        "labels": input_ids,
        "source": torch.tensor([s for s, _ in rows]),
        "row": torch.tensor([r for _, r in rows]),
    }


# --- 2. the mixture ------------------------------------------------------------------------------

class MixtureSchedule:
    """Per-source weights as a function of the optimizer step: a list of curriculum stages."""

    def __init__(self, names: list[str], default_weights: dict[str, float], stages: list[dict] | None,
                 tokens_per_step: int):
        self.names = names
        self.stages: list[tuple[int, np.ndarray]] = []
        raw = stages or [{"start_step": 0, "weights": default_weights}]
        for i, stage in enumerate(raw):
            unknown = set(stage) - {"start_step", "start_tokens", "weights"}
            if unknown or "weights" not in stage or ("start_step" in stage) == ("start_tokens" in stage):
                raise ValueError(f"stages[{i}] needs 'weights' and exactly one of 'start_step' / 'start_tokens'"
                                 f"{f'; unknown keys {sorted(unknown)}' if unknown else ''}")
            # A token budget becomes the first step whose tokens reach it.
            start = stage["start_step"] if "start_step" in stage else math.ceil(stage["start_tokens"] / tokens_per_step)
            bad = set(stage["weights"]) - set(names)
            if bad:
                raise ValueError(f"stages[{i}].weights names unknown sources {sorted(bad)}; sources: {names}")
            self.stages.append((int(start), self._normalise([float(stage["weights"].get(n, 0.0)) for n in names],
                                                            f"stages[{i}].weights")))
        starts = [s for s, _ in self.stages]
        if starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"stage start steps must begin at 0 and increase strictly, got {starts}")

    @staticmethod
    def _normalise(weights: list[float], where: str) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"{where} must be non-negative with a positive sum, got {weights}")
        return w / w.sum()

    def stage_at(self, step: int) -> int:
        return max(i for i, (start, _) in enumerate(self.stages) if start <= step)


class MixtureStream(IterableDataset):
    """Yields this rank's micro-batches, step after step, forever; `state_dict` resumes it exactly.

    Also the object StatefulDataLoader (torchdata) checkpoints: it calls state_dict/load_state_dict.
    """

    def __init__(self, sources: list[PackedSource], schedule: MixtureSchedule, *, seed: int, micro_batch_size: int,
                 accumulation_steps: int, rank: int, world_size: int, eos_id: int):
        self.sources, self.schedule, self.seed, self.eos_id = sources, schedule, seed, eos_id
        self.micro, self.accum, self.rank, self.world = micro_batch_size, accumulation_steps, rank, world_size
        self.global_batch = micro_batch_size * accumulation_steps * world_size
        # Adaptive mixing multiplies the stage weights by these factors (1 = as configured).
        self.adaptive_factors = np.ones(len(sources))
        self.step = 0
        self.stage = 0
        self.stage_drawn = 0  # samples drawn in the current stage
        self.stage_counts = np.zeros(len(sources), dtype=np.int64)
        self.consumed = np.zeros(len(sources), dtype=np.int64)  # rows read per source, ever
        self._perm: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)
        # Rows never to train on (a rolled-back batch's): skipped when their turn comes.
        self.excluded: set[tuple[int, int]] = set()

    def set_adaptive_factors(self, factors: np.ndarray) -> None:
        """New adaptive factors take effect like a new curriculum stage: the round robin restarts its
        counts, so the deficit built under the old weights is not paid back with single-source
        batches (issue 11: steps 5-8 were all prose, 9-10 all arithmetic)."""
        self.adaptive_factors = np.asarray(factors, dtype=np.float64)
        self.stage_drawn = 0
        self.stage_counts[:] = 0

    def weights(self) -> np.ndarray:
        w = self.schedule.stages[self.stage][1] * self.adaptive_factors
        return w / w.sum()

    def _row(self, s: int, k: int) -> int:
        n = self.sources[s].n_train
        epoch, pos = divmod(k, n)
        if s not in self._perm or self._perm[s][0] != epoch:
            self._perm[s] = (epoch, np.random.default_rng([self.seed, s, epoch]).permutation(n))
        return int(self._perm[s][1][pos])

    def next_step_rows(self) -> list[tuple[int, int]]:
        """All rows of the next optimizer step, every rank's, in order; advances the state."""
        stage = self.schedule.stage_at(self.step)
        if stage != self.stage:
            self.stage, self.stage_drawn = stage, 0
            self.stage_counts[:] = 0
        w = self.weights()
        rows = []
        for _ in range(self.global_batch):
            self.stage_drawn += 1
            s = int(np.argmax(w * self.stage_drawn - self.stage_counts))  # largest deficit; ties -> first
            self.stage_counts[s] += 1
            row = self._row(s, int(self.consumed[s]))
            self.consumed[s] += 1
            while (s, row) in self.excluded:
                row = self._row(s, int(self.consumed[s]))
                self.consumed[s] += 1
            rows.append((s, row))
        self.step += 1
        return rows

    def __iter__(self):
        # tests: "S:seconds[:rank]" sleeps before every batch from step S on (on one rank only)
        slow = fault("slow_data")
        slow = slow.split(":") if slow and (slow.count(":") == 1 or slow.split(":")[2] == str(self.rank)) else None
        while True:
            mine = self.next_step_rows()[self.rank::self.world]
            if slow and self.step > int(slow[0]):
                time.sleep(float(slow[1]))
            for i in range(self.accum):
                yield make_batch(mine[i * self.micro:(i + 1) * self.micro], self.sources, self.eos_id)

    def state_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "stage_drawn": self.stage_drawn,
                "stage_counts": self.stage_counts.tolist(), "consumed": self.consumed.tolist(),
                "adaptive_factors": self.adaptive_factors.tolist(), "excluded": sorted(self.excluded)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.stage, self.stage_drawn = state["step"], state["stage"], state["stage_drawn"]
        self.stage_counts = np.asarray(state["stage_counts"], dtype=np.int64)
        self.consumed = np.asarray(state["consumed"], dtype=np.int64)
        self.adaptive_factors = np.asarray(state["adaptive_factors"], dtype=np.float64)
        # A union: exclusions decided after this state was saved (a rollback to it) must survive it.
        self.excluded |= {tuple(r) for r in state["excluded"]}


def adapt_factors(factors: np.ndarray, previous: np.ndarray, current: np.ndarray, rate: float,
                  floor: float = 0.05) -> np.ndarray:
    """Shift weight toward the sources whose validation loss improves most slowly.

    Rule (our own, in the spirit of DoReMi's excess-loss reweighting, Xie et al. 2023, without a
    reference model): with relative improvements r_i = (L_prev - L_now) / L_prev since the last
    evaluation, multiply each factor by exp(rate * (mean(r) - r_i) / (|mean(r)| + 1e-8)). Sources
    learning slower than average gain weight, faster ones lose it; the normalised step keeps `rate`
    meaningful whatever the loss scale. Factors stay >= `floor` so no source is ever dropped.
    """
    r = (previous - current) / np.maximum(previous, 1e-8)
    new = factors * np.exp(rate * (r.mean() - r) / (abs(r.mean()) + 1e-8))
    new = new / new.mean()
    return np.maximum(new, floor)
