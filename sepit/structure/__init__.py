"""sepit.structure: structure and sequence files -> validated protein records; the store.

- :mod:`~sepit.structure.parse`: ``parse_file`` / ``parse_bytes`` / ``parse_structure_text``
  (never raise on bad input) and ``load_records`` (raises :class:`StructureError`).
- :mod:`~sepit.structure.pdbx` (PDB/mmCIF/AlphaFold DB via gemmi), :mod:`~sepit.structure.fasta`,
  :mod:`~sepit.structure.reference_h5` (the reference's ``pdb.h5``).
- :mod:`~sepit.structure.store`: the Parquet protein store reader (pure pyarrow; not loaded here).

No Ray in this package: the distributed job lives in :mod:`sepit.data.preprocess`.
"""

from sepit.structure.parse import ParseOptions, load_records, parse_bytes, parse_file, parse_structure_text
from sepit.structure.record import ProteinRecord, RecordError
from sepit.structure.result import ParseResult, Reject, StructureError

__all__ = [
    "ParseOptions", "ParseResult", "ProteinRecord", "RecordError", "Reject", "StructureError",
    "load_records", "parse_bytes", "parse_file", "parse_structure_text",
]
