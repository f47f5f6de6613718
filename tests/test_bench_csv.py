"""bench/bench_engine.py's CSV: one header per file, also when columns were added."""

from __future__ import annotations

import csv

import pytest
from bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench_engine():
    return load_bench("bench_engine")


INFO = {"date": "2026-12-02", "git": "abc1234", "device_name": "H200", "torch": "2.11.0",
        "stack": "CUDA 12.8, TF32 off"}  # fmt: skip
ROW = {"n": 1024, "output": "sum", "provider": "auto", "median_s": 0.5, "peak_bytes": 10,
       "peak_reserved_bytes": 12, "extrapolated": False}  # fmt: skip


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_new_file_has_every_column(bench_engine, tmp_path):
    path = str(tmp_path / "sub" / "engine_cuda.csv")
    bench_engine.append_csv(path, INFO, [ROW])
    bench_engine.append_csv(path, INFO, [{**ROW, "provider": "vmap", "peak_reserved_bytes": None}])
    rows = read(path)
    assert rows[0] == bench_engine.CSV_FIELDS
    assert len(rows) == 3 and all(len(r) == len(rows[0]) for r in rows)
    got = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert [g["provider"] for g in got] == ["auto", "vmap"]
    assert got[0]["peak_reserved_bytes"] == "12" and got[1]["peak_reserved_bytes"] == ""
    assert got[0]["stack"] == "CUDA 12.8, TF32 off" and got[0]["device_name"] == "H200"


def test_file_with_an_older_header_is_rewritten_once(bench_engine, tmp_path):
    path = tmp_path / "engine_cpu.csv"
    old_fields = ["date", "git", "device_name", "torch", "n", "output", "provider", "median_s",
                  "spread_s", "first_s", "peak_bytes", "extrapolated", "error", "gram_s",
                  "gram_tflops", "phases"]  # fmt: skip
    path.write_text(
        ",".join(old_fields) + "\n"
        "2026-11-23,7e80b49,x86_64,2.13.0+cpu,128,sum,fwdbwd,2.04,0.11,3.2,1280,False,\n"
    )
    bench_engine.append_csv(str(path), INFO, [ROW])
    rows = read(path)
    assert rows[0] == bench_engine.CSV_FIELDS
    old, new = (dict(zip(rows[0], r, strict=True)) for r in rows[1:])
    assert (old["git"], old["provider"], old["median_s"], old["peak_bytes"]) == (
        "7e80b49",
        "fwdbwd",
        "2.04",
        "1280",
    )
    assert old["stack"] == "" and old["peak_reserved_bytes"] == ""
    assert (new["git"], new["peak_reserved_bytes"]) == ("abc1234", "12")
    bench_engine.append_csv(str(path), INFO, [ROW])  # now current: appended
    assert len(read(path)) == 4 and read(path)[:3] == rows


def test_file_of_another_script_is_refused(bench_engine, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("arch,score\nx,1\n")
    with pytest.raises(SystemExit, match="arch"):
        bench_engine.append_csv(str(path), INFO, [ROW])
    assert path.read_text() == "arch,score\nx,1\n"
