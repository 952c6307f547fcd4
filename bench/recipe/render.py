"""Render the XTuner config of the benchmark from the faithful recipe (docs/RECIPE.md).

The template holds the pinned config's math; this module fills in only what must
differ (paths, stop step, seed, precision, device) and lists each change, so the
verdict can say exactly how the run departs from the pinned config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from bench.core.layout import Layout
from bench.core.statuses import Criteria
from bench.core.trainer_files import COMPARED_STEPS, PROFILE_NAME, PROFILED_ITERATIONS
from bench.recipe.config_facts import ConfigFacts
from bench.recipe.levers import Levers
from bench.recipe.memory_model import GPU_MEMORY_CAP_VARIABLE

PRECISIONS = ("nf4", "bf16")
STOCK_PER_DEVICE_BATCH = 32
# The seed's 4 nodes x 8 GPUs x 32: the global batch the criterion is stated for. The
# epoch-based LR schedule and the samples seen in max_steps both follow the global
# batch, so "below 2.3 within 500 steps" means the same training only at this one.
REFERENCE_GLOBAL_BATCH = 1024
# The pinned config logs the metrics every 10 iterations; a shorter run logs at its end.
PINNED_LOG_INTERVAL = 10


@dataclass(frozen=True)
class RecipeOptions:
    """What a user may choose; every field lands in the verdict."""

    max_steps: int = Criteria.max_steps  # the criteria's, written once there
    precision: str = "nf4"
    per_device_batch: int = STOCK_PER_DEVICE_BATCH
    accumulative_counts: int = 1
    seed: int = 42
    device: str = "cuda"  # "cuda" or "cpu"; cpu = fp32 LLM, plain OptimWrapper, gloo
    levers: Levers = Levers()
    tokenized_cache_folder: Path | None = None  # set with levers.tokenized_cache (bench/recipe/levers.py)
    save_checkpoint: bool = False
    eval_image: Path | None = None
    save_projector: bool = False  # the projector's weights before and after, for perf's comparison
    profile: bool = False  # rank 0's kernel time by kind over two steady steps (bench/trainer/step_profile.py)
    gpu_memory_cap_mib: int | None = None  # each rank's allocator capped: a smaller card simulated
    # The math reference on GPUs: stock's recipe with every float in float32 (no fp16,
    # bf16 or TF32), which perf holds the levers' and stock's own rounding against.
    float32_reference: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {self.device!r}")
        for name in ("max_steps", "per_device_batch", "accumulative_counts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.levers.dequantize_nf4 and (self.device, self.precision) != ("cuda", "nf4"):
            raise ValueError("dequantize_nf4 applies to NF4 on GPUs")
        if self.float32_reference and not self.levers.stock:
            raise ValueError("float32_reference is stock's recipe: every lever off")

    @property
    def computes_in_float32(self) -> bool:
        """Every float in float32: the CPU variant, or the float32 reference on GPUs."""
        return self.device == "cpu" or self.float32_reference

    @property
    def max_iters(self) -> int:
        """Micro-iterations XTuner runs: one optimizer step is ``accumulative_counts`` of them."""
        return self.max_steps * self.accumulative_counts


@dataclass(frozen=True)
class RenderedRecipe:
    """The config text handed to XTuner and what the verdict records about it."""

    text: str
    source: str  # "template" or "user"
    deviations: list[str] = field(default_factory=list)
    cfg_options: list[str] = field(default_factory=list)  # train.py --cfg-options, user configs only
    float32: bool = False  # GPUs: DeepSpeed without fp16/bf16 and TF32 off (the float32 reference)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _template() -> Template:
    text = resources.files("bench.recipe.templates").joinpath("llava_pretrain.py.tmpl").read_text()
    return Template(text)


def _deviations(options: RecipeOptions) -> list[str]:
    """Each way the rendered recipe differs from the pinned config, in words."""
    changes = [
        "model and data paths are absolute paths into the mounted layout",
        "xtuner ThroughputHook added (the seed's metrics carry tflops and tokens_per_sec)",
        "llava-bench TokenCountHook added: logs the text and labelled tokens a sample for the FLOP model (it reads "
        "the batch, nothing else)",
        "llava-bench StartupHook added: notes when the runner, DeepSpeed and the first step were ready (the clock)",
        "llava-bench RankTimingHook added: times each rank's forward pass "
        + ("(the clock)" if options.device == "cpu" else "(CUDA events, no synchronisation)"),
        f"fixed random seed {options.seed}",
        f"training stops after {options.max_steps} optimizer steps "
        f"(TrainLoop max_iters={options.max_iters}); the LR schedule still spans the full epoch",
    ]
    if options.max_iters < PINNED_LOG_INTERVAL:
        changes.append(
            f"metrics logged every {options.max_iters} iterations instead of {PINNED_LOG_INTERVAL}, so a run this "
            "short "
            "logs its loss"
        )
    if options.eval_image is None:
        changes.append("EvaluateChatHook off (its default image is a URL, which fails offline)")
    else:
        changes.append(f"EvaluateChatHook uses the local image {options.eval_image}")
    changes.append("checkpoints every 500 steps, 2 kept" if options.save_checkpoint else "no checkpoints saved")
    if options.device == "cpu":
        changes.append("CPU variant: fp32 LLM without quantization, plain OptimWrapper, gloo, no DeepSpeed")
    elif options.precision == "bf16":
        changes.append("LLM weights in bf16 without 4-bit quantization")
    if options.float32_reference and options.device == "cuda":
        changes.append(
            "float32 reference: the LLM "
            + ("in float32 with NF4 compute in float32" if options.precision == "nf4" else "weights in float32")
            + ", DeepSpeed without fp16 or bf16, TF32 off (NVIDIA_TF32_OVERRIDE=0): the same math without "
            "half-precision "
            "rounding, for llava-bench perf's gradient check; not a benchmark run"
        )
    if options.per_device_batch != STOCK_PER_DEVICE_BATCH:
        changes.append(f"per-device batch {options.per_device_batch} instead of 32")
    if options.accumulative_counts != 1:
        changes.append(accumulation_deviation(options.accumulative_counts))
    if options.save_projector:
        changes.append(
            f"the projector's weights saved before training and after step {COMPARED_STEPS}, and its first gradient "
            "(xtuner/projector-*.safetensors)"
        )
    if options.profile:
        changes.append(
            f"torch.profiler on rank 0 over iterations {PROFILED_ITERATIONS[0] + 1}-{PROFILED_ITERATIONS[-1] + 1} "
            f"(xtuner/{PROFILE_NAME}: kernel time by kind; those steps are slower)"
        )
    if options.gpu_memory_cap_mib is not None:
        changes.append(
            f"each rank's GPU memory capped at {options.gpu_memory_cap_mib} MiB to simulate a smaller card "
            f"({GPU_MEMORY_CAP_VARIABLE})"
        )
    changes += options.levers.deviations()
    if options.levers.tokenized_cache:
        changes.append(
            "the dataset tokenized by the appliance (XTuner's tokens, computed in one batch, by prepare, an earlier "
            f"run or this run's preflight: timing.startup.tokenization) in {options.tokenized_cache_folder}; every "
            "rank reads it from there"
        )
    return changes


def render(layout: Layout, options: RecipeOptions, appliance_version: str) -> RenderedRecipe:
    """The appliance's own config for ``layout``."""
    if options.levers.tokenized_cache and options.tokenized_cache_folder is None:
        raise ValueError("the tokenized-cache lever needs tokenized_cache_folder")
    on_cpu = options.device == "cpu"
    model_levers = options.levers.model_kwargs
    half = {"nf4": "torch.float16", "bf16": "torch.bfloat16"}[options.precision]
    llm_dtype = "torch.float32" if options.computes_in_float32 else half
    quantization = "nf4_quantization" if options.precision == "nf4" and not on_cpu else "None"
    evaluate_chat_hook = ""
    if options.eval_image is not None:
        evaluate_chat_hook = (
            "\n    dict(type=EvaluateChatHook, tokenizer=tokenizer,"
            " image_processor=image_processor, every_n_iters=500,"
            " evaluation_inputs=['Please describe this picture'],"
            f" evaluation_images={str(Path(options.eval_image).absolute())!r},"
            " system='', prompt_template=prompt_template),"
        )
    text = _template().substitute(
        appliance_version=appliance_version,
        # xtuner 0.2.0 asks torch.cpu.is_bf16_supported(), which torch lacks; harmless elsewhere.
        compat_shims=("\n__import__('torch').cpu.is_bf16_supported = lambda *args, **kwargs: False\n" if on_cpu else "")
        + (
            f"\n__import__('bench.trainer.memory', fromlist=['x']).cap_gpu_memory({options.gpu_memory_cap_mib})\n"
            if options.gpu_memory_cap_mib is not None
            else ""
        ),
        llm_path=repr(str(layout.llm_dir)),
        clip_path=repr(str(layout.clip_dir)),
        data_path=repr(str(layout.dataset_json)),
        image_folder=repr(str(layout.image_folder)),
        batch_size=options.per_device_batch,
        accumulative_counts=options.accumulative_counts,
        dataloader_num_workers=options.levers.dataloader_workers,
        dataloader_extras="\n    pin_memory=True," if options.levers.pin_memory else "",
        llm_loader="from_pretrained_dequantized"
        if options.levers.dequantize_nf4
        else "AutoModelForCausalLM.from_pretrained",
        lever_imports=(
            (
                "from bench.trainer.dequantize import from_pretrained_dequantized\n"
                if options.levers.dequantize_nf4
                else ""
            )
            + (
                "from bench.trainer.cached_dataset import CachedLLaVADataset\n"
                if options.levers.tokenized_cache
                else ""
            )
            + ("from bench.trainer.levered_llava import LeveredLLaVAModel\n" if model_levers else "")
            + ("from bench.trainer.hooks import ProjectorSnapshotHook\n" if options.save_projector else "")
            + ("from bench.trainer.step_profile import StepProfileHook\n" if options.profile else "")
        ),
        llm_extras="".join(f"\n        {name}={value!r}," for name, value in options.levers.llm_kwargs.items()),
        measurement_hooks=(
            f"\n    dict(type=ProjectorSnapshotHook, compared_iters={COMPARED_STEPS * options.accumulative_counts}),"
            if options.save_projector
            else ""
        )
        + ("\n    dict(type=StepProfileHook)," if options.profile else ""),
        model_type="LeveredLLaVAModel" if model_levers else "LLaVAModel",
        model_extras="".join(f"\n    {name}={value!r}," for name, value in model_levers.items()),
        dataset_type="CachedLLaVADataset" if options.levers.tokenized_cache else "LLaVADataset",
        dataset_extras=(
            f"\n    cache_folder={str(options.tokenized_cache_folder)!r}," if options.levers.tokenized_cache else ""
        ),
        max_iters=options.max_iters,
        log_interval=min(PINNED_LOG_INTERVAL, options.max_iters),
        llm_dtype=llm_dtype,
        quantization=quantization,
        nf4_compute_dtype="torch.float32" if options.float32_reference else "torch.float16",
        optim_wrapper_type="OptimWrapper" if on_cpu else "AmpOptimWrapper",
        amp_options="" if on_cpu else "\n    loss_scale='dynamic',\n    dtype='float16'",
        evaluate_chat_hook=evaluate_chat_hook,
        checkpoint_hook=(
            "dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit)"
            if options.save_checkpoint
            else "None"
        ),
        dist_backend=repr("gloo" if on_cpu else "nccl"),
        seed=options.seed,
    )
    return RenderedRecipe(
        text=text, source="template", deviations=_deviations(options), float32=options.float32_reference and not on_cpu
    )


