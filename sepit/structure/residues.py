"""Residue names (PDB chemical component ids) to one-letter protein codes.

The mapping follows the wwPDB chemical component dictionary as tabulated inside gemmi
(``gemmi.find_tabulated_residue``): standard amino acids map to their letter, modified amino acids
map to their parent (gemmi stores the parent's letter in lower case: MSE -> 'm' -> M, SEP -> S,
TPO -> T, HYP -> P, PCA -> E ...), and ``UNK`` maps to X.  Components gemmi does not know are
resolved through the file's own MODRES / ``_pdbx_struct_mod_residue`` statements when present,
else they become X.  Capping groups and other non-amino-acid components inside a peptide chain
(ACE, NH2, FOR ...) are not residues of the protein sequence and are dropped (``None``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Optional

import gemmi

#: Letter used for a residue we cannot map to a parent amino acid.
UNKNOWN_RESIDUE = "X"


@lru_cache(maxsize=4096)
def _tabulated(name: str) -> tuple[bool, bool, str]:
    """(found, is_amino_acid, one_letter_code as gemmi tabulates it)."""
    info = gemmi.find_tabulated_residue(name)
    if info is None or not info.found():  # gemmi returns a placeholder for names it does not know
        return False, False, " "
    return True, bool(info.is_amino_acid()), info.one_letter_code


def protein_letter(name: str, modified_parents: Mapping[str, str] | None = None) -> Optional[str]:
    """One-letter code of residue ``name`` inside a protein chain, or None to drop it.

    ``modified_parents`` maps a modified residue name to its parent's name as stated by the file
    (MODRES records); it is only consulted for names gemmi's table lacks or cannot map.
    """
    name = name.strip().upper()
    found, is_aa, code = _tabulated(name)
    if found and is_aa and code.strip().isalpha():
        return code.upper()  # lower case = modified residue, upper = its parent
    if modified_parents and name in modified_parents:
        parent = modified_parents[name].strip().upper()
        if parent != name:
            letter = protein_letter(parent)
            if letter is not None:
                return letter
    if found and not is_aa:
        return None  # caps, ions, sugars, waters, nucleotides: not protein residues
    return UNKNOWN_RESIDUE


def is_protein_residue_name(name: str) -> bool:
    """True for names gemmi classifies as amino acids (standard or modified)."""
    found, is_aa, _ = _tabulated(name.strip().upper())
    return found and is_aa
