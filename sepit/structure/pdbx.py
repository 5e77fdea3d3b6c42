"""PDB and mmCIF (PDBx) files, experimental or AlphaFold DB models, into protein records.

Parsing uses **gemmi** (https://gemmi.readthedocs.io): a C++ core with Python bindings that reads
PDB, mmCIF and gzip natively, models NMR ensembles, alternate locations, microheterogeneity and
entity/polymer types, and ships the wwPDB chemical component table used for modified residues.
It is what the AlphaFold and OpenFold data pipelines build on, and it is fast enough that the
preprocess job is limited by I/O, not parsing.  (Biotite would also have done; gemmi's mmCIF
entity model and SEQRES alignment decided it.)

Rules, per file:

- Only the first model of multi-model (NMR) files is read (``meta["n_models"]`` says how many).
- One record per protein chain (``chain_policy="all"``), only the first (``"first"``) or one named
  chain.  Waters and ligands are not residues of any chain's polymer and are ignored; nucleic-acid
  chains are rejected with a reason; a named chain that is absent is rejected with the list of
  protein chains.
- Sequence: by default the full sequence the file states (SEQRES / ``_entity_poly_seq``) with the
  observed residues aligned onto it (gemmi's ``label_seq``); residues that were never modelled,
  or have no Cα atom, keep their letter and get ``coord_mask=False``.  Files without a stated
  sequence (or whose statement disagrees with the model) use the modelled residues
  (``meta["sequence_source"]`` says which).  ``meta["residue_ids"]`` gives each position's author
  residue number (with insertion code), None for unmodelled positions.
- Alternate locations: for each residue the conformer (microheterogeneity) and the Cα altloc with
  the highest occupancy win; ties keep the first in the file.
- Modified residues map to their parent (:mod:`sepit.structure.residues`), unknown ones to X.
- AlphaFold DB models (``_ma_*`` ModelCIF categories, ``AF-<acc>-F1`` names, ALPHAFOLD titles)
  get ``source_format="afdb"`` and per-residue pLDDT from the Cα B-factor.
- NaN or absurd coordinates reject the chain (:class:`~sepit.structure.record.RecordError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gemmi
import numpy as np

from sepit.structure import accessions as acc
from sepit.structure.record import ProteinRecord, RecordError
from sepit.structure.residues import protein_letter, is_protein_residue_name
from sepit.structure.result import ParseResult, Reject

_PEPTIDE = {gemmi.PolymerType.PeptideL, gemmi.PolymerType.PeptideD}
_NUCLEIC = {
    gemmi.PolymerType.Dna: "DNA", gemmi.PolymerType.Rna: "RNA", gemmi.PolymerType.DnaRnaHybrid: "DNA/RNA hybrid",
}


@dataclass(frozen=True)
class ChainOptions:
    chain: Optional[str] = None
    """Keep only this chain id (auth chain name); None = follow ``chain_policy``."""
    chain_policy: str = "all"
    """all: one record per protein chain; first: only the first protein chain."""
    sequence_source: str = "seqres"
    """seqres: the file's stated full sequence when it aligns with the model; model: modelled residues only."""
    max_residues: int = 100_000
    """Chains longer than this are rejected as absurd (the store keeps full length; models truncate at batching)."""


def _ca_atom(res: gemmi.Residue) -> Optional[gemmi.Atom]:
    """The Cα with the highest occupancy among its altlocs (first one on ties), or None."""
    best = None
    for atom in res:
        if atom.name == "CA" and (best is None or atom.occ > best.occ):
            best = atom
    return best


def _occupancy(res: gemmi.Residue) -> float:
    ca = _ca_atom(res)
    if ca is not None:
        return ca.occ
    return max((a.occ for a in res), default=0.0)


def _best_conformer(group: list[gemmi.Residue]) -> gemmi.Residue:
    """Microheterogeneity (two residue names at one position): the most occupied one wins."""
    best = group[0]
    for res in group[1:]:
        if _occupancy(res) > _occupancy(best):
            best = res
    return best


def _residue_id(res: gemmi.Residue) -> str:
    return f"{res.seqid.num}{res.seqid.icode.strip()}"


def _group_by_position(polymer: gemmi.ResidueSpan) -> list[list[gemmi.Residue]]:
    """Consecutive residues sharing a sequence id are alternatives for one position."""
    groups: list[list[gemmi.Residue]] = []
    for res in polymer:
        if groups and groups[-1][0].seqid == res.seqid:
            groups[-1].append(res)
        else:
            groups.append([res])
    return groups


def _seqres_positions(
    entity: Optional[gemmi.Entity], groups: list[list[gemmi.Residue]]
) -> tuple[Optional[list[tuple[str, Optional[list[gemmi.Residue]]]]], str]:
    """[(stated residue name, observed alternatives or None)] along the stated sequence, or None + why not."""
    full = list(entity.full_sequence) if entity is not None else []
    if not full:
        return None, "no stated sequence (SEQRES/_entity_poly_seq) in the file"
    observed: dict[int, list[gemmi.Residue]] = {}
    for group in groups:
        label = group[0].label_seq
        if label is None or not 1 <= label <= len(full):
            return None, f"residue {_residue_id(group[0])} could not be aligned to the stated sequence"
        if label in observed:
            return None, f"two modelled residues align to stated position {label}"
        allowed = full[label - 1].split(",")
        if not any(r.name in allowed for r in group):  # microheterogeneity: one alternative is stated
            return None, f"residue {group[0].name} {_residue_id(group[0])} differs from the stated {full[label - 1]}"
        observed[label] = group
    return [(gemmi.Entity.first_mon(item), observed.get(i + 1)) for i, item in enumerate(full)], ""


