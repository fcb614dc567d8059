"""Simulation throughput: stamps per second on 1 and 2 processes, and the projected time of the
default survey (44,444 stamps). Run: python benchmarks/bench_simulation.py [--n 4000]

Timings on a shared machine are noisy, so a fixed numpy/FFT calibration loop is timed in the same
run; compare "stamps/s per calibration unit" across machines rather than raw rates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.fft

from galaxyvae.simulation import DEFAULT_N_IMAGES, render_survey, simulate_survey
from galaxyvae.simulation.survey import simulate_chunk


def calibration_rate(seconds: float = 2.0) -> float:
    """Iterations per second of a fixed single-threaded loop like the renderer's inner work:
    one 192 x 192 real FFT pair and a transcendental over the grid."""
    image = np.random.default_rng(0).random((192, 192), dtype=np.float32)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scipy.fft.irfft2(scipy.fft.rfft2(image) * 0.5, s=image.shape)
        np.exp(-image ** 0.25)
        count += 1
    return count / (time.perf_counter() - start)


def single_process_rate(n: int) -> tuple[float, float]:
    """(cold seconds for the first 200 stamps, warm stamps/s) in this process."""
    start = time.perf_counter()
    simulate_chunk(0, 0, 200)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    simulate_chunk(0, 200, 200 + n)
    return cold, n / (time.perf_counter() - start)


def pool_seconds(n: int, workers: int) -> float:
    """Wall seconds to render ``n`` stamps on ``workers`` fresh processes (start-up included)."""
    start = time.perf_counter()
    render_survey(n, seed=1, workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="stamps per timed run on 2 processes")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    calibration = calibration_rate()
    cold, warm = single_process_rate(max(args.n // 4, 400))
    print(f"calibration loop:          {calibration:8.1f} it/s (single thread)")
    print(f"1 process:                 {warm:8.1f} stamps/s warm "
          f"({warm / calibration:.3f} stamps per calibration it); first 200 stamps {cold:.2f} s (GalSim tables)")

    small, large = max(args.n // 4, 2 * args.workers * 200), args.n
    t_small, t_large = pool_seconds(small, args.workers), pool_seconds(large, args.workers)
    rate = (large - small) / max(t_large - t_small, 1e-9)
    startup = max(t_small - small / rate, 0.0)
    print(f"{args.workers} processes:               {large / t_large:8.1f} stamps/s end to end for {large} stamps "
          f"({rate:.1f} stamps/s steady, {startup:.1f} s start-up)")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        simulate_survey(Path(folder) / "bench.h5", n_images=small, n_held_out=10, seed=2, workers=args.workers,
                        progress=False)
        write_overhead = max(time.perf_counter() - start - t_small, 0.0) * DEFAULT_N_IMAGES / small
    projected = startup + DEFAULT_N_IMAGES / rate + write_overhead
    print(f"projected default survey:  {projected:8.1f} s for {DEFAULT_N_IMAGES} stamps on {args.workers} processes "
          f"(target < 120 s)")


if __name__ == "__main__":
    main()
