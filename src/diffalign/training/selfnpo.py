"""Self-NPO: truncated diffusion fine-tuning of a negative model against an EMA teacher
(docs/methods.md#self-npo).

Wang et al. 2025, "Self-NPO: Negative Preference Optimization of Diffusion Models by Simply Learning from
Itself without Explicit Preference Annotation". One training step, per sample:

1. a start point ``x_{t_start}`` with ``t_start = g[i]`` on a DDIM grid ``g`` (:func:`ddim_grid`, trailing
   spacing, ``g[0] = T-1``, N points), and an end position ``e``, by the rule ``start_range``:
   - ``"official"`` (default, the official training code): ``i ~ U{0..N-1}`` and the teacher's K steps are
     clipped at ``t = 0``. The grid is extended by the point ``g[N] = 0`` (the DDIM previous timestep of the
     lowest grid point) and ``e = min(i+K, N)``, so the samples with ``i >= N-K`` (a share K/N: 20% for N = 25,
     K = 5) end at ``t = 0`` after fewer than K steps;
   - ``"interior"``: ``i ~ U{0..N-1-K}`` and ``e = i+K``: every sample takes K full steps, none starts below
     ``g[N-1-K]`` nor ends below ``g[N-1]`` (239 and 39 for T = 1000, N = 25, K = 5).
   Where the trajectory starts:
   - ``start="images"``: ``x_{t_start} = a x0 + s eps`` from the latent ``x0`` of a real image;
   - ``start="noise"``: data-free. ``x_{g[0]}`` is pure noise; a lower ``t_start`` is reached by the teacher's
     own denoising from that noise (the same guided DDIM steps), so no image is ever read;
2. the teacher (an EMA of the student, :class:`EmaTeacher`) takes ``e - i`` deterministic DDIM steps (eta = 0)
   from ``t_start`` to ``t = g[e]`` with the guided prediction ``pred = cond + w*(cond - uncond)``; the step
   into ``t = 0`` uses ``alphas_cumprod[0]``;
3. the target is the teacher's (guided) x0 estimate ``x0_hat(x_t, t)`` (at ``t = 0``: close to ``x_t`` itself);
   the student sees ``x_s = renoise(x_t, t, s, ...)`` with ``s ~ U{t+1..T-1}`` (``U{1..T-1}`` when ``t = 0``)
   and its caption, and is trained on the pseudo-Huber (or L2) distance between its own x0 prediction at
   ``(x_s, s, c)`` and the target;
4. after the optimizer step the loop calls the recipe's ``after_update``: :meth:`EmaTeacher.update`.

Teacher network calls per training step (the convention the tests check). A *call* is one forward of the
UNet on one batch; conditional and unconditional inputs of all samples travel in that one batch (2B rows). The
teacher's x0 estimate at each state serves both the DDIM step and, at the last state, the target, so a sample
needs ``(e - i) + 1`` calls. Samples run in lock-step and leave the batch once they reach their ``t``, so:

- ``start="images"``: ``max_b(e_b - i_b) + 1`` calls: exactly ``K + 1`` with ``start_range="interior"``; with
  ``"official"`` also ``K + 1`` unless every sample of the batch has ``i_b > N-K`` (then fewer);
- ``start="noise"``: ``max_b(e_b) + 1`` calls: every sample walks from the top of the grid (``max_b(i_b) + K + 1``
  with ``"interior"``; ``N + 1`` as soon as one sample ends at ``t = 0``).

When ``w == -1`` the guided prediction is exactly the unconditional one (and when ``w == 0`` the conditional
one), so the call carries only that half (B rows): the same number of calls at half the cost, which is the
official SD1.5 setting. Everything the teacher does runs under ``torch.no_grad``.

:class:`SelfNPORecipe` is the method's recipe for the training loop (protocol.py): its data are prompts or
image-caption rows (selfnpo_data.py), its checkpoints hold the teacher (``ema.safetensors``), its output is the
negative offset: the student's LoRA (``pytorch_lora_weights.safetensors``) or its whole network (``unet/``, or
``transformer/`` for SD3, FLUX and CogVideoX), meant for the negative branch of classifier-free guidance only.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import Tensor

from ..errors import UserError
from ..models import Conditioning
from ..objectives import SELFNPO_LOSSES, per_sample_mse, renoise, selfnpo_distance
from .checkpoint import is_sharded_checkpoint
from .model_card import write_selfnpo_model_card
from .protocol import RecipeBase, RunContext, StepResult, TrainData
from .selfnpo_data import SelfNPOBatch, load_selfnpo_data, make_batch
from .timesteps import UniformTimesteps, draw_global, timestep_sampler
from .traced import TracedDenoiser

if TYPE_CHECKING:
    from ..models import ModelFamily

START_MODES = ("noise", "images")
START_RANGES = ("official", "interior")


def ddim_grid(num_train_timesteps: int, steps: int) -> Tensor:
    """Descending DDIM timesteps with trailing spacing: ``round(T - j*T/N) - 1`` for j = 0..N-1.

    The top is ``T-1``, where pure noise is the closest to the true marginal (leading spacing would start at
    ``T - T/N`` instead). For T = 1000, N = 25: 999, 959, ..., 39.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"the DDIM grid needs 1..{num_train_timesteps} steps, got {steps}")
    grid = torch.round(torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps, dtype=torch.float64)) - 1
    return grid.long()[:steps]