def _chain_record(
    chain_name: str,
    polymer: gemmi.ResidueSpan,
    entity: Optional[gemmi.Entity],
    modified: dict[str, str],
    is_afdb: bool,
    options: ChainOptions,
    base: dict,
) -> ProteinRecord:
    groups = _group_by_position(polymer)
    positions, why_not = (None, "sequence_source=model")
    if options.sequence_source == "seqres":
        positions, why_not = _seqres_positions(entity, groups)
    meta = dict(base["meta"])
    if positions is None:
        positions = [(g[0].name, g) for g in groups]
        meta["sequence_source"] = "model"
        meta["sequence_note"] = why_not
    else:
        meta["sequence_source"] = "seqres"
    letters, coords, mask, plddt, residue_ids = [], [], [], [], []
    for stated_name, group in positions:
        res = _best_conformer(group) if group else None
        letter = protein_letter(res.name if res is not None else stated_name, modified)
        if letter is None:
            continue  # capping group or other non-residue component listed in the polymer
        ca = _ca_atom(res) if res is not None else None
        letters.append(letter)
        residue_ids.append(_residue_id(res) if res is not None else None)
        if ca is None:
            coords.append((0.0, 0.0, 0.0))
            mask.append(False)
            plddt.append(np.nan)
        else:
            coords.append((ca.pos.x, ca.pos.y, ca.pos.z))
            mask.append(True)
            plddt.append(ca.b_iso)
    n = len(letters)
    if n == 0:
        raise RecordError("chain has no amino-acid residues")
    if n > options.max_residues:
        raise RecordError(f"{n} residues exceeds max_residues={options.max_residues} (absurd size)")
    mask_arr = np.asarray(mask, bool)
    if not mask_arr.any():
        raise RecordError(f"no Cα coordinates in the chain ({n} residues, none with a CA atom)")
    meta["residue_ids"] = residue_ids
    meta["n_observed"] = int(mask_arr.sum())
    plddt_arr = None
    if is_afdb:
        plddt_arr = np.asarray(plddt, np.float32)
        meta["mean_plddt"] = round(float(np.nanmean(plddt_arr)), 2)
    accessions = base["chain_accessions"].get(chain_name) or base["entity_accessions"].get(entity.name if entity else "", [])
    if base["afdb_accession"]:
        accessions = [base["afdb_accession"]]
    if len(set(accessions)) > 1:
        meta["uniprot"] = sorted(set(accessions))
    return ProteinRecord(
        id=f"{base['entry']}:{chain_name}",
        sequence="".join(letters),
        coords=np.asarray(coords, np.float64),
        coord_mask=mask_arr,
        plddt=plddt_arr,
        accession=acc.single_accession(accessions),
        chain=chain_name,
        source=base["source"],
        source_format="afdb" if is_afdb else base["fmt"],
        checksum=base["checksum"],
        meta=meta,
    )


def _is_afdb(text: str, block: Optional[gemmi.cif.Block], entry: str) -> bool:
    if acc.AFDB_ENTRY.search(entry):
        return True
    if block is not None:
        return any(block.find_mmcif_category(c) for c in ("_ma_qa_metric_local.", "_ma_target_ref_db_details."))
    head = "\n".join(ln for ln in text[:8000].splitlines() if ln.startswith(("TITLE", "REMARK", "HEADER")))
    return "ALPHAFOLD" in head.upper()


def _protein_chains(model: gemmi.Model, source: str, rejects: list[Reject]) -> list[tuple[str, gemmi.ResidueSpan]]:
    """Protein polymer chains of ``model`` in file order; nucleic/other polymers become rejects."""
    out, seen = [], set()
    for chain in model:
        polymer = chain.get_polymer()
        if len(polymer) == 0:
            continue  # only ligands / waters under this chain id
        if chain.name in seen:
            rejects.append(Reject(source, chain.name, "chain id occurs twice in the first model; second copy skipped", "chain"))
            continue
        seen.add(chain.name)
        ptype = polymer.check_polymer_type()
        if ptype in _NUCLEIC:
            rejects.append(Reject(source, chain.name, f"nucleic-acid chain ({_NUCLEIC[ptype]}) skipped: not a protein", "chain"))
        elif ptype in _PEPTIDE or sum(is_protein_residue_name(r.name) for r in polymer) * 2 > len(polymer):
            out.append((chain.name, polymer))
        else:
            rejects.append(Reject(source, chain.name, f"polymer chain of type {ptype.name} skipped: not a protein", "chain"))
    return out


