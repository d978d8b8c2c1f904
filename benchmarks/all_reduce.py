"""All-reduce latency across this machine's GPUs, by the routes the cuda backend can take: NCCL and
kiln's one-shot route over torch symmetric memory (backends/all_reduce.py), each eager and replayed
from a CUDA graph, with the sum checked. Sizes are one row of a Llama-3.1-8B hidden state (8 KB) up
to a 256-token decode batch (2 MB) and a prefill chunk.

    python benchmarks/all_reduce.py --gpus 2
"""

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [8 << 10, 64 << 10, 512 << 10, 2 << 20, 16 << 20]


def timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def graphed(fn, iters: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def worker(rank: int, world: int, port: int, out: dict) -> None:
    from kiln.backends.all_reduce import AllReduce

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
                            device_id=torch.device("cuda", rank))
    device = torch.device("cuda", rank)
    routes = {"nccl": AllReduce.for_job(device, "nccl"), "auto": AllReduce.for_job(device, "auto")}
    rows = []
    torch.manual_seed(0)  # every rank draws the same base, scaled by rank + 1
    for nbytes in SIZES:
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device) * (rank + 1)
        want = x.float() * sum(r + 1 for r in range(world)) / (rank + 1)
        row = {"bytes": nbytes}
        for name, reduce in routes.items():
            err = (reduce(x).float() - want).abs().max().item()
            row[f"{name} route"] = "one-shot" if reduce.buffer is not None and nbytes <= reduce.one_shot_max_bytes \
                else "nccl"
            row[f"{name} eager us"] = timed(lambda r=reduce, t=x: r(t), 50)
            row[f"{name} graph us"] = graphed(lambda r=reduce, t=x: r(t), 50)
            row[f"{name} max err"] = err
        rows.append(row)
    if rank == 0:
        out["rows"] = rows
        out["auto"] = routes["auto"].route
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    args = p.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.gpus, port, out), nprocs=args.gpus)
        rows, auto = list(out["rows"]), out["auto"]
    print(f"{args.gpus}x {torch.cuda.get_device_name()}; kiln's auto route: {auto}")
    print("| bytes | auto route | nccl eager us | nccl graph us | auto eager us | auto graph us | max err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bytes']} | {r['auto route']} | {r['nccl eager us']:.1f} | {r['nccl graph us']:.1f} | "
              f"{r['auto eager us']:.1f} | {r['auto graph us']:.1f} | "
              f"{max(r['nccl max err'], r['auto max err']):.2g} |")


if __name__ == "__main__":
    main()
