"""Object names and labels the provider gives the GPUs it registers (``deviceapi.naming``)."""

from __future__ import annotations

import re

import pytest

from gpufleet.deviceapi.naming import gpu_labels, gpu_name, label_value, provider_name

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def test_name_drops_the_gpu_prefix_and_lower_cases() -> None:
    assert (
        gpu_name("GPU-5B9A2E6C-0D47-4C5E-9F0A-3E1C2B7D8A91")
        == "gpu-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91"
    )


@pytest.mark.parametrize(
    "uuid",
    ["GPU-5b9a2e6c-0d47-4c5e-9f0a-3e1c2b7d8a91", "gpu-ABC_def", "weird uuid!", "GPU-" + "a" * 80],
)
def test_name_is_a_dns1123_label(uuid: str) -> None:
    name = gpu_name(uuid)
    assert len(name) <= 63

    assert re.fullmatch(DNS1123_LABEL, name)


def test_name_of_an_empty_uuid_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot derive"):
        gpu_name("GPU-")


def test_label_value_sanitises_the_product_name() -> None:
    assert label_value("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert label_value(" (weird) ") == "weird"
    assert len(label_value("x" * 100)) == 63


def test_labels_name_the_node_and_product() -> None:
    assert gpu_labels("node-1", "NVIDIA L4") == {
        "gpufleet.io/node": "node-1",
        "gpufleet.io/product": "NVIDIA-L4",
        "gpufleet.io/provider": "nvml",
    }


def test_the_provider_label_names_the_source_actually_used() -> None:
    from gpufleet.gpu import sim
    from gpufleet.gpu.nvml import NvmlSource
    from gpufleet.gpu.smi.source import SmiXmlSource

    simulated = NvmlSource(sim.open("l4"))
    try:
        assert provider_name(simulated) == "sim"
    finally:
        simulated.close()
    assert provider_name(SmiXmlSource.__new__(SmiXmlSource)) == "smi"
    assert provider_name(object()) == "nvml"


def test_the_gpus_help_selector_example_matches_what_the_provider_labels() -> None:
    from gpufleet.deviceapi.cli import SELECTOR_EXAMPLE
    from gpufleet.deviceapi.selector import parse

    assert parse(SELECTOR_EXAMPLE).matches(gpu_labels("node-a", "NVIDIA L4", "sim"))
    assert not parse(SELECTOR_EXAMPLE).matches(gpu_labels("node-b", "NVIDIA L4", "sim"))