def pdb_truncation_reason(text: str) -> Optional[str]:
    """Why PDB text looks cut short, or None.  wwPDB files end with END and close every MODEL;
    a cut inside a coordinate record leaves it shorter than its 54 coordinate columns.
    (Headerless files without END cannot be checked beyond the last record.)"""
    lines = [ln.rstrip("\r\n") for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1]
    if last.startswith(("ATOM  ", "HETATM")) and len(last.rstrip()) < 54:
        return f"truncated: the last coordinate record is cut short ({len(last.rstrip())} of 54+ columns)"
    records = {ln[:6].rstrip() for ln in lines}
    if "HEADER" in records and "END" not in records:
        return "truncated: the file has a HEADER record but no END record"
    n_model = sum(ln.startswith("MODEL ") for ln in lines)
    n_endmdl = sum(ln.startswith("ENDMDL") for ln in lines)
    if n_model and n_model != n_endmdl:
        return f"truncated: {n_model} MODEL records but {n_endmdl} ENDMDL"
    return None


def _read(text: str, fmt: str) -> tuple[gemmi.Structure, Optional[gemmi.cif.Block]]:
    if fmt == "pdb":
        return gemmi.read_pdb_string(text), None
    doc = gemmi.cif.read_string(text)
    if len(doc) == 0:
        raise ValueError("no data block")
    block = doc[0]
    return gemmi.make_structure_from_block(block), block


def records_from_structure_text(
    text: str, fmt: str, entry: str, source: str, checksum: str = "", options: ChainOptions = ChainOptions()
) -> ParseResult:
    """Records (and rejects) from PDB (``fmt="pdb"``) or mmCIF (``fmt="mmcif"``) text."""
    result = ParseResult(source_format=fmt)
    label = "PDB" if fmt == "pdb" else "mmCIF"
    truncated = pdb_truncation_reason(text) if fmt == "pdb" else None
    if truncated:
        result.rejects.append(Reject(source, None, truncated, "parse"))
        return result
    try:
        st, block = _read(text, fmt)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.replace("string:", "line ", 1) if first.startswith("string:") else first
        result.rejects.append(Reject(source, None, f"malformed {label}: {first}", "parse"))
        return result
    if len(st) == 0 or not any(len(ch) for ch in st[0]):
        result.rejects.append(Reject(source, None, f"no atoms: the {label} text has no ATOM/HETATM records", "parse"))
        return result
    try:
        st.setup_entities()
        st.assign_label_seq_id(False)
    except (RuntimeError, ValueError) as exc:
        result.rejects.append(Reject(source, None, f"inconsistent {label} entities: {exc}", "parse"))
        return result
    is_afdb = _is_afdb(text, block, entry)
    if is_afdb:
        result.source_format = "afdb"
        m = acc.AFDB_ENTRY.search(entry) or acc.AFDB_ENTRY.search(st.name)
        entry = m.group(0) if m else entry
    chain_accs, entity_accs = ({}, {})
    if block is not None:
        chain_accs, entity_accs = acc.mmcif_uniprot_accessions(block)
    else:
        chain_accs = acc.pdb_dbref_accessions(text)
    afdb_accession = None
    if is_afdb:
        afdb_accession = (acc.mmcif_afdb_accession(block) if block is not None else None) or acc.afdb_accession(entry)
    info = dict(st.info)
    meta = {"entry_id": info.get("_entry.id") or st.name or entry, "n_models": len(st)}
    if info.get("_struct.title"):
        meta["title"] = info["_struct.title"]
    if info.get("_exptl.method"):
        meta["method"] = info["_exptl.method"]
    if st.resolution > 0:
        meta["resolution"] = round(float(st.resolution), 3)
    base = {
        "entry": entry, "source": source, "fmt": fmt, "checksum": checksum, "meta": meta,
        "chain_accessions": chain_accs, "entity_accessions": entity_accs, "afdb_accession": afdb_accession,
    }
    modified = {m.mod_id: m.parent_comp_id for m in st.mod_residues}
    chains = _protein_chains(st[0], source, result.rejects)
    if options.chain is not None:
        wanted = [(name, pol) for name, pol in chains if name == options.chain]
        if not wanted:
            names = ", ".join(name for name, _ in chains) or "none"
            result.rejects = [r for r in result.rejects if r.chain == options.chain]
            if not result.rejects:
                result.rejects.append(Reject(source, options.chain, f"chain {options.chain} not found; protein chains: {names}", "chain"))
            return result
        chains, result.rejects = wanted, []
    elif options.chain_policy == "first":
        chains = chains[:1]
    if not chains and not result.rejects:
        result.rejects.append(Reject(source, None, "no polymer chains: only ligands and/or waters", "chain"))
    for name, polymer in chains:
        try:
            rec = _chain_record(name, polymer, st.get_entity_of(polymer), modified, is_afdb, options, base)
        except RecordError as exc:
            reason = str(exc)
            prefix = f"{entry}:{name}: "  # ProteinRecord.validate names the record; the reject already does
            result.rejects.append(Reject(source, name, reason[len(prefix):] if reason.startswith(prefix) else reason, "validate"))
            continue
        result.records.append(rec)
    return result

