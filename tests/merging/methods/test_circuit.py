"""Circuit-Merge: drop-rate table, MAGPRUNE, priority accumulation, fixes of the reference's bugs.

Worked values from ``../shared/specs/circuit-della-peft.md`` §1.1 (drop-rate table, T = 0
accumulation of a same-sign run) and an independent float64 restatement of the per-tensor
algorithm, fed the same generator draws.
"""

import pytest
import torch
import yaml

from merging.api import run_stages
from merging.errors import MergeConfigError
from merging.methods.circuit import SPEC, CircuitParams, accumulate, calculate_p, drop_rates, magprune_linear
from merging.params import ModelParams
from merging.resolve import build_params, split_global_parameters
from merging.rng import generator_for
from merging.spec import TensorGroup

F64 = torch.float64


def _group(base, models, name="w"):
    deltas = torch.stack([m - base for m in models])
    return TensorGroup(name=name, base=base, deltas=deltas, model_params=tuple(ModelParams() for _ in models))


def _merge(base, models, seed=0, name="w", **params):
    return base + run_stages(SPEC, _group(base, models, name), CircuitParams(**params), seed)


def _reference(base, models, seed, name, temperature=0.0, b=0.5, threshold=2e-6, rescale=True):
    """Independent restatement (float64, entry by entry where it matters) of spec §1.1 steps 1-5."""
    g = generator_for(seed, name)
    n = len(models)
    acc = torch.zeros_like(base).reshape(-1)
    count = [0] * acc.numel()
    for i, model in enumerate(reversed(models), 1):  # processing order, i = 1 for the last listed
        d = (model - base).reshape(-1).clone()
        d[d.abs() < threshold] = 0
        u = torch.rand(base.shape, generator=g, dtype=torch.float32).to(F64).reshape(-1)
        k = n - max(i, 2) + 1
        p = 1 - ((1 - temperature) * 0.5**k * 2 * (1 - b) + temperature * (1 - b))
        if p != 0:
            m = d.abs()
            lo, hi = float(m.min()), float(m.max())
            for j in range(d.numel()):
                q = p - 0.05 + 0.1 * (1 - (float(m[j]) - lo) / (hi - lo))
                if u[j] < q:
                    d[j] = 0
                elif rescale:
                    d[j] = d[j] / (1 - q)
        for j in range(d.numel()):
            x = float(d[j])
            if x == 0:
                continue
            if count[j] == 0 or (acc[j] > 0) != (x > 0):
                acc[j], count[j] = x, 1
            else:
                count[j] += 1
                c = count[j]
                acc[j] = (1 - temperature) * (acc[j] + x) / 2 + temperature * (acc[j] * (c - 1) + x) / c
    return base + acc.reshape(base.shape)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, [0.5, 0.5]), (3, [0.5, 0.75, 0.75]), (4, [0.5, 0.75, 0.875, 0.875])],
)
def test_drop_rate_table_at_defaults(n, expected):
    """Spec §1.1 step 3: listed order, b = 0.5, T = 0."""
    assert drop_rates(n, CircuitParams()) == expected
    assert [calculate_p(i, n, 0.0, 0.5) for i in range(n, 0, -1)] == expected


def test_temperature_one_gives_every_model_the_base_droprate():
    for n in (2, 3, 5):
        assert drop_rates(n, CircuitParams(temperature=1.0, base_droprate=0.3)) == pytest.approx([0.3] * n, abs=1e-15)


def test_keep_rates_sum_to_twice_one_minus_b_at_temperature_zero():
    for n in (2, 3, 6):
        rates = drop_rates(n, CircuitParams(base_droprate=0.4))
        assert sum(1 - p for p in rates) == pytest.approx(2 * (1 - 0.4))


