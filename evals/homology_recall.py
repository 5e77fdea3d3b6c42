"""Recall of each homology search mode against exhaustive alignment, on the bundled proteins.

    python evals/homology_recall.py [--proteins builder|derived] [--limit N] [--cache /tmp/exhaustive.npz]
                                    [--out evals/results/homology_recall.json]

The proteins are the ones ``sepit build-dataset`` clusters with the default (bundled) annotation
files and no store: records read and joined as the builder does (``read_inputs``, ``_generate``,
``_unify`` of ``sepit/data/build.py``), sequences cut to 1022 residues (4,985 proteins, 12.4 M
pairs: exhaustive alignment of all of them is over an hour on one core, so ``--limit N`` takes a
seeded sample of N).  ``--proteins derived`` takes the 758 UniProt/STRING/Pika proteins of
``derived/proteins.jsonl`` instead.

Ground truth is ``exhaustive`` (every pair aligned with the project's identity).  For each mode
(``exhaustive``, ``prefilter``, ``mmseqs`` when the binary is found) and each threshold it
reports: pairs at or above the threshold that the mode aligned, recall against exhaustive,
the share of those true pairs whose proteins still share a single-linkage cluster built from the
mode's pairs (what leakage depends on: a missed pair can be joined through others), wall time
and the ratio to the exhaustive wall time measured in the same run, plus the load average
(the box is shared).  The ``prefilter`` and ``mmseqs`` identities are the same function on the
same pairs, so a pair they aligned has exactly its exhaustive identity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.data.homology import search_pairs  # noqa: E402
from sepit.data.identity import all_pairs  # noqa: E402
from sepit.data.mmseqs import MmseqsParams, find_mmseqs  # noqa: E402
from sepit.data.splits import single_linkage  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.7)


def builder_proteins(files: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(protein ids, sequences) as ``build_dataset`` sees them with ``files`` (default: the bundled annotation files)."""
    import contextlib
    import io

    from sepit.data.build import BuildConfig, _generate, _unify
    from sepit.data.build_inputs import InputLedger, default_annotation_files, default_id_maps, load_id_maps, read_inputs
    from sepit.data.protein_join import StoreIndex

    ledger = InputLedger()
    with contextlib.redirect_stderr(io.StringIO()):  # per-file warning lines
        records = read_inputs(files or default_annotation_files(), load_id_maps(default_id_maps()), ledger)
    _examples, proteins = _unify(_generate(records, StoreIndex([]), BuildConfig(), ledger), ledger)
    keys = sorted(proteins)
    return keys, [proteins[k].sequence for k in keys]


