"""The MCU path end to end: digits models compiled for stm32f746, their C built for the host
(ASan + UBSan) and for the Cortex-M7 (run under QEMU), bit for bit against cm's reference
executor; accuracy, RAM against TensorFlow Lite Micro's arenas, budgets, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcc
from lrcc.codegen.c.execute import run_program
from lrcc.codegen.c.verify import check_c
from lrcc.zoo import digits

# TensorFlow Lite Micro's arena for int8 models of the same shapes (measured with TFLM; see the
# issue and docs/mcu.md): RAM lrcc must stay within half of
TFLM_ARENA = {"mlp": 5024, "cnn": 23664, "vit": 81968}


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    out = {}
    for name in ("mlp", "cnn", "vit"):
        model, data, acc = digits.trained(name)
        calib = [(data.x_train[i:i + 64],) for i in range(0, len(data.y_train), 64)]
        cm = lrcc.compile(model, (data.x_train[:1],), target="stm32f746", calibration=calib)
        out[name] = (model, data, acc, cm)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_int8_c_matches_reference_on_host_and_qemu_and_keeps_accuracy(compiled, name, tmp_path):
    model, data, float_acc, cm = compiled[name]
    with torch.no_grad():
        int8_acc = float((cm(data.x_test).argmax(-1) == data.y_test).float().mean())
    assert float_acc > 0.9, f"{name} trained to only {float_acc:.3f}"
    assert int8_acc >= float_acc - 0.01, f"{name}: int8 accuracy {int8_acc:.4f} vs float {float_acc:.4f}"
    q = cm.module.quantize_input(data.x_test[:12])
    chk = check_c(cm.program, q, board="stm32f746", workdir=tmp_path)
    assert chk.host_equal and chk.qemu_equal
    assert 0 < chk.stack_used < 4096
    inp, outp = cm.program.tensors[cm.program.input], cm.program.tensors[cm.program.output]
    ram = chk.arena_bytes + chk.stack_used + inp.size + outp.size  # arena, stack, and the caller's I/O
    assert ram <= 0.5 * TFLM_ARENA[name], f"{name}: {ram} B of RAM vs TFLite Micro's {TFLM_ARENA[name]} B"
    t = cm.report.totals
    assert t["arena_bytes"] == chk.arena_bytes
    assert t["arena_bytes"] <= t["arena_bytes_greedy"] <= t["arena_bytes_naive"]
    assert cm.report.arena and "arena" in str(cm.report)


def test_whole_int8_range_is_sanitizer_clean(compiled, tmp_path):
    """Inputs across the whole int8 range, extremes included, through the ViT's C under ASan/UBSan."""
    _, _, _, cm = compiled["vit"]
    n = cm.program.tensors[cm.program.input].size
    rng = np.random.default_rng(0)
    inputs = np.stack([np.full(n, -128), np.full(n, 127), rng.choice([-128, 127], n), rng.integers(-128, 128, n)])
    chk = check_c(cm.program, inputs.astype(np.int8), board=None, workdir=tmp_path)
    assert chk.host_equal


def test_save_load_and_header(compiled, tmp_path):
    _, data, _, cm = compiled["cnn"]
    cm.save(tmp_path / "out")
    header = (tmp_path / "out" / "lrcc_model.h").read_text()
    for define in ("LRCC_INPUT_SIZE 1024", "LRCC_OUTPUT_SIZE 10", "LRCC_INPUT_SCALE", "LRCC_INPUT_ZERO_POINT",
                   "LRCC_OUTPUT_SCALE", "LRCC_OUTPUT_ZERO_POINT", "LRCC_ARENA_BYTES"):
        assert f"#define {define}" in header
    assert "int lrcc_model_run(const int8_t *input, int8_t *output);" in header
    source = (tmp_path / "out" / "lrcc_model.c").read_text()
    assert "malloc(" not in source and "static int64_t lrcc_arena[" in source
    cm2 = lrcc.load(tmp_path / "out")
    x = data.x_test[:8]
    assert torch.equal(cm(x), cm2(x))


def test_flash_budget_factorises_and_c_stays_exact(compiled, tmp_path):
    model, data, float_acc, cm = compiled["vit"]
    full = cm.report.totals["flash_bytes"]
    calib = [(data.x_train[i:i + 64],) for i in range(0, len(data.y_train), 64)]
    budget = lrcc.Budget(flash=int(full * 0.85), sram="320KB")
    cm2 = lrcc.compile(model, (data.x_train[:1],), target="stm32f746", budget=budget, calibration=calib)
    assert cm2.report.totals["flash_bytes"] <= budget.flash
    assert any(op.name.endswith(".v") for op in cm2.program.ops), "no site was factorised"
    with torch.no_grad():
        agree = float((cm2(data.x_test).argmax(-1) == model(data.x_test).argmax(-1)).float().mean())
    assert agree >= 0.9
    chk = check_c(cm2.program, cm2.module.quantize_input(data.x_test[:6]), board="stm32f746", workdir=tmp_path)
    assert chk.host_equal and chk.qemu_equal


def test_stm32f411_build_runs_on_cortex_m4(compiled, tmp_path):
    _, data, _, cm = compiled["mlp"]
    chk = check_c(cm.program, cm.module.quantize_input(data.x_test[:8]), board="stm32f411", workdir=tmp_path)
    assert chk.qemu_equal


