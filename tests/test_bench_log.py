"""ddpm_lib.bench's throughput rows read back: parse_row inverts format_row, and read_log reads
the saved GPU log that chapter 11 and benchmarks.md are written from."""
from pathlib import Path

import pytest

from ddpm_lib.bench import format_row, parse_row, read_log

ROOT = Path(__file__).resolve().parents[1]

GPU_ROW = dict(net="cifar", variant="ddpm_lib eager bf16", params=35_746_307, batch=128,
               images_per_s=1983.4, ms_per_step=64.53, ms_per_eval=18.15, peak_memory_gb=7.0,
               mfu=0.075, warmup_s=0.7)
CPU_ROW = dict(net="small", variant="ddpm_lib fast (fp16)", params=1_112_801, batch=64,
               images_per_s=51.2, ms_per_step=1250.0, ms_per_eval=310.25, mfu=None, warmup_s=12.3)


@pytest.mark.parametrize("row", [GPU_ROW, CPU_ROW], ids=["memory and MFU", "neither"])
def test_parse_row_inverts_format_row(row):
    line = format_row(row)
    parsed = parse_row(line)
    assert parsed.keys() == row.keys()
    assert parsed == pytest.approx(row)
    assert parsed["net"] == row["net"] and parsed["variant"] == row["variant"]
    assert isinstance(parsed["params"], int) and isinstance(parsed["batch"], int)
    assert format_row(parsed) == line


def test_parse_row_keeps_what_is_printed_only():
    """Figures come back rounded as printed; memory is absent and MFU None where "n/a"."""
    row = dict(GPU_ROW, images_per_s=1983.4567, ms_per_step=64.5349, mfu=0.07512345)
    parsed = parse_row(format_row(row))
    assert parsed["images_per_s"] == 1983.5 and parsed["ms_per_step"] == 64.53
    assert parsed["mfu"] == pytest.approx(0.075)
    no_mfu = parse_row(format_row(dict(GPU_ROW, mfu=None)))
    assert no_mfu["mfu"] is None and no_mfu["peak_memory_gb"] == 7.0
    no_memory = parse_row(format_row(CPU_ROW))
    assert "peak_memory_gb" not in no_memory and no_memory["mfu"] is None


def test_a_failed_row_or_another_line_gives_none():
    failed = format_row(dict(net="cifar", variant="ddpm_lib fast", batch=128,
                             error="RuntimeError: compile failed, 12 params"))
    assert "failed: RuntimeError" in failed
    assert parse_row(failed) is None
    assert parse_row("") is None
    assert parse_row("| small | ddpm_lib fast | 1,112,801 | 128 | 15,194 | 4.51x |") is None


def test_read_log_reads_the_saved_gpu_log():
    env, rows = read_log(ROOT / "ddpm_lib" / "results" / "bench_h200.log")
    assert env["gpu"] == "NVIDIA H200"
    assert env["date"] == "2026-11-26" and env["torch"] == "2.11.0+cu130"
    assert len(rows) == 9
    assert [r["net"] for r in rows] == ["small"] * 5 + ["cifar"] * 4
    assert ("cifar", "ddpm_lib fast") not in {(r["net"], r["variant"]) for r in rows}
    # the log's line, checked by hand:
    # cifar  ddpm_lib eager fp32     35,746,307 params  batch  128     2038.3 img/s
    #     62.80 ms/step     20.55 ms/eval    7.58 GB  MFU   7.7%  (warm-up 0.8 s)
    row = next(r for r in rows if (r["net"], r["variant"]) == ("cifar", "ddpm_lib eager fp32"))
    assert row == pytest.approx(dict(net="cifar", variant="ddpm_lib eager fp32", params=35_746_307,
                                     batch=128, images_per_s=2038.3, ms_per_step=62.80,
                                     ms_per_eval=20.55, peak_memory_gb=7.58, mfu=0.077,
                                     warmup_s=0.8))


def test_read_log_skips_failed_rows(tmp_path):
    ok = dict(GPU_ROW, net="small", variant="ddpm_lib eager fp32")
    log = tmp_path / "bench.log"
    log.write_text("\n".join([
        "=== bench",
        "date: 2026-01-01 | torch: 2.13.0 | device: cuda | gpu: NVIDIA H100 80GB HBM3",
        format_row(ok),
        format_row(dict(net="small", variant="ddpm_lib fast", batch=128, error="OutOfMemoryError")),
        format_row(GPU_ROW),
        "",
    ]))
    env, rows = read_log(log)
    assert env == {"date": "2026-01-01", "torch": "2.13.0", "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    assert [r["variant"] for r in rows] == ["ddpm_lib eager fp32", "ddpm_lib eager bf16"]
    assert rows[1] == pytest.approx(GPU_ROW)


def test_flop_counts_of_a_convolution_and_the_caller_mode_kept():
    """forward_flops counts 2 H W C_out C_in k^2 for one 3x3 convolution (the time input is
    ignored by this stand-in), train_flops adds the backward pass, and neither changes the
    caller's train/eval mode."""
    import torch

    from ddpm_lib.bench import forward_flops, train_flops

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)

    net = Conv().eval()
    forward = forward_flops(net, (4, 6, 6), 2, "cpu")
    assert forward == 2 * 2 * 6 * 6 * 8 * 4 * 9
    # backward of a convolution: the gradients of the weights (same count); the input needs none
    assert train_flops(net, (4, 6, 6), 2, "cpu") == 2 * forward
    assert not net.training
