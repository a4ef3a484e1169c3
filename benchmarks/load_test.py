"""Load test of `python -m engine.serve` (127.0.0.1 only, bounded in requests and time; stops by itself).

    python -m benchmarks.load_test --out results/serve [--parts gallery vectors durability]
        [--model ARTIFACT] [--images ../shared/data/flickr8k/images] [--gallery-size 500] [--import-store STORE]
        [--threads 2] [--batch-workers 2] [--max-wait-ms 5]
        [--clients 1 4 16] [--requests 200] [--seconds 30] [--service-rerank-k 100 10] [--vectors 1000000] [--queries 200]

Parts (each writes its section of OUT/load_test.json; the plot is OUT/load_test.png):
- gallery: a server on the first --gallery-size Flickr8K photos (indexed on its first start into
  build/load-test/, reused by later runs), text queries (Flickr8K captions) top_k=10 after a
  BSSAN re-rank of K=100, at each --clients count, micro-batching on and off: latency p50/p95/p99,
  requests/s, errors, the server's CPU per request and cores held, and the machine's busy / niced / idle cores. Each point stops after --requests requests or --seconds, whichever first.
- vectors: the first stage alone on a synthetic index of --vectors unit vectors (a mixture of
  Gaussian clusters in the artifact's shortlist dimension; vectors only, no images): exact
  (IndexFlatIP) vs the --approximate indexes (IVF at several nprobe, HNSW at several efSearch),
  build time, recall@100 against exact and ms per query (one query at a time).
- service: the same queries without HTTP, one thread, batches of 1, 4 and 16 (what micro-batching
  hands the scorer): wall and CPU ms per query, at each --service-rerank-k (default 100). Its CPU at batch 1
  over batch 16 is the most micro-batching can gain at that K (req/s at saturation = cores / CPU per request,
  and HTTP adds the same cost to both modes); K=10, the least a top-10 query re-ranks, bounds it for any K.
- durability: searches and adds at once, the server killed (SIGKILL) mid-burst, restarted: every
  acknowledged add must be in the gallery.
- restart: a gallery (engine.serve.gallery, in process) of --restart-size synthetic rows (the vectors of the
  vectors part plus a one-number row) with each --approximate index: its first build, close() (which saves the
  index beside the snapshot), the next open loading it, and an open rebuilding it (the saved files deleted); the
  loaded index must answer as the closed one did. Then 1% of the rows removed (Gallery.remove, each fsynced), close
  and open again (the saved index must still be loaded), and a background compaction of a quarter more, timed,
  with searches meanwhile.

--model: an artifact with shortlist graphs whose image pipeline runs here. Without it, a
RANDOM-WEIGHT artifact with the reference model's sizes (models/reference and
models/reference-shortlist configs: the same pair-scoring cost) is exported once to
build/load-test/artifact from build/assets: its rankings mean nothing, its speed is the reference's.
The load generator runs on the same (shared, 2-core) machine as the server: the numbers include it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info
from engine.cli import ArgumentParser, command, positive_float, positive_int
from engine.files import package_versions, write_json_atomic
from engine.runtime import PATHS

WORK = REPO_ROOT / "build" / "load-test"
FLICKR8K = REPO_ROOT.parent / "shared" / "data" / "flickr8k"
PARTS = ("gallery", "service", "vectors", "durability", "restart")
SERVE_LIBRARIES = ("fastapi", "uvicorn", "faiss-cpu", "httpx", "onnxruntime", "numpy")
KEY = "load-test-key-0123456789abcdef"


# ---------------------------------------------------------------------------------------------- setup
def build_random_artifact(out: Path, assets: Path) -> Path:
    """A random-weight BSSAN + dual encoder at the reference model's sizes, exported with `assets`."""
    if (out / "manifest.json").is_file():
        return out
    import torch

    from engine.features import ExtractConfig, Extractor
    from export.pipeline import ExportOptions, export_artifact
    from training.baseline import DualEncoder, DualEncoderConfig
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig, TrainConfig
    from training.model import BSSAN

    def config_of(model_dir: str) -> dict:
        data = json.loads((REPO_ROOT / "models" / model_dir / "config.json").read_text())
        return data.get("model", data)

    torch.manual_seed(0)
    model = BSSAN(ModelConfig.from_dict(config_of("reference"))).eval()
    shortlist = DualEncoder(DualEncoderConfig.from_dict(config_of("reference-shortlist"))).eval()
    extractor = Extractor(ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=assets, word_features=(), threads=2))
    work = out.parent / "checkpoints"
    store = SimpleNamespace(manifest={"extractor": extractor.describe(), "splits": {}}, root=work / "no-store")
    label = {"weights": "random", "note": "benchmarks.load_test: reference sizes, NOT a trained model"}
    bssan = save_checkpoint(work / "bssan", model, TrainConfig(word_set="minilm"), store=store, metrics=label)
    dual = save_checkpoint(work / "shortlist", shortlist, TrainConfig(word_set="minilm"), store=store, metrics=label)
    export_artifact(ExportOptions(model_dir=bssan, out=out, precisions=("fp32",), shortlist_dir=dual, tensorrt="off",
                                  assets_dir=assets, progress=False))
    return out


