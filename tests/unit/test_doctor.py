"""`ctray doctor`'s judgement of what a GPU node reports (the fake clusters of test_multinode*.py
have no GPU: there the doctor runs end to end on its no-GPU branch). The node reports are what
ctray.doctor.probe_node returns on a node."""

import pytest

from ctray.doctor import _gpu_line, _net_line

H100 = {
    "gpu_names": ["NVIDIA H100 80GB HBM3"] * 8,
    "torch": "2.13.0",
    "torch_cuda": "13.0",
    "driver": "580.95.05",
    "driver_cuda": "13.0",
    "bf16": True,
}


@pytest.mark.parametrize(
    ("change", "ok", "says"),
    [
        ({}, True, "8x NVIDIA H100 80GB HBM3: torch 2.13.0 CUDA 13.0, driver 580.95.05 (CUDA 13.0); bf16 yes"),
        ({"driver": "570.172.08", "driver_cuda": "12.8"}, False, "driver 570.172.08 (CUDA 12.8)"),  # too old a driver
        ({"torch_cuda": None}, False, "torch 2.13.0 is a CPU build"),
        ({"bf16": False}, False, "bf16 no"),  # a V100: no bf16
        ({"torch": None, "torch_error": "OSError: libcudart.so.13"}, False, "torch not importable (OSError"),
        ({"torch_cuda": "12.8"}, True, "CUDA 12.8, driver 580.95.05"),  # an older build on a newer driver runs
    ],
)
def test_torchs_cuda_build_against_the_driver_and_bf16(change, ok, says):
    topic, text, judged = _gpu_line({**H100, **change})
    assert topic == "gpus" and judged is ok and says in text


def test_efa_devices_without_the_efa_provider_are_flagged():
    efa = {"FI_PROVIDER": "efa", "NCCL_NET": "OFI"}
    assert _net_line({"net_env": efa, "efa_devices": 32}) == (
        "network",
        "FI_PROVIDER=efa, NCCL_NET=OFI; 32 EFA device(s)",
        True,
    )
    _, text, ok = _net_line({"net_env": {}, "efa_devices": 32})
    assert not ok and "set FI_PROVIDER=efa and NCCL_NET=OFI" in text
    assert _net_line({"net_env": {"NCCL_SOCKET_NTHREADS": "4"}, "efa_devices": 0}) == (
        "network",
        "NCCL_SOCKET_NTHREADS=4",
        True,
    )


def test_printed_lines_carry_no_credentials(monkeypatch):
    from ctray.doctor import Report, format_report

    from helpers import CANARY_ENV, CANARY_PASSWORD

    monkeypatch.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
    report = Report()
    report.add("job a.yaml", f"storage s3://bucket/x?X-Amz-Signature={CANARY_ENV}: reachable")
    report.add("job a.yaml", f"storage http://canaryuser:{CANARY_PASSWORD}@127.0.0.1:9/b: not found", ok=False)
    report.add("network", f"FI_PROVIDER=efa, NCCL_IB_HCA={CANARY_ENV}")
    lines = format_report(report)
    assert len(lines) == 3 and lines[1].startswith("!! job a.yaml  storage http://***@127.0.0.1:9/b")
    assert not any(CANARY_ENV in line or CANARY_PASSWORD in line for line in lines), lines