def accumulation_deviation(accumulative_counts: int) -> str:
    """Accumulation in words, with what it does to the schedule: mmengine steps the LR
    schedule every micro-iteration, and the optimizer steps at the last one of each
    step, so step s uses the LR the reference run (no accumulation) has at step
    s + 1 - 1/k: the same schedule per step, less than one step ahead."""
    k = accumulative_counts
    return (
        f"gradient accumulation over {k} micro-batches a step (the LR schedule moves every micro-iteration: "
        f"step s runs at the reference run's LR of step s + {1 - 1 / k:.4g})"
    )


def global_batch_plan(
    asked: int | None, per_device_batch: int, world_size: int, reference: bool
) -> tuple[int, int, str | None]:
    """(global batch, accumulative_counts, problem): the asked global batch, else the
    reference one where ``reference`` (GPU runs), else one micro-batch a step (a
    functional check); a problem where per-device batch x processes does not divide it."""
    per_micro_step = per_device_batch * world_size
    target = asked if asked is not None else (REFERENCE_GLOBAL_BATCH if reference else per_micro_step)
    if target % per_micro_step == 0:
        return target, target // per_micro_step, None
    workable = [b for b in range(per_device_batch, 0, -1) if target % (b * world_size) == 0][:1]
    what = f"--global-batch {target}" if asked is not None else f"the reference global batch {target}"
    nearest = sorted(
        {max(1, target // per_micro_step) * per_micro_step, (target // per_micro_step + 1) * per_micro_step}
    )
    problem = (
        f"{what} is not a multiple of per-device batch x processes ({per_device_batch} x {world_size} = "
        f"{per_micro_step}); "
        + (
            f"--per-device-batch {' or '.join(map(str, workable))} holds it"
            if workable
            else f"no per-device batch holds it on {world_size} processes"
        )
        + f", or --global-batch {' or '.join(map(str, nearest))} runs "
        + ("that schedule" if asked is not None else "another schedule (the verdict says it is not the reference)")
    )
    return target, 1, problem


def from_user_config(config: Path, options: RecipeOptions, as_written: ConfigFacts) -> RenderedRecipe:
    """A user's config at the layout root, run as written but for what the benchmark
    defines: stop step and seed, and the per-device batch and accumulation that hold
    the global batch where they differ from the file's (``as_written``). Applied
    through XTuner's ``--cfg-options`` rather than by editing the user's file."""
    stop = ["train_cfg.max_epochs=None", f"train_cfg.max_iters={options.max_iters}"]
    seed = f"randomness.seed={options.seed}"
    deviations = [
        f"user config {config.name} from the layout root, used as written but for the options below",
        f"training stops after {options.max_steps} optimizer steps (--cfg-options {' '.join(stop)})",
        f"fixed random seed {options.seed} (--cfg-options {seed})",
    ]
    cfg_options = [*stop, seed]
    if options.per_device_batch != as_written.per_device_batch:
        cfg_options.append(f"train_dataloader.batch_size={options.per_device_batch}")
        deviations.append(
            f"per-device batch {options.per_device_batch} instead of the file's {as_written.per_device_batch} "
            f"(--cfg-options {cfg_options[-1]})"
        )
    if options.accumulative_counts != as_written.accumulative_counts:
        cfg_options.append(f"optim_wrapper.accumulative_counts={options.accumulative_counts}")
        deviations.append(f"{accumulation_deviation(options.accumulative_counts)} (--cfg-options {cfg_options[-1]})")
    return RenderedRecipe(text=config.read_text(), source="user", deviations=deviations, cfg_options=cfg_options)
