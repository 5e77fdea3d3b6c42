"""Benchmark: StructureBias naive vs chunked vs sparse (memory, time) and encoder throughput.

    python evals/bench_structure_bias.py                       # L = 256, 512, 1024; paper sizes
    python evals/bench_structure_bias.py --lengths 256 --out bench.json

How memory is measured: ``torch.profiler`` with ``profile_memory=True`` records every tensor
allocation and free made by the CPU allocator during one call; the peak of their running sum is
the largest amount of tensor memory the call had alive on top of what existed before it (its
inputs and the module's weights are excluded, outputs are included).  It is the CPU analogue of
``torch.cuda.max_memory_allocated`` deltas; process RSS is not used (allocator caching and
import spikes make it noisy).  Time is the median of ``--repeats`` unprofiled calls after one
warm-up, as wall seconds and as process CPU seconds, with ``--threads`` intra-op threads; on a
shared, loaded machine use ``--threads 1`` and read the CPU seconds (idle threads spin-waiting
for a core inflate both figures when threads > free cores).

Coordinates are real: Cα traces of the bundled structures (longest first: the 796-residue
P04629 model, then AlphaFold DB chains) laid side by side 60 Å apart until L residues, as in a
multi-chain assembly.  StructureBias uses the paper sizes (K = 128, H = 20, D = 1280); the
encoder throughput uses the ``small`` preset (ESM-2 8M sizes, 6 layers × 320) on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from sepit.models.encoder import EncoderConfig, ProteinEncoder
from sepit.models.protein_batch import collate_proteins
from sepit.models.structure_bias import StructureBias, StructureBiasConfig
from sepit.resources import data_path
from sepit.structure.parse import load_records

STRUCTURES = [
    ("graphein_testdata", "P04629.pdb.gz"),
    ("chlamatlas_afdb", "afdb_models", "AF-O84395-F1-model_v4.cif.gz"),
    ("chlamatlas_afdb", "afdb_models", "AF-O84835-F1-model_v4.cif.gz"),
    ("chlamatlas_afdb", "afdb_models", "AF-O84081-F1-model_v4.cif.gz"),
]
VARIANTS = {  # name -> (graph mode, StructureBias method)
    "naive": ("dense", "naive"),
    "chunked": ("dense", "forward"),
    "radius16": ("radius", "forward"),
    "knn32": ("knn", "forward"),
}


def real_assembly(length: int) -> tuple[str, np.ndarray]:
    """(sequence, Cα [length, 3] Å) from real chains placed 60 Å apart along x."""
    seqs, coords, shift = [], [], 0.0
    while sum(map(len, seqs)) < length:
        for parts in STRUCTURES:
            rec = load_records(data_path(*parts))[0]
            ca = rec.coords[rec.coord_mask]
            seq = "".join(np.array(list(rec.sequence))[rec.coord_mask])
            ca = ca - ca.mean(0) + np.array([shift, 0.0, 0.0], np.float32)
            shift += 60.0
            seqs.append(seq)
            coords.append(ca)
    return "".join(seqs)[:length], np.concatenate(coords)[:length].astype(np.float32)


def peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated during fn() (see module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``repeats`` calls after one warm-up."""
    fn()  # warm-up (lazy init, allocator)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_structure_bias(lengths: list[int], chunk: int, repeats: int) -> list[dict]:
    rows = []
    for L in lengths:
        _, ca = real_assembly(L)
        coords = torch.from_numpy(ca)[None]  # [1, L, 3]
        mask = torch.ones(1, L, dtype=torch.bool)
        reference = None
        for name, (graph, method) in VARIANTS.items():
            torch.manual_seed(0)
            sb = StructureBias(StructureBiasConfig(num_heads=20, embed_dim=1280, num_rbf=128, chunk_size=chunk,
                                                   graph=graph, radius=16.0, knn=32))
            call = getattr(sb, method)

            def infer():
                with torch.no_grad():
                    return call(coords, mask)

            def train():
                out = call(coords, mask)
                (out.attn_bias.square().mean() + out.edge_embedding.square().mean()).backward()
                sb.zero_grad(set_to_none=True)

            out = infer()
            if reference is None:
                reference = out
            diff = (out.attn_bias - reference.attn_bias).abs().max().item()
            fwd_wall, fwd_cpu = timed(infer, repeats)
            train_wall, train_cpu = timed(train, repeats)
            row = {
                "L": L, "variant": name, "max_abs_diff_vs_naive": diff,
                "forward_s": fwd_wall, "forward_cpu_s": fwd_cpu, "forward_peak_mb": peak_bytes(infer) / 2**20,
                "train_s": train_wall, "train_cpu_s": train_cpu, "train_peak_mb": peak_bytes(train) / 2**20,
            }
            if graph != "dense":
                row["edges"] = int(sb.residue_graph(coords, mask).shape[1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:  # ratios against the naive formula at the same length
        base = next(r for r in rows if r["L"] == row["L"] and r["variant"] == "naive")
        for key in ("forward_s", "forward_cpu_s", "forward_peak_mb", "train_s", "train_cpu_s", "train_peak_mb"):
            row[key + "_vs_naive"] = row[key] / base[key]
    return rows


def bench_encoder(preset: str, lengths: list[int], batch: int, repeats: int) -> list[dict]:
    rows = []
    for L in lengths:
        seq, ca = real_assembly(L)
        torch.manual_seed(0)
        variants = {
            "sequence_only": (EncoderConfig.preset(preset), False),
            "structure_dense": (EncoderConfig.preset(preset), True),
            "structure_radius16": (EncoderConfig.preset(preset, structure_graph="radius"), True),
        }
        base = None
        for name, (cfg, with_coords) in variants.items():
            enc = ProteinEncoder(cfg).eval()
            b = collate_proteins(enc.alphabet, [(seq, ca, None)] * batch)

            def run():
                with torch.no_grad():
                    if with_coords:
                        enc(b.tokens, b.coords, b.coord_mask)
                    else:
                        enc(b.tokens)

            t, cpu = timed(run, repeats)
            base = base or cpu
            row = {"preset": preset, "L": L, "batch": batch, "variant": name, "forward_s": t, "forward_cpu_s": cpu,
                   "residues_per_s": batch * L / t, "residues_per_cpu_s": batch * L / cpu,
                   "cpu_vs_sequence_only": cpu / base}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(bias_rows: list[dict], enc_rows: list[dict]) -> str:
    lines = ["| L | variant | fwd wall / CPU (s) | fwd peak (MB) | train wall / CPU (s) | train peak (MB) | "
             "fwd CPU, mem vs naive | train CPU, mem vs naive | edges | max abs diff vs naive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bias_rows:
        lines.append(
            f"| {r['L']} | {r['variant']} | {r['forward_s']:.3f} / {r['forward_cpu_s']:.3f} | {r['forward_peak_mb']:.0f} | "
            f"{r['train_s']:.3f} / {r['train_cpu_s']:.3f} | {r['train_peak_mb']:.0f} | "
            f"{r['forward_cpu_s_vs_naive']:.2f}, {r['forward_peak_mb_vs_naive']:.3f} | "
            f"{r['train_cpu_s_vs_naive']:.2f}, {r['train_peak_mb_vs_naive']:.3f} | "
            f"{r.get('edges', '')} | {r['max_abs_diff_vs_naive']:.1e} |"
        )
    lines += ["", "| preset | L | batch | variant | forward wall / CPU (s) | residues/s (wall) | residues/CPU-s | "
              "CPU vs sequence-only |", "|---|---|---|---|---|---|---|---|"]
    for r in enc_rows:
        lines.append(f"| {r['preset']} | {r['L']} | {r['batch']} | {r['variant']} | {r['forward_s']:.3f} / "
                     f"{r['forward_cpu_s']:.3f} | {r['residues_per_s']:.0f} | {r['residues_per_cpu_s']:.0f} | "
                     f"{r['cpu_vs_sequence_only']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--chunk", type=int, default=64, help="row chunk of the dense StructureBias")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder-preset", default="small")
    ap.add_argument("--encoder-lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--encoder-batch", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    bias_rows = bench_structure_bias(args.lengths, args.chunk, args.repeats)
    enc_rows = bench_encoder(args.encoder_preset, args.encoder_lengths, args.encoder_batch, args.repeats)
    env["loadavg_end"] = os.getloadavg()
    print(markdown(bias_rows, enc_rows))
    print(json.dumps(env))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "structure_bias": bias_rows, "encoder": enc_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
