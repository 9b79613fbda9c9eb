"""SpectrumOptions.check_cost: an analysis over the product cap or the memory budget is
refused before any work, naming the option that costs the most."""

from __future__ import annotations

import pytest
from hessian_service.engine.analysis import spectrum
from hessian_service.engine.analysis.spectrum import SpectrumOptions
from hessian_service.engine.errors import ResourceLimitError


@pytest.mark.parametrize(
    ("probes", "steps", "named"),
    [(40, 10, "density_probes"), (4, 2**40, "density_steps"), (3, 30, "density_steps")],
)
def test_the_product_cap_names_the_option_asking_for_most_products(probes, steps, named):
    """The density's probes x steps products name the larger factor (an absurd
    density_steps was blamed on density_probes)."""
    options = SpectrumOptions(
        max_lanczos_iterations=50, trace_samples=30, density_probes=probes, density_steps=steps
    )
    products = 50 + 2 * 30 + probes * steps
    options.check_cost(1000, 8, 2**60, products)  # exactly at the cap: allowed
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(1000, 8, 2**60, products - 1)
    assert info.value.field == f"options.{named}" and f"about {products}" in str(info.value)


def test_lanczos_products_count_at_most_one_per_parameter():
    options = SpectrumOptions(max_lanczos_iterations=500, trace_samples=0, density_probes=0)
    options.check_cost(20, 8, 2**40, 20)  # a 20-parameter problem: at most 20 products
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(20, 8, 2**40, 19)
    assert info.value.field == "options.max_lanczos_iterations"


@pytest.mark.parametrize("itemsize", [4, 8])
def test_the_memory_budget_counts_the_largest_set_of_working_vectors(itemsize):
    n = 10_000
    options = SpectrumOptions(density_probes=20, density_steps=30, batch_size=16)
    # SLQ: a batch of 16 of the 20 probes, each with its Lanczos basis and working vectors
    vectors = 16 * (30 + 1 + spectrum.DENSITY_VECTORS)
    assert vectors > options.max_lanczos_iterations + 2 * options.block_size
    need = vectors * n * itemsize
    options.check_cost(n, itemsize, need, 10**9)
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(n, itemsize, need - 1, 10**9)
    assert info.value.field == "options.density_steps" and f"need {need} bytes" in str(info.value)


def test_a_prefix_names_the_field_where_the_options_came_from():
    options = SpectrumOptions(max_lanczos_iterations=100, trace_samples=0, density_probes=0)
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(1000, 8, 2**40, 10, field_prefix="request.options")
    assert info.value.field == "request.options.max_lanczos_iterations"
