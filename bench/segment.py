"""``iid segment`` on a large generated raster: throughput against a plain windowed read and
against the model's own forward rate, and peak memory at several raster sizes.

For each size a SIZE x SIZE x BANDS uint8 GeoTIFF is generated block row by block row (tiled
512 px, uncompressed, EPSG:32633, nodata 0 declared but absent; noise on gradients), synced to
disk (it stays in the page cache: every read below measures decoding, not the disk), and then,
one after another on a machine left to settle in between:

1. **plain read**: every window of the segment layout (``read_window``: core + 2 * margin px)
   read in this process, the raster opened once, GDAL's cache as ``segment`` sets it.
2. **forward**: the same model (loaded from the checkpoint ``segment`` gets) on batches of
   ``--batch-size`` random windows of the tile size, after a warm-up: with ``--cpus-per-actor``
   torch threads here (what a CPU actor gets), or on the GPU with ``--gpu`` (inputs already on
   the GPU, synchronised: the model's limit there). Shown beside it, ``scorer``: the actor's
   whole per-batch work in this process (uint8 -> float, forward, crop, argmax, mask, back to
   numpy; host <-> GPU copies included with ``--gpu``).
3. **segment**: ``segment(...)`` of the raster (clusters only, no probabilities), Ray started
   beforehand (its start-up, ``ray s``, is timed on its own and left out) and shut down
   afterwards, so that 1 and 2 of the next size run on a quiet machine. Its wall time includes
   planning, actor start-up and the COG copy + preview at the end. ``MapWriter``'s methods are
   wrapped with timers here (the bench's only intrusion): ``1st out`` is the time until the
   first window was written (start-up, and the first Ray Data block -- windows reach the
   driver a block of ~4 batches at a time), ``write`` the driver's window writes in all,
   ``finish`` the COG copy + preview, and ``steady`` the rate over the middle half of the
   windows (by their write times; only with 8 blocks or more).
4. **memory**, during segment, of this process (the driver) and every process below it: Ray
   *workers* (command line with ``ray::`` or ``default_worker.py``: read tasks, the scoring
   actors, Ray Data's helper actors, idle workers) and Ray's *system* processes (raylet,
   gcs_server, log monitor, the dashboard and its agents -- ``ray::DashboardAgent`` and
   ``ray::RuntimeEnvAgent``, titled like workers: a fixed cost of a local cluster, shown
   apart). RSS is sampled every 0.25 s. PSS (proportional set size,
   ``memory_full_info().pss``) divides a shared page -- libtorch, loaded by every process
   that imports torch; the object store's shared memory, mapped by the raylet, workers and
   driver -- among the processes that map it, where RSS counts it in each; a PSS pass costs
   ~0.1 s of CPU here, so it is taken when the RSS sum reaches a new high (at most once a
   second) and every 5 s
   (``MemorySampler``). Shown: peak RSS of the driver, peak RSS of the largest worker, and
   peaks of PSS sums: ``pipeline`` = driver + workers, ``all`` adds the system processes. A
   sum's peak is over samples (what was resident at one moment), not a sum of peaks.

Goals (the issue's): memory flat in raster size and under 1.5 GB here -- the verdict takes
``all`` PSS (everything the run keeps resident), its peak at the largest size at most 1.2x
that at the smallest; with ``--gpu``, segment's steady rate (the wall-clock one where there
is none) >= 0.8 of the model's forward rate on that GPU (reading and writing keep it busy).
On CPU the actor's threads, the read tasks and the driver share the machine's cores, so there
the rate is bounded by forward + read + write time, not by the forward alone. Compare sizes of
at least a few blocks each (32 windows a block with the defaults: 1500 px is one block, so one
read task and fewer worker processes than later).

The defaults take about a quarter of an hour on 2 cores (500 MP; segment ~0.7 MP/s there).

    .venv/bin/python bench/segment.py                           # 10000 and 20000 px
    .venv/bin/python bench/segment.py --sizes 2000 4000         # quick (two minutes)
    .venv/bin/python bench/segment.py --gpu                     # GPU actors

MP = megapixels of the raster (height x width), whatever the margin reads around each core.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
import torch
from rasterio.windows import Window

import psutil  # isort: skip  (Ray's bundled copy; imported after ray)

from pipeline import checkpoint
from pipeline.config import Config, Job
from pipeline.data.format import to_unit
from pipeline.models import build_model
from pipeline.prepare.raster import GDAL_CACHE_MB, open_raster
from pipeline.segment import rasters
from pipeline.segment.layout import Layout
from pipeline.segment.rasters import read_window
from pipeline.segment.run import Scorer, SegmentOptions, plan, segment

BLOCK = 512  # generated raster's tile side
GOAL_GB = 1.5
GOAL_GROWTH = 1.2
GOAL_GPU_RATIO = 0.8


# ------------------------------------------------------------------------------- inputs
def make_raster(path: Path, size: int, bands: int, seed: int = 0) -> None:
    """A size x size uint8 GeoTIFF written one block row at a time (one row of 512 px blocks
    in memory: 20000 px x 4 bands = 41 MB): per band a horizontal or vertical ramp plus a
    weaker cross ramp and noise; values 1..238, so the declared nodata (0) never occurs."""
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": bands,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "BIGTIFF": "IF_SAFER",
        "nodata": 0,
        "crs": "EPSG:32633",
        "transform": rasterio.transform.from_origin(368000, 5808000, 0.05, 0.05),
    }
    span = max(1, size - 1)
    x = (np.arange(size, dtype=np.int64) * 255 // span).astype(np.uint8)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, BLOCK):
            h = min(BLOCK, size - row)
            y = (np.arange(row, row + h, dtype=np.int64) * 255 // span).astype(np.uint8)
            block = rng.integers(1, 49, (bands, h, size), dtype=np.uint8)
            for b in range(bands):
                main, cross = (x[None, :], y[:, None]) if b % 2 == 0 else (y[:, None], x[None, :])
                if b % 4 >= 2:
                    main = 255 - main
                block[b] += main // 2
                block[b] += cross // 4
            dst.write(block, window=Window(0, row, size, h))


def save_checkpoint(folder: Path, bands: int, width: float) -> Path:
    """A checkpoint of a random small segmentation network (as tests/test_segment.py saves
    one): head B's 3 clusters matched to classes a, b, c."""
    cfg = Config.from_dict(
        {
            "data": {"shards": "unused", "dtype": "uint8"},
            "model": {"in_channels": bands, "width": width},
            "run": {"name": "bench-segment"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    classes = ("a", "b", "c")
    job = Job(cfg, classes, tuple(range(256)), "", "", cfg.pairs)
    k = cfg.model.n_clusters_b
    counts = torch.zeros(cfg.model.n_subheads, k, len(classes), dtype=torch.int64)
    counts[:, :, :] = torch.eye(k, len(classes), dtype=torch.int64) * 10
    folder.mkdir(parents=True)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint.save(folder, model, optimizer, [{"epoch": 0, "best_subhead": 0}], job, counts, [])
    return folder


# ------------------------------------------------------------------------------ machine
def settle(max_s: float = 30.0, quiet_pct: float = 20.0) -> float:
    """Wait (up to max_s) until the whole machine's CPU use over one second is below
    quiet_pct percent; returns the last second's figure."""
    deadline = time.monotonic() + max_s
    busy = psutil.cpu_percent(interval=1.0)
    while busy >= quiet_pct and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
    return busy


WORKER_MARKS = ("ray::", "default_worker.py")
SYSTEM_MARKS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # titled like workers


@dataclass
class MemoryPeaks:
    """Peaks over the samples, bytes (sums: per sample, then the peak)."""

    driver_rss: int = 0
    worker_rss: int = 0  # the largest single worker
    pipeline_rss: int = 0  # driver + workers, summed as RSS (shared pages once per process)
    pipeline_pss: int = 0  # driver + workers
    system_pss: int = 0  # Ray's system processes
    all_pss: int = 0  # everything
    workers: int = 0  # most worker processes at once
    samples: int = 0  # RSS passes
    pss_samples: int = 0  # PSS passes
    sampler_cpu_s: float = 0.0  # CPU time the sampling itself took
    baseline_all_pss: int = 0  # one pass before segment starts (Ray up, idle)
    errors: list[str] = field(default_factory=list)


class MemorySampler(threading.Thread):
    """Samples the driver and every process under it.

    RSS every ``interval`` seconds (/proc/PID/statm: microseconds a process). PSS needs a walk
    of every mapping (smaps_rollup: 20-40 ms for a process that imported torch, ~0.1 s a pass
    over a dozen processes, a third of a core at 4 passes a second), so it is read only when
    the RSS sum of all processes is 2% above the highest one seen by an earlier PSS pass (at
    most once a second), and every ``pss_every`` seconds: the PSS peak is then the peak at the
    moments resident memory peaked.
    """

    def __init__(self, interval: float = 0.25, pss_every: float = 5.0):
        super().__init__(daemon=True, name="memory-sampler")
        self.interval, self.pss_every = interval, pss_every
        self.peaks = MemoryPeaks()
        self._halt = threading.Event()
        self._me = psutil.Process()
        self._pss_rss_high = 0  # the all-processes RSS sum at the highest PSS pass
        self._last_pss = -math.inf

    def _processes(self) -> list[tuple[psutil.Process, str]]:
        """(process, "driver" | "worker" | "system") of the driver and everything below it."""
        found = [(self._me, "driver")]
        for proc in self._me.children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            worker = any(m in cmd for m in WORKER_MARKS) and not any(m in cmd for m in SYSTEM_MARKS)
            found.append((proc, "worker" if worker else "system"))
        return found

    def _pass(self, full: bool) -> dict[str, int]:
        """Sums and maxima now; PSS ones only when ``full``."""
        now = dict.fromkeys(
            ("driver_rss", "worker_rss", "pipeline_rss", "all_rss", "workers", "pipeline_pss",
             "system_pss"),
            0,
        )  # fmt: skip
        for proc, role in self._processes():
            try:
                mem = proc.memory_full_info() if full else proc.memory_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied as err:  # not ours: say so once
                if str(err) not in self.peaks.errors:
                    self.peaks.errors.append(str(err))
                continue
            now["all_rss"] += mem.rss
            if role == "system":
                now["system_pss"] += mem.pss if full else 0
                continue
            now["pipeline_rss"] += mem.rss
            now["pipeline_pss"] += mem.pss if full else 0
            if role == "driver":
                now["driver_rss"] = mem.rss
            else:
                now["workers"] += 1
                now["worker_rss"] = max(now["worker_rss"], mem.rss)
        return now

    def _record(self) -> None:
        p = self.peaks
        now = self._pass(full=False)
        p.samples += 1
        p.driver_rss = max(p.driver_rss, now["driver_rss"])
        p.worker_rss = max(p.worker_rss, now["worker_rss"])
        p.pipeline_rss = max(p.pipeline_rss, now["pipeline_rss"])
        p.workers = max(p.workers, now["workers"])
        since = time.monotonic() - self._last_pss
        high = now["all_rss"] > self._pss_rss_high * 1.02 and since >= 1.0
        if high or since >= self.pss_every:
            self._pss_rss_high = max(self._pss_rss_high, now["all_rss"])
            self._last_pss = time.monotonic()
            full = self._pass(full=True)
            p.pss_samples += 1
            p.pipeline_pss = max(p.pipeline_pss, full["pipeline_pss"])
            p.system_pss = max(p.system_pss, full["system_pss"])
            p.all_pss = max(p.all_pss, full["pipeline_pss"] + full["system_pss"])

    def run(self) -> None:
        start = time.thread_time()
        while not self._halt.wait(self.interval):
            self._record()
        self._record()
        self.peaks.sampler_cpu_s = time.thread_time() - start

    def start(self) -> None:
        full = self._pass(full=True)
        self.peaks.baseline_all_pss = full["pipeline_pss"] + full["system_pss"]
        super().start()

    def stop(self) -> MemoryPeaks:
        self._halt.set()
        self.join()
        return self.peaks


# ---------------------------------------------------------------------------- measuring
def plain_read(path: Path, layout: Layout) -> float:
    """Seconds to read every window of the layout in this process (the raster opened once)."""
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_raster(path) as src:
        for r, c in layout.cores():
            read_window(src, layout, r, c)
    return time.perf_counter() - start


def forward_rates(model_dir: Path, args, layout: Layout) -> tuple[float, float]:
    """(forward, scorer) in raster MP/s: core pixels of windows per second, after a warm-up,
    with the actor's torch threads (CPU) or on the GPU."""
    device = "cuda" if args.gpu else "cpu"
    threads = torch.get_num_threads()
    if not args.gpu:
        torch.set_num_threads(max(1, int(args.cpus_per_actor)))
    try:
        the_plan = plan(str(model_dir), SegmentOptions(core=args.core, margin=args.margin))
        model = build_model(the_plan.config.model)
        model.load_state_dict(the_plan.weights)
        model.eval().to(device)
        rng = np.random.default_rng(1)
        t = layout.tile
        raw = rng.integers(1, 256, (args.batch_size, args.bands, t, t), dtype=np.uint8)
        core_mp = args.batch_size * args.core**2 / 1e6
        sync = torch.cuda.synchronize if args.gpu else (lambda: None)

        def timed(step, min_s: float, min_n: int) -> float:
            for _ in range(2):  # warm-up
                step()
            sync()
            n, start = 0, time.perf_counter()
            while n < min_n or (time.perf_counter() - start < min_s and n < 1000):
                step()
                n += 1
            sync()
            return n * core_mp / (time.perf_counter() - start)

        x = torch.from_numpy(to_unit(raw)).to(device)
        with torch.inference_mode():
            forward = timed(lambda: model(x, the_plan.head), 5.0, 20 if args.gpu else 4)
        scorer = Scorer(the_plan, args.core, args.margin, device=device)
        batch = {
            "raster": np.zeros(args.batch_size, np.int64),
            "row": np.zeros(args.batch_size, np.int64),
            "col": np.zeros(args.batch_size, np.int64),
            "error": np.array([""] * args.batch_size, dtype=object),
            "image": raw,
            "valid": np.ones((args.batch_size, t, t), bool),
        }
        scored = timed(lambda: scorer(batch), 5.0, 20 if args.gpu else 4)
        return forward, scored
    finally:
        torch.set_num_threads(threads)
        give_back_heap()


def give_back_heap() -> None:
    """Return the heap the measurements above freed to the system (glibc keeps it otherwise),
    so that the driver's RSS during segment is a driver's, not this bench's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Row:
    size: int
    mp: float
    windows: int
    gen_s: float
    read_s: float
    forward: float  # raster MP/s
    scorer: float  # raster MP/s
    ray_s: float
    seg_s: float
    first_s: float  # segment's start -> first window written
    write_s: float  # all windows' writes on the driver
    finish_s: float  # COG copy + preview
    steady: float  # raster MP/s, middle half of the windows
    cpu_busy: float  # % of the machine during segment
    mem: MemoryPeaks
    quiet: list[str]  # steps that started on a busy machine

    @property
    def seg_mps(self) -> float:
        return self.mp / self.seg_s


class Timings:
    """MapWriter's work on the driver, timed while in place (``with Timings() as t``): every
    window's write (``writes``: when each ended, ``write_s``: their total) and ``finish``
    (the COG copy with overviews and the preview)."""

    def __init__(self):
        self.writes: list[float] = []
        self.write_s = 0.0
        self.finish_s = 0.0

    def __enter__(self) -> Timings:
        self._originals = rasters.MapWriter.write, rasters.MapWriter.finish
        write, finish = self._originals

        def timed_write(writer, *a, **k):
            start = time.perf_counter()
            try:
                return write(writer, *a, **k)
            finally:
                end = time.perf_counter()
                self.write_s += end - start
                self.writes.append(end)

        def timed_finish(writer, *a, **k):
            start = time.perf_counter()
            try:
                return finish(writer, *a, **k)
            finally:
                self.finish_s += time.perf_counter() - start

        rasters.MapWriter.write, rasters.MapWriter.finish = timed_write, timed_finish
        return self

    def __exit__(self, *exc) -> None:
        rasters.MapWriter.write, rasters.MapWriter.finish = self._originals

    def steady(self, mp: float, blocks: int) -> float:
        """Raster MP/s over the middle half of the windows, by the time each was written;
        NaN with fewer than 8 Ray Data blocks (windows reach the driver a block at a time)."""
        n = len(self.writes)
        if blocks < 8 or n < 8:
            return math.nan
        lo, hi = n // 4, 3 * n // 4
        return mp * (hi - lo) / n / max(1e-9, self.writes[hi] - self.writes[lo])


def measure(size: int, args, model_dir: Path, work: Path) -> Row:
    from pipeline.train import start_ray

    folder = Path(tempfile.mkdtemp(prefix=f"size-{size}-", dir=work))
    raster = folder / f"scene{size}.tif"
    print(f"\n== {size} x {size} x {args.bands}: generating {raster}", flush=True)
    start = time.perf_counter()
    make_raster(raster, size, args.bands)
    os.sync()
    gen_s = time.perf_counter() - start
    gigabytes = raster.stat().st_size / 1e9
    print(f"generated: {gigabytes:.2f} GB in {gen_s:.1f} s", flush=True)
    layout = Layout(size, size, args.core, args.margin)
    mp = size * size / 1e6
    quiet: list[str] = []

    def quiet_now(step: str) -> None:
        busy = settle()
        if busy >= 20:
            quiet.append(f"{step} {busy:.0f}%")

    quiet_now("read")
    read_s = plain_read(raster, layout)
    print(f"plain read: {len(layout)} windows, {read_s:.2f} s ({mp / read_s:.1f} MP/s)", flush=True)

    quiet_now("forward")
    forward, scored = forward_rates(model_dir, args, layout)
    print(f"forward: {forward:.2f} MP/s, scorer {scored:.2f} MP/s", flush=True)

    start = time.perf_counter()
    start_ray(dashboard=False)  # as `iid segment` starts it
    ray_s = time.perf_counter() - start
    quiet_now("segment")
    opts = SegmentOptions(
        core=args.core,
        margin=args.margin,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpu=args.gpu,
        progress=False,
    )
    sampler = MemorySampler()
    try:
        with Timings() as timings:
            sampler.start()
            psutil.cpu_percent(None)
            start = time.perf_counter()
            report = segment(
                str(model_dir), str(raster), str(folder / "out"), opts, say=lambda s: print(s)
            )
            seg_s = time.perf_counter() - start
            cpu_busy = psutil.cpu_percent(None)
    finally:
        mem = sampler.stop()
        ray.shutdown()  # a local cluster stops; a RAY_ADDRESS one is only left
    if report.failed or len(report.done) != 1:
        raise SystemExit(f"segment failed: {report.failed}")
    blocks = max(1, min(len(layout) // (4 * args.batch_size), 4096))  # as segment makes them
    row = Row(
        size,
        mp,
        len(layout),
        gen_s,
        read_s,
        forward,
        scored,
        ray_s,
        seg_s,
        first_s=timings.writes[0] - start,
        write_s=timings.write_s,
        finish_s=timings.finish_s,
        steady=timings.steady(mp, blocks),
        cpu_busy=cpu_busy,
        mem=mem,
        quiet=quiet,
    )
    print(
        f"segment: {seg_s:.1f} s ({row.seg_mps:.2f} MP/s), peak PSS all {mem.all_pss / 1e9:.2f} GB",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(folder)
    return row


# ------------------------------------------------------------------------------ report
def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def print_tables(rows: list[Row], args) -> None:
    cores = os.cpu_count() or 1
    where = "GPU" if args.gpu else f"{int(args.cpus_per_actor)} thr"
    print(
        f"\nmodel width {args.width:g}, {args.bands} bands uint8, core {args.core} + margin "
        f"{args.margin} (tile {args.core + 2 * args.margin}), batch {args.batch_size}, "
        f"{args.actors} actor(s) x {'1 GPU' if args.gpu else f'{args.cpus_per_actor:g} CPUs'}, "
        f"{cores} cores on this machine"
    )
    print(
        f"{'size':>6}{'MP':>6}{'windows':>8}{'read s':>8}{'read MP/s':>10}"
        f"{'fwd MP/s':>9}{'scorer':>8}{'ray s':>7}{'seg s':>8}{'seg MP/s':>9}{'/core':>7}"
        f"{'seg/fwd':>8}{'seg/read':>9}{'1st out':>8}{'write':>6}{'finish':>7}{'steady':>7}"
        f"{'st/fwd':>7}{'cpu%':>5}"
    )
    for r in rows:
        print(
            f"{r.size:>6}{r.mp:>6.0f}{r.windows:>8}{r.read_s:>8.2f}{r.mp / r.read_s:>10.1f}"
            f"{r.forward:>9.2f}{r.scorer:>8.2f}{r.ray_s:>7.1f}{r.seg_s:>8.1f}{r.seg_mps:>9.2f}"
            f"{r.seg_mps / cores:>7.2f}{r.seg_mps / r.forward:>8.2f}{r.seg_s / r.read_s:>9.1f}"
            f"{r.first_s:>8.1f}{r.write_s:>6.1f}{r.finish_s:>7.1f}{r.steady:>7.2f}"
            f"{r.steady / r.forward:>7.2f}{r.cpu_busy:>5.0f}"
        )
    print(
        f"fwd / scorer: the model's forward / the actor's whole batch work, alone ({where}), in "
        "raster MP/s; ray s: Ray start-up (not in seg s); seg/fwd: segment's MP/s over the "
        "forward's; seg/read: segment's time over the plain read's; 1st out: seconds until the "
        "first window was written (planning, actor start-up, the first Ray Data block); write: "
        "the driver's window writes in all; finish: COG copy + preview; steady: MP/s over the "
        "middle half of the windows (nan: under 8 blocks), st/fwd: over the forward's; cpu%: the "
        "whole machine during segment"
    )
    print(
        f"\n{'size':>6}{'driver RSS':>11}{'worker RSS':>11}{'pipeline PSS':>13}"
        f"{'(as RSS)':>9}{'system PSS':>11}{'all PSS':>9}{'idle all':>9}{'workers':>8}"
        f"{'samples':>8}{'PSS':>5}{'sampler s':>10}"
    )
    for r in rows:
        m = r.mem
        print(
            f"{r.size:>6}{gb(m.driver_rss):>11}{gb(m.worker_rss):>11}{gb(m.pipeline_pss):>13}"
            f"{gb(m.pipeline_rss):>9}{gb(m.system_pss):>11}{gb(m.all_pss):>9}"
            f"{gb(m.baseline_all_pss):>9}{m.workers:>8}{m.samples:>8}"
            f"{m.pss_samples:>5}{m.sampler_cpu_s:>10.2f}"
        )
    print(
        "GB, peaks during segment: driver RSS; worker RSS: the largest single Ray worker; "
        "pipeline PSS: driver + Ray workers (as RSS: the same summed as RSS, shared pages "
        "counted in every process); system PSS: raylet, GCS, dashboard, agents; all PSS: "
        "everything; idle all: all PSS just before segment (Ray up, idle); workers: most worker "
        "processes at once; samples: RSS passes (0.25 s), PSS: PSS passes; sampler s: CPU time "
        "the sampling took"
    )
    for r in rows:
        for m in r.mem.errors:
            print(f"note: {r.size}: a process could not be sampled: {m}")
        if r.quiet:
            print(f"note: {r.size}: machine busy before: {', '.join(r.quiet)} (CPU, 1 s)")


def verdict(rows: list[Row], args) -> str:
    peaks = [r.mem.all_pss for r in rows]
    under = max(peaks) < GOAL_GB * 1e9
    parts = [f"peak all PSS {max(peaks) / 1e9:.2f} GB {'<' if under else '>='} {GOAL_GB} GB"]
    ok = under
    if len(rows) > 1:
        small, large = min(rows, key=lambda r: r.size), max(rows, key=lambda r: r.size)
        growth = large.mem.all_pss / small.mem.all_pss
        flat = growth <= GOAL_GROWTH
        ok &= flat
        parts.append(
            f"{large.size} px / {small.size} px = {growth:.2f} "
            f"({'<=' if flat else '>'} {GOAL_GROWTH}: {'flat' if flat else 'grows'})"
        )
    else:
        parts.append("one size: growth not measured")
    if args.gpu:  # the steady rate where there is one: start-up and the COG tail are not the GPU's
        ratios = [(r.steady if r.steady == r.steady else r.seg_mps) / r.forward for r in rows]
        busy = min(ratios) >= GOAL_GPU_RATIO
        ok &= busy
        parts.append(
            f"GPU: segment (steady) / forward {min(ratios):.2f} "
            f"{'>=' if busy else '<'} {GOAL_GPU_RATIO}"
        )
    return f"verdict: {'PASS' if ok else 'FAIL'}: " + "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000], help="raster sides")
    p.add_argument("--bands", type=int, default=4)
    p.add_argument("--width", type=float, default=0.125, help="model.width of the random model")
    p.add_argument("--core", type=int, default=256)
    p.add_argument("--margin", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=2.0)
    p.add_argument("--gpu", action="store_true", help="GPU actors; the forward rate on the GPU")
    p.add_argument(
        "--workdir",
        default=None,
        help="a new folder for the rasters and maps is made in it (default: under /tmp); "
        "deleted at the end unless --keep",
    )
    p.add_argument("--keep", action="store_true", help="keep the rasters, maps and checkpoint")
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: torch sees no GPU here")
    if min(args.sizes) < 1:
        p.error("--sizes: expected >= 1")
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-segment-", dir=args.workdir))
    rows: list[Row] = []
    try:
        model_dir = save_checkpoint(work / "model", args.bands, args.width)
        for size in args.sizes:
            rows.append(measure(size, args, model_dir, work))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(rows, args)
    print(verdict(rows, args))
    print(f"command: {command}")


if __name__ == "__main__":
    main()
