"""Where an exported graph's time goes: OpenVINO's per-layer counters, summed by layer type and kernel.

For the int8 path's report (docs/performance.md): which share of a face is int8 convolution, float
convolution (the encoder, kept in floating point for the codes), normalisation, attention and
layout changes. One warm-up pass, then --repeats profiled passes (their counters averaged).

    python benchmarks/profile_graph.py model-int8.xml --dtype int8
    python benchmarks/profile_graph.py model.xml --dtype bfloat16 --top 12
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_restore import face_image  # noqa: E402

from iqpir.inference.engines import openvino_config  # noqa: E402
from iqpir.inference.files import read_graph  # noqa: E402
from iqpir.quantize import feeds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graph", type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    import openvino as ov

    graph = read_graph(args.graph)
    x = face_image() if graph.image_size == 512 else torch.rand(1, 3, graph.image_size or 512, graph.image_size or 512)
    feed = feeds(graph, [x.numpy().astype(np.float32)])[0]
    config = dict(openvino_config(args.dtype), PERF_COUNT=True)
    compiled = ov.Core().compile_model(str(args.graph), "CPU", config)
    request = compiled.create_infer_request()
    request.infer(feed)
    by_kind: collections.Counter = collections.Counter()
    total = 0.0
    for _ in range(args.repeats):
        request.infer(feed)
        for layer in request.get_profiling_info():
            ms = layer.real_time.total_seconds() * 1e3
            if ms > 0:
                by_kind[(layer.node_type, layer.exec_type)] += ms / args.repeats
                total += ms / args.repeats
    print(f"{args.graph.name}, {args.dtype}: {total:.0f} ms of layer time per face ({config['INFERENCE_PRECISION_HINT']} "
          f"hint, {config['INFERENCE_NUM_THREADS']} threads)\n")
    print("| layer type | kernel | ms | share |\n|---|---|---:|---:|")
    for (node, kernel), ms in by_kind.most_common(args.top):
        print(f"| {node} | {kernel} | {ms:.0f} | {100 * ms / total:.1f}% |")
    rest = total - sum(ms for _, ms in by_kind.most_common(args.top))
    print(f"| (the rest) | | {rest:.0f} | {100 * rest / total:.1f}% |")


if __name__ == "__main__":
    main()