def prepare_gallery(images: Path, size: int) -> Path:
    """A folder of links to the first `size` photos (sorted by name) of `images` (all of them when there are fewer)."""
    folder = WORK / f"gallery-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:size]
    for photo in photos:
        link = folder / photo.name
        if not link.exists():
            link.symlink_to(photo.resolve())
    return folder


def index_dir(size: int, artifact: Path, rows: str = "fp32") -> Path:
    """The gallery index of `size` photos for this artifact (its manifest's hash: a re-exported artifact gets a new index),
    one per --gallery-rows (an fp32 run never reads rows an fp16 run rounded)."""
    import hashlib

    suffix = "" if rows == "fp32" else f"-{rows}"
    return WORK / f"index-{size}-{artifact.name}-{hashlib.sha256((artifact / 'manifest.json').read_bytes()).hexdigest()[:12]}{suffix}"


def caption_pool(captions: Path, count: int, seed: int = 0) -> list[str]:
    """`count` Flickr8K captions (token format `image#n<TAB>caption`), sampled with a fixed seed."""
    lines = [line.split("\t", 1)[1].strip() for line in captions.read_text(encoding="utf-8").splitlines() if "\t" in line]
    random.Random(seed).shuffle(lines)
    return lines[:count]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m engine.serve` on 127.0.0.1 as a child process, its log under build/load-test/."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log, self.process, self.port = args, log, None, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_seconds: float = 3600) -> "Server":
        import httpx

        self.port = free_port()
        handle = open(self.log, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "engine.serve", *self.args, "--host", "127.0.0.1",
                                         "--port", str(self.port), "--log-level", "warning"], stdout=handle, stderr=handle)
        deadline = time.time() + ready_seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"server not ready after {ready_seconds} s; see {self.log}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server has used so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill()


def machine_cpu_seconds() -> dict:
    """CPU seconds of the whole machine so far by kind (/proc/stat): niced = processes at nice > 0 (the shared
    machine's background jobs), busy = every other process, idle. Differences over a point say who had the cores."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = (t / os.sysconf("SC_CLK_TCK") for t in ticks)
    return {"busy": user + system + irq + softirq, "niced": nice, "idle": idle + iowait}


# ---------------------------------------------------------------------------------------------- traffic
def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


async def drive(url: str, clients: int, requests: int, seconds: float, texts: list[str], top_k: int, rerank_k: int) -> dict:
    """`clients` concurrent clients, each sending its next query when the last is answered."""
    import httpx

    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient):
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            start = time.perf_counter()
            try:
                response = await http.post("/v1/search", json={"text": text, "top_k": top_k, "rerank_k": rerank_k})
                ok = response.status_code == 200 and len(response.json()["results"]) == top_k
                if not ok:
                    errors.append(f"{response.status_code}: {response.text[:120]}")
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            **percentiles(latencies)}


def run_gallery(args, artifact: Path) -> dict:
    folder = prepare_gallery(args.images, args.gallery_size)
    index = index_dir(args.gallery_size, artifact, args.gallery_rows)
    texts = caption_pool(args.captions, 40_000)
    report = {"gallery_images": len(list(folder.iterdir())), "top_k": 10, "rerank_k": 100, "threads": args.threads,
              "gallery_rows": args.gallery_rows,
              "batch_workers": args.batch_workers, "max_wait_ms": args.max_wait_ms, "points": []}
    if args.import_store is not None:
        report["import_store"] = str(args.import_store)
    used = 0  # every point sends captions no earlier point sent (nothing is answered from a warm cache)
    for batching in ("on", "off"):
        server_args = ["--model", str(artifact), "--gallery", str(folder), "--index", str(index), "--batching", batching,
                       "--threads", str(args.threads), "--path", args.path, "--batch-workers", str(args.batch_workers),
                       "--max-wait-ms", str(args.max_wait_ms), "--gallery-rows", args.gallery_rows]
        if args.import_store is not None:
            server_args += ["--import-store", str(args.import_store)]
        server = Server(server_args, WORK / "server-gallery.log")
        started = time.perf_counter()
        server.start()
        report.setdefault("first_ready_s", round(time.perf_counter() - started, 1))
        with __import__("httpx").Client(base_url=server.url) as http:
            report["gallery_images_served"] = http.get("/readyz").json()["gallery"]
            report.setdefault("server_backend", http.get("/v1/info").json()["backend"])  # backend and scoring path, and why
        try:
            asyncio.run(drive(server.url, 2, 10, 60, texts[-50:], 10, 100))  # warm-up (not recorded)
            for clients in args.clients:
                cpu, machine = server.cpu_seconds(), machine_cpu_seconds()
                load_before = os.getloadavg()[0]
                point = asyncio.run(drive(server.url, clients, args.requests, args.seconds, texts[used:used + args.requests], 10, 100))
                used += args.requests
                point["batching"] = batching
                point["load_average_1min_before"] = round(load_before, 2)
                # what a request costs the server in CPU time: on a shared, saturated machine (wall-clock
                # latency then measures the queue for the cores), this is the figure that carries over
                cpu_used = server.cpu_seconds() - cpu  # (not `used`: that counts the captions sent so far)
                point["server_cpu_ms_per_request"] = round(1000 * cpu_used / max(1, point["ok"]), 1)
                # cores held over the point: the server's, and the machine's by kind (batching on and off can win
                # different shares of a shared machine; on an idle one both should hold ~2 less the load generator)
                point["server_cores"] = round(cpu_used / point["seconds"], 2)
                point["machine_cores"] = {k: round((v - machine[k]) / point["seconds"], 2) for k, v in machine_cpu_seconds().items()}
                point["load_average_1min"] = round(os.getloadavg()[0], 2)
                print(f"gallery batching={batching} clients={clients}: p50 {point['p50_ms']} ms, p99 {point['p99_ms']} ms, "
                      f"{point['requests_per_s']} req/s, {point['errors']} errors, server CPU "
                      f"{point['server_cpu_ms_per_request']} ms/request on {point['server_cores']} cores (machine {point['machine_cores']}), "
                      f"load {point['load_average_1min']}", flush=True)
                report["points"].append(point)
        finally:
            server.stop()
    by = {(p["batching"], p["clients"]): p for p in report["points"]}
    top = max(args.clients)
    if ("on", top) in by and ("off", top) in by and by[("off", top)]["requests_per_s"]:
        report[f"speedup_at_{top}_clients"] = round(by[("on", top)]["requests_per_s"] / by[("off", top)]["requests_per_s"], 2)
    return report


def run_service(args, artifact: Path) -> dict:
    """The service without HTTP or concurrency: one thread calls search_texts with batches of 1, 4 and 16
    queries (what the micro-batcher hands it), wall and CPU time per query. Sequential, so on a shared
    machine the process's share of the cores stays the same across batch sizes."""
    import shutil
    import tempfile

    from engine.runtime import Scorer
    from engine.serve.gallery import Gallery
    from engine.serve.service import SearchService, TextQuery

    snapshot = index_dir(args.gallery_size, artifact) / "snapshot"
    if not snapshot.is_dir():
        raise SystemExit(f"{snapshot}: run the gallery part first (it indexes the gallery)")
    texts = caption_pool(args.captions, 4000)
    report = {"gallery_images": args.gallery_size, "top_k": 10, "rerank_k": list(args.service_rerank_k), "points": []}
    with tempfile.TemporaryDirectory(prefix="bssan-load-") as folder, \
            Scorer.load(artifact, backend="onnxruntime-cpu", threads=args.threads, spinning=False, text_threads=1,
                        path=args.path) as scorer:  # as engine.serve
        shutil.copytree(snapshot, Path(folder) / "snapshot")
        gallery = Gallery.open(folder, scorer.fingerprint, scorer.cache_precision)
        service = SearchService(scorer, gallery)
        report["backend"] = scorer.runner.reason  # backend and scoring path, and why
        service.search_texts([TextQuery(t) for t in texts[:4]])  # warm-up
        used = 4
        for rerank_k in args.service_rerank_k:
            for batch in (1, 4, 16):
                rounds = max(1, 96 // batch)  # 96 queries a point: a batch of 16 varies by ~+-25% with the images its pairs touch
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(rounds):
                    service.search_texts([TextQuery(texts[(used + i) % len(texts)], rerank_k=rerank_k) for i in range(batch)])
                    used += batch
                queries = rounds * batch
                point = {"rerank_k": rerank_k, "batch": batch, "queries": queries,
                         "wall_ms_per_query": round(1000 * (time.perf_counter() - wall) / queries, 1),
                         "cpu_ms_per_query": round(1000 * (time.process_time() - cpu) / queries, 1),
                         "load_average_1min": round(os.getloadavg()[0], 2)}
                print(f"service K={rerank_k} batch {batch}: {point['wall_ms_per_query']} ms/query wall, "
                      f"{point['cpu_ms_per_query']} ms CPU", flush=True)
                report["points"].append(point)
            one, full = (np.mean([p["cpu_ms_per_query"] for p in report["points"] if p["rerank_k"] == rerank_k and p["batch"] == b])
                         for b in (1, 16))  # over every pass of this K
            # req/s at saturation = cores / CPU per request: the most batching can gain over one-at-a-time in process,
            # before HTTP adds the same cost to both (engine.serve's own overhead only lowers it)
            report.setdefault("batch16_vs_batch1_cpu", {})[str(rerank_k)] = round(float(one / full), 2) if full > 0 else None
    return report


# ---------------------------------------------------------------------------------------------- vectors only
def synthetic_vectors(rng: np.random.Generator, centers: np.ndarray, count: int, spread: float) -> np.ndarray:
    """Unit vectors around random cluster centres: centre + spread x N(0, I/d), normalised."""
    dim = centers.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def run_vectors(args, dim: int) -> dict:
    import faiss

    from engine.serve.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_HNSW_M, VectorIndex, ivf_lists

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = synthetic_vectors(rng, centers, args.vectors, args.spread)
    queries = synthetic_vectors(rng, centers, args.queries, args.spread)
    k = 100
    report = {"vectors": args.vectors, "dim": dim, "clusters": args.clusters, "spread": args.spread, "queries": args.queries,
              "k": k, "data": "synthetic: unit vectors around random cluster centres (vectors only, no images)",
              "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    exact = VectorIndex("flat", dim, threads=args.threads)
    started = time.perf_counter()
    exact.add(vectors)
    report["flat_build_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    truth, _ = exact.search(queries, k)
    report["flat_ms_per_query_batched"] = round(1000 * (time.perf_counter() - started) / len(queries), 3)
    single = [timed(lambda q=q: exact.search(q[None], k)) for q in queries[:20]]
    report["flat_ms_per_query"] = round(1000 * float(np.median(single)), 2)
    del exact
    print(f"vectors: exact {report['flat_ms_per_query']} ms/query", flush=True)

    def sweep(index, name: str, values: list[int], attribute: str) -> list[dict]:
        points = []
        for value in values:
            setattr(index, attribute, value)
            labels, _ = index.search(queries, k)
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(labels, truth)]))
            times = [timed(lambda q=q: index.search(q[None], k)) for q in queries]
            point = {attribute: value, "recall_at_100": round(recall, 4), "ms_per_query_p50": round(1000 * float(np.median(times)), 3),
                     "ms_per_query_p99": round(1000 * float(np.percentile(times, 99)), 3), "load_average_1min": round(os.getloadavg()[0], 2)}
            print(f"vectors: {name} {attribute} {value}: recall@100 {point['recall_at_100']}, {point['ms_per_query_p50']} ms/query "
                  f"(p99 {point['ms_per_query_p99']}), load {point['load_average_1min']}", flush=True)
            points.append(point)
        return points

    if "ivf" in args.approximate:
        nlist = args.ivf_lists or ivf_lists(len(vectors))
        ivf = VectorIndex("ivf", dim, nlist=nlist, train_at=len(vectors), threads=args.threads)
        started = time.perf_counter()
        ivf.add(vectors)  # reaches train_at: k-means on a sample, then every vector to its list
        report["ivf"] = {"nlist": nlist, "build_s": round(time.perf_counter() - started, 1), "points": []}
        print(f"vectors: IVF {nlist} lists built in {report['ivf']['build_s']} s", flush=True)
        report["ivf"]["points"] = sweep(ivf, "IVF", [p for p in args.nprobe if p <= nlist], "nprobe")
        del ivf
    if "hnsw" in args.approximate:
        hnsw = VectorIndex("hnsw", dim, hnsw_m=args.hnsw_m or DEFAULT_HNSW_M, ef_construction=args.ef_construction or DEFAULT_EF_CONSTRUCTION,
                           threads=args.threads)
        started = time.perf_counter()
        for start in range(0, len(vectors), 100_000):
            hnsw.add(vectors[start:start + 100_000])
            print(f"vectors: HNSW built {start + 100_000:,} in {time.perf_counter() - started:.0f} s", flush=True)
            if time.perf_counter() - started > args.build_seconds:
                raise SystemExit(f"HNSW build over --build-seconds {args.build_seconds}: stopped")
        report["hnsw"] = {"m": args.hnsw_m or DEFAULT_HNSW_M, "ef_construction": hnsw.index.hnsw.efConstruction,
                          "build_s": round(time.perf_counter() - started, 1), "points": []}
        report["hnsw"]["points"] = sweep(hnsw, "HNSW", args.ef_search, "ef_search")
    return report


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- durability
def run_durability(args, artifact: Path) -> dict:
    import httpx

    folder = prepare_gallery(args.images, 16)
    index = WORK / "index-durability"
    if index.exists():
        import shutil

        shutil.rmtree(index)
    key_file = WORK / "key"
    key_file.write_text(KEY)
    photos = sorted(args.images.iterdir())[100:140]
    texts = caption_pool(args.captions, 200)
    server_args = ["--model", str(artifact), "--gallery", str(folder), "--index", str(index), "--api-key-file", str(key_file),
                   "--threads", str(args.threads)]
    server = Server(server_args, WORK / "server-durability.log").start()
    acknowledged, search_errors, searches, stop = [], [], [0], threading.Event()

    def writer(worker: int):
        with httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": KEY}) as http:
            for n in range(10_000):
                if stop.is_set():
                    return
                photo = photos[(worker * 7 + n) % len(photos)]
                image_id = f"w{worker}-{n}-{photo.name}"
                try:
                    response = http.put(f"/v1/images/{image_id}", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
                except httpx.HTTPError:
                    return
                if response.status_code in (200, 201):
                    acknowledged.append(image_id)

    def reader():
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/search", json={"text": texts[searches[0] % len(texts)], "top_k": 10})
                except httpx.HTTPError:
                    return
                searches[0] += 1
                if response.status_code != 200:
                    search_errors.append(response.status_code)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + args.durability_seconds
    while time.time() < deadline and len(acknowledged) < args.durability_adds:
        time.sleep(0.1)
    server.kill()  # SIGKILL with adds and searches in flight
    stop.set()
    for t in threads:
        t.join()
    killed_after = len(acknowledged)
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        ids = set(http.get("/v1/images", params={"limit": 10_000}).json()["ids"])
        after = http.post("/v1/search", json={"text": texts[0], "top_k": 10}).status_code
    server.stop()
    lost = sorted(set(acknowledged) - ids)
    report = {"acknowledged_adds": killed_after, "searches_during_burst": searches[0], "search_errors": len(search_errors),
              "lost_after_kill_9": len(lost), "lost_examples": lost[:5], "gallery_after_restart": len(ids),
              "search_after_restart_status": after}
    print(f"durability: {killed_after} adds acknowledged before kill -9, {len(lost)} lost; "
          f"{searches[0]} searches, {len(search_errors)} errors", flush=True)
    return report


# ---------------------------------------------------------------------------------------------- restart
def compaction_while_searching(g, queries: np.ndarray, fraction: float) -> dict:
    """A background compaction of gallery `g`: just over `fraction` of its rows (every 3rd from the start) removed,
    which starts it, timed from the removal to the swap, one query at a time searching meanwhile (top-100). The removals
    are applied in memory, without their log records (Gallery.remove fsyncs one record each: at 1M, minutes of
    fsyncs that are not what is timed here), so the gallery is thrown away after."""
    with g.lock:
        ids = [i for i in g.slot_ids[:g.count] if i]
        doomed = ids[:3 * (int(fraction * len(ids)) + 1):3]
        for image_id in doomed:
            g._apply_remove(image_id)
        started = time.perf_counter()
        g._maybe_compact()
    latencies = []
    while g.compaction is not None:
        t0 = time.perf_counter()
        g.search(queries[len(latencies) % len(queries)][None], 100)
        latencies.append(1000 * (time.perf_counter() - t0))
    seconds = time.perf_counter() - started
    return {"removed_rows": len(doomed), "live_rows": len(g), "compacted": not g.index.dead and g.count == len(g),
            "seconds": round(seconds, 1), "searches_during": len(latencies),
            "search_ms_p50": round(float(np.median(latencies)), 2) if latencies else None,
            "search_ms_max": round(max(latencies), 1) if latencies else None}


def run_restart(args, dim: int) -> dict:
    import shutil
    import tempfile

    from engine.cache import ImageCache
    from engine.serve import gallery as gallery_module
    from engine.serve.gallery import Gallery
    from engine.serve.index import DEFAULT_EF_CONSTRUCTION, DEFAULT_HNSW_M

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = synthetic_vectors(rng, centers, args.restart_size, args.spread)
    queries = synthetic_vectors(rng, centers, 50, args.spread)
    rows = ImageCache([f"img{i}" for i in range(len(vectors))], {"image_vectors": vectors, "tag": np.zeros((len(vectors), 1), np.float32)},
                      "synthetic", "fp32")
    report = {"size": len(vectors), "dim": dim, "data": "synthetic rows: unit vectors (as the vectors part) and one float each",
              "load_average_1min_at_start": round(os.getloadavg()[0], 2), "indexes": {}}
    for kind in args.approximate:
        options = {"threads": args.threads}
        if kind == "hnsw":
            options.update(hnsw_m=args.hnsw_m or DEFAULT_HNSW_M, ef_construction=args.ef_construction or DEFAULT_EF_CONSTRUCTION)
        elif args.ivf_lists:
            options.update(nlist=args.ivf_lists)
        folder = Path(tempfile.mkdtemp(prefix=f"bssan-restart-{kind}-", dir=WORK))
        try:
            def opened() -> tuple[Gallery, float]:
                started = time.perf_counter()
                g = Gallery.open(folder, "synthetic", "fp32", index_kind=kind, index_options=options)
                g.wait_compaction()  # an IVF index due for training trains in a thread: serving at full recall after it
                return g, time.perf_counter() - started

            g, _ = opened()
            started = time.perf_counter()
            g.put_rows(rows)
            g.wait_compaction()
            built = time.perf_counter() - started
            before = g.index.search(queries, 100)
            started = time.perf_counter()
            g.close()
            closed = time.perf_counter() - started
            saved = folder / gallery_module.INDEX_FILE
            g, loaded = opened()
            after = g.index.search(queries, 100)
            same = bool(np.array_equal(before[0], after[0]))
            g.close()
            saved_mb = saved.stat().st_size / 2**20 if saved.is_file() else 0.0
            saved.unlink(missing_ok=True)
            (folder / gallery_module.INDEX_JSON).unlink(missing_ok=True)
            g, rebuilt = opened()
            removed = g.ids()[::100]  # 1%: below the compaction threshold, each one fsynced
            started = time.perf_counter()
            for image_id in removed:
                g.remove(image_id)
            removing = time.perf_counter() - started
            g.close()
            g, after_removals = opened()
            loaded_after_removals = g.index_on_disk is not None and len(g) == len(vectors) - len(removed)
            compaction = compaction_while_searching(g, queries, gallery_module.COMPACT_FRACTION)
            g.close()
            point = {"first_build_s": round(built, 1), "close_with_save_s": round(closed, 1), "open_loading_saved_s": round(loaded, 1),
                     "open_rebuilding_s": round(rebuilt, 1), "saved_index_mb": round(saved_mb, 1), "loaded_answers_as_before": same,
                     "removals": len(removed), "removals_per_s": round(len(removed) / removing, 1),
                     "open_after_removals_s": round(after_removals, 1), "loaded_after_removals": loaded_after_removals,
                     "compaction": compaction, "options": options}
            print(f"restart {kind} ({len(vectors):,} rows): first build {point['first_build_s']} s, close {point['close_with_save_s']} s, "
                  f"open loading the saved index {point['open_loading_saved_s']} s vs rebuilding {point['open_rebuilding_s']} s; "
                  f"same answers {same}; after {len(removed):,} removals open {point['open_after_removals_s']} s "
                  f"(saved index loaded: {loaded_after_removals}); compaction of {compaction['live_rows']:,} live rows {compaction['seconds']} s in the "
                  f"background, {compaction['searches_during']} searches meanwhile (p50 {compaction['search_ms_p50']} ms, "
                  f"max {compaction['search_ms_max']} ms)", flush=True)
            report["indexes"][kind] = point
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------------------- plot and main
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approximate = [(name, label, key) for name, label, key in (("ivf", "IVF (nprobe)", "nprobe"), ("hnsw", "HNSW (efSearch)", "ef_search"))
                   if name in report.get("vectors", {})]
    restart = report.get("restart", {}).get("indexes", {})
    service = report.get("service", {}).get("points", [])
    columns = (2 if "gallery" in report else 0) + (1 if service else 0) + (1 if approximate else 0) + (1 if restart else 0)
    if not columns:
        return
    fig, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.2), squeeze=False)
    axes = list(axes[0])
    if "gallery" in report:
        g = report["gallery"]
        for batching, marker in (("on", "o"), ("off", "s")):
            points = [p for p in g["points"] if p["batching"] == batching]
            clients = [p["clients"] for p in points]
            for q, style in (("p50_ms", "-"), ("p99_ms", ":")):
                axes[0].plot(clients, [p[q] for p in points], style, marker=marker, label=f"batching {batching} {q[:3]}")
            axes[1].plot(clients, [p["requests_per_s"] for p in points], marker=marker, label=f"batching {batching}")
        axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
                    title=f"text query, top-10 after K=100 re-rank, {g['gallery_images']} images")
        axes[1].set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="throughput")
        for ax in axes[:2]:
            ax.set_xticks(sorted({p["clients"] for p in g["points"]}), labels=[str(c) for c in sorted({p["clients"] for p in g["points"]})])
            ax.grid(alpha=.3)
            ax.legend(fontsize=8)
    if service:
        ax = axes[2 if "gallery" in report else 0]
        ratios = report["service"].get("batch16_vs_batch1_cpu", {})
        for rerank_k in sorted({p.get("rerank_k", 100) for p in service}, reverse=True):
            points = [p for p in service if p.get("rerank_k", 100) == rerank_k]
            ax.plot([p["batch"] for p in points], [p["cpu_ms_per_query"] for p in points], marker="o",
                    label=f"K={rerank_k}: batch 1 / batch 16 = {ratios.get(str(rerank_k), float('nan')):.2f}x")
        ax.set(xscale="log", xlabel="queries per search_texts call (batch)", ylabel="CPU ms per query", ylim=(0, None),
               title="in process, no HTTP: what batching can share")
        ax.set_xticks(sorted({p["batch"] for p in service}), labels=[str(b) for b in sorted({p["batch"] for p in service})])
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    if restart:
        ax = axes[-1]
        kinds = list(restart)
        x = np.arange(len(kinds))
        bars_of = [("open_rebuilding_s", "open, rebuilding the index"), ("open_loading_saved_s", "open, loading the saved index")]
        if all("open_after_removals_s" in restart[k] for k in kinds):
            bars_of.append(("open_after_removals_s", f"open after {restart[kinds[0]]['removals']:,} removals"))
        if all("compaction" in restart[k] for k in kinds):
            bars_of.append(("compaction", "compaction of a quarter removed (background)"))
        width = 0.8 / len(bars_of)
        heights = [[restart[k][key]["seconds"] if key == "compaction" else restart[k][key] for k in kinds] for key, _ in bars_of]
        for j, ((_, label), values) in enumerate(zip(bars_of, heights)):
            bars = ax.bar(x + (j - (len(bars_of) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.1f s", fontsize=8)
        ax.set_xticks(x, labels=[k.upper() for k in kinds])
        ax.set(ylabel="seconds", title=f"gallery restart, {report['restart']['size']:,} rows")
        ax.set_ylim(0, 1.35 * max(map(max, heights)))  # room for the legend above the bars
        ax.grid(alpha=.3, axis="y")
        ax.legend(fontsize=8, loc="upper left")
    if approximate:
        v = report["vectors"]
        ax = axes[-2 if restart else -1]
        for name, label, key in approximate:
            points = v[name]["points"]
            ax.plot([p["ms_per_query_p50"] for p in points], [p["recall_at_100"] for p in points], marker="o",
                    label=f"{label}, build {v[name]['build_s']:.0f} s")
            for p in points:
                ax.annotate(str(p[key]), (p["ms_per_query_p50"], p["recall_at_100"]), fontsize=8)
        ax.axvline(10, color="orange", ls=":", label="10 ms")
        ax.axvline(v["flat_ms_per_query"], color="grey", ls="--", label=f"exact: {v['flat_ms_per_query']} ms")
        ax.axhline(0.95, color="red", ls=":", label="recall 0.95")
        ax.set(xscale="log", xlabel="ms per query (1 query)", ylabel="recall@100 vs exact",
               title=f"first stage, {v['vectors']:,} x {v['dim']} synthetic vectors")
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "serve")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--model", type=Path, help="artifact (default: a random-weight one at the reference sizes)")
    p.add_argument("--assets", type=Path, default=REPO_ROOT / "build" / "assets", help="backbone/MiniLM assets for the default model")
    p.add_argument("--images", type=Path, default=FLICKR8K / "images")
    p.add_argument("--captions", type=Path, default=FLICKR8K / "captions.txt")
    p.add_argument("--gallery-size", type=positive_int, default=500)
    p.add_argument("--clients", type=positive_int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=positive_int, default=200, help="requests per point at most")
    p.add_argument("--seconds", type=positive_float, default=30, help="seconds per point at most")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--batch-workers", type=positive_int, default=2, help="the server's --batch-workers")
    p.add_argument("--path", default="auto", choices=PATHS, help="the server's --path (scoring path)")
    p.add_argument("--max-wait-ms", type=positive_float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--gallery-rows", default="fp32", choices=("fp32", "fp16"), help="the server's --gallery-rows")
    p.add_argument("--import-store", type=Path, help="feature store of the model's pipeline: the gallery's images it holds are "
                   "imported from their features on the first start (engine.serve --import-store)")
    p.add_argument("--service-rerank-k", type=positive_int, nargs="+", default=[100],
                   help="the service part's K (BSSAN pairs per query); 10, the least a top-10 query re-ranks, bounds what batching can gain")
    p.add_argument("--vectors", type=positive_int, default=1_000_000)
    p.add_argument("--queries", type=positive_int, default=200)
    p.add_argument("--clusters", type=positive_int, default=1000)
    p.add_argument("--spread", type=positive_float, default=1.0, help="within-cluster noise norm relative to the centre (1.0: cos ~0.5)")
    p.add_argument("--hnsw-m", type=positive_int)
    p.add_argument("--ef-construction", type=positive_int)
    p.add_argument("--ef-search", type=positive_int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--approximate", nargs="+", choices=("ivf", "hnsw"), default=["ivf"], help="approximate indexes measured at --vectors")
    p.add_argument("--ivf-lists", type=positive_int, help="IVF lists (default: engine.serve.index.ivf_lists(--vectors))")
    p.add_argument("--nprobe", type=positive_int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--build-seconds", type=positive_float, default=3600, help="give up building HNSW after this long")
    p.add_argument("--restart-size", type=positive_int, default=200_000, help="rows of the restart part's gallery")
    p.add_argument("--durability-adds", type=positive_int, default=30, help="kill -9 after this many acknowledged adds ...")
    p.add_argument("--durability-seconds", type=positive_float, default=120, help="... or after this long")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "load_test.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update({"machine": machine_info(args.threads), "libraries": package_versions(SERVE_LIBRARIES),
                   "load_average_at_start": list(os.getloadavg())})
    artifact = args.model
    if artifact is None and set(args.parts) & {"gallery", "service", "durability"}:
        artifact = build_random_artifact(WORK / "artifact", args.assets)
        report["model"] = {"artifact": str(artifact), "weights": "random, at the reference model's sizes (scores meaningless)"}
    elif artifact is not None:
        report["model"] = {"artifact": str(artifact)}
    for part in args.parts:
        started = time.perf_counter()
        if part == "gallery":
            report["gallery"] = run_gallery(args, artifact)
        elif part == "service":
            report["service"] = run_service(args, artifact)
        elif part == "vectors":
            dim = json.loads((artifact / "manifest.json").read_text())["dims"]["shortlist_dim"] if artifact else 512
            report["vectors"] = run_vectors(args, dim)
        elif part == "restart":
            dim = json.loads((artifact / "manifest.json").read_text())["dims"]["shortlist_dim"] if artifact else 512
            report["restart"] = run_restart(args, dim)
        else:
            report["durability"] = run_durability(args, artifact)
        report[part]["wall_s"] = round(time.perf_counter() - started, 1)
        write_json_atomic(path, report)
    plot(report, args.out / "load_test.png")
    print(f"wrote {path} and {args.out / 'load_test.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