def test_matches_independent_restatement_in_float64():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g, dtype=F64)
    models = [base + 0.01 * torch.randn(6, 7, generator=g, dtype=F64) for _ in range(3)]
    models[1][0, :3] = base[0, :3] + 1e-7  # below the threshold
    for temperature in (0.0, 0.4, 1.0):
        out = _merge(base, models, seed=5, name="layer.w", temperature=temperature)
        expected = _reference(base, models, 5, "layer.w", temperature=temperature)
        assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_matches_restatement_without_rescaling_and_other_droprate():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, generator=g, dtype=F64)
    models = [base + torch.randn(40, generator=g, dtype=F64) for _ in range(4)]
    out = _merge(base, models, seed=2, name="bias", base_droprate=0.3, skip_rescaling=True, temperature=0.2)
    expected = _reference(base, models, 2, "bias", temperature=0.2, b=0.3, rescale=False)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_same_sign_run_at_temperature_zero_halves_older_contributions():
    """Spec §1.1 step 5: x_1..x_k same sign -> x_1/2^(k-1) + sum_{j>=2} x_j/2^(k-j+1)."""
    xs = torch.tensor([[1.0], [2.0], [4.0], [8.0]], dtype=F64)  # processing order
    assert accumulate(xs, 0.0).item() == 1 / 8 + 2 / 8 + 4 / 4 + 8 / 2
    assert accumulate(xs, 1.0).item() == pytest.approx(xs.mean().item())


def test_sign_disagreement_overwrites_and_restarts_the_count():
    xs = torch.tensor([[2.0], [4.0], [-1.0], [-3.0]], dtype=F64)
    assert accumulate(xs, 0.0).item() == (-1 - 3) / 2
    assert accumulate(xs, 1.0).item() == (-1 - 3) / 2  # count restarted at the overwrite: mean of 2


def test_zeros_leave_the_accumulator_unchanged():
    xs = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, -2.0]], dtype=F64)
    assert accumulate(xs, 0.5).tolist() == [3.0, -2.0]


def test_highest_priority_sign_wins_when_nothing_is_dropped():
    """b = 0, T = 1 gives p = 0 for every model: no pruning; the first-listed model's sign wins."""
    base = torch.zeros(3, dtype=F64)
    top = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    low = torch.tensor([-5.0, -3.0, 2.0], dtype=F64)
    out = _merge(base, [top, low], base_droprate=0.0, temperature=1.0)
    assert out.tolist() == [1.0, -2.0, 2.0]


def test_threshold_zeroes_small_changes_and_accepts_yaml_strings():
    params = CircuitParams(**yaml.safe_load("meaningful_change_threshold: 1e-3\nbase_droprate: 0.0\ntemperature: 1.0"))
    assert params.meaningful_change_threshold == 1e-3
    base = torch.zeros(4, dtype=F64)
    a = torch.tensor([5e-4, 2e-3, -1e-3, 0.0], dtype=F64)
    out = base + run_stages(SPEC, _group(base, [a, a]), params, 0)
    assert out.tolist() == [0.0, 2e-3, -1e-3, 0.0]  # |d| == threshold is kept


def test_yaml_float_strings_are_coerced_and_junk_refused():
    raw = yaml.safe_load("parameters:\n  meaningful_change_threshold: 1e-6\n  temperature: 5e-1\n")["parameters"]
    assert raw["meaningful_change_threshold"] == "1e-6"  # PyYAML (YAML 1.1) reads it as a string
    shared, defaults = split_global_parameters(SPEC, raw)
    params, _ = build_params(SPEC, shared, defaults, [{}, {}], ["a", "b"], "w")
    assert params.meaningful_change_threshold == 1e-6 and params.temperature == 0.5
    with pytest.raises(ValueError):
        CircuitParams(meaningful_change_threshold="tiny")
    with pytest.raises(ValueError):
        CircuitParams(base_droprate=1.0)
    with pytest.raises(ValueError):
        CircuitParams(extra_knob=1)


