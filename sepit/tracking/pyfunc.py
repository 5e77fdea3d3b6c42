"""The ``mlflow.pyfunc`` face of an exported sepit folder, so ``mlflow.pyfunc.load_model`` (and
``mlflow models serve``) can use a registered stage without knowing sepit's classes.

The MLflow Model holds the self-contained export folder unchanged as the artifact
:data:`FOLDER_ARTIFACT`; :class:`SepitPyfuncModel` loads it by its ``config.json``:

* a SEPIT model (stages 1 and 2, ``model_type == "sepit"``): input rows ``question`` and
  ``sequence`` (one-letter amino acids), output column ``answer`` (greedy generation;
  ``params={"max_new_tokens": N}``);
* a protein encoder (stage 0, ``model_type == "sepit_protein_encoder"``): input ``sequence``,
  output ``embedding`` (mean of the residue states of the last layer, ``hidden_size`` floats).
"""

from __future__ import annotations

import json
from pathlib import Path
import mlflow.pyfunc

from sepit.tracking.models import FOLDER_ARTIFACT

SEPIT_LM = "sepit"
PROTEIN_ENCODER = "sepit_protein_encoder"
DEFAULT_MAX_NEW_TOKENS = 64


def model_type(folder: str | Path) -> str | None:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError:
        return None


def signature_for(folder: str | Path):
    """The MLflow signature of a folder's pyfunc; None for folders it cannot serve (e.g. test toys)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    kind = model_type(folder)
    if kind == SEPIT_LM:
        return ModelSignature(
            inputs=Schema([ColSpec("string", "question"), ColSpec("string", "sequence")]),
            outputs=Schema([ColSpec("string", "answer")]),
            params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]))
    if kind == PROTEIN_ENCODER:
        return ModelSignature(inputs=Schema([ColSpec("string", "sequence")]),
                              outputs=Schema([ColSpec(Array("float"), "embedding")]))
    return None


class SepitPyfuncModel(mlflow.pyfunc.PythonModel):
    """Answers questions about proteins (SEPIT) or embeds proteins (stage-0 encoder); see module doc."""

    def load_context(self, context):
        folder = context.artifacts[FOLDER_ARTIFACT]
        self.kind = model_type(folder)
        if self.kind == SEPIT_LM:
            from sepit.models.sepit_lm import SepitForConditionalGeneration
            from sepit.processing import SepitProcessor

            self.model = SepitForConditionalGeneration.from_pretrained(folder).eval()
            self.processor = SepitProcessor.from_pretrained(folder)
        elif self.kind == PROTEIN_ENCODER:
            from sepit.models.encoder import ProteinEncoder

            self.model = ProteinEncoder.from_pretrained(folder).eval()
        else:
            raise ValueError(f"{folder}: config.json model_type {self.kind!r} is neither {SEPIT_LM!r} nor "
                             f"{PROTEIN_ENCODER!r}; the sepit pyfunc cannot load it")

    # No type hints here: MLflow would read them as the model's schema; the signature is explicit.
    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        frame = pd.DataFrame(model_input)
        missing = [c for c in (("question", "sequence") if self.kind == SEPIT_LM else ("sequence",))
                   if c not in frame.columns]
        if missing:
            raise ValueError(f"sepit pyfunc input lacks column(s) {missing} (got {list(frame.columns)})")
        sequences = [str(s) for s in frame["sequence"]]
        if self.kind == SEPIT_LM:
            max_new = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            from sepit.processing import generate_answers

            answers = generate_answers(self.model, self.processor, [str(q) for q in frame["question"]],
                                       [(s, None, None) for s in sequences], max_new_tokens=max_new)
            return pd.DataFrame({"answer": answers})
        from sepit.models.protein_batch import collate_proteins

        batch = collate_proteins(self.model.alphabet, [(s, None, None) for s in sequences])
        with torch.no_grad():
            hidden = self.model(batch.tokens, compute_logits=False).last_hidden_state  # [B, L, D]
        mask = batch.residue_mask.unsqueeze(-1).float()  # [B, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
        return pd.DataFrame({"embedding": [row.tolist() for row in pooled.float()]})