def extended_grid(grid: Tensor) -> Tensor:
    """``grid`` followed by ``t = 0``, the DDIM previous timestep of its lowest point (unless that is 0 already)."""
    return grid if int(grid[-1]) == 0 else torch.cat([grid, grid.new_zeros(1)])


class EmaTeacher:
    """The Self-NPO teacher: an exponential moving average of the student's trainable weights.

    ``weights`` maps the student's trainable parameter names to the teacher's values (float32, no gradient):
    - full fine-tune (``separate_copy=True``): a frozen copy of the UNet made at construction (= the base
      model); ``weights`` are that copy's parameters, so the teacher runs as its own module;
    - LoRA (``separate_copy=False``): the teacher is the base UNet plus EMA'd adapter weights. Only the
      adapters are copied; :meth:`active` loads them into the shared UNet for the teacher's calls and puts the
      student's values back afterwards (no second UNet in memory).

    The teacher changes only in :meth:`update`: ``teacher = decay * teacher + (1 - decay) * student``.
    """

    def __init__(self, unet: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], decay: float, *,
                 separate_copy: bool):
        if not 0 <= decay < 1:
            raise ValueError(f"teacher EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.separate_copy = separate_copy
        if separate_copy:
            self.module = copy.deepcopy(unet).requires_grad_(False).eval()
            own = dict(self.module.named_parameters())
            missing = sorted(set(trainable) - set(own))
            if missing:
                raise ValueError(f"the teacher copy has no parameter {missing[0]!r}")
            self.weights = {name: own[name] for name in trainable}
            for w in self.weights.values():
                if w.dtype != torch.float32:
                    w.data = w.data.float()
        else:
            self.module = unet
            self.weights = {name: p.detach().clone().float() for name, p in trainable.items()}
        self._trainable = trainable

    def rebind(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """The student's parameters after sharding; the teacher copy was sharded too (its own parameters)."""
        if self.separate_copy:
            own = dict(self.module.named_parameters())
            self.weights = {name: own[name] for name in trainable}
        else:  # LoRA: nothing is trained yet, the teacher's adapters start at the student's (now sharded) ones
            self.weights = {name: p.detach().clone().float() for name, p in trainable.items()}
        self._trainable = trainable

    def rounds(self, needed: int) -> int:
        """Teacher calls to make when this process needs `needed`: the most any process needs when the teacher is
        sharded (each of its calls gathers weights from every process, so all make the same number)."""
        if hasattr(next(self.module.parameters()), "to_local"):
            import torch.distributed as dist

            n = torch.tensor([needed], dtype=torch.long, device=next(self.module.parameters()).device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            return int(n)
        return needed

    @torch.no_grad()
    def update(self, trainable: Optional[dict[str, torch.nn.Parameter]] = None) -> None:
        """One EMA step towards the student's current weights (call after the optimizer step)."""
        d = self.decay
        for name, p in (trainable or self._trainable).items():
            w = self.weights[name]
            w.copy_(d * w + (1 - d) * p.detach().to(w.device, w.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        return self.weights

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The module to call as the teacher (eval mode, teacher weights) for the duration of the context."""
        if self.separate_copy:
            yield self.module
            return
        was_training = self.module.training
        saved = {n: p.detach().clone() for n, p in self._trainable.items()}
        with torch.no_grad():
            for n, p in self._trainable.items():
                p.copy_(self.weights[n].to(p.dtype))
        self.module.eval()
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for n, p in self._trainable.items():
                    p.copy_(saved[n])
            self.module.train(was_training)


@dataclass
class TeacherResult:
    x_t: Tensor  # the state the teacher reached [B, ...], float32
    t: Tensor  # its timestep [B]
    target: Tensor  # the teacher's x0 estimate at (x_t, t) [B, ...], float32
    t_start: Tensor  # [B]
    calls: int  # teacher network calls made


class SelfNPORecipe(RecipeBase):
    """Turns a :class:`SelfNPOBatch` and a seeded generator into per-sample Self-NPO losses.

    ``latent_shape`` is the per-sample latent shape for ``start="noise"``: (C, H, W), or (F', C, H', W') for video
    (``family.latent_shape()``; every tensor op here works on any ``[B, ...]``). All randomness is drawn
    from the generator, in a fixed order (start indices, start noise, s, re-noising noise; ``start_range`` changes
    only the range of the start indices' one draw), so the loop's
    (seed, step) generator makes a resumed run identical. ``shard = (rank, world)``: every draw covers the
    global batch (world x B samples, the same generator on every process) and this process keeps rows
    rank::world (the rows ``BatchStream`` gives it), so a sample's draws do not depend on the process count.
    ``timesteps`` draws the student's ``s`` above the teacher's ``t`` (default uniform); ``distance`` (what the
    method table gives as the objective) takes the place of the one ``loss`` and ``huber_c`` name. Built by the
    loop with :meth:`for_run`.
    """

    def __init__(self, family: ModelFamily, teacher: EmaTeacher, *, start: str = "noise", guidance: float = -1.0,
                 grid_steps: int = 25, teacher_steps: int = 5, loss: str = "pseudo_huber", huber_c: float = 1e-3,
                 latent_shape: Optional[tuple[int, ...]] = None, shard: tuple[int, int] = (0, 1),
                 start_range: str = "official", distance: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 timesteps=None, run: Optional[RunContext] = None, trace_teacher: bool = False):
        if start not in START_MODES:
            raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
        if start_range not in START_RANGES:
            raise ValueError(f"start_range must be one of {START_RANGES}, got {start_range!r}")
        if loss not in SELFNPO_LOSSES:
            raise ValueError(f"loss must be one of {SELFNPO_LOSSES}, got {loss!r}")
        if teacher_steps < 1 or grid_steps < teacher_steps + 1:
            raise ValueError(f"need teacher_steps >= 1 and grid_steps >= teacher_steps + 1, got K={teacher_steps}, "
                             f"N={grid_steps}")
        if start == "noise" and latent_shape is None:
            raise ValueError("start='noise' needs latent_shape (C, H, W), or (F', C, H', W') for video")
        self.family, self.teacher = family, teacher
        self.schedule = family.schedule
        self.start, self.guidance, self.K = start, float(guidance), int(teacher_steps)
        self.latent_shape = latent_shape
        self.distance = distance if distance is not None else selfnpo_distance(loss, huber_c=huber_c)
        self.grid = ddim_grid(family.num_train_timesteps, grid_steps)
        self.path = extended_grid(self.grid)  # the points a trajectory can reach: the grid, then t = 0
        self.start_range = start_range
        self.shard = shard
        self.timesteps = timesteps or UniformTimesteps(family.num_train_timesteps)
        self.run = run
        self._uncond1 = None
        self.trace_teacher = trace_teacher
        self._traced: Optional[TracedDenoiser] = None

    @classmethod
    def for_run(cls, ctx: RunContext) -> "SelfNPORecipe":
        """The teacher starts at the base model: a copy of the not-yet-trained UNet, or its zero-B LoRA."""
        cfg, keys, family = ctx.cfg, ctx.keys, ctx.family
        if keys.ddim_grid > family.num_train_timesteps:
            raise UserError(f"ddim_grid={keys.ddim_grid} exceeds the model's {family.num_train_timesteps} timesteps")
        if keys.trace_teacher and family.denoiser_name != "unet":
            raise UserError(f"trace_teacher applies to UNet families (sd, sdxl); {type(family).__name__} calls a "
                            f"{family.denoiser_name}: set --trace_teacher=false")
        lora = cfg.train_mode == "lora"
        teacher = EmaTeacher(family.unet, ctx.trainable, keys.teacher_ema_decay, separate_copy=not lora)
        return cls(family, teacher, start=keys.selfnpo_start, guidance=keys.teacher_guidance,
                   grid_steps=keys.ddim_grid, teacher_steps=keys.teacher_steps,
                   latent_shape=family.latent_shape(cfg.resolution),  # video: (F', C, H', W')
                   shard=ctx.shard,  # draws cover the global batch: same weights on any process count
                   start_range=keys.selfnpo_start_range, distance=ctx.method.objective(keys), run=ctx,
                   timesteps=timestep_sampler(cfg, family), trace_teacher=keys.trace_teacher)

    def _draw(self, fn, n: int, *args, generator: torch.Generator, **kwargs) -> Tensor:
        """``fn(..., (n, ...))`` drawn for the global batch, this process's rows (see ``shard``)."""
        *lead, shape = args
        return draw_global(fn, n, tuple(shape), generator, self.shard, *lead, **kwargs)

    def _positions(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Start and end positions ``(i, e)`` on :attr:`path` of this process's ``n`` samples (``start_range``):
        official ``i ~ U{0..N-1}``, ``e = min(i+K, N)`` (position N is t = 0); interior ``i ~ U{0..N-1-K}``,
        ``e = i+K``. One draw either way."""
        N, K = len(self.grid), self.K
        if self.start_range == "interior":
            i = self._draw(torch.randint, n, 0, N - K, (), generator=generator)
            return i, i + K
        i = self._draw(torch.randint, n, 0, N, (), generator=generator)
        return i, torch.clamp(i + K, max=len(self.path) - 1)

    # ------------------------------------------------------------------------------------------ teacher
    def _teacher_net(self, net: torch.nn.Module) -> torch.nn.Module:
        """The network to call as the teacher: `net`, or with `trace_teacher` its traced calls (kept across steps:
        the traces read the weights the teacher swaps in at each call)."""
        if not self.trace_teacher:
            return net
        if hasattr(next(net.parameters()), "to_local"):
            raise UserError("trace_teacher does not apply to a sharded (FSDP) teacher: set --trace_teacher=false")
        if self._traced is None or self._traced.net is not net:
            self._traced = TracedDenoiser(net)
        return self._traced

    def _guided_x0(self, net, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning) -> Tensor:
        """The teacher's x0 estimate from ``cond + w*(cond - uncond)``: ONE call of ``net``."""
        family, w = self.family, self.guidance
        if w == -1.0:  # cond + (-1)(cond - uncond) == uncond: only that half is needed
            out = family.predict(x, t, uncond, net=net)
        elif w == 0.0:
            out = family.predict(x, t, cond, net=net)
        else:
            both = family.predict(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([cond, uncond]), net=net)
            out_c, out_u = both.float().chunk(2)
            out = out_c + w * (out_c - out_u)
        return self.schedule.pred_x0(x, t, out.float()).float()

    @torch.no_grad()
    def teacher_target(self, batch: SelfNPOBatch, generator: torch.Generator) -> TeacherResult:
        """Steps 1-3 of the module docstring: the teacher's state ``x_t``, its ``t`` and x0 target."""
        B, path = batch.size, self.path
        device = self.family.device
        i, end = self._positions(B, generator)
        if self.start == "images":
            if batch.latents is None:
                raise ValueError("start='images' needs batch.latents")
            x0 = batch.latents.float()
            noise = self._draw(torch.randn, B, x0.shape[1:], generator=generator).to(device)
            a, s = self.schedule.coeffs(path[i], x0)
            x = a * x0.to(device) + s * noise
            pos = i.clone()
        else:
            x = self._draw(torch.randn, B, self.latent_shape, generator=generator).to(device)
            pos = torch.zeros(B, dtype=torch.long)
        x_t, target = torch.empty_like(x), torch.empty_like(x)
        calls = 0
        with self.teacher.active() as net:
            net = self._teacher_net(net)
            todo = torch.arange(B)
            rounds = self.teacher.rounds(int((end - pos).max()) + 1)  # this process's rows need (end - pos) + 1 calls
            for _ in range(rounds - int((end - pos).max()) - 1):  # sharded: match the process needing the most
                first = torch.zeros(1, dtype=torch.long)
                self._guided_x0(net, x[first.to(device)], path[pos[first]].to(device), batch.cond[first],
                                batch.uncond[first])
            while len(todo):
                t_cur = path[pos[todo]]
                xs = x[todo.to(device)]
                x0_hat = self._guided_x0(net, xs, t_cur.to(device), batch.cond[todo], batch.uncond[todo])
                calls += 1
                done = pos[todo] == end[todo]
                if done.any():
                    idx = todo[done].to(device)
                    x_t[idx], target[idx] = xs[done.to(device)], x0_hat[done.to(device)]
                go = ~done
                if go.any():  # deterministic DDIM (eta = 0) from t_cur to the next point (t = 0: alphas_cumprod[0])
                    moving = todo[go]
                    xg, x0g = xs[go.to(device)], x0_hat[go.to(device)]
                    x[moving.to(device)] = self.schedule.ddim_step(xg, x0g, t_cur[go], path[pos[moving] + 1])
                    pos[moving] += 1
                todo = todo[go]
        return TeacherResult(x_t, path[end].to(device), target, path[i].to(device), calls)

    # ------------------------------------------------------------------------------------------ student
    def __call__(self, batch: SelfNPOBatch, generator: torch.Generator) -> StepResult:
        family = self.family
        teacher = self.teacher_target(batch, generator)
        s = self.timesteps.sample_above(teacher.t.cpu(), generator, self.shard)  # U{t+1..T-1}
        z = self._draw(torch.randn, batch.size, teacher.x_t.shape[1:], generator=generator).to(teacher.x_t.device)
        s = s.to(teacher.x_t.device)
        if hasattr(self.schedule, "renoise"):  # flow matching: along the straight path (models/flow.py)
            x_s = self.schedule.renoise(teacher.x_t, teacher.t, s, z)
        else:
            x_s = renoise(teacher.x_t, teacher.t, s, self.schedule.alphas_cumprod, z)
        x_s = x_s.to(family.dtype)
        out = family.predict(x_s, s, batch.cond, net=self.net)
        x0_pred = self.schedule.pred_x0(x_s, s, out).float()
        losses = self.distance(x0_pred, teacher.target)
        metrics = {  # on the device: the loop reads them once per optimizer step
            "t": teacher.t.float().mean(),
            "s": s.float().mean(),
            "t_start": teacher.t_start.float().mean(),
            "teacher_calls": float(teacher.calls),
            "x0_l2": per_sample_mse(x0_pred.detach(), teacher.target).mean(),
        }
        return StepResult(losses, metrics)

    def step(self, batch: SelfNPOBatch, generator: torch.Generator) -> StepResult:
        return self(batch, generator)

    # ------------------------------------------------------------------------------------------ the run
    def load_data(self) -> TrainData:
        ctx = self._context()
        data = load_selfnpo_data(ctx.cfg, ctx.resolution)
        with torch.no_grad():
            self._uncond1 = self.family.unconditional(1)
        return data

    def describe(self, data: TrainData) -> str:
        ctx = self._context()
        return f"{ctx.method.title(ctx.keys)} on {data.summary()}"

    def make_batch(self, rows: list, generator: torch.Generator) -> tuple[Optional[SelfNPOBatch], dict]:
        ctx = self._context()
        return make_batch(rows, self.family, ctx.resolution, self._uncond1, with_latents=self.start == "images"), {}

    def after_update(self) -> None:
        self.teacher.update()  # a skipped update leaves the teacher where it was too: the loop does not call this

    def checkpoint_state(self) -> dict[str, Tensor]:
        return self.teacher.state_dict()

    def own_networks(self) -> list[torch.nn.Module]:
        return [self.teacher.module] if self.teacher.separate_copy else []

    def rebind(self, trainable) -> None:
        super().rebind(trainable)
        self.teacher.rebind(trainable)

    def check_checkpoint(self, path: Path) -> None:
        if is_sharded_checkpoint(path):  # the teacher is part of the sharded state (its load says when it is not)
            return
        if not (Path(path) / "ema.safetensors").is_file():
            raise UserError(f"checkpoint '{path}' has no teacher EMA (ema.safetensors): it was not written by a "
                            "selfnpo run")

    def write_model_card(self, out: Path, data_summary: str) -> Path:
        ctx = self._context()
        return write_selfnpo_model_card(ctx.cfg, out, resolution=ctx.resolution, family=self.family.name,
                                        data_summary=data_summary)


__all__ = ["EmaTeacher", "SELFNPO_LOSSES", "START_MODES", "START_RANGES", "SelfNPOBatch", "SelfNPORecipe",
           "TeacherResult", "ddim_grid", "extended_grid", "selfnpo_distance"]
