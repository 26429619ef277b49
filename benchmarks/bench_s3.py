"""`make bench-s3`: the extract host ceiling (no-op UNet: the model costs nothing) with the inputs,
the run and the cache on a local S3 server (moto, in its own process on loopback) beside the same
on the local disk, in one run, alternating, with the median of the repeats; and the requests the
S3 run makes per shard (counted from the server's request log), by method.

Loopback moto is not S3: it answers in well under a millisecond and stores in memory, so this
measures the client's cost per request (signing, HTTP, the GIL), not network latency; on real S3
each small GET costs 10-30 ms of latency, which the loader workers overlap (see the README).

    python benchmarks/bench_s3.py [--images 512] [--size 256] [--shard-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import make_jpegs, results_file, scratch_dir  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
REQUEST = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) ([^ ?]+)')


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in a subprocess (its own GIL), logging each request to a file."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(self.url, timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def requests(self) -> Counter:
        return Counter(m for m, _ in REQUEST.findall(self.log.read_text()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def extract_once(run: str, model: Path, cache: str, workers: int, size: int, endpoint: str,
                 one_at_a_time: bool = False) -> float:
    """images/s of one extract with the no-op UNet (`one_at_a_time`: each loader worker reads its
    images one GET after the other, as before batches were fetched concurrently)."""
    import stages.extract as extract
    from stages.domain.noise_model import NoiseModel
    from storage.locations import object_store

    os.environ["AWS_ENDPOINT_URL"] = endpoint
    object_store._FILESYSTEMS.clear()
    predict, getitems = NoiseModel.predict, extract.ShardImages.__getitems__
    NoiseModel.predict = lambda self, x, timestep=0: x
    if one_at_a_time:
        extract.ShardImages.__getitems__ = lambda self, indices: [self.item(i) for i in indices]
    try:
        t0 = time.perf_counter()
        out = extract.run_extract(run, extract.ExtractOptions(
            model, size=size, workers=workers, batch_size=32, device="cpu", cache_dir=cache))
        return out["images"] / (time.perf_counter() - t0)
    finally:
        NoiseModel.predict, extract.ShardImages.__getitems__ = predict, getitems


ROWS = (("local disk", False, False), ("s3 (loopback)", True, False),
        ("s3 + latency", "delay", False), ("s3 + latency, one GET at a time", "delay", True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="Added to each request (latency rows).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    scratch = scratch_dir("bench-s3-")
    server = S3Server(scratch / "moto.log")
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=server.url)
    port = free_port()
    delayed = f"http://127.0.0.1:{port}"
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3_server.py"), str(port),
                              str(server.port), str(args.latency_ms)])  # the tests' proxy, delay alone
    try:
        result = measure(args, scratch, server, {False: "", True: server.url, "delay": delayed})
    finally:
        proxy.terminate()
        server.stop()
    print(f"\n## Extract host ceiling (no-op UNet), {args.images} JPEG {args.size} px, shard size "
          f"{args.shard_size}, {args.workers} loader workers, median of {args.repeats}; latency rows: "
          f"{args.latency_ms:g} ms added to each request")
    print("| inputs, run and cache on | images/s | ratio to local |\n|---|---|---|")
    local = result["extract_images_per_s"]["local disk"]
    for name, rate in result["extract_images_per_s"].items():
        print(f"| {name} | {rate:.1f} | {rate / local:.2f} |")
    print(f"\nS3 requests per shard of extract: {result['extract_requests_per_shard']} "
          f"({result['extract_requests_per_image']} per image)")
    print(f"shard (probe) seconds: {result['shard_seconds']}; S3 requests {result['shard_requests']}")
    out = results_file(args.out, "bench_s3.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"(written to {out})")


def measure(args: argparse.Namespace, scratch: Path, server: S3Server, endpoints: dict) -> dict:
    """Shard both ways once, then extract every row `repeats` times, alternating the rows."""
    import boto3
    import torch

    from stages.domain.noise_model import make_test_model
    from stages.shard import run_shard

    torch.set_num_threads(1)
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    data = scratch / "data"
    make_jpegs(data, args.images, args.size)
    for f in sorted(data.rglob("*.jpg")):
        client.put_object(Bucket="bench", Key=f"data/{f.relative_to(data).as_posix()}", Body=f.read_bytes())
    model = make_test_model(scratch / "model", size=32)
    before = server.requests()
    t0 = time.perf_counter()
    run_shard(["s3://bench/data"], "s3://bench/run", shard_size=args.shard_size, workers=args.workers)
    shard_s3 = time.perf_counter() - t0
    shard_requests = server.requests() - before
    t0 = time.perf_counter()
    run_shard([str(data)], scratch / "run", shard_size=args.shard_size, workers=args.workers)
    shard_local = time.perf_counter() - t0
    shards = -(-args.images // args.shard_size)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    per_shard: Counter = Counter()
    extract_once(str(scratch / "run"), model, str(scratch / "warm"), args.workers, args.size, server.url)
    for r in range(args.repeats):
        for k, (name, where, one_at_a_time) in enumerate(ROWS):
            run = "s3://bench/run" if where else str(scratch / "run")
            cache = f"s3://bench/cache{r}-{k}" if where else str(scratch / f"cache{r}")
            before = server.requests()
            rates[name].append(extract_once(run, model, cache, args.workers, args.size,
                                            endpoints[where] or server.url, one_at_a_time))
            if where is True:
                per_shard = server.requests() - before
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "images": args.images, "size": args.size, "shard_size": args.shard_size, "workers": args.workers,
        "latency_ms": args.latency_ms, "extract_images_per_s": {k: round(v, 1) for k, v in med.items()},
        "extract_requests_per_shard": {m: round(n / shards, 1) for m, n in sorted(per_shard.items())},
        "extract_requests_per_image": round(sum(per_shard.values()) / args.images, 3),
        "shard_seconds": {"local": round(shard_local, 2), "s3": round(shard_s3, 2)},
        "shard_requests": dict(sorted(shard_requests.items())),
    }


if __name__ == "__main__":
    main()
