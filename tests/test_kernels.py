"""Kernel selection: plain torch on CPU; on CUDA, Liger agrees with torch (GPU tests skip elsewhere)."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from core import SmolForgeForCausalLM
from core.kernels import causal_lm_loss, resolve_use_liger
from conftest import tiny_config, perturb_

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_automatic_choice_is_torch_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert resolve_use_liger(None) is False
    assert SmolForgeForCausalLM(tiny_config()).use_liger is False
    # Forced on where it cannot run: a warning naming the switch, and plain torch (issue 11).
    with pytest.warns(UserWarning, match="use_liger_kernels=True"):
        assert resolve_use_liger(True) is False


def test_checkpoint_saved_with_liger_loads_and_runs_on_cpu(tmp_path):
    """`use_liger_kernels: true` travels in config.json from a GPU run; a CPU must still load the
    checkpoint (evaluation, export, the next stage) and compute what plain torch computes."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    model = perturb_(SmolForgeForCausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_liger_kernels": True}))
    with pytest.warns(UserWarning, match="use_liger_kernels=True") as caught:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert len([w for w in caught if "use_liger_kernels" in str(w.message)]) == 1  # once per model, not per module
    assert loaded.config.use_liger_kernels is True  # the recipe's choice is kept for the next GPU run
    assert not any(getattr(m, "use_liger", False) for m in loaded.modules())
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(loaded(x, labels=x).loss, model(x, labels=x).loss, rtol=0, atol=0)


def test_switch_false_overrides_automatic_choice():
    model = SmolForgeForCausalLM(tiny_config(use_liger_kernels=False))
    assert model.use_liger is False
    assert not any(getattr(m, "use_liger", False) for m in model.modules())


@cuda
@pytest.mark.gpu
def test_liger_matches_torch_loss_and_gradients_bf16():
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=4096, qk_norm=True, z_loss_coefficient=1e-4, tie_word_embeddings=False)
    results = {}
    for use_liger in (False, True):
        config.use_liger_kernels = use_liger
        model = perturb_(SmolForgeForCausalLM(config), std=0.05).cuda().to(torch.bfloat16).train()
        assert model.use_liger is use_liger
        x = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(1)).cuda()
        out = model(x, labels=x)
        out.loss.backward()
        results[use_liger] = (out.loss.float(), out.z_loss.float(),
                              {n: p.grad.float() for n, p in model.named_parameters()})
    (loss_t, z_t, g_t), (loss_l, z_l, g_l) = results[False], results[True]
    torch.testing.assert_close(loss_l, loss_t, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(z_l, z_t, rtol=5e-2, atol=1e-4)
    for name in g_t:
        # bf16 tolerance, relative to each gradient's scale.
        scale = g_t[name].abs().max().item() + 1e-8
        assert (g_l[name] - g_t[name]).abs().max().item() <= 5e-2 * scale, name


@cuda
@pytest.mark.gpu
def test_fused_cross_entropy_peak_memory_report():
    """Peak memory of loss + backward at vocab 49152 x seq 4096 (hidden 2048, bf16): fused vs torch."""
    pytest.importorskip("liger_kernel")
    vocab, seq, hidden = 49152, 4096, 2048
    report = {}
    for use_liger in (False, True):
        torch.cuda.empty_cache()
        head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(1, seq, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, seq), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logits = None if use_liger else head(h)
        loss, _, _ = causal_lm_loss(h, head, labels, None, 1e-4, None, use_liger=use_liger, logits=logits)
        loss.backward()
        report["liger_fused" if use_liger else "torch"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del head, h, labels, logits, loss
    report["ratio_torch_over_fused"] = report["torch"] / report["liger_fused"]
    print("\nfused cross-entropy peak memory (MiB above inputs):", json.dumps(report))
    if os.environ.get("SMOLFORGE_REPORT_DIR"):
        with open(os.path.join(os.environ["SMOLFORGE_REPORT_DIR"], "fused_ce_memory.json"), "w") as f:
            json.dump(report, f)
    assert report["liger_fused"] < report["torch"]
