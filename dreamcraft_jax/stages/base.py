"""What a stage is, and the registry the runner finds stages in.

A stage is built once from its resolved config (:func:`dreamcraft_jax.config.stage_config`), the device mesh and
the run's priors; the runner (:mod:`dreamcraft_jax.runner`) drives every stage through :class:`Stage` alone:

    stage = build_stage(name, cfg, mesh, priors, prior_params)
    state = stage.init_state(previous)                       # previous: the stage before's handoff, or None
    for step in range(start, max_steps):
        key = stage.step_key(step)                           # hashable: which program runs this step
        state, metrics = stage.step_fn(key)(state, *stage.step_inputs(key))
    view = stage.eval_inputs(state)                          # once per state (e.g. the geometry stage's mesh)
    images = stage.eval_render(h, w)(view, camera)           # {"rgb", "normal", "depth", "opacity"}: (h, w, .)
    next_start = stage.handoff(state)

Step functions come from :func:`dreamcraft_jax.train_step.build_step` and share its TrainState
(:class:`dreamcraft_jax.train_step.TrainState`: params, opt_state, extras, step, rng, nonfinite_skips).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from typing import Any

from dreamcraft_jax import parallel
from dreamcraft_jax.stages import views
from dreamcraft_jax.train_step import StepDef, TrainState, build_step, build_update

StepKey = Hashable


class Stage(abc.ABC):
    """The interface the runner uses. Subclasses are frozen dataclasses holding static settings (no arrays but
    the frozen prior weights and the stage's fixed inputs, which the step functions take as arguments)."""

    name: str
    cfg: Any

    @abc.abstractmethod
    def init_state(self, previous: TrainState | None = None) -> TrainState:
        """The state at step 0, from ``cfg.seed``; ``previous``: the previous stage's :meth:`handoff` (or None)."""

    @abc.abstractmethod
    def step_key(self, step: int) -> StepKey:
        """Which compiled step runs at ``step`` (host int), e.g. ("random", (128, 128))."""

    def step_keys(self, start: int, stop: int | None = None) -> list[StepKey]:
        """The distinct :meth:`step_key` values of steps ``start`` .. ``stop - 1`` (default: to ``max_steps``),
        in first-use order (a walk over every step: microseconds per step, once per stage)."""
        keys = []
        for step in range(int(start), self.max_steps if stop is None else int(stop)):
            key = self.step_key(step)
            if key not in keys:
                keys.append(key)
        return keys

    @abc.abstractmethod
    def step_fn(self, key: StepKey) -> Callable:
        """A new jitted step ``(state, *step_inputs(key)) -> (new state, metrics)`` (``state`` donated)."""

    @abc.abstractmethod
    def step_inputs(self, key: StepKey) -> tuple:
        """The device-placed inputs of the step ``key`` besides the state (e.g. targets, prior weights)."""

    @abc.abstractmethod
    def eval_render(self, height: int, width: int) -> Callable:
        """A jitted, deterministic render ``(eval_inputs(state), camera) -> {"rgb": (h, w, 3), "normal": (h, w, 3)
        in [0, 1], "depth": (h, w), "opacity": (h, w)}``, replicated (every process can read it)."""

    def eval_inputs(self, state: TrainState) -> Any:
        """What :meth:`eval_render` renders from, computed once per state for all its views (a turntable renders
        120): the state itself, or e.g. the geometry stage's extracted mesh."""
        return state

    @abc.abstractmethod
    def eval_cameras(self) -> dict:
        """Validation views: {name: camera}; "reference" is the input view when the stage has one."""

    def eval_metrics(self, name: str, images: dict) -> dict:
        """Metrics of the validation render of view ``name`` (host arrays), e.g. the reference PSNR."""
        del name, images
        return {}

    def reference_images(self) -> dict | None:
        """Images shown next to the validation renders (reference.png), or None."""
        return None

    video_panels: tuple[str, ...] = ("rgb", "normal", "depth", "opacity")  # the turntable's panels, left to right

    def finish(self, state: TrainState, folder) -> dict | None:
        """Outputs written once the stage's last step is done (e.g. the geometry stage's mesh files); returns
        {kind: path} or None. Runs on every process; only process 0 writes files (the runner checks)."""
        del state, folder
        return None

    def handoff(self, state: TrainState) -> TrainState:
        """What the next stage starts from (its ``init_state(previous=...)``)."""
        return state

    def timing_split(self, state: TrainState, compiled_steps: dict | None = None) -> dict | None:
        """ms of one step split into its parts (``timing.json``), or None when the stage has no split.
        ``compiled_steps``: {key: step fn} the caller already compiled, reused instead of compiling again."""
        del state, compiled_steps
        return None

    @property
    def max_steps(self) -> int:
        return int(self.cfg.train.max_steps)


class StepDefStage(Stage):
    """A stage whose step keys are ``(kind, (height, width))`` and whose steps are built from
    ``step_def(kind, height, width)`` (:class:`dreamcraft_jax.train_step.StepDef`) and ``optimizer``."""

    def step_fn(self, key: StepKey) -> Callable:
        kind, (height, width) = key
        return build_step(self.step_def(kind, height, width), self.optimizer, self.mesh,
                          separate_guidance=bool(self.cfg.train.separate_guidance))

    def update_fn(self, key: StepKey) -> Callable:
        """jit (state, grads, data) -> (new state, metrics): the step's update alone on given gradients."""
        kind, (height, width) = key
        return build_update(self.step_def(kind, height, width), self.optimizer)

    @abc.abstractmethod
    def param_shapes(self) -> Any:
        """The params pytree as ``jax.ShapeDtypeStruct`` leaves (what :meth:`init_state` puts in ``params``)."""

    @property
    def param_specs(self):
        """PartitionSpecs of the params as the sharding rules place them (``params/...``)."""
        return parallel.rule_specs(self.param_shapes(), "params", self.mesh,
                                   parallel.rules_from_config(self.cfg.parallel), int(self.cfg.parallel.fsdp_min_size))

    def reference_and_random_step_def(self, prepare, render, guidance, summary) -> StepDef:
        """The :class:`StepDef` of a step whose batch is (reference views, random views): the priors (``guidance``,
        None on steps without them) score the random views, and the random-view loss merges as
        :func:`dreamcraft_jax.stages.views.merge_random_loss`."""
        return StepDef(prepare=prepare, render=render, guidance=guidance, guide_views=lambda batch: batch[1],
                       merge=views.merge_random_loss, summary=summary,
                       frozen_specs=self.prior_specs if guidance is not None else parallel.REPLICATED,
                       param_specs=self.param_specs)


_REGISTRY: dict[str, Callable[..., Stage]] = {}


def register(name: str):
    """Decorator: ``@register("coarse_nerf") def build(cfg, mesh, priors=None, prior_params=None) -> Stage``."""

    def wrap(build: Callable[..., Stage]):
        _REGISTRY[name] = build
        return build

    return wrap


def build_stage(name: str, cfg, mesh, priors=None, prior_params=None) -> Stage:
    """The stage ``name`` built from its resolved config (``priors``/``prior_params`` as loaded for the run)."""
    from dreamcraft_jax import stages  # noqa: F401  (registers the stages)

    if name not in _REGISTRY:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](cfg, mesh, priors, prior_params)


def registered() -> tuple[str, ...]:
    from dreamcraft_jax import stages  # noqa: F401

    return tuple(_REGISTRY)
