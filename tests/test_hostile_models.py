"""lrcc.compile on hostile models and inputs: non-finite weights and calibration data, fp16 / bf16 /
integer weights, zero-size layers and inputs, dynamic batch and sequence length, malformed
example_inputs. Each either compiles to a model that matches the original or fails with an
LrccError that names what was wrong and where."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrcc
from lrcc import CalibrationError, LrccError
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["cpu", "stm32f746"]
FLOAT32_HINT = "model.float()"


def mlp() -> nn.Sequential:
    """Supported on MCU targets: Linear, ReLU, Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def batches(n: int = 4, b: int = 16, d: int = 16, seed: int = 1) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=gen),) for _ in range(n)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


# --- non-finite weights and calibration data ---------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("where,value", [("2.weight", float("nan")), ("0.bias", float("inf")),
                                         ("2.bias", float("-inf"))])
def test_non_finite_weight_is_rejected_naming_it(target, where, value):
    model = mlp()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[3] = value
    with pytest.raises(LrccError) as e:
        lrcc.compile(model, (torch.randn(1, 16),), target=target, calibration=batches())
    msg = str(e.value)
    layer = where.split(".")[0]
    assert repr(where) in msg and f"layer {layer!r}" in msg, msg
    assert ("1 NaN" if value != value else "1 Inf") in msg, msg
    assert "fix the model's weights" in msg


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_batch_is_rejected_naming_it(target, value):
    calib = batches(5)
    calib[3][0][7, 2] = value
    with pytest.raises(CalibrationError) as e:
        lrcc.compile(mlp(), (torch.randn(1, 16),), target=target, calibration=calib)
    msg = str(e.value)
    assert "calibration batch 3 input 0" in msg and ("1 NaN" if value != value else "1 Inf") in msg, msg


def test_non_finite_example_is_rejected_when_it_is_the_calibration_data():
    x = torch.randn(4, 16)
    x[1, 1] = float("nan")
    with pytest.raises(CalibrationError, match=r"example_inputs .* input 0: contains 1 NaN"):
        lrcc.compile(mlp(), (x,))


def test_uninitialised_example_is_fine_with_calibration_data():
    """Example inputs only give shapes when calibration data is given (torch.empty is common there)."""
    x = torch.full((2, 16), float("nan"))
    model = mlp()
    cm = lrcc.compile(model, (x,), calibration=batches())
    probe = torch.randn(6, 16)
    assert rel_err(cm(probe), model(probe)) < 0.1


# --- fp16 / bf16 / integer weights ----------------------------------------------------------------
# Decision: low-precision float models are rejected (the planner, refit and lowering compute in
# float32); the message names the weight and says to convert with model.float().

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_is_rejected_with_float32_advice(target, dtype):
    model = mlp().to(dtype)
    with pytest.raises(LrccError) as e:
        lrcc.compile(model, (torch.randn(1, 16, dtype=dtype),), target=target,
                     calibration=[(b.to(dtype),) for (b,) in batches()])
    msg = str(e.value)
    assert "'0.weight'" in msg and str(dtype) in msg and "float32" in msg and FLOAT32_HINT in msg, msg


def test_low_precision_inputs_to_a_float32_model_are_rejected():
    with pytest.raises(LrccError) as e:
        lrcc.compile(mlp(), (torch.randn(2, 16, dtype=torch.float16),))
    assert "example_inputs[0]" in str(e.value) and "torch.float16" in str(e.value) and FLOAT32_HINT in str(e.value)


def test_calibration_dtype_must_match_the_example():
    calib = batches()
    calib[2] = (calib[2][0].to(torch.bfloat16),)
    with pytest.raises(CalibrationError) as e:
        lrcc.compile(mlp(), (torch.randn(2, 16),), calibration=calib)
    assert "calibration batch 2 input 0" in str(e.value) and "torch.bfloat16" in str(e.value)


def test_low_precision_buffer_used_as_a_linear_weight_is_rejected():
    """A float16 buffer fed to F.linear (not a parameter): caught once imported, naming it."""
    class HalfBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(8, 16, dtype=torch.float16))

        def forward(self, x):
            return nn.functional.linear(x.half(), self.w).float()

    with pytest.raises(LrccError) as e:
        lrcc.compile(HalfBuffer().eval(), (torch.randn(2, 16),), calibration=batches())
    assert "'w'" in str(e.value) and "float32" in str(e.value), str(e.value)


