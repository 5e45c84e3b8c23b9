"""Data pipeline speed vs training speed on the tiny preset (target: pipeline >= 20x training).

    .venv/bin/python bench/pretrain_data.py [--steps 20]

Measures, in one run: (1) tokenising + packing the built-in sources (one-off preprocessing),
(2) the training-time pipeline — the mixture stream through torchdata's StatefulDataLoader, from
the packed memmaps to model-ready batches with position ids — and (3) the tiny preset's training
step on those batches. The ratio (2)/(3) is the target: the loop must never wait for data.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from core import SmolForgeConfig, SmolForgeForCausalLM
from pretrain.data import MixtureSchedule, MixtureStream, PackedSource, pack_source
from core.sources import SourceSpec
from pretrain.tokenizer import sample_sources, train_tokenizer

SOURCES = [SourceSpec(name="arithmetic", path="builtin:arithmetic", max_rows=20000), SourceSpec(name="prose", path="builtin:prose"),
           SourceSpec(name="code", path="builtin:code", max_rows=200), SourceSpec(name="math", path="builtin:math", max_rows=5000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tokenizer = train_tokenizer(sample_sources([s.__dict__ for s in SOURCES], 500), 1024)

    start = time.perf_counter()
    dirs = [pack_source(s, tokenizer, args.seq, tmp) for s in SOURCES]
    pack_s = time.perf_counter() - start
    sources = [PackedSource(s.name, d, 8) for s, d in zip(SOURCES, dirs)]
    packed_tokens = sum(s.meta["tokens"] for s in sources)

    schedule = MixtureSchedule([s.name for s in SOURCES], {s.name: 1.0 for s in SOURCES}, None, args.batch * args.seq)
    stream = MixtureStream(sources, schedule, seed=0, micro_batch_size=args.batch, accumulation_steps=1, rank=0,
                           world_size=1, eos_id=tokenizer.eos_token_id)
    batches = iter(StatefulDataLoader(stream, batch_size=None, num_workers=0))
    n = 500
    start = time.perf_counter()
    kept = [next(batches) for _ in range(n)]
    stream_tps = n * args.batch * args.seq / (time.perf_counter() - start)

    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=1024)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()

    step(kept[0])
    start = time.perf_counter()
    for b in kept[1:args.steps + 1]:
        step(b)
    train_tps = args.steps * args.batch * args.seq / (time.perf_counter() - start)
    print(json.dumps({
        "tokenize_and_pack_tokens_per_s": round(packed_tokens / pack_s), "packed_tokens": packed_tokens,
        "pipeline_tokens_per_s": round(stream_tps), "training_tokens_per_s": round(train_tps),
        "pipeline_over_training": round(stream_tps / train_tps, 1), "target": ">= 20",
        "threads": torch.get_num_threads(), "batch": f"{args.batch}x{args.seq}",
    }, indent=2))


if __name__ == "__main__":
    main()
