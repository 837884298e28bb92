"""experiments.trace_summary on small synthetic Perfetto traces (GPU- and TPU-shaped)."""

import gzip
import json

import pytest

from experiments import trace_summary


def _meta(pid, name, tid=None):
  event = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name",
           "args": {"name": name}}
  return event if tid is None else {**event, "tid": tid}


def _kernel(pid, tid, name, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name}


def _gpu_trace():
  return [
      _meta(1, "/host:CPU"), _meta(1, "python", tid=1),
      _meta(2, "/device:GPU:0 (NVIDIA H100)"), _meta(2, "Stream #13(Compute)", tid=13),
      _meta(2, "Stream #14(MemcpyH2D)", tid=14), _meta(2, "XLA Modules", tid=99),
      _kernel(1, 1, "host work", 1e6),  # host time: not counted
      _kernel(2, 99, "jit_step", 5000.0),  # a derived line: not counted again
      _kernel(2, 13, "nvjet_tst_128x256_64x4", 1000.0),
      _kernel(2, 13, "nvjet_tst_128x256_64x4", 1000.0),
      _kernel(2, 13, "cudnn_generated_fort_native_sdpa_sm90", 1500.0),
      _kernel(2, 13, "loop_multiply_fusion", 400.0),
      _kernel(2, 14, "MemcpyH2D", 100.0),
  ]


def test_gpu_streams_are_summed_by_kernel_and_category(tmp_path):
  kernels = trace_summary.device_kernels(_gpu_trace())
  assert list(kernels) == ["/device:GPU:0 (NVIDIA H100)"]
  gpu = kernels["/device:GPU:0 (NVIDIA H100)"]
  assert gpu == {"nvjet_tst_128x256_64x4": (2000.0, 2),
                 "cudnn_generated_fort_native_sdpa_sm90": (1500.0, 1),
                 "loop_multiply_fusion": (400.0, 1), "MemcpyH2D": (100.0, 1)}
  path = tmp_path / "run" / "perfetto_trace.json.gz"
  path.parent.mkdir()
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": _gpu_trace()}, f)
  text = trace_summary.summarize(str(tmp_path))
  assert "device busy: 4.000 ms in 5 kernels" in text
  assert "| matmul | 2.000 | 50.0 % |" in text
  assert "| attention | 1.500 | 37.5 % |" in text
  assert "| fusion | 0.400 | 10.0 % |" in text
  assert "| copy | 0.100 | 2.5 % |" in text


def test_tpu_takes_the_xla_ops_line():
  events = [_meta(3, "/device:TPU:0"), _meta(3, "XLA Ops", tid=2), _meta(3, "Steps", tid=1),
            _kernel(3, 1, "0", 900.0), _kernel(3, 2, "fusion.12", 300.0),
            _kernel(3, 2, "all-reduce.3", 200.0)]
  tpu = trace_summary.device_kernels(events)["/device:TPU:0"]
  assert tpu == {"fusion.12": (300.0, 1), "all-reduce.3": (200.0, 1)}
  assert trace_summary.category("all-reduce.3") == "collective"


def test_missing_trace_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
    trace_summary.find_trace(str(tmp_path))
