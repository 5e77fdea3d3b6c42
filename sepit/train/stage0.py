"""Stage 0: structure warm-up of the protein encoder against a frozen text encoder (docs/method.md §2).

    sepit stage0 --preset small --data outputs/dataset --out runs/stage0
    python jobs/stage0.py --config stage0.yaml train.num_workers=2

Trains :class:`~sepit.models.clip.ProteinTextCLIP` (CLIP over the global batch + masked LM +
3D denoising) on the dataset's stage-0 (protein, caption) pairs; backbone at ``train.lr``, new
modules (structure bias, projections, heads) at ``train.lr × new_module_lr_mult``.  Validation
reports the losses and protein↔caption retrieval accuracy over the whole validation split.
Exports the protein encoder folder that stage 1 starts from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

from sepit.config.base import check_range
from sepit.models.clip import CLIPConfig

from .config import TrainConfig
from .launch import run_training
from .lineage import ParentRef
from .stage_common import StageDataConfig, StageInitError, add_stage_arguments, run_cli
from .task import TrainTask, unwrap


@dataclass
class Stage0JobConfig:
    model: CLIPConfig = field(default_factory=CLIPConfig)
    """ProteinTextCLIP: encoder sizes, text encoder folder, projections, MLM / denoising settings."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="stage0", lr=1e-6))
    init_encoder: Optional[str] = None
    """Start the encoder from a ProteinEncoder folder or a local fair-esm ESM-2 ``.pt`` (paper:
    ESM-2 650M); None = random init from ``model.encoder``."""
    new_module_lr_mult: float = 10.0
    """lr multiplier of the new modules over the backbone (docs/method.md: ×10)."""

    def __post_init__(self) -> None:
        check_range(self.new_module_lr_mult, "new_module_lr_mult", lo=0, lo_inclusive=False)


@lru_cache(maxsize=4)
def _text_tokenizer(path: str):
    from transformers import AutoTokenizer

    from sepit.models.text_encoder import resolve_text_encoder_path

    return AutoTokenizer.from_pretrained(str(resolve_text_encoder_path(path or None)), local_files_only=True)


@lru_cache(maxsize=2)
def esm_alphabet(name: str):
    import esm

    return esm.data.Alphabet.from_architecture(name)


def proteins_of(rows: list[dict[str, Any]]) -> list[tuple]:
    """(sequence, coords [n,3] | None, coord_mask [n] | None) per dataset row."""
    from sepit.data.instruction_schema import row_protein

    return [row_protein(r) for r in rows]


def initial_encoder(init: str | None, encoder_cfg: Any):
    """The protein encoder to start from: ``init`` is a saved folder or a fair-esm checkpoint
    file (checked here), none = random init."""
    from sepit.models.encoder import MODEL_TYPE, build_encoder

    path = Path(init) if init else None
    if path is None:
        return build_encoder(encoder_cfg)
    if path.is_dir():
        from .stage_common import check_model_folder

        check_model_folder(path, MODEL_TYPE, "a protein encoder folder (stage-0 export)")
        return build_encoder(encoder_cfg, folder=path)
    if path.is_file():
        return build_encoder(encoder_cfg, esm_checkpoint=path)
    raise StageInitError(f"init_encoder={init}: no such folder or checkpoint file")


class Stage0Task(TrainTask):
    stage = "stage0"
    columns = ["id", "answer", "sequence", "coords", "coord_mask"]

    def __init__(self, cfg: Stage0JobConfig):
        self.model_cfg = cfg.model
        self.init_encoder = cfg.init_encoder
        self.mult = cfg.new_module_lr_mult
        self.max_residues = cfg.train.max_residues

    def build_model(self) -> torch.nn.Module:
        from sepit.models.clip import ProteinTextCLIP

        encoder = initial_encoder(self.init_encoder, self.model_cfg.encoder) if self.init_encoder else None
        return ProteinTextCLIP(self.model_cfg, encoder=encoder)

    def param_groups(self, model, lr):
        return model.param_groups(base_lr=lr, new_module_mult=self.mult)

    def row_length(self, row) -> int:
        return len(row["sequence"])  # the O(L²) structure bias dominates the cost

    def collate(self, rows, *, train):
        from sepit.models.protein_batch import collate_proteins

        protein = collate_proteins(esm_alphabet(self.model_cfg.encoder.alphabet), proteins_of(rows),
                                   max_residues=self.max_residues, truncate=True)
        text = _text_tokenizer(self.model_cfg.text_encoder_path)(
            [r["answer"] for r in rows], padding=True, truncation=True,
            max_length=self.model_cfg.text_max_length, return_tensors="pt")
        n_tok = int(protein.lengths.sum()) + int(text["attention_mask"].sum())
        return {"protein": protein, "text_input_ids": text["input_ids"],
                "text_attention_mask": text["attention_mask"], "num_tokens": n_tok, "num_examples": len(rows)}

    def forward_loss(self, model, batch):
        out = model(protein=batch["protein"], text_input_ids=batch["text_input_ids"],
                    text_attention_mask=batch["text_attention_mask"])
        parts = {"clip_loss": out.clip_loss, "mlm_loss": out.mlm_loss, "denoise_loss": out.denoise_loss,
                 "logit_scale": out.logit_scale}
        return out.loss, {k: float(v.detach().reshape(-1)[0]) for k, v in parts.items()}

    def evaluate(self, model, batches):
        """Losses plus retrieval accuracy over the *whole* validation split (embeddings of clean,
        uncorrupted inputs, gathered from every rank; chance level = 1 / pairs)."""
        import torch.distributed as dist

        from sepit.models.clip import retrieval_accuracy

        module = unwrap(model)
        batches = list(batches)
        metrics = super().evaluate(model, batches)
        prot, text = [], []
        for b in batches:
            prot.append(module.embed_protein(b["protein"]).float())
            text.append(module.embed_text(b["text_input_ids"], b["text_attention_mask"]).float())
        if not prot:
            return metrics
        p, t = torch.cat(prot), torch.cat(text)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank holds the same number of validation rows (see data.ValidationRows).
            ps, ts = [torch.empty_like(p) for _ in range(dist.get_world_size())], [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(ps, p.contiguous())
            dist.all_gather(ts, t.contiguous())
            p, t = torch.cat(ps), torch.cat(ts)
        for k in (1, 5):
            metrics.update({f"val_{name}": v for name, v in retrieval_accuracy(p, t, k=k).items()})
        metrics["val_retrieval_chance"] = 1.0 / p.shape[0]
        return metrics

    def export(self, model, out_dir: Path) -> None:
        model.export_encoder(out_dir)

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "init_encoder": self.init_encoder or "random", "new_module_lr_mult": self.mult}


def run_stage0(config: Stage0JobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train stage 0; returns ``{output_dir, model_dir, mlflow_run_id, tracking_uri, metrics, checkpoint}``."""
    if parent_run_id:
        config.train.parent_run_id = parent_run_id
    parent = None
    if config.init_encoder:
        init = Path(config.init_encoder)
        if not init.exists():
            raise StageInitError(f"init_encoder={config.init_encoder}: no such folder or checkpoint file")
        parent = ParentRef(path=str(init.resolve()), stage="pretrained-encoder")
    outcome = run_training(Stage0Task(config), config.train, dataset_dir=config.data.dataset_dir,
                           data_stage="stage0", stage_config=config, parent=parent)
    return outcome.as_dict()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, stage=0)


def run(args: argparse.Namespace) -> int:
    return run_cli(args, "stage0", run_stage0)
