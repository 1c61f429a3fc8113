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
