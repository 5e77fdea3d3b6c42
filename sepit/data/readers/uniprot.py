"""UniProtKB entries (flat text and XML) -> :class:`ProteinAnnotation`.

Fields taken per category: CC FUNCTION (function), CC SUBCELLULAR LOCATION (location),
CC SIMILARITY "Belongs to ..." (family), FT DOMAIN/REPEAT/ZN_FING/MOTIF (domains and motifs),
KW (keywords), DR GO (GO terms), DE EC= (EC numbers), CC CATALYTIC ACTIVITY (reactions).
Both the current flat-file layout (``FT   DOMAIN  13..82`` + ``/note=``) and the pre-2019 one
(``FT   DOMAIN  165  193  Leucine-zipper.``) are read.  Evidence tags ``{ECO:...}`` are dropped.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional

from sepit.data.annotations import AnnotationFormatError, GOTerm, ProteinAnnotation, clean_text, unique
from sepit.data.readers.text_io import numbered_lines, read_text, report

SOURCE = "uniprot"
FEATURE_TYPES = {"DOMAIN", "REPEAT", "ZN_FING", "MOTIF"}
XML_FEATURE_TYPES = {"domain", "repeat", "zinc finger region", "short sequence motif"}
_EC = re.compile(r"\bEC[= ](\d+\.[\d-]+\.[\d-]+\.n?[\d-]+)")
_LINE_CODE = re.compile(r"^([A-Z]{2})(   |$)")
_SQ_LEN = re.compile(r"^SQ\s+SEQUENCE\s+(\d+)\s+AA;")
_NEW_FT = re.compile(r"^FT   (\S+)\s+(\S+)\s*$")  # FT   DOMAIN          13..82
_OLD_FT = re.compile(r"^FT   (\S+)\s+(\S+)\s+(\S+)(?:\s+(.*))?$")  # FT   DOMAIN  165  193  Leucine-zipper.
_QUALIFIER = re.compile(r"\s*\((?:Potential|Probable|By similarity)\)")
_NS = "{http://uniprot.org/uniprot}"


# --------------------------------------------------------------------------- shared helpers
def location_labels(text: Optional[str]) -> list[str]:
    """``"Cell membrane; Multi-pass membrane protein. Nucleus. Note=..."`` -> labels.

    Each sentence names one location, optionally followed by ``; topology``; the location is
    the part before the first ``;`` (and before a comma-qualified sub-location's first comma
    we keep the whole string: ``Cytoplasm, cytosol`` is a distinct, valid label).
    """
    if not text:
        return []
    text = text.split("Note=")[0]
    text = re.sub(r"\[[^\]]*\]:", "", text)  # isoform prefixes "[Isoform 2]:"
    labels = []
    for sentence in re.split(r"\.\s+|\.$", text):
        loc = _QUALIFIER.sub("", sentence.split(";")[0]).strip().strip(".")
        if loc and len(loc) < 80:
            labels.append(loc)
    return unique(labels)


def family_sentence(similarity_texts: list[str]) -> Optional[str]:
    """The ``Belongs to ...`` sentence(s) of the SIMILARITY comments, if any."""
    parts = [t for t in similarity_texts if t.startswith("Belongs to")]
    return " ".join(parts) if parts else None


def similarity_domains(similarity_texts: list[str]) -> list[str]:
    """Old entries list domains as ``Contains 1 bZIP domain.`` similarity sentences."""
    out = []
    for t in similarity_texts:
        m = re.match(r"Contains (?:\d+ )?(.+?)\.?$", t)
        if m:
            out.append(m.group(1))
    return out


# --------------------------------------------------------------------------- flat file
def _split_entries(path: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """Yield ``(first line number, [(line number, line), ...])`` per entry (ID ... //)."""
    entry: list[tuple[int, str]] = []
    for no, line in numbered_lines(path):
        if not line.strip() and not entry:
            continue
        entry.append((no, line))
        if line.startswith("//"):
            yield entry[0][0], entry
            entry = []
    if entry:
        yield entry[0][0], entry  # unterminated: the parser reports it


def _cc_topics(lines: list[tuple[int, str]]) -> list[tuple[str, str]]:
    topics: list[tuple[str, list[str]]] = []
    for _no, line in lines:
        body = line[5:]
        if body.startswith("-----") or body.startswith("Copyrighted") or body.startswith("Distributed"):
            continue
        if body.startswith("-!- "):
            topic, _, rest = body[4:].partition(":")
            topics.append((topic.strip(), [rest.strip()]))
        elif topics:
            topics[-1][1].append(body.strip())
    return [(t, join_wrapped(parts)) for t, parts in topics]


def join_wrapped(parts: list[str]) -> str:
    """Join wrapped lines; a line ending in a hyphen continues the same word ("non-covalently")."""
    text = ""
    for part in parts:
        if not part:
            continue
        text = f"{text}{part}" if text.endswith("-") or not text else f"{text} {part}"
    return text.strip()


def _features(path: str, lines: list[tuple[int, str]]) -> list[str]:
    """Domain/repeat/zinc-finger/motif features as ``"name (start-end)"``."""
    out: list[str] = []
    current: Optional[dict] = None

    def flush() -> None:
        if current and current["type"] in FEATURE_TYPES and current["note"].strip():
            start, end = current["start"], current["end"]
            span = start if end in (None, start) else f"{start}-{end}"
            note = clean_text(current["note"]).rstrip(".")
            out.append(f"{note} ({span})" if span else note)

    for no, line in lines:
        if line.startswith("FT" + " " * 19):  # continuation / qualifier line (both layouts)
            if current is None:
                raise AnnotationFormatError(path, no, "FT continuation line before any feature")
            text = line[2:].strip()
            if current["new"]:
                if text.startswith('/note="'):
                    current["note"] = text[len('/note="'):]
                    current["in_note"] = not (text.endswith('"') and len(text) > len('/note="'))
                elif current["in_note"]:
                    current["note"] += " " + text
                    current["in_note"] = not text.endswith('"')
                current["note"] = current["note"].rstrip('"') if not current["in_note"] else current["note"]
            elif not text.startswith("/"):  # old layout: description continues; /FTId= is not text
                current["note"] += " " + text
            continue
        flush()
        m = _NEW_FT.match(line)
        if m:
            start, _, end = m.group(2).rpartition(":")[2].partition("..")
            current = {"type": m.group(1), "start": start.strip("<>?"), "end": end.strip("<>?") or None,
                       "note": "", "new": True, "in_note": False}
            continue
        m = _OLD_FT.match(line)
        if m:
            current = {"type": m.group(1), "start": m.group(2).strip("<>?"), "end": m.group(3).strip("<>?"),
                       "note": (m.group(4) or "").strip(), "new": False, "in_note": False}
            continue
        raise AnnotationFormatError(path, no, f"cannot parse feature line {line[:60]!r}")
    flush()
    return out


def _parse_flat_entry(path: str, lines: list[tuple[int, str]], index: int) -> ProteinAnnotation:
    first = lines[0][0]
    if not lines[0][1].startswith("ID   "):
        raise AnnotationFormatError(path, first, f"entry {index} does not start with an ID line: {lines[0][1][:60]!r}")
    if not lines[-1][1].startswith("//"):
        raise AnnotationFormatError(path, lines[-1][0], f"entry {index} is not terminated by '//'")
    by_code: dict[str, list[tuple[int, str]]] = {}
    seq_parts: list[str] = []
    in_seq = False
    sq_line: Optional[tuple[int, str]] = None
    for no, line in lines[:-1]:
        if in_seq:
            if not line.startswith("     "):
                raise AnnotationFormatError(path, no, f"expected a sequence line after SQ, got {line[:40]!r}")
            seq_parts.append(line.replace(" ", ""))
            continue
        m = _LINE_CODE.match(line)
        if not m:
            raise AnnotationFormatError(path, no, f"not a UniProt flat-file line (no two-letter code): {line[:60]!r}")
        if m.group(1) == "SQ":
            in_seq, sq_line = True, (no, line)
            continue
        by_code.setdefault(m.group(1), []).append((no, line))

    entry_name = lines[0][1].split()[1] if len(lines[0][1].split()) > 1 else None
    accessions = [a.strip() for _no, l in by_code.get("AC", []) for a in l[5:].split(";") if a.strip()]
    if not accessions:
        raise AnnotationFormatError(path, first, f"entry {index} ({entry_name}) has no AC line")
    locator = f"entry {index} ({accessions[0]})"
    if sq_line is None:
        raise AnnotationFormatError(path, locator, "no SQ (sequence) block")
    sequence = "".join(seq_parts).upper()
    m = _SQ_LEN.match(sq_line[1])
    if not m:
        raise AnnotationFormatError(path, sq_line[0], f"malformed SQ line {sq_line[1][:60]!r}")
    if int(m.group(1)) != len(sequence):
        raise AnnotationFormatError(
            path, sq_line[0], f"{accessions[0]}: sequence has {len(sequence)} residues but SQ says {m.group(1)}"
        )

    de = " ".join(l[5:].strip() for _no, l in by_code.get("DE", []))
    name_m = re.search(r"RecName: Full=([^;{]+)", de) or re.search(r"SubName: Full=([^;{]+)", de)
    name = name_m.group(1).strip() if name_m else (clean_text(de.split(" (")[0].rstrip(".")) if de else None)
    cc = _cc_topics(by_code.get("CC", []))
    texts = lambda topic: [clean_text(t) for k, t in cc if k == topic and clean_text(t)]  # noqa: E731
    similarity = texts("SIMILARITY")
    location_text = " ".join(texts("SUBCELLULAR LOCATION")) or None
    catalytic = []
    ec = _EC.findall(de)
    for t in texts("CATALYTIC ACTIVITY"):
        reaction = re.search(r"Reaction=(.+?);\s*(?:Xref=|EC=|Evidence=|$)", t + ";")
        catalytic.append(reaction.group(1).strip() if reaction else t.rstrip("."))
        ec += _EC.findall(t)
    go = []
    for no, l in by_code.get("DR", []):
        if l[5:].startswith("GO;"):
            parts = [p.strip() for p in l[5:].split(";")]
            if len(parts) < 3 or ":" not in parts[2]:
                raise AnnotationFormatError(path, no, f"malformed GO cross-reference {l[:70]!r}")
            aspect, _, term = parts[2].partition(":")
            go.append(GOTerm(parts[1], aspect, term))
    keywords = " ".join(l[5:].strip() for _no, l in by_code.get("KW", []))
    os_text = " ".join(l[5:].strip() for _no, l in by_code.get("OS", []))
    return ProteinAnnotation(
        source=SOURCE, source_file=path, record=locator, accession=accessions[0], sequence=sequence,
        name=clean_text(name), organism=clean_text(os_text.rstrip(".")) if os_text else None,
        function=" ".join(texts("FUNCTION")) or None,
        locations=location_labels(location_text), location_text=location_text,
        family=family_sentence(similarity),
        domains_motifs=unique(_features(path, by_code.get("FT", [])) + similarity_domains(similarity)),
        keywords=unique(clean_text(k.rstrip(".")) for k in keywords.split(";")),
        go=go, ec=unique(ec), catalytic_activity=unique(catalytic),
    )


def read_uniprot_text(path: str | Path, errors: Optional[list] = None) -> Iterator[ProteinAnnotation]:
    """UniProtKB flat file (one or many entries) -> one annotation per entry."""
    path = str(path)
    n = 0
    for index, (_first, lines) in enumerate(_split_entries(path), start=1):
        n += 1
        try:
            yield _parse_flat_entry(path, lines, index)
        except AnnotationFormatError as exc:
            if exc.line is not None and isinstance(exc.line, int):
                exc = AnnotationFormatError(path, f"entry {index}", f"line {exc.line}: {exc.reason}")
            report(errors, exc)
    if n == 0:
        report(errors, AnnotationFormatError(path, None, "no UniProt entries found (expected 'ID   ' lines)"))


# --------------------------------------------------------------------------- XML
def _t(elem: Optional[ET.Element]) -> Optional[str]:
    return clean_text(elem.text) if elem is not None and elem.text else None


def _parse_xml_entry(path: str, entry: ET.Element, index: int) -> ProteinAnnotation:
    accession = _t(entry.find(f"{_NS}accession"))
    if not accession:
        raise AnnotationFormatError(path, f"entry {index}", "entry has no <accession>")
    locator = f"entry {index} ({accession})"
    seq_el = entry.find(f"{_NS}sequence")
    if seq_el is None or not (seq_el.text or "").strip():
        raise AnnotationFormatError(path, locator, "entry has no <sequence> text")
    sequence = re.sub(r"\s+", "", seq_el.text).upper()
    declared = seq_el.get("length")
    if declared is not None and declared.isdigit() and int(declared) != len(sequence):
        raise AnnotationFormatError(path, locator, f"sequence has {len(sequence)} residues but length={declared}")
    protein = entry.find(f"{_NS}protein")
    name = None
    ec: list[str] = []
    if protein is not None:
        for tag in ("recommendedName", "submittedName"):
            el = protein.find(f"{_NS}{tag}/{_NS}fullName")
            if el is not None:
                name = _t(el)
                break
        ec = [e.text.strip() for e in protein.iter(f"{_NS}ecNumber") if e.text]
    comments = entry.findall(f"{_NS}comment")
    texts = lambda kind: [t for c in comments if c.get("type") == kind  # noqa: E731
                          for t in [_t(c.find(f"{_NS}text"))] if t]
    locations: list[str] = []
    loc_sentences: list[str] = []
    for c in comments:
        if c.get("type") != "subcellular location":
            continue
        for sl in c.findall(f"{_NS}subcellularLocation"):
            locs = [t for t in (_t(l) for l in sl.findall(f"{_NS}location")) if t]
            topo = [t for t in (_t(l) for l in sl.findall(f"{_NS}topology")) if t]
            if locs:
                locations.append(", ".join(locs))
                loc_sentences.append("; ".join([", ".join(locs)] + topo) + ".")
    catalytic = []
    for c in comments:
        if c.get("type") == "catalytic activity":
            reaction = c.find(f"{_NS}reaction")
            text = _t(reaction.find(f"{_NS}text")) if reaction is not None else _t(c.find(f"{_NS}text"))
            if text:
                catalytic.append(text.rstrip("."))
            if reaction is not None:
                ec += [d.get("id") for d in reaction.findall(f"{_NS}dbReference") if d.get("type") == "EC"]
    features = []
    for f in entry.findall(f"{_NS}feature"):
        if f.get("type") not in XML_FEATURE_TYPES or not f.get("description"):
            continue
        begin = f.find(f"{_NS}location/{_NS}begin")
        end = f.find(f"{_NS}location/{_NS}end")
        pos = f.find(f"{_NS}location/{_NS}position")
        if begin is not None and end is not None:
            span = f"{begin.get('position')}-{end.get('position')}"
        else:
            span = pos.get("position") if pos is not None else None
        label = clean_text(f.get("description"))
        features.append(f"{label} ({span})" if span and "None" not in span else label)
    go = []
    for ref in entry.findall(f"{_NS}dbReference"):
        if ref.get("type") == "GO":
            term = next((p.get("value") for p in ref.findall(f"{_NS}property") if p.get("type") == "term"), None)
            if not term or ":" not in term:
                raise AnnotationFormatError(path, locator, f"GO reference {ref.get('id')} has no 'term' property")
            aspect, _, name_ = term.partition(":")
            go.append(GOTerm(ref.get("id"), aspect, name_))
    organism = entry.find(f"{_NS}organism/{_NS}name[@type='scientific']")
    similarity = texts("similarity")
    return ProteinAnnotation(
        source=SOURCE, source_file=path, record=locator, accession=accession, sequence=sequence,
        name=name, organism=_t(organism), function=" ".join(texts("function")) or None,
        locations=unique(locations), location_text=" ".join(loc_sentences) or None,
        family=family_sentence(similarity),
        domains_motifs=unique(features + similarity_domains(similarity)),
        keywords=unique(_t(k) for k in entry.findall(f"{_NS}keyword")),
        go=go, ec=unique(ec), catalytic_activity=unique(catalytic),
    )


def read_uniprot_xml(path: str | Path, errors: Optional[list] = None) -> Iterator[ProteinAnnotation]:
    """UniProtKB XML (``<uniprot><entry>...``) -> one annotation per entry."""
    path = str(path)
    try:
        root = ET.fromstring(read_text(path))
    except ET.ParseError as exc:
        report(errors, AnnotationFormatError(path, exc.position[0], f"not well-formed XML: {exc}"))
        return
    if root.tag != f"{_NS}uniprot":
        report(errors, AnnotationFormatError(path, None, f"root element is {root.tag!r}, expected UniProt's <uniprot>"))
        return
    entries = root.findall(f"{_NS}entry")
    if not entries:
        report(errors, AnnotationFormatError(path, None, "no <entry> elements"))
    for index, entry in enumerate(entries, start=1):
        try:
            yield _parse_xml_entry(path, entry, index)
        except AnnotationFormatError as exc:
            report(errors, exc)
