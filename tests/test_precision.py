"""Which precision a run computes in: bf16 only where the hardware has it natively."""
import pytest
import torch

import train_gpt as tg

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Fake the CPU's native-bf16 capability (torch.ops.mkldnn._is_mkldnn_bf16_supported())."""
    def fake(native: bool) -> None:
        monkeypatch.setattr(tg, "cpu_has_bf16", lambda: native)
    return fake


def test_compiled_cpu_run_uses_bf16_where_the_cpu_has_it(cpu_bf16):
    cpu_bf16(True)
    assert tg.precision(tg.Hyperparameters(compile=True), CPU) == "bf16"
    assert tg.uses_bf16(tg.Hyperparameters(compile=True), CPU)


def test_compiled_cpu_run_falls_back_to_fp32_without_native_bf16(cpu_bf16):
    # An AVX2-only CPU runs a bf16 matmul 12-75x slower than fp32, compiled or not.
    cpu_bf16(False)
    assert tg.precision(tg.Hyperparameters(compile=True), CPU) == "fp32 reason:no_native_bf16"
    assert not tg.uses_bf16(tg.Hyperparameters(compile=True), CPU)


def test_eager_cpu_run_is_fp32_whatever_the_cpu(cpu_bf16):
    for native in (True, False):
        cpu_bf16(native)
        assert tg.precision(tg.Hyperparameters(compile=False), CPU) == "fp32 reason:compile_0"


def test_cuda_always_computes_in_bf16(cpu_bf16):
    cpu_bf16(False)
    for compile_ in (True, False):
        assert tg.precision(tg.Hyperparameters(compile=compile_), torch.device("cuda", 0)) == "bf16"


def test_runtime_line_says_why_a_compiled_cpu_run_is_fp32(cpu_bf16):
    cpu_bf16(False)
    lines = []
    log = type("Log", (), {"kept": None, "__call__": lambda self, line: lines.append(line)})()
    tg.log_setup(tg.Hyperparameters(compile=True), log, 1, CPU)
    runtime = [line for line in lines if line.startswith("runtime ")]
    assert runtime and "autocast:fp32 reason:no_native_bf16" in runtime[0].split(" ", 2)[2]


def test_model_built_for_a_cpu_without_bf16_keeps_an_fp32_residual_stream(cpu_bf16):
    cpu_bf16(False)
    hp = tg.Hyperparameters(vocab_size=97, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                            xsa_last_n=0, parallel_start=-1, recur_layers="", compile=True)
    model = tg.GPT(hp, bf16=tg.uses_bf16(hp, CPU))
    assert model.bf16 is False