class IntScaled(NearlyLowRank):
    """NearlyLowRank whose output is scaled by an int8 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1, 17, dtype=torch.int8) % 5 + 1)

    def forward(self, x):
        return super().forward(x) * self.scale


def test_int8_buffer_is_handled_on_cpu():
    model = IntScaled().eval()
    cm = lrcc.compile(model, (torch.randn(2, 64),), budget=0.5, calibration=nearly_low_rank_batches())
    assert cm.report.totals["params_after"] < cm.report.totals["params_before"]  # it did compress
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    assert rel_err(cm(x), model(x)) < 0.05


def test_int8_buffer_on_mcu_names_the_unsupported_op():
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.register_buffer("q", torch.arange(8, dtype=torch.int8) % 3 + 1)

        def forward(self, x):
            return self.net(x) * self.q

    with pytest.raises(LrccError, match=r"stm32f746.*cannot be emitted as C[\s\S]*aten\.mul"):
        lrcc.compile(Scaled().eval(), (torch.randn(1, 16),), target="stm32f746", calibration=batches())


# --- zero-size layers and inputs -------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_zero_output_layer_is_rejected_naming_it(target):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 0)).eval()
    with pytest.raises(LrccError) as e:
        lrcc.compile(model, (torch.randn(1, 16),), target=target, calibration=batches())
    msg = str(e.value)
    assert "'2.weight'" in msg and "layer '2'" in msg and "zero-size" in msg and "(0, 8)" in msg, msg


@pytest.mark.parametrize("target", TARGETS)
def test_zero_input_layer_is_rejected_naming_it(target):
    class ZeroIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.empty = nn.Linear(16, 8), nn.Linear(0, 8)

        def forward(self, x):
            return self.body(x) + self.empty(x[:, :0])

    with pytest.raises(LrccError) as e:
        lrcc.compile(ZeroIn().eval(), (torch.randn(1, 16),), target=target, calibration=batches())
    assert "'empty.weight'" in str(e.value) and "zero-size" in str(e.value), str(e.value)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0)])
def test_zero_size_example_input_is_rejected(target, shape):
    model = mlp() if shape[1] else nn.Sequential(nn.Linear(0, 4)).eval()
    with pytest.raises(LrccError) as e:
        lrcc.compile(model, (torch.randn(*shape),), target=target)
    assert "example_inputs[0]" in str(e.value) and str(shape) in str(e.value) and "zero-size" in str(e.value)


def test_empty_calibration_batch_is_rejected_naming_it():
    calib = batches()
    calib.insert(1, (torch.randn(0, 16),))
    with pytest.raises(CalibrationError, match=r"calibration batch 1 input 0 .* zero-size"):
        lrcc.compile(mlp(), (torch.randn(2, 16),), calibration=calib)


# --- dynamic shapes ------------------------------------------------------------------------------

def test_calibration_batch_sizes_differ_from_example():
    model = NearlyLowRank().eval()
    cm = lrcc.compile(model, (torch.randn(3, 64),), budget=0.5, calibration=nearly_low_rank_batches())
    assert cm.report.totals["params_after"] <= 0.5 * cm.report.totals["params_before"]
    gen = torch.Generator().manual_seed(4)
    for b in (1, 7, 130):
        x = torch.randn(b, 64, generator=gen)
        assert cm(x).shape == (b, 16)
        assert rel_err(cm(x), model(x)) < 0.05


class Tokens(nn.Module):
    """A per-token MLP over (batch, length, features) followed by a mean over the length."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = NearlyLowRank()

    def forward(self, x):
        return self.mlp(x).mean(1)


def test_calibration_sequence_lengths_differ_from_example():
    model = Tokens().eval()
    gen = torch.Generator().manual_seed(7)
    calib = [(torch.randn(b, l, 64, generator=gen),) for b, l in [(4, 9), (3, 13), (6, 5), (2, 17), (5, 11)]]
    cm = lrcc.compile(model, (torch.randn(2, 6, 64, generator=gen),), budget=0.5, calibration=calib)
    assert cm.report.totals["params_after"] <= 0.5 * cm.report.totals["params_before"]
    for b, l in [(1, 3), (5, 21)]:
        x = torch.randn(b, l, 64, generator=gen)
        assert rel_err(cm(x), model(x)) < 0.05


def test_calibration_shape_the_model_fixes_is_rejected_naming_the_dim():
    class Fixed(nn.Module):  # reshapes to a fixed length of 6: L cannot vary
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6 * 4, 8)

        def forward(self, x):
            return self.lin(x.reshape(x.shape[0], 6 * 4))

    calib = [(torch.randn(3, 6, 4),), (torch.randn(3, 7, 4),)]
    with pytest.raises(CalibrationError) as e:
        lrcc.compile(Fixed().eval(), (torch.randn(2, 6, 4),), calibration=calib)
    assert "calibration batch 1 input 0" in str(e.value) and "dim 1 is 7" in str(e.value) and "6" in str(e.value)


def test_calibration_of_the_wrong_rank_is_rejected():
    with pytest.raises(CalibrationError, match=r"calibration batch 0 input 0 .*\(3 dims\) .* with 2 dims"):
        lrcc.compile(mlp(), (torch.randn(2, 16),), calibration=[(torch.randn(2, 3, 16),)])


# --- malformed example_inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bad,kind", [(([0.5] * 16,), "list"), ((3,), "int"), (("x",), "str"),
                                      ((None,), "NoneType"), ({"x": torch.randn(1, 16)}, "dict")])
def test_non_tensor_example_inputs_are_rejected(target, bad, kind):
    with pytest.raises(LrccError) as e:
        lrcc.compile(mlp(), bad, target=target)
    assert "example_inputs[0]" in str(e.value) and f"type {kind}" in str(e.value) and "tensor" in str(e.value)


@pytest.mark.parametrize("target", TARGETS)
def test_wrong_number_of_example_inputs_is_rejected(target):
    x = torch.randn(1, 16)
    with pytest.raises(LrccError) as e:
        lrcc.compile(mlp(), (x, x), target=target)
    assert "2 tensor(s)" in str(e.value) and "Sequential.forward takes 1 (input)" in str(e.value)
    with pytest.raises(LrccError, match="example_inputs is empty"):
        lrcc.compile(mlp(), (), target=target)


def test_too_few_example_inputs_is_rejected_naming_forward_arguments():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, x, y, scale=None):
            return self.lin(x + y)

    with pytest.raises(LrccError, match=r"1 tensor\(s\) but Two.forward takes 2 to 3 \(x, y, scale\)"):
        lrcc.compile(Two().eval(), (torch.randn(2, 16),))


def test_calibration_of_the_wrong_count_is_rejected():
    with pytest.raises(CalibrationError, match="calibration batch 1: has 2 inputs, the model takes 1"):
        lrcc.compile(mlp(), (torch.randn(2, 16),), calibration=[batches(1)[0], (torch.randn(2, 16),) * 2])