def test_rescaling_preserves_the_expectation_and_skip_does_not_rescale():
    base = torch.zeros(200_000, dtype=F64)
    a = torch.full((200_000,), 0.5, dtype=F64)
    a[::2] = 1.0
    rescaled = magprune_linear(a, 0.6, torch.rand(a.shape, generator=torch.Generator().manual_seed(0), dtype=F64))
    assert rescaled.mean().item() == pytest.approx(a.mean().item(), rel=0.01)
    skipped = _merge(base, [a, a], skip_rescaling=True, base_droprate=0.6)
    assert set(skipped.unique().tolist()) == {0.0, 0.5, 1.0}  # survivors unscaled


def test_magprune_drops_small_magnitudes_more():
    delta = torch.linspace(0.0, 1.0, 100_001, dtype=F64)
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    kept = magprune_linear(delta, 0.5, u) != 0
    assert kept[:10_000].double().mean() < 0.47 and kept[-10_000:].double().mean() > 0.53


def test_flat_magnitudes_get_p_not_nan():
    delta = torch.full((1000,), -0.25, dtype=F64)
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = magprune_linear(delta, 0.5, u)
    assert torch.isfinite(out).all()
    assert torch.equal(out != 0, u >= 0.5)
    assert set(out.unique().tolist()) <= {0.0, -0.5}


def test_probabilities_outside_unit_interval_are_clamped():
    delta = torch.linspace(0.0, 1.0, 1000, dtype=F64)
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(magprune_linear(delta, 0.999, u)[:100], torch.zeros(100, dtype=F64))  # q >= 1: dropped
    never = magprune_linear(delta, 0.01, u)  # q in [-0.04, 0.06]: the largest entries have q < 0
    assert torch.equal(never[-300:], delta[-300:])  # kept, not shrunk by 1/(1 - q) < 1


def test_seed_and_name_determine_the_result():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(10, 10, generator=g)
    models = [base + torch.randn(10, 10, generator=g) for _ in range(2)]
    one = _merge(base, models, seed=3, name="a")
    assert torch.equal(one, _merge(base, models, seed=3, name="a"))
    assert not torch.equal(one, _merge(base, models, seed=4, name="a"))
    assert not torch.equal(one, _merge(base, models, seed=3, name="b"))


def test_float32_compute_matches_float64_restatement():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(8, 8, generator=g)
    models = [base + 0.1 * torch.randn(8, 8, generator=g) for _ in range(3)]
    out = _merge(base, models, seed=1)
    expected = _reference(base.double(), [m.double() for m in models], 1, "w")
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_single_model_is_refused_by_default():
    base = torch.zeros(5)
    with pytest.raises(MergeConfigError, match="one model for tensor 'w'") as err:
        _merge(base, [base + 1])
    assert "single_model_drop: formula" in str(err.value)


def test_single_model_formula_keeps_the_delta_and_reference_drops_almost_all():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(5000, generator=g, dtype=F64)
    model = base + torch.randn(5000, generator=g, dtype=F64)
    assert drop_rates(1, CircuitParams(single_model_drop="formula")) == [0.0]
    assert drop_rates(1, CircuitParams(single_model_drop="formula", temperature=1.0, base_droprate=0.3)) == [
        pytest.approx(0.3)
    ]
    assert torch.allclose(_merge(base, [model], single_model_drop="formula"), model, rtol=0, atol=1e-14)
    broken = _merge(base, [model], single_model_drop="reference")
    assert drop_rates(1, CircuitParams(single_model_drop="reference")) == [1.0]
    assert int(((broken - base) != 0).sum()) < 100


def test_lambda_scales_the_merged_delta():
    base = torch.zeros(3, dtype=F64)
    a = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    out = base + run_stages(SPEC, _group(base, [a, a]), CircuitParams(base_droprate=0.0, temperature=1.0, **{"lambda": 0.5}), 0)
    assert out.tolist() == [0.5, -1.0, 1.5]
