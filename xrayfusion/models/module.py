"""FusionClassifier: one LightningModule wrapping any set of branches and one fusion strategy."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from xrayfusion.core.errors import ConfigError
from xrayfusion.core.names import DIVERSITY, FUSED
from xrayfusion.fusion import build_fusion
from xrayfusion.fusion.calibration import view_probs
from xrayfusion.models.backbones import check_input_size, create_backbone, feature_dim, input_stats
from xrayfusion.models.equalize import check_equalize, equalize_images
from xrayfusion.models.metrics import compute_values, metric_collection, metric_input, train_accuracy
from xrayfusion.models.mixup import build_mixer
from xrayfusion.models.tta import DEFAULT_SCALES, PLAIN, View, tta_views


@functools.cache
def _cuda_bf16(index: int | None) -> bool:
    with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def bf16_branch_indices(branches: Sequence[str], bf16_branches: Sequence[str] | str | None) -> list[int]:
    """Positions in `branches` of the names in `bf16_branches` (`all`: every branch; `auto`: none until
    measured, see models/precision.py); ValueError for unknown names or values."""
    if bf16_branches is None or bf16_branches == "auto":
        return []
    if bf16_branches == "all":
        return list(range(len(branches)))
    if isinstance(bf16_branches, str) or not isinstance(bf16_branches, Sequence):
        raise ValueError(
            f"model.bf16_branches={bf16_branches!r} must be a list of branch names, 'all' or 'auto', "
            f"e.g. 'model.bf16_branches=[{branches[0]}]'"
        )
    unknown = [b for b in bf16_branches if b not in branches]
    if unknown:
        raise ValueError(
            f"model.bf16_branches names {unknown}, which are not in model.branches={list(branches)}; "
            "list only branches of this model, e.g. 'model.bf16_branches=[]' or model.bf16_branches=auto (timed)"
        )
    return [i for i, b in enumerate(branches) if b in set(bf16_branches)]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_of(trainer_precision: str | int | None) -> str | None:
    """The autocast a Lightning precision trains in: 'bf16' (bf16-mixed), 'fp16' (16-mixed) or None."""
    text = str(trainer_precision or "")
    if text in ("bf16-mixed", "bf16"):
        return "bf16"
    if text in ("16-mixed", "16"):
        return "fp16"
    return None


def branch_entries(option: str, branches: Sequence[str], mapping: Mapping[str, Any] | None) -> dict[int, Any]:
    """{branch index: value} of a per-branch option (model.branch_sizes, model.trainable_layers): an entry named
    by a branch name applies to every copy of that branch, one named by a branch key (`efficientnet_lite0_2`, the
    second copy) to that copy only, and overrides the name's. ConfigError for an entry naming neither."""
    names, keys = [str(b) for b in branches], branch_keys(list(branches))
    entries = {str(k): v for k, v in (mapping or {}).items()}
    unknown = sorted(set(entries) - set(names) - set(keys))
    if unknown:
        copies = [k for k, n in zip(keys, names, strict=True) if k != n]
        also = f" or branch keys {copies}" if copies else ""
        raise ConfigError(
            f"model.{option} names {unknown}, which are not in model.branches={names}{also}; name only branches of "
            f"this model (to replace an experiment's mapping: model.{option}=null '+model.{option}={{...}}')"
        )
    out = {i: entries[n] for i, n in enumerate(names) if n in entries}
    out.update({i: entries[k] for i, k in enumerate(keys) if k in entries and k not in names})
    return out


def branch_input_sizes(branches: Sequence[str], image_size: int, branch_sizes: Mapping[str, int] | None) -> list[int]:
    """Each branch's input size: its model.branch_sizes entry (by branch name, or by key for one copy of a
    repeated branch), else `image_size` (the size images are decoded at). ConfigError for an entry naming no
    branch or larger than `image_size`."""
    entries = branch_entries("branch_sizes", branches, branch_sizes)
    out = []
    for i, name in enumerate(branches):
        value = entries.get(i, image_size)
        try:
            size = int(value)
        except (TypeError, ValueError):
            size = 0
        if size <= 0:
            raise ConfigError(f"model.branch_sizes.{name}={value!r} must be a positive number of pixels, e.g. 96")
        out.append(size)
    if max(out) > image_size:
        raise ConfigError(
            f"model.branch_sizes asks for {max(out)} px but data.image_size={image_size}: images are decoded "
            f"once, at the largest size; set data.image_size={max(out)}"
        )
    return out


