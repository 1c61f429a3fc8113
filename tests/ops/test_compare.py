"""python -m dfine.ops.compare: every op case runs and its fused backends agree with the references."""

from dfine.ops import compare


def test_compare_quick_errors_are_small(fused_backend):
    results = compare.run_comparisons(quick=True, backends=[fused_backend])
    assert {r.op for r in results} == {op for op, _, backends in compare.OP_CASES if fused_backend in backends}
    for r in results:
        assert r.errors[0].name in ("out", "out0") and len(r.errors) >= 2, r
        for e in r.errors:
            assert e.max_rel <= 1e-4, f"{r.op}/{r.backend} {e.name}: rel err {e.max_rel:.2e}"
        assert r.speedup > 0
    table = compare.format_table(results)
    assert table.count("\n") == 1 + sum(len(r.errors) for r in results)


def test_compare_measures_a_real_difference():
    """The error columns are not constant: a wrong 'fused' function shows up as a large error."""
    import torch

    inputs = {"x": torch.linspace(-1, 1, 11)}
    r = compare.compare_callables("square", "wrong", "11", lambda x: x * x, lambda x: x * x + 0.5, inputs, ("x",), repeats=1)
    assert abs(r.errors[0].max_abs - 0.5) < 1e-6
    assert r.errors[1].max_abs == 0.0  # same gradient 2x


def test_half_precision_is_compared_with_float64_and_a_missing_kernel_is_listed():
    """bf16 inputs: the error is measured against the reference in float64 (a bf16-sized error, not 0); a fused
    op that does not take the dtype gives a row with its error instead of numbers."""
    import torch

    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    inputs = {"x": x.to(torch.bfloat16)}
    r = compare.compare_callables("exp", "cpp", "101", torch.exp, torch.exp, inputs, ("x",), repeats=1)
    assert r.dtype == "bfloat16" and r.failure is None
    assert 1e-4 < r.errors[0].max_rel < 2 ** -7  # bf16 rounding of exp(x), measured against float64
    assert r.fused_ms > 0 and r.reference_ms > 0 and r.compiled_ms != r.compiled_ms  # not compiled: nan

    def no_bf16(x):
        raise RuntimeError("exp: no kernel for BFloat16\nmore detail")

    missing = compare.compare_callables("exp", "triton", "101", torch.exp, no_bf16, inputs, ("x",), repeats=1)
    assert missing.failure == "exp: no kernel for BFloat16" and not missing.errors
    table = compare.format_table([r, missing])
    assert table.splitlines()[-1].endswith("| - | n/a | n/a | exp: no kernel for BFloat16 |")
    timing = compare.format_timing_table([r, missing]).splitlines()
    assert timing[0].startswith("| op | backend | device | bfloat16 fused ms | bfloat16 reference ms |")
    assert len(timing) == 4  # one row per (op, backend)
    assert timing[2].count("n/a") == 0 and timing[2].endswith("| - |")  # measured; vs compile: not run
    assert timing[3] == "| exp | triton | cpu | n/a | n/a | n/a | n/a | n/a |"


def test_timing_table_has_a_column_group_per_dtype():
    rows = [compare.Comparison("op", "cpp", "s", fused_ms=1.0, reference_ms=4.0, compiled_ms=2.0, dtype="float32"),
            compare.Comparison("op", "cpp", "s", fused_ms=0.5, reference_ms=3.0, dtype="bfloat16")]
    lines = compare.format_timing_table(rows).splitlines()
    assert lines[0].count("|") == 3 + 2 * 5 + 1
    assert lines[2] == "| op | cpp | cpu | 1.000 | 4.000 | 2.000 | 4.00x | 2.00x | 0.500 | 3.000 | - | 6.00x | - |"


def test_device_cuda_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--device", "cuda", "--quick"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: no CUDA GPU is visible") and "\n" not in err