def test_budgets_that_cannot_be_met_name_the_smallest_reachable(compiled):
    model, data, _, _ = compiled["cnn"]
    with pytest.raises(lrcc.BudgetError, match=r"sram=2,048 bytes cannot be met.*smallest reachable is [\d,]+ bytes"):
        lrcc.compile(model, (data.x_train[:1],), target="stm32f746", budget="sram=2KB",
                     calibration=[(data.x_train[:64],)])
    with pytest.raises(lrcc.BudgetError, match=r"flash.*cannot be met.*smallest reachable"):
        lrcc.compile(model, (data.x_train[:1],), target="stm32f746", budget="flash=20KB",
                     calibration=[(data.x_train[:64],)])


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.sigmoid(self.fc(x))
        return torch.matmul(h.unsqueeze(-1), h.unsqueeze(-2)).flatten(1)


def test_unsupported_ops_are_listed_together():
    with pytest.raises(lrcc.LrccError) as e:
        lrcc.compile(Unsupported(), (torch.randn(1, 8),), target="stm32f746")
    msg = str(e.value)
    assert "2 operator(s) cannot be emitted as C" in msg
    assert "aten.sigmoid" in msg and "aten.matmul" in msg


class MaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)))

    def forward(self, x):
        t = self.q(x).view(1, 4, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t, attn_mask=self.mask).transpose(1, 2).reshape(1, 4, 8)


def test_attention_mask_is_refused_not_ignored():
    with pytest.raises(lrcc.LrccError, match="attn_mask"):
        lrcc.compile(MaskedAttention(), (torch.randn(1, 4, 8),), target="stm32f746")


class DepthwiseNet(nn.Module):
    """Depthwise + pointwise convolutions, strided, causal self-attention over the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.q = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        b = x.shape[0]
        t = x.flatten(2).transpose(1, 2)              # (b, 16 tokens, 16)
        h = self.q(t).view(b, 16, 2, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(b, 16, 16)
        return self.head((t + a).mean(dim=1))


def test_depthwise_conv_and_causal_attention_lower_exactly(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    calib = [(torch.rand(16, 3, 8, 8),) for _ in range(4)]
    cm = lrcc.compile(model, (calib[0][0][:1],), target="stm32f746", calibration=calib)
    kinds = [op.kind for op in cm.program.ops]
    assert "conv2d" in kinds and "attention" in kinds
    assert any(op.kind == "conv2d" and op.attrs["groups"] == 8 for op in cm.program.ops)
    assert any(op.kind == "attention" and op.attrs["causal"] for op in cm.program.ops)
    x = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        ref, got = model(x), cm(x)
    cos = F.cosine_similarity(ref, got, dim=1)
    assert float(cos.mean()) > 0.98
    chk = check_c(cm.program, cm.module.quantize_input(x[:4]), board=None, workdir=tmp_path)
    assert chk.host_equal


def test_reference_executor_rejects_wrong_input():
    torch.manual_seed(0)
    model = digits.MLP().eval()
    cm = lrcc.compile(model, (torch.rand(1, 64),), target="stm32f746", calibration=[(torch.rand(32, 64),)])
    with pytest.raises(lrcc.LrccError, match="expected 64 int8 input values"):
        run_program(cm.program, np.zeros(63, dtype=np.int8))
    with pytest.raises(lrcc.LrccError, match="expected input of shape"):
        cm(torch.rand(2, 65))
    assert math.isfinite(float(cm(torch.rand(2, 64)).sum()))


def test_tight_flash_budget_picks_int4_weights_that_run_exactly(tmp_path):
    """On full-rank (untrained) weights low rank is a poor deal and the planner takes per-channel
    int4 (GPTQ) weights; the C runs their codes and zero points as stored, so C, QEMU and cm agree
    bit for bit, and the output stays close to the float model."""
    torch.manual_seed(0)
    model = digits.MLP().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.rand(64, 64, generator=g),) for _ in range(8)]
    cm = lrcc.compile(model, (calib[0][0][:1],), target="stm32f746", budget="flash=66KB", calibration=calib)
    assert cm.report.totals["flash_bytes"] <= 66 * 1024
    assert any("int4" in r["choice"] for r in cm.report.rows)
    assert any(op.kind == "linear" and "zero" in op.attrs for op in cm.program.ops)
    x = torch.rand(64, 64, generator=g)
    with torch.no_grad():
        cos = F.cosine_similarity(model(x), cm(x), dim=1)
    assert float(cos.mean()) > 0.98
    chk = check_c(cm.program, cm.module.quantize_input(x[:8]), board="stm32f746", workdir=tmp_path)
    assert chk.host_equal and chk.qemu_equal


class AvgPoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.relu(self.conv(x)), 3, stride=2).flatten(1))


def test_avg_pool_lowers_exactly(tmp_path):
    torch.manual_seed(0)
    model = AvgPoolNet().eval()
    calib = [(torch.rand(16, 1, 7, 7),) for _ in range(4)]
    cm = lrcc.compile(model, (calib[0][0][:1],), target="stm32f746", calibration=calib)
    assert any(op.kind == "avgpool2d" for op in cm.program.ops)
    x = torch.rand(32, 1, 7, 7)
    with torch.no_grad():
        cos = F.cosine_similarity(model(x), cm(x), dim=1)
    assert float(cos.mean()) > 0.99
    chk = check_c(cm.program, cm.module.quantize_input(x[:4]), board=None, workdir=tmp_path)
    assert chk.host_equal
    with pytest.raises(lrcc.LrccError, match="avg_pool2d with padding"):
        class Padded(AvgPoolNet):
            def forward(self, x):
                return F.avg_pool2d(self.conv(x), 3, stride=2, padding=1).flatten(1)
        lrcc.compile(Padded().eval(), (calib[0][0][:1],), target="stm32f746", calibration=calib)
