"""Throughput plumbing (issue 22): the FLOPs formula behind every MFU, the MFU's peak, torch.compile of
the core against eager, and the per-token losses pretraining splits by source. Speed itself is measured
by the benches (bench/pretrain_vs_trainer.py, bench/pretrain_throughput.py), never asserted here."""

import time

import torch
import torch.nn.functional as F
from torch import nn

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.faults import active_faults
from pretrain.config import PretrainConfig
from pretrain.train import flops_per_token, peak_flops


def test_flops_per_token_matches_a_hand_count_of_the_tiny_preset():
    # tiny: d=128, L=4, 2 query heads and 1 KV head of width 64, SwiGLU width 384, vocab 1024, T=128.
    # Per layer: q 128x128 + k 128x64 + v 128x64 + o 128x128 = 49,152; MLP 3 x 128 x 384 = 147,456.
    # N = 4 x 196,608 + head 128 x 1024 = 917,504; 6N = 5,505,024.
    # Attention (PaLM appendix B): 12 L H Q T = 12 x 4 x 2 x 64 x 128 = 786,432.
    config = SmolForgeConfig.from_preset("tiny")
    assert flops_per_token(config, 128) == 5_505_024 + 786_432


def test_flops_per_token_counts_every_matmul_weight_of_the_model():
    """N of the formula is the model's nn.Linear weights (the tied head counted as a matmul), for a
    shape unlike the presets: GQA 4:2, no tying, a head_dim that is not hidden / heads."""
    config = SmolForgeConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    model = SmolForgeForCausalLM(config)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * 3 * 4 * 32 * 50
    assert flops_per_token(config, 50) == 6 * matmul_weights + attention


def test_mfu_peak_follows_the_dtype_and_names_itself():
    fp32, fp32_source = peak_flops(PretrainConfig(), torch.device("cpu"))
    bf16, bf16_source = peak_flops(PretrainConfig(bf16=True), torch.device("cpu"))
    assert "fp32" in fp32_source and "bf16" in bf16_source and "measured" in fp32_source
    assert fp32 > 0 and bf16 > 0
    assert peak_flops(PretrainConfig(peak_flops=1e12), torch.device("cpu")) == (1e12, "1e+12 FLOP/s, peak_flops "
                                                                                       "from the recipe")


def tiny_model(**overrides) -> SmolForgeForCausalLM:
    torch.manual_seed(0)
    config = SmolForgeConfig.from_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, max_position_embeddings=64, **overrides)
    config._attn_implementation = "sdpa"
    return SmolForgeForCausalLM(config).train()


def packed_batch() -> dict:
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(32).repeat(2, 1)
    position_ids[1, 16:] = torch.arange(16)  # two documents packed in the second row
    return {"input_ids": x, "position_ids": position_ids, "labels": x}


def test_compiled_core_gives_the_eager_loss_and_gradients_in_one_graph():
    """fullgraph=True fails on any graph break (one was ours: the z-loss's boolean indexing). The backend is
    aot_eager: dynamo's capture and AOTAutograd's joint forward/backward graph, i.e. everything inductor
    receives, without inductor's C++ code generation, which took 110 s for this 1-layer model on these 2
    cores (bench/pretrain_vs_trainer.py --compile measures inductor's time and speed-up)."""
    model, batch = tiny_model(z_loss_coefficient=1e-4), packed_batch()
    eager = model(**batch, return_token_loss=True)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    model.compile(backend="aot_eager", fullgraph=True, dynamic=False)
    compiled = model(**batch, return_token_loss=True)
    compiled.loss.backward()
    print(f"\ncompile + first step: {time.perf_counter() - started:.1f} s")
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(compiled.token_loss, eager.token_loss)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_token_losses_are_the_loss_split_by_token():
    """What pretraining's per-source losses read instead of a second cross-entropy over the logits."""
    model, batch = tiny_model(), packed_batch()
    with torch.no_grad():
        out = model(**batch, return_token_loss=True)
        plain = model(**batch)
    assert plain.token_loss is None  # only when asked for: other stages' outputs are unchanged
    assert out.token_loss.shape == batch["input_ids"].shape
    assert (out.token_loss[:, -1] == 0).all()  # the last position has no target
    reference = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                                reduction="none")  # (B, T-1)
    torch.testing.assert_close(out.token_loss[:, :-1], reference)
    torch.testing.assert_close(out.token_loss.sum() / reference.numel(), plain.loss)


def test_faults_are_read_once_and_absent_in_a_normal_run(monkeypatch):
    monkeypatch.delenv("SMOLFORGE_FAULT", raising=False)
    assert active_faults() == {}
    monkeypatch.setenv("SMOLFORGE_FAULT", "nan_at_step:3:1,poison_step:9")
    assert active_faults() == {"nan_at_step": "3:1", "poison_step": "9"}


def test_bf16_autocast_keeps_the_loss_and_the_residual_stream_in_fp32():
    """What `bf16: true` runs (accelerate's autocast, on CPU too): matmuls in bf16, while the loss (fp32
    logits into the cross-entropy), the norms (RMSNorm in fp32) and the residual stream (fp32 embeddings
    plus bf16 branch outputs promote to fp32) stay fp32, and the weights stay fp32 master copies."""
    model, batch = tiny_model(z_loss_coefficient=1e-4), packed_batch()
    with torch.no_grad():
        fp32 = model(**batch, return_token_loss=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
            bf16 = model(**batch, return_token_loss=True)
    assert bf16.logits.dtype == torch.bfloat16  # the head's matmul ran in bf16
    assert hidden.dtype == bf16.loss.dtype == bf16.z_loss.dtype == bf16.token_loss.dtype == torch.float32
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=2e-2, atol=0)