def branch_keys(names: Sequence[str]) -> list[str]:
    """Unique metric/module-safe keys for branch names (dots become underscores, repeats get _2, _3)."""
    keys: list[str] = []
    for name in names:
        key = re.sub(r"[^0-9A-Za-z_]", "_", name)
        candidate, n = key, 1
        while candidate in keys or candidate in (FUSED, DIVERSITY):
            n += 1
            candidate = f"{key}_{n}"
        keys.append(candidate)
    return keys


class FusionClassifier(pl.LightningModule):
    """Branches (backbone + own linear head) trained together on each batch, fused by a strategy.

    Inputs are uint8 (B, C, H, W) images; normalisation happens on the device, per branch: the mean/std of its
    ImageNet weights when `pretrained`, else `mean`/`std`. `load_weights=False` rebuilds a pretrained model
    (normalisation included) without reading weight files, e.g. before loading a checkpoint offline.
    `tta` ('flips', 'scales' with `tta_scales`, 'flips_scales'; models/tta.py) averages the probabilities of
    each image's views in eval mode (validation, test, evaluate, predict and the served model alike; training
    steps never see it). `tta_each_epoch=False` leaves the views out of each training epoch's validation (the
    best-epoch choice and the val/ curves then see the image alone); every pass after training still averages them.
    `equalize` ('hist' or 'clahe', with `clahe_clip_limit` and `clahe_grid`) equalises every input image on the
    device before normalisation (kornia), in every forward: training, validation, test and serving alike.
    `mixup` (model.mixup: mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing) mixes training batches
    and trains on soft targets (timm.data.Mixup); training steps only.
    `fusion_fitted_on` says where a fitted fusion was fitted ('holdout' = the validation split, 'oof_cv<K>');
    `calibrated_on` where the branch temperatures were fitted ('val' with fusion.calibrate=true, else None).
    `branch_sizes` gives a branch its own input size (model.branch_sizes, e.g. {small_cnn: 96}); the others take
    `image_size`. Images arrive at `image_size` (decoded once, at the largest size) and each branch's copy is
    resized on the device (bilinear, antialiased), in training and every inference path alike.
    `data_split` records what made the training's validation split (seed, val_fraction, digest of its names).
    `autocast` ('bf16' or 'fp16', from trainer.precision=bf16-mixed / 16-mixed) runs the whole forward under that
    autocast, wherever the model runs (see `forward`).
    `bf16_branches` names branches whose forward runs under bfloat16 autocast whatever the trainer's precision
    (dense convolutions gain on CPUs with AMX; depthwise ones often lose), so each branch gets its faster precision.
    """

    def __init__(
        self,
        branches: Sequence[str],
        num_classes: int,
        fusion: Mapping[str, Any],
        in_chans: int = 1,
        image_size: int = 64,
        mean: float = 0.5,
        std: float = 0.25,
        class_names: Sequence[str] | None = None,
        class_weights: Sequence[float] | None = None,
        pretrained: bool = False,
        weights_dir: str | None = None,
        load_weights: bool = True,
        drop_rate: float = 0.0,
        threshold: float = 0.5,
        branch_thresholds: Mapping[str, float] | None = None,
        fusion_fitted_on: str | None = None,
        calibrated_on: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        bf16_branches: Sequence[str] = (),
        autocast: str | None = None,
        data_split: Mapping[str, Any] | None = None,
        tta: str = "none",
        tta_scales: Sequence[float] = DEFAULT_SCALES,
        tta_each_epoch: bool = True,
        branch_sizes: Mapping[str, int] | None = None,
        equalize: str = "none",
        clahe_clip_limit: float = 40.0,
        clahe_grid: Sequence[int] = (8, 8),
        mixup: Mapping[str, float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.views = tta_views(tta, tta_scales)  # ConfigError for an unknown mode or bad scales
        check_equalize(equalize, clahe_clip_limit, clahe_grid, image_size)
        self.mixer = build_mixer(mixup, num_classes)  # None: hard labels (no mixing, no label smoothing)
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r} must be one of {list(AUTOCAST_DTYPES)} or None")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: at least two classes are needed")
        self.keys = branch_keys(list(branches))
        self.sizes = branch_input_sizes(branches, image_size, branch_sizes)
        self.bf16_keys = frozenset(self.keys[i] for i in bf16_branch_indices(branches, bf16_branches))
        self.backbones = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.weights_sources: dict[str, str | None] = {}  # where each branch's pretrained weights came from
        stats = []
        for i, (name, key) in enumerate(zip(branches, self.keys, strict=True)):
            backbone = create_backbone(
                name, in_chans, pretrained and load_weights, drop_rate, weights_dir if pretrained else None
            )
            check_input_size(name, backbone, in_chans, self.sizes[i])
            scaled = [v.size(self.sizes[i]) for v in self.views if v.scale != 1.0 and not v.flip]
            if self.sizes[i] in scaled or len(set(scaled)) < len(scaled):
                raise ConfigError(
                    f"model.tta_scales={list(tta_scales)} gives {name} ({self.sizes[i]} px) the inputs {scaled} px, "
                    "which repeat a size (a view counted twice in the mean); use scales further from 1 and apart"
                )
            for size in sorted(set(scaled)):
                try:  # every size a test-time view feeds it
                    check_input_size(name, backbone, in_chans, size)
                except ConfigError as err:
                    raise ConfigError(
                        f"backbone {name!r} cannot take the {size}x{size} px inputs "
                        f"model.tta_scales={list(tta_scales)} makes of its {self.sizes[i]} px input; "
                        "use larger scales or model.tta=none"
                    ) from err
            self.backbones[key] = backbone
            self.heads[key] = nn.Linear(feature_dim(backbone), num_classes)
            self.weights_sources[key] = backbone.weights_source
            stats.append((pretrained and input_stats(backbone, in_chans)) or ([mean] * in_chans, [std] * in_chans))
        dims = [feature_dim(self.backbones[k]) for k in self.keys]
        self.fusion = build_fusion(dict(fusion), len(self.keys), num_classes, dims)
        # per-branch temperature applied to branch logits before softmax (1 = uncalibrated); see calibration.py
        self.register_buffer("temperature", torch.ones(len(self.keys)))
        # (K, C, 1, 1): one row per branch
        self.register_buffer("mean", torch.tensor([m for m, _ in stats]).float()[..., None, None], persistent=False)
        self.register_buffer("std", torch.tensor([s for _, s in stats]).float()[..., None, None], persistent=False)
        self.shared_stats = bool((self.mean == self.mean[0]).all() and (self.std == self.std[0]).all())
        weights = torch.tensor(list(class_weights), dtype=torch.float) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {k: metric_collection(num_classes, f"{stage}/{k}/", threshold) for k in [*self.keys, FUSED]}
                )
                for stage in ("val",)  # test results come from the inference path (evaluation.inference)
            }
        )
        self.train_acc = train_accuracy(num_classes, threshold)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            for backbone in self.backbones.values():
                backbone.compile()  # in place: state_dict keys stay the same

    # ---- forward -------------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor, branch: int = 0) -> torch.Tensor:
        """uint8 or [0, 1] float images to float normalised for branch `branch`, with the backbone's channels."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = self.equalize_input(x)
        x = (x - self.mean[branch]) / self.std[branch]
        if x.shape[1] != self.hparams.in_chans:
            x = x.expand(-1, self.hparams.in_chans, -1, -1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def equalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float images equalised as `equalize` says (none: unchanged); see models/equalize.py."""
        hp = self.hparams
        return equalize_images(
            x, hp.get("equalize", "none"), hp.get("clahe_clip_limit", 40.0), hp.get("clahe_grid", (8, 8))
        )

    def forward(
        self,
        x: torch.Tensor,
        features: Mapping[str, torch.Tensor] | None = None,
        view_features: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Branch logits and probabilities (B, K, C), fused probabilities (B, C) and fused logits or None.

        Runs under the autocast the model was trained in (`autocast`, from trainer.precision=*-mixed), so the
        run's own validation and test passes, evaluate, predict and the served model compute alike.
        `features` are cached pooled features of frozen branches by branch key, used in place of running those
        backbones (model.feature_cache); `view_features` those of the other test-time views (`self.views[1:]`).
        """
        with self._model_autocast(x.device):
            if self.training or len(self.views) == 1:
                return self._forward(x, features)
            return self._forward_tta(x, features, view_features)

    def _forward_tta(
        self,
        x: torch.Tensor,
        features: Mapping[str, torch.Tensor] | None = None,
        view_features: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Test-time augmentation (eval mode only): the mean of the probabilities of the image's views
        (models/tta.py); logits are those of the image itself (what calibration fits), `view_logits` (B, V, K, C)
        every view's."""
        plain = self._forward(x, features)
        outs = [plain]
        for i, view in enumerate(self.views[1:]):
            outs.append(self._forward(view.apply(x), view_features[i] if view_features else None, view))
        mean = {k: torch.stack([o[k] for o in outs]).mean(dim=0) for k in ("probs", "fused_probs")}
        return {**plain, **mean, "view_logits": torch.stack([o["logits"] for o in outs], dim=1)}

    def _model_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        kind = self.hparams.get("autocast")
        if not kind:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[kind])

    def branch_input(
        self, x: torch.Tensor, branch: int, prepared: dict | None = None, view: View = PLAIN
    ) -> torch.Tensor:
        """Branch `branch`'s input: `x` normalised with its statistics and resized to its size (scaled by the
        test-time `view`'s factor), on the device. `prepared` shares the work between branches with the same
        statistics and size within one forward."""
        prepared = {} if prepared is None else prepared
        stats = 0 if self.shared_stats else branch
        size = view.size(self.sizes[branch])
        if (stats, size) not in prepared:
            if (stats, None) not in prepared:
                prepared[(stats, None)] = self.preprocess(x, stats)
            full = prepared[(stats, None)]
            prepared[(stats, size)] = full if tuple(full.shape[-2:]) == (size, size) else self._resize(full, size)
        return prepared[(stats, size)]

    def _resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def branch_features(
        self, x: torch.Tensor, branch: int, prepared: dict | None = None, view: View = PLAIN
    ) -> torch.Tensor:
        """Pooled features of branch `branch` for uint8 images `x` (already flipped for a mirrored `view`; its
        scale is applied here), under the branch's precision."""
        key = self.keys[branch]
        with self._branch_autocast(key, x.device):
            return self.backbones[key](self.branch_input(x, branch, prepared, view))

    def _forward(
        self, x: torch.Tensor, features: Mapping[str, torch.Tensor] | None = None, view: View = PLAIN
    ) -> dict[str, torch.Tensor | None]:
        prepared: dict = {}
        feats, logits = [], []
        for i, key in enumerate(self.keys):
            if features is not None and key in features:  # a frozen branch's cached features (feature_cache.py)
                feat = self._cached(key, features[key])
            else:
                feat = self.branch_features(x, i, prepared, view)
            with self._branch_autocast(key, x.device):
                feats.append(feat)
                logits.append(self.heads[key](feat))
        stacked = torch.stack(logits, dim=1).float()
        with torch.autocast(x.device.type, enabled=False):  # temperatures and fusion in float32 (stacking: float64)
            probs = view_probs(stacked[:, None], self.temperature)[:, 0]  # the one temperature formula
            fused_probs, fused_logits = self.fusion(probs, [f.float() for f in feats])
        return {"logits": stacked, "probs": probs, "fused_probs": fused_probs, "fused_logits": fused_logits}

    def _cached(self, key: str, feat: torch.Tensor) -> torch.Tensor:
        """Cached pooled features as the live frozen backbone would give them: its dropout on the pooled
        features (timm's `drop_rate`) still applies in training."""
        rate = float(getattr(self.backbones[key], "drop_rate", 0.0) or 0.0)
        return F.dropout(feat, p=rate, training=True) if self.training and rate > 0 else feat

    def set_bf16_branches(self, names: Sequence[str] | str) -> None:
        """Run these branches in bfloat16 autocast from now on (saved with the checkpoint's hyperparameters)."""
        branches = list(self.hparams.branches)
        self.bf16_keys = frozenset(self.keys[i] for i in bf16_branch_indices(branches, names))
        self.hparams.bf16_branches = names if isinstance(names, str) else list(names)

    @property
    def bf16_branch_names(self) -> list[str]:
        """The branches (model.branches names) whose forward runs in bfloat16 autocast."""
        return [b for b, k in zip(self.hparams.branches, self.keys, strict=True) if k in self.bf16_keys]

    def _branch_autocast(self, key: str, device: torch.device) -> contextlib.AbstractContextManager:
        """bfloat16 autocast for the branches named in bf16_branches; the trainer's precision for the others."""
        if key not in self.bf16_keys or (device.type == "cuda" and not _cuda_bf16(device.index)):
            return contextlib.nullcontext()  # a GPU without bf16 (e.g. V100, T4) runs the branch in float32
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _loss(self, out: Mapping[str, torch.Tensor | None], y: torch.Tensor) -> torch.Tensor:
        """Sum of branch cross-entropies (plus the fused one for concat); `y` is hard labels (N,) or soft
        targets (N, C) (mixup, label smoothing), which the class weights weight alike."""
        logits = out["logits"]
        n, k, c = logits.shape
        branch_loss = (
            F.cross_entropy(
                logits.reshape(n * k, c), y.repeat_interleave(k, dim=0), weight=self.class_weights, reduction="sum"
            )
            / n
        )
        if out["fused_logits"] is not None:
            weight = float(self.hparams.fusion.get("loss_weight", 1.0))
            branch_loss = branch_loss + weight * self._fused_loss(out["fused_logits"], y)
        return branch_loss

    def _fused_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Class-weighted mean cross-entropy; for soft targets normalised by their total class weight, so a
        one-hot target gives exactly the hard-label loss."""
        if not y.is_floating_point():
            return F.cross_entropy(logits, y, weight=self.class_weights)
        total = (y * self.class_weights).sum() if self.class_weights is not None else y.sum()
        return F.cross_entropy(logits, y, weight=self.class_weights, reduction="sum") / total

    # ---- steps ---------------------------------------------------------------------------------------
    def _unpack(self, batch: Sequence[torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        """(images, labels, cached features, cached features of the other test-time views) of a batch; the
        features come from the datamodule's feature store when its loaders yield (image, label, index) batches
        (model.feature_cache)."""
        if len(batch) == 2:
            return batch[0], batch[1], None, None
        x, y, index = batch
        features, view_features = self.trainer.datamodule.feature_store.lookup(split, index, y.device)
        return x, y, features, view_features

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, features, _ = self._unpack(batch, "train")
        # soft targets (model.mixup; never with cached features, which cannot be mixed: training/run.py refuses it)
        x, target = self.mixer(x, y) if self.mixer is not None else (x, y)
        out = self(x, features)
        loss = self._loss(out, target)
        self.train_acc.update(out["fused_probs"].detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        # no prog_bar: Lightning would .item() the loss every step for the bar (a host sync)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, stage: str, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        x, y, features, view_features = self._unpack(batch, stage)
        if self.hparams.get("tta_each_epoch", True) or len(self.views) == 1:
            out = self(x, features, view_features)
        else:  # model.tta_each_epoch=false: this epoch's validation sees the image alone
            with self._model_autocast(x.device):
                out = self._forward(x, features)
        self.log(f"{stage}/loss", self._loss(out, y), on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        collections = self.metrics[stage]
        for i, key in enumerate(self.keys):
            collections[key].update(metric_input(out["probs"][:, i]), y)
        collections[FUSED].update(metric_input(out["fused_probs"]), y)
        return out

    def _log_collections(self, stage: str) -> None:
        for collection in self.metrics[stage].values():
            self.log_dict(compute_values(collection, int(self.hparams.num_classes)))
            collection.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_collections("val")

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("FusionClassifier was built without an optimizer factory; it can only predict")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        accepted = inspect.signature(self.scheduler_factory).parameters
        steps = int(self.trainer.estimated_stepping_batches)
        extra = {}
        if "total_steps" in accepted:
            extra["total_steps"] = steps
        elif "T_max" in accepted:
            extra["T_max"] = steps
        scheduler = self.scheduler_factory(optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