def derived_proteins() -> tuple[list[str], list[str]]:
    """(accession, sequence) of the 758 bundled UniProt/STRING/Pika proteins
    (``derived/proteins.jsonl``, the set ``tests/test_splits.py`` uses), cut to 1022 residues."""
    import gzip

    from sepit.resources import data_path

    seen: dict[str, str] = {}
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("sequence") and row["accession"] not in seen:
                seen[row["accession"]] = row["sequence"][:1022]
    keys = sorted(seen)
    return keys, [seen[k] for k in keys]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proteins", choices=["builder", "derived"], default="builder",
                    help="builder: what build-dataset clusters with the bundled files; derived: derived/proteins.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="seeded sample of this many proteins (0 = all)")
    ap.add_argument("--cache", help="npz file keeping the exhaustive identities between runs (same proteins only)")
    ap.add_argument("--mmseqs-sensitivity", type=float, default=MmseqsParams.sensitivity)
    ap.add_argument("--mmseqs-evalue", type=float, default=MmseqsParams.evalue)
    ap.add_argument("--mmseqs-kmer", type=int, default=MmseqsParams.kmer, help="0 = MMseqs2's choice")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "homology_recall.json"))
    args = ap.parse_args()

    keys, seqs = builder_proteins() if args.proteins == "builder" else derived_proteins()
    if args.limit and args.limit < len(keys):
        keep = sorted(random.Random(0).sample(range(len(keys)), args.limit))
        keys, seqs = [keys[i] for i in keep], [seqs[i] for i in keep]
    n = len(keys)
    lengths = np.array([len(s) for s in seqs])
    print(f"{n} proteins, {n * (n - 1) // 2:,} pairs, median length {int(np.median(lengths))}", flush=True)
    result: dict = {"protein_set": args.proteins, "proteins": n, "pairs": n * (n - 1) // 2, "median_length": int(np.median(lengths)),
                    "mean_length": round(float(lengths.mean()), 1), "limit": args.limit or None,
                    "cpu_count": os.cpu_count(), "machine": platform.machine(), "load_avg_start": load_avg(),
                    "modes": {}}

    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file() and np.load(cache)["keys"].tolist() == keys:
        saved = np.load(cache)
        truth_ident, exhaustive_s = saved["identities"], float(saved["wall_s"])
        print(f"exhaustive identities from {cache} ({exhaustive_s:.0f} s when measured)", flush=True)
    else:
        t0 = time.time()
        truth_ident = search_pairs(seqs, "exhaustive").identities
        exhaustive_s = time.time() - t0
        if cache is not None:
            np.savez(cache, keys=np.array(keys), identities=truth_ident, wall_s=exhaustive_s)
    pairs = all_pairs(n)
    runs = {"exhaustive": (pairs, truth_ident, exhaustive_s, {})}
    t0 = time.time()
    found = search_pairs(seqs, "prefilter")
    runs["prefilter"] = (found.pairs, found.identities, time.time() - t0, {"k": 3, "top_m": 10, "min_cosine": 0.3})
    binary = find_mmseqs()
    if binary is not None:
        params = MmseqsParams(sensitivity=args.mmseqs_sensitivity, evalue=args.mmseqs_evalue, kmer=args.mmseqs_kmer)
        t0 = time.time()
        found = search_pairs(seqs, "mmseqs", mmseqs=params)
        runs["mmseqs"] = (found.pairs, found.identities, time.time() - t0,
                          {"binary": binary, "sensitivity": params.sensitivity, "max_seqs": params.max_seqs,
                           "evalue": params.evalue, "kmer": params.kmer or "auto",
                           "threads": params.threads or os.cpu_count()})
    else:
        result["modes"]["mmseqs"] = {"skipped": "no mmseqs binary (apt-get install -y mmseqs2)"}

    for mode, (mpairs, ident, wall, params) in runs.items():
        row: dict = {"pairs_aligned": int(len(mpairs)), "wall_s": round(wall, 2),
                     "time_vs_exhaustive": round(wall / exhaustive_s, 4), "params": params, "thresholds": {}}
        for t in THRESHOLDS:
            truth = pairs[truth_ident >= t]
            got = {tuple(p) for p in mpairs[ident >= t].tolist()}
            clusters = single_linkage(n, mpairs[ident >= t])
            co = int((clusters[truth[:, 0]] == clusters[truth[:, 1]]).sum()) if len(truth) else 0
            missed = [tuple(p) for p in truth.tolist() if tuple(p) not in got]
            row["thresholds"][str(t)] = {
                "true_pairs": int(len(truth)), "found": len(got), "recall": round(len(got) / len(truth), 4) if len(truth) else None,
                "true_pairs_co_clustered": co, "co_clustered_share": round(co / len(truth), 4) if len(truth) else None,
                "clusters": int(clusters.max()) + 1 if n else 0,
                "missed_examples": [{"pair": [keys[i], keys[j]], "lengths": [len(seqs[i]), len(seqs[j])],
                                     "identity": round(float(truth_ident[i * n - i * (i + 1) // 2 + (j - i - 1)]), 4)}
                                    for i, j in missed[:10]],
            }
        result["modes"][mode] = row
        t4 = row["thresholds"]["0.4"]
        print(f"{mode:10s} {row['pairs_aligned']:>10,} pairs  {wall:8.1f} s ({row['time_vs_exhaustive']:.3f} x)  "
              f">=0.4: {t4['found']}/{t4['true_pairs']} recall {t4['recall']}  co-clustered {t4['co_clustered_share']}",
              flush=True)
    result["load_avg_end"] = load_avg()
    result["exhaustive_pairs_per_s"] = round(result["pairs"] / exhaustive_s, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
