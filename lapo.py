"""LAPO: Latent Action Policies, in one file.

"Learning to Act without Actions" (Schmidt & Jiang, ICLR 2024) learns a policy from videos
of behaviour, with no action labels:

  stage 1  a latent inverse dynamics model (IDM) looks at (o_{t-1}, o_t, o_{t+1}) and emits a
           vector-quantised latent action; a forward dynamics model (FDM) must predict o_{t+1}
           from (o_{t-1}, o_t) and that latent action. The bottleneck forces the latent to
           carry what the agent did.
  stage 2  a latent policy imitates the IDM's latent actions from o_t alone.
  stage 3  the latent policy is decoded into real actions: offline with a small decoder
           trained on a few labelled frames, or online with PPO (RL + SL).

This file also trains the PPO expert that makes the observation dataset and collects it, so
the whole method runs from nothing: `python lapo.py pipeline --preset tiny`.

Sections, in the paper's order:
  1. configuration     every hyperparameter, and the tiny / cpu / paper presets
  2. environment, data Procgen, its action groups, return normalisation, the chunked dataset
  3. networks          IMPALA-CNN, EMA vector quantiser, IDM, U-Net FDM, policies
  4. the method        one function per update: stage 1, stage 2, PPO, the decoder's SL
  5. measurements      the latent probe and its bars, stage 1's held-out scores, evaluation
  6. stages            expert, collect, stage1, stage2, decode, finetune, eval, pipeline
  7. utilities         errors, checkpoints, metrics, torchrun
  8. command line
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # differentiable collectives
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------


def arg(default, help):
    """A Config field whose help text is also its --help."""
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclass
class Config:
    # what and where
    env: str = arg("coinrun", "Procgen game")
    run_dir: str = arg("", "checkpoints, metrics and the dataset (default runs/<env>-<preset>)")
    data: str = arg("", "dataset folder holding train/ and test/ (default <run-dir>/data)")
    preset: str = arg("paper", "which preset filled in the defaults")
    device: str = arg("", "cuda or cpu (default: cuda when available)")
    seed: int = arg(0, "random seed; for decode and finetune, S > 0 writes files with -seedS")
    amp: bool = arg(None, "bf16 autocast (default: on with CUDA and on CPUs with bf16 instructions)")
    ckpt_every_s: float = arg(300, "seconds between checkpoints: the most work a crash can cost")
    # networks
    idm_scale: float = arg(4, "IDM width: IMPALA channels (16, 32, 32) x scale")
    policy_scale: float = arg(4, "latent policy and PPO agent width, as --idm-scale")
    fdm_width: int = arg(24, "FDM U-Net base width b: channels b .. 32b")
    fdm_residual: bool = arg(False, "FDM predicts o_{t+1} - o_t, starting from 0 (copying o_t is then free)")
    la_dim: int = arg(128, "latent action size")
    vq: bool = arg(True, "quantise the latent action (--no-vq: the paper's no-VQ ablation)")
    vq_codebooks: int = arg(2, "codebooks of the vector quantiser")
    vq_codes: int = arg(64, "codes per codebook")
    vq_dim: int = arg(16, "code size; la_dim / (codebooks x vq_dim) positions per codebook")
    vq_beta: float = arg(0.05, "commitment cost")
    vq_decay: float = arg(0.999, "EMA decay of the codebook statistics")
    vq_count_init: float = arg(1.0, "initial EMA count of every code (the authors' code: 0)")
    vq_reset_after: int = arg(0, "re-seed a code unused for this many steps (0: never)")
    # PPO, shared by the expert (= PPO from scratch) and online fine-tuning
    num_envs: int = arg(64, "parallel games")
    num_steps: int = arg(64, "rollout length: one update sees num_envs x num_steps frames")
    minibatches: int = arg(8, "minibatches per PPO epoch")
    epochs: int = arg(3, "PPO epochs per rollout")
    gamma: float = arg(0.999, "discount")
    gae_lambda: float = arg(0.95, "GAE lambda")
    clip: float = arg(0.2, "PPO ratio and value clip")
    vf_coef: float = arg(0.5, "value loss weight")
    max_grad_norm: float = arg(0.5, "PPO gradient-norm clip")
    expert_frames: int = arg(50_000_000, "frames of PPO for the expert")
    expert_lr: float = arg(5e-4, "expert learning rate, decayed linearly to 0")
    expert_ent: float = arg(0.01, "expert entropy bonus")
    # dataset
    train_frames: int = arg(8_000_000, "frames collected for training")
    test_frames: int = arg(131_072, "frames collected on other levels, for held-out scores")
    collect_temp: float = arg(1.0, "collect samples the expert's actions from softmax(logits / T): below 1 "
                              "a sharper policy, as a longer-trained expert's")
    # stage 1: IDM + FDM
    s1_steps: int = arg(50_000, "stage-1 training steps")
    s1_batch: int = arg(128, "stage-1 batch")
    s1_lr: float = arg(3e-4, "stage-1 learning rate: from 0.1x over the warm-up, to 0.01x")
    s1_warmup: int = arg(50, "stage-1 warm-up steps (at most half of --s1-steps)")
    s1_idm_lr_scale: float = arg(1.0, "the IDM's stage-1 learning rate as a multiple of the FDM's "
                                 "(the paper: 1; at 0.3 a seed that collapsed at 1 read the action, README)")
    s1_clip: float = arg(2.0, "stage-1 gradient-norm clip")
    probe_every: int = arg(5_000, "stage-1 steps between probes (latent -> true action)")
    probe_frames: int = arg(16_384, "held-out windows for the probe, half to fit, half to score")
    probe_steps: int = arg(500, "training steps of the probe")
    # stage 2: latent behaviour cloning
    s2_steps: int = arg(60_000, "stage-2 training steps")
    s2_batch: int = arg(128, "stage-2 batch")
    s2_lr: float = arg(2e-4, "stage-2 learning rate: from 0.01x over the warm-up, to 0")
    s2_warmup: int = arg(1_000, "stage-2 warm-up steps (at most half of --s2-steps)")
    # stage 3 offline: latent policy + decoder fitted on a few labelled frames
    labels: int = arg(256, "labelled frames for decode")
    decode_epochs: int = arg(100, "passes of the decoder over the labelled frames")
    bc_epochs: int = arg(25, "passes of BC over them (it overfits sooner than the decoder)")
    decode_lr: float = arg(1e-3, "decoder (or BC) learning rate")
    decode_wd: float = arg(1e-4, "decoder (or BC) weight decay")
    eval_episodes: int = arg(100, "episodes of the final evaluation of every policy")
    # stage 3 online: PPO fine-tuning, RL + SL
    ft_frames: int = arg(4_000_000, "frames of PPO fine-tuning")
    ft_lr: float = arg(1e-2, "fine-tuning base learning rate: each part peaks at ft_lr x its FT_RAMPS factor")
    ft_ent: float = arg(0.0025, "fine-tuning entropy bonus")
    ft_schedule_scale: float = arg(1.0, "stretches FT_RAMPS and the SL window (in frames)")
    sl_start: int = arg(10_000, "frame at which the decoder's SL starts")
    sl_dense: int = arg(50_000, "until this frame SL re-fits after every update, then every --sl-every")
    sl_end: int = arg(400_000, "frame at which the decoder's SL stops")
    sl_every: int = arg(20, "PPO updates between decoder re-fits after --sl-dense")
    sl_epochs: int = arg(3, "epochs of each decoder re-fit")
    sl_batch: int = arg(512, "batch of the decoder re-fit")
    sl_smoothing: float = arg(0.05, "label smoothing of the decoder re-fit")


# Fine-tuning trains three parts of the RL+SL policy, each with a learning rate that is 0
# until frame a, ramps linearly to ft_lr x f at frame b, then decays linearly to 0 at
# ft_frames; a and b are stretched by ft_schedule_scale. The paper's schedule.
FT_RAMPS = dict(rl_head=(35_000, 50_000, 1 / 4), value=(25_000, 50_000, 1 / 4),
                fc_rl=(50_000, 200_000, 1 / 10))
ONLINE_DECODER = (192, 128, 64)  # hidden widths of the RL+SL decoder (paper)
OFFLINE_DECODER = (128, 128)  # ... of the offline decoder, and of the probe

PRESETS = {
    "paper": {},
    # laptop scale: tuned by experiment, see README "Results"
    "cpu": dict(idm_scale=1, policy_scale=1, fdm_width=8, fdm_residual=True, vq_reset_after=50,
                num_envs=64, num_steps=64, minibatches=4, epochs=2, expert_frames=1_000_000,
                train_frames=262_144, test_frames=32_768, s1_steps=3_000, s1_lr=1e-3,
                probe_every=500, probe_frames=8_192, probe_steps=300, s2_steps=3_000,
                s2_lr=1e-3, ft_frames=500_000, ft_schedule_scale=0.25),
    # the whole pipeline in minutes: a smoke test whose output is still worth reading
    "tiny": dict(idm_scale=0.5, policy_scale=0.5, fdm_width=8, fdm_residual=True, vq_reset_after=20,
                 num_envs=32, num_steps=32, minibatches=2, epochs=2, expert_frames=98_304,
                 train_frames=32_768, test_frames=8_192, s1_steps=500, s1_batch=64, s1_lr=1e-3,
                 probe_every=250, probe_frames=4_096, probe_steps=150, s2_steps=500,
                 s2_lr=1e-3, eval_episodes=32, ft_frames=65_536,
                 ft_schedule_scale=0.05, ckpt_every_s=60),
}
# fields a checkpoint's networks must agree on with the flags that load it: stage 1 holds
# the IDM and FDM, a PPO agent is sized by policy_scale alone, the other stages use both
IDM_FDM_FIELDS = ("idm_scale", "fdm_width", "fdm_residual", "la_dim", "vq", "vq_codebooks", "vq_codes", "vq_dim")
NET_FIELDS = IDM_FDM_FIELDS + ("policy_scale",)


def make_config(preset="paper", **overrides):
    cfg = Config(preset=preset, **PRESETS[preset])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.env}-{preset}"
    cfg.data = cfg.data or str(Path(cfg.run_dir) / "data")
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.amp is None:  # bf16 pays on GPUs and on CPUs that compute in it; elsewhere it is slower
        cfg.amp = cfg.device.startswith("cuda") or cpu_has_bf16()
    check_config(cfg)
    return cfg


def cpu_has_bf16():
    """AVX512-BF16 or AMX: the x86 instructions that make bf16 autocast faster than fp32."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_config(cfg):
    if cfg.env not in GAMES:
        raise LapoError(f"unknown game {cfg.env!r}; choose one of: {', '.join(GAMES)}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        may_be_0 = f.name in ("seed", "vq_reset_after", "vq_count_init", "sl_smoothing", "expert_ent",
                              "ft_ent", "decode_wd", "sl_start", "s1_warmup", "s2_warmup")
        if f.type in (int, float) and (not math.isfinite(v) or v < 0 or (v == 0 and not may_be_0)):
            raise LapoError(f"--{f.name.replace('_', '-')} must be a {'non-negative' if may_be_0 else 'positive'} "
                            f"number, got {v}")
    if cfg.seed >= 10_000:  # collect gives each seed 10,000 chunks' worth of levels (LEVEL_SEEDS)
        raise LapoError(f"--seed must be below 10,000, got {cfg.seed}")
    if cfg.vq and cfg.la_dim % (cfg.vq_codebooks * cfg.vq_dim):  # --no-vq: the latent is la_dim numbers
        raise LapoError(f"--la-dim {cfg.la_dim} must be a multiple of "
                        f"--vq-codebooks x --vq-dim = {cfg.vq_codebooks * cfg.vq_dim}")
    for name in ("gamma", "gae_lambda", "clip", "vq_decay", "vq_beta", "sl_smoothing"):
        if getattr(cfg, name) > 1:
            raise LapoError(f"--{name.replace('_', '-')} must be at most 1, got {getattr(cfg, name)}")
    if (cfg.num_envs * cfg.num_steps) % cfg.minibatches:
        raise LapoError("--num-envs x --num-steps must be divisible by --minibatches")
    if cfg.probe_frames < 32:
        raise LapoError("--probe-frames must be at least 32")
    if cfg.num_steps < 3:
        raise LapoError("--num-steps must be at least 3: fine-tuning labels windows of 3 frames")
    ramps_end = max(b for _, b, _ in FT_RAMPS.values())
    if ramps_end * cfg.ft_schedule_scale >= cfg.ft_frames:
        raise LapoError(f"--ft-frames {cfg.ft_frames} ends before the fine-tuning ramps (frame {ramps_end} x "
                        f"--ft-schedule-scale {cfg.ft_schedule_scale:g}): raise --ft-frames or lower --ft-schedule-scale")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if cfg.device not in devices:
        raise LapoError(f"--device {cfg.device}: this machine's devices are {', '.join(devices)}")


# ----------------------------------------------------------------------------------------
# 2. Environment and data
# ----------------------------------------------------------------------------------------

GAMES = ["bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball",
         "fruitbot", "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder",
         "starpilot"]
NUM_ACTIONS = 15  # every Procgen game: LEFT-DOWN, LEFT, LEFT-UP, DOWN, NOOP, UP, ..., Q, E
# mean episode return (easy mode) of a uniform-random policy and of the authors' experts
RANDOM_RETURN = dict(zip(GAMES, [0.874, 0.046, 2.597, 0.663, 2.224, 2.705, 0.613, -2.533,
                                 3.076, 3.411, 2.511, 4.273, 1.251, 2.560, 4.321, 1.525]))
EXPERT_RETURN = dict(zip(GAMES, [36.34, 11.63, 9.184, 9.956, 10.23, 9.933, 13.49, 29.93,
                                 9.685, 8.460, 7.408, 9.969, 11.89, 9.475, 11.46, 66.99]))
TRAIN_CHUNK, TEST_CHUNK = 32_768, 4_096  # frames per chunk, as in the authors' data
FRAME_BYTES = 64 * 64 * 3


def relative_return(game, ret):
    """0 = uniform-random policy, 1 = the paper's expert."""
    return (ret - RANDOM_RETURN[game]) / (EXPERT_RETURN[game] - RANDOM_RETURN[game])


# Procgen draws every episode's level (one of 2^31) from a generator seeded by the seed given
# to make_env, so each use of the game has seeds of its own: PPO runs (the expert, fine-tuning,
# PPO from scratch) seed + frames done, the dataset and evaluation far above. Fine-tuning then
# replays a level of the dataset it imitated, and evaluation a level of training, only by
# the chance that two draws from 2^31 levels meet.
LEVEL_SEEDS = dict(train=1_000_000_000, test=1_100_000_000, eval=1_200_000_000)


def make_env(game, num_envs, seed):
    """Procgen, easy mode, the full level distribution. A baselines-style vector env:
    reset() -> {"rgb": (E,64,64,3) uint8}; step(a) -> (obs, reward, done, info); it resets
    finished episodes by itself."""
    from procgen import ProcgenEnv  # imported here: the networks need no game installed

    return ProcgenEnv(num_envs=num_envs, env_name=game, num_levels=0, start_level=0,
                      distribution_mode="easy", rand_seed=seed)


def next_frames(game, states=512, policy=None):
    """Yields, for batches of 64 states reached by random play (or by `policy`, frames
    (64, 64, 64, 3) -> 64 actions), about `states` in all, o_t (64, 64, 64, 3) and the next
    frame of every action stepped from the same saved state (64, 15, 64, 64, 3): what the
    game itself says each action does."""
    from procgen import ProcgenGym3Env

    E = 64
    env = ProcgenGym3Env(num=E, env_name=game, distribution_mode="easy", num_levels=0,
                         start_level=0, rand_seed=0)
    rng = np.random.default_rng(0)
    for _ in range(max(1, states // E)):
        for _ in range(8):  # wander to new states
            act = rng.integers(NUM_ACTIONS, size=E) if policy is None else policy(env.observe()[1]["rgb"])
            env.act(np.asarray(act, np.int32))
        now, saved, frames = env.observe()[1]["rgb"].copy(), env.get_state(), []
        for a in range(NUM_ACTIONS):
            env.set_state(saved)
            env.act(np.full(E, a, np.int32))
            frames.append(env.observe()[1]["rgb"].copy())
        env.set_state(saved)
        yield now, np.stack(frames, 1)
    env.close()


def action_groups(game, prior=None, states=512):
    """Which of the 15 actions do the same thing, asked of the game itself (next_frames).
    Actions whose next frames are identical in 95% of the states are joined, and
    joined actions form a group (coinrun: LEFT = LEFT-DOWN; most games: the last six do
    nothing). From o_{t+1} alone an action can be told only up to the actions that give the
    same frame, so the ceilings are the accuracy of the best guess from the next frame, raw
    and on groups, if actions were drawn from `prior` (15 probabilities, default uniform)
    whatever the state. A probe can beat them where the policy's choice shows in o_t."""
    same = []
    for _, frames in next_frames(game, states):
        frames = frames.reshape(*frames.shape[:2], -1)  # (64, 15, pixels)
        same.append(np.stack([(frames == frames[:, [a]]).all(-1) for a in range(NUM_ACTIONS)], 1))
    same = np.concatenate(same)  # (states, 15, 15): actions a and b give the same next frame
    group = np.arange(NUM_ACTIONS)
    for a, b in zip(*np.nonzero(same.mean(0) >= 0.95)):
        group[group == group[a]] = group[b]
    group = np.unique(group, return_inverse=True)[1]
    p = np.full(NUM_ACTIONS, 1 / NUM_ACTIONS) if prior is None else np.asarray(prior, dtype=float)
    ceiling, ceiling_merged = next_frame_ceiling(same, p, group)
    return dict(groups=group.tolist(), ceiling=ceiling, ceiling_merged=ceiling_merged)


def next_frame_ceiling(same, prior, group):
    """Bayes: seeing a's next frame, guess the likeliest action (group) among its look-alikes.
    same (states, 15, 15): actions a and b give the same next frame; prior: the actions'
    probabilities, (15,) or one row per state (states, 15). Returns the expected accuracy of
    that guess on raw actions and on groups."""
    prior = np.broadcast_to(prior, same.shape[:2])
    look_alikes = same * prior[:, None, :]  # (states, a, b): p(b) if b gives a's frame
    mass = look_alikes.sum(-1) + 1e-12
    best_group = (look_alikes @ np.eye(group.max() + 1)[group]).max(-1)
    hit = prior * look_alikes.max(-1) / mass  # p(a) x p(the guess from a's next frame is right)
    hit_merged = prior * best_group / mass
    return float(hit.sum(-1).mean()), float(hit_merged.sum(-1).mean())


class RewardNormalizer:
    """Divides rewards by the running std of the discounted return and clips to [-10, 10],
    as gym's NormalizeReward + clipping do for PPO on Procgen."""

    def __init__(self, num_envs, gamma):
        self.gamma, self.ret = gamma, np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, reward, done):
        self.ret = self.ret * self.gamma + reward
        m, v, n = self.ret.mean(), self.ret.var(), len(self.ret)  # merge batch stats (Chan et al.)
        delta, total = m - self.mean, self.count + n
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        self.ret[done] = 0.0
        return np.clip(reward / np.sqrt(self.var + 1e-8), -10, 10)

    def state_dict(self):
        return dict(mean=float(self.mean), var=float(self.var), count=float(self.count))

    def load_state_dict(self, d):
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]


def to_input(obs, device):
    """uint8 (B, [T,] H, W, 3) -> float (B, T*3, H, W) in [-0.5, 0.5], channels-last.
    Observations stay uint8 until they are on the device: 4x less to copy. Frames are stacked
    on channels; NHWC is already channels-last memory, so a frame's layout needs no copy."""
    x = torch.as_tensor(obs).to(device, non_blocking=True)
    if x.ndim == 5:
        x = x.permute(0, 2, 3, 1, 4).flatten(3)  # (B, H, W, T*C)
    x = x.permute(0, 3, 1, 2).float() / 255 - 0.5
    return x.contiguous(memory_format=torch.channels_last)


# The dataset is the authors' format: <data>/{train,test}/<i>.npz, chunks of consecutive
# frames with keys obs (N,64,64,3) uint8, ta (N,) true action, done (N,) bool, rewards,
# ep_returns, values (N,) float32. done[t] means the episode ended with action ta[t] (or
# collect's last step cut it there), so obs[t+1] starts a new one; ep_returns[t] is the
# return of the episode so far.
CHUNK_KEYS = dict(obs=np.uint8, ta=np.int64, done=np.bool_, rewards=np.float32,
                  ep_returns=np.float32, values=np.float32)


def write_chunk(path, chunk):
    """Uncompressed .npz (so obs can be memory-mapped), written to a temporary name and
    renamed, so a crash never leaves a half-written chunk."""
    tmp = Path(f"{path}.tmp.npz")
    np.savez(tmp, **{k: np.asarray(chunk[k], dtype=t) for k, t in CHUNK_KEYS.items()})
    os.replace(tmp, path)


def chunk_files(folder):
    files = [p for p in Path(folder).glob("*.npz") if p.stem.isdigit()]
    return sorted(files, key=lambda p: int(p.stem))


def check_game(folder, game):
    """collect names the game in <data>/game.txt (beside train/ and test/, which keep the
    authors' format): another game's frames would train a stage, and be scored against this
    game's action groups, silently. Data from elsewhere need not have the file."""
    path = Path(folder) / "game.txt"
    made_on = path.read_text().strip() if path.exists() else None
    if game and made_on and made_on != game:
        raise LapoError(f"{folder} holds frames of {made_on}, the flags say --env {game}: "
                        f"pass --env {made_on}, or another --data")


def mmap_npz(path, key):
    """Memory-map one array of an uncompressed .npz (None if it is compressed), so that
    reading a chunk's header does not read its frames."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra field lengths at 26..30
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_chunk(path):
    """Returns obs (memory-mapped if possible) and the small per-frame arrays, after checking
    every key and shape, obs's dtype and that actions are 0..14; a bad chunk raises one line
    naming the file."""
    try:
        with np.load(path) as z:
            missing = [k for k in CHUNK_KEYS if k not in z.files]
            if missing:
                raise LapoError(f"{path}: chunk lacks keys {missing}; expected {list(CHUNK_KEYS)}")
            small = {k: z[k] for k in CHUNK_KEYS if k != "obs"}
            obs = mmap_npz(path, "obs")
            if obs is None:
                obs = z["obs"]
    except LapoError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError, ...
        raise LapoError(f"{path}: corrupt or truncated chunk ({type(e).__name__}: {e}); "
                        "delete it and re-run `python lapo.py collect`") from None
    n = len(obs)
    if obs.shape[1:] != (64, 64, 3) or obs.dtype != np.uint8:
        raise LapoError(f"{path}: obs is {obs.dtype} {obs.shape}, expected uint8 (N, 64, 64, 3)")
    for k, v in small.items():
        if v.shape != (n,) or (k == "ta" and not np.isin(v, np.arange(NUM_ACTIONS)).all()):
            raise LapoError(f"{path}: {k} has shape {v.shape} (want ({n},)) or values out of range")
    return obs, small


class Dataset:
    """Transitions (o_{t-1}, o_t, o_{t+1}) from a folder of chunks. Windows never cross a
    chunk or an episode boundary. Observations of uncompressed chunks stay on disk: each
    window is one read of 3 frames, so memory does not grow with the dataset (pages of a
    memory map would count against the process as it touches them; the page cache does not).
    game: the --env, which must be the one the folder's game.txt names, if it has one."""

    def __init__(self, folder, split, game=None):
        check_game(folder, game)
        files = chunk_files(Path(folder) / split)
        if not files:
            raise LapoError(f"no dataset chunks in {Path(folder) / split}: run "
                            f"`python lapo.py collect` (or point --data at a dataset)")
        self.obs, self.ta, index = [], [], []
        for i, path in enumerate(files):
            obs, small = read_chunk(path)
            done = small["done"].astype(bool)
            t = np.arange(1, len(obs) - 1)
            t = t[~done[t - 1] & ~done[t]]  # no episode ends between t-1 and t+1
            self.obs.append((path, obs.offset) if isinstance(obs, np.memmap) else obs)
            self.ta.append(small["ta"].astype(np.int64))
            index.append(np.stack([np.full_like(t, i), t], 1))
        self.index = np.concatenate(index)
        self.frames = sum(len(d) for d in self.ta)
        if len(self.index) == 0:
            raise LapoError(f"{Path(folder) / split}: no complete transitions in the dataset")

    def __len__(self):
        return len(self.index)

    def get(self, idx):
        """windows (B, 3, 64, 64, 3) uint8 and the true action taken at o_t, (B,)"""
        obs = np.stack([self.window(c, t) for c, t in self.index[idx]])
        ta = np.array([self.ta[c][t] for c, t in self.index[idx]])
        return obs, ta

    def window(self, c, t):
        if isinstance(self.obs[c], np.ndarray):  # a compressed chunk, loaded in RAM
            return self.obs[c][t - 1 : t + 2]
        path, offset = self.obs[c]
        with open(path, "rb") as f:
            f.seek(offset + (t - 1) * FRAME_BYTES)
            return np.frombuffer(f.read(3 * FRAME_BYTES), np.uint8).reshape(3, 64, 64, 3)

    def sample(self, rng, batch, rank=0, world=1):
        """A random batch; under torchrun every rank draws the same one and keeps its share."""
        return self.get(rng.integers(len(self), size=batch)[rank::world])


# ----------------------------------------------------------------------------------------
# 3. Networks
# ----------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv0 = nn.Conv2d(c, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaCNN(nn.Module):
    """IMPALA-CNN (Espeholt et al. 2018): three (conv3x3, maxpool 3x3/2, 2 residual blocks)
    sequences, then a linear layer to 256 features. size x size images (64 in Procgen)."""

    def __init__(self, in_channels, scale, size=64):
        super().__init__()
        layers = []
        for c in (16, 32, 32):
            c = int(c * scale)
            layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.MaxPool2d(3, 2, padding=1),
                       ResidualBlock(c), ResidualBlock(c)]
            in_channels, size = c, (size + 1) // 2  # each max-pool halves, rounding up
        self.conv = nn.Sequential(*layers, nn.Flatten(), nn.ReLU())
        self.fc = nn.Linear(in_channels * size * size, 256)

    def forward(self, x):
        return F.relu(self.fc(self.conv(x)))


class VectorQuantizerEMA(nn.Module):
    """Vector quantisation (van den Oord et al. 2017) with an EMA codebook: no codebook
    gradients, codes move to the running mean of the vectors assigned to them.
    A latent of size G*P*D is read as G codebooks x P positions x D dims; each D-vector snaps
    to the nearest of its codebook's K codes. Gradients pass straight through.
    count_init: the EMA counts start at 1 by default. The authors start them at 0 without bias
    correction, so a code not picked on the first step is divided by ~1e-5 and flung far away."""

    def __init__(self, codebooks, codes, dim, beta, decay, count_init=1.0, reset_after=0, eps=1e-5):
        super().__init__()
        self.beta, self.decay, self.reset_after, self.eps = beta, decay, reset_after, eps
        codebook = torch.empty(codebooks, codes, dim).uniform_(-5 / codes, 5 / codes)
        self.register_buffer("codebook", codebook)  # (G, K, D)
        self.register_buffer("ema_count", torch.full((codebooks, codes), float(count_init)))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("idle_steps", torch.zeros(codebooks, codes))

    def statistics(self, onehot, x):
        """How many vectors each code got, and their sum: (G, K), (G, K, D). A method of its own
        so that GlobalVectorQuantizerEMA can sum them over the torchrun processes."""
        return onehot.sum(1), onehot.transpose(1, 2) @ x

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z):
        """z (B, G*P*D) -> z_q (B, G*P*D), commitment loss, perplexity, codes (B, G, P)"""
        G, K, D = self.codebook.shape
        B = z.shape[0]
        x = z.float().view(B, G, -1, D).transpose(0, 1).reshape(G, -1, D)  # (G, B*P, D)
        distance = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.codebook.transpose(1, 2)
                    + self.codebook.pow(2).sum(-1).unsqueeze(1))  # (G, B*P, K)
        idx = distance.argmin(-1)
        q = torch.gather(self.codebook, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # a copy of the codes
        onehot = F.one_hot(idx, K).float()
        commitment = self.beta * F.mse_loss(x, q.detach())
        q = x + (q - x).detach()  # straight-through: forward is q, gradient flows to x
        usage = onehot.mean(1)  # (G, K)
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum(-1)).mean()
        if self.training:  # after the lookup: this step's codes are the codebook before the update
            self.update_codebook(onehot, x)
        z_q = q.view(G, B, -1, D).transpose(0, 1).reshape(B, -1)
        return z_q, commitment, perplexity, idx.view(G, B, -1).transpose(0, 1)

    @torch.no_grad()
    def update_codebook(self, onehot, x):
        """Each code moves to the EMA mean of the vectors that picked it."""
        K = onehot.shape[-1]
        count, total = self.statistics(onehot, x)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        if self.reset_after:  # codebook collapse: a code nobody picks never moves again,
            # so one idle for reset_after steps restarts at a random vector of this batch
            self.idle_steps.add_(1).mul_(count == 0)
            dead = (self.idle_steps >= self.reset_after).unsqueeze(-1)
            sample = x[:, torch.randint(x.shape[1], (K,), device=x.device)]
            self.ema_sum.copy_(torch.where(dead, sample, self.ema_sum))
            self.ema_count.copy_(torch.where(dead[..., 0], 1.0, self.ema_count))
            self.idle_steps.mul_(~dead[..., 0])
        n = self.ema_count.sum(-1, keepdim=True)  # Laplace smoothing: no division by 0,
        # kept in the counts as the authors do (an idle code's count then settles near
        # eps / (1 - decay) rather than decaying to 0)
        self.ema_count.copy_((self.ema_count + self.eps) / (n + K * self.eps) * n)
        self.codebook.copy_(self.ema_sum / self.ema_count.unsqueeze(-1))


class IDM(nn.Module):
    """Latent inverse dynamics: (o_{t-1}, o_t, o_{t+1}) on 9 channels -> latent action."""

    def __init__(self, cfg, quantizer=VectorQuantizerEMA):
        super().__init__()
        self.cnn = ImpalaCNN(9, cfg.idm_scale)
        self.head = nn.Linear(256, cfg.la_dim)
        self.vq = quantizer(cfg.vq_codebooks, cfg.vq_codes, cfg.vq_dim, cfg.vq_beta, cfg.vq_decay,
                            cfg.vq_count_init, cfg.vq_reset_after) if cfg.vq else None

    def forward(self, x):
        """x (B, 9, 64, 64) -> la (continuous), la_q (quantised), commitment loss, perplexity"""
        la = self.head(self.cnn(x))
        if self.vq is None:  # no bottleneck but the latent's size: the no-VQ ablation
            return la, la, la.new_zeros(()), la.new_tensor(float("nan"))
        la_q, commitment, perplexity, _ = self.vq(la)
        return la, la_q, commitment, perplexity


class ResLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(c // 2, c, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


class TiledLatentConv(nn.Module):
    """conv3x3(cat[x, la tiled over the image]), without building the tiled tensor. A 3x3
    conv of a spatially constant map is, at each pixel, the sum of W_tap @ la over the taps
    that fall inside the image (zero padding drops the others at the border). Same function
    and parameters as the plain conv; the latent part costs ~la_dim x less (it was most of
    the FDM's compute)."""

    def __init__(self, c_x, c_la, c_out):
        super().__init__()
        self.c_x = c_x
        self.conv = nn.Conv2d(c_x + c_la, c_out, 3, padding=1)

    def forward(self, x, la):
        w = self.conv.weight
        out = F.conv2d(x, w[:, : self.c_x], self.conv.bias, padding=1)
        H, W = x.shape[2:]
        inside = F.pad(x.new_ones(1, 1, H, W), (1, 1, 1, 1))
        taps = inside.unfold(2, H, 1).unfold(3, W, 1)[0, 0]  # (3, 3, H, W): tap (k,l) inside?
        per_tap = torch.einsum("bc,ockl->bokl", la, w[:, self.c_x :])
        return out + torch.einsum("bokl,klhw->bohw", per_tap, taps)


def down_block(c_in, c_out, norm, conv=True):  # halves the resolution
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1) if conv else nn.Identity(),
                         norm(c_out), ResLayer(c_out), nn.MaxPool2d(2), nn.ReLU())


def up_block(c_in, c_out, norm):  # doubles the resolution
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2), norm(c_out), ResLayer(c_out), nn.ReLU())


class FDM(nn.Module):
    """Forward dynamics: U-Net from (o_{t-1}, o_t) and the latent action to o_{t+1}.
    The latent action is tiled over the image at the input and fed again at the 1x1
    bottleneck, so the U-Net's upsampling half cannot ignore it. Channels b, 2b, .., 16b down to 2x2, 32b at
    1x1, then back up with skip connections."""

    def __init__(self, cfg, norm=nn.BatchNorm2d):
        super().__init__()
        b, la, self.residual = cfg.fdm_width, cfg.la_dim, cfg.fdm_residual
        widths = [b, 2 * b, 4 * b, 8 * b, 16 * b]  # 32, 16, 8, 4, 2 pixels
        self.inp = TiledLatentConv(6, la, b)  # = conv3x3 of (o_{t-1}, o_t, la tiled)
        # the first down block's conv is self.inp, which also takes the latent
        self.down = nn.ModuleList([down_block(b, b, norm, conv=False)] + [
            down_block(c_in, c_out, norm) for c_in, c_out in zip(widths[:-1], widths[1:])])
        self.mid = nn.Conv2d(16 * b, 32 * b, 2)  # 2x2 -> 1x1
        # up[0]: 1x1 bottleneck + latent -> 2x2; then each takes cat(h, skip) and doubles the resolution
        self.up = nn.ModuleList([up_block(32 * b + la, 16 * b, norm)] + [
            up_block(2 * c, c_out, norm) for c, c_out in zip(widths[::-1], widths[::-1][1:] + [b])])
        self.out = nn.Sequential(nn.Conv2d(b + 6, b, 3, padding=1), ResLayer(b), nn.ReLU(),
                                 nn.Conv2d(b, 3, 1))
        if self.residual:  # start as copying o_t, so that only the change is left to learn
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, la):
        """x (B, 6, 64, 64) = (o_{t-1}, o_t); la (B, la_dim) -> o_{t+1} prediction (B, 3, 64, 64)"""
        h = self.inp(x, la)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = self.up[0](torch.cat([self.mid(h), la[:, :, None, None]], 1))
        for block, skip in zip(self.up[1:], reversed(skips)):
            h = block(torch.cat([h, skip], 1))
        out = self.out(torch.cat([h, x], 1))
        if self.residual:  # predict the change: a still frame costs nothing, motion must be explained
            return x[:, 3:6] + torch.tanh(out)
        return torch.tanh(out) / 2  # pixels live in [-0.5, 0.5]


class Policy(nn.Module):
    """IMPALA-CNN policy from o_t: 15 action logits and a value (the PPO agents and BC), or,
    with value=False, a latent action and no value (the latent policy of stage 2). PyTorch's
    default initialisation; the PPO agents re-initialise their heads (run_expert)."""

    def __init__(self, scale, out_dim, value=True):
        super().__init__()
        self.cnn = ImpalaCNN(3, scale)
        self.head = nn.Linear(256, out_dim)
        self.value = nn.Linear(256, 1) if value else None

    def forward(self, x):
        h = self.cnn(x)
        # the heads run in fp32 even under bf16 autocast: bf16 keeps 8 bits of a value, and
        # GAE's r + gamma V' - V would then be mostly rounding error where rewards are sparse
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            return self.head(h), (None if self.value is None else self.value(h).squeeze(-1))


def orthogonal_init(layer, std):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)


def mlp(*sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DecodedPolicy(nn.Module):
    """Offline decoding: the latent policy followed by a latent -> true action decoder."""

    def __init__(self, cfg, latent_policy):
        super().__init__()
        self.latent_policy = latent_policy
        self.decoder = mlp(cfg.la_dim, *OFFLINE_DECODER, NUM_ACTIONS)

    def forward(self, x):
        la, _ = self.latent_policy(x)
        return self.decoder(la), None


class ActionPrior(nn.Module):
    """A policy blind to the screen, drawing actions from fixed probabilities: uniform (the
    random reference) or the action mix of a few labels (decode's blind baseline: on a game
    where one direction mostly wins, a bar well above random)."""

    def __init__(self, probs=None):
        super().__init__()
        probs = torch.full((NUM_ACTIONS,), 1 / NUM_ACTIONS) if probs is None else torch.as_tensor(probs)
        self.register_buffer("logits", probs.float().log())

    def forward(self, x):
        return self.logits.to(x.device).expand(len(x), -1), None


class RLSLPolicy(nn.Module):
    """Online decoding (paper, section 3.3). The latent policy's conv trunk is kept and
    frozen. Two paths share it:
      SL path: a frozen copy of the latent policy's linear layer, its latent head (frozen),
               then a decoder MLP, fitted by supervised learning on (IDM latent, action) pairs.
      RL path: the latent policy's linear layer (tuned by PPO), a zero-initialised action
               head and a value head.
    The logits are the mean of both paths. The RL head starts at 0, so the agent acts as the
    latent policy through the decoder at temperature 2 (the halved logits, as in the authors'
    code; a random decoder until SL first fits it), and RL only has to correct it.
    With sl=False (RL only) PPO trains the decoder instead of SL."""

    def __init__(self, cfg, latent_policy, sl=True):
        super().__init__()
        self.conv = latent_policy.cnn.conv
        self.fc_rl = latent_policy.cnn.fc
        self.fc_sl = copy.deepcopy(latent_policy.cnn.fc)
        self.la_head = latent_policy.head
        self.decoder = mlp(cfg.la_dim, *ONLINE_DECODER, NUM_ACTIONS)
        self.rl_head = nn.Linear(256, NUM_ACTIONS)
        nn.init.zeros_(self.rl_head.weight)
        nn.init.zeros_(self.rl_head.bias)
        self.value = nn.Linear(256, 1)
        orthogonal_init(self.value, 1.0)
        frozen = [self.conv, self.fc_sl, self.la_head] + ([self.decoder] if sl else [])
        for module in frozen:  # no gradient reaches them, so PPO can neither move nor clip them
            module.requires_grad_(False)

    def forward(self, x):
        h = self.conv(x)
        with torch.autocast(h.device.type, enabled=False):  # fp32 heads, as in Policy
            h = h.float()
            h_rl, h_sl = F.relu(self.fc_rl(h)), F.relu(self.fc_sl(h))
            logits = (self.rl_head(h_rl) + self.decoder(self.la_head(h_sl))) / 2
            return logits, self.value(h_rl).squeeze(-1)


def make_policy(kind, cfg):
    """Rebuilds a saved acting policy from its kind: every checkpoint that can act says which."""
    if kind == "policy":
        return Policy(cfg.policy_scale, NUM_ACTIONS)
    if kind == "decoded":  # an empty latent policy: the checkpoint fills in its weights
        return DecodedPolicy(cfg, Policy(cfg.policy_scale, cfg.la_dim, value=False))
    if kind == "rlsl":
        return RLSLPolicy(cfg, Policy(cfg.policy_scale, cfg.la_dim, value=False))
    if kind == "prior":
        return ActionPrior()
    raise LapoError(f"checkpoint kind {kind!r} cannot act")


# ----------------------------------------------------------------------------------------
# 4. The method, one update at a time (the stages below, tools/bench.py and the tests call these)
# ----------------------------------------------------------------------------------------


def idm_fdm_loss(idm, fdm, x):
    """x (B, 9, 64, 64) = (o_{t-1}, o_t, o_{t+1}). The IDM sees all three frames; the FDM sees
    the first two and the quantised latent action of this very transition."""
    _, la_q, commitment, perplexity = idm(x)
    fdm_loss = F.mse_loss(fdm(x[:, :6], la_q).float(), x[:, 6:])
    return fdm_loss, commitment, perplexity


def stage1_update(cfg, idm, fdm, opt, x, step):
    """One step of stage 1 on windows x: FDM error + commitment, no action labels. The
    learning rate warms up from 0.1x and decays linearly to 0.01x (the paper's schedule); opt
    has two groups, the IDM's (at s1_idm_lr_scale x that rate) and the FDM's."""
    warmup = min(cfg.s1_warmup, cfg.s1_steps // 2)
    lr = lr_at(step, [0, warmup, cfg.s1_steps], [0.1 * cfg.s1_lr, cfg.s1_lr, 0.01 * cfg.s1_lr])
    set_lr(opt, lr * cfg.s1_idm_lr_scale, lr)  # the optimiser's groups: IDM, FDM
    idm.train(), fdm.train()
    with autocast(cfg):
        fdm_loss, commitment, perplexity = idm_fdm_loss(idm, fdm, x)
    loss = fdm_loss + commitment
    logged = global_mean(torch.stack([loss, fdm_loss, commitment]))  # one all-reduce under torchrun
    check_finite(logged[0], "stage1 loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(trained_params(opt), cfg.s1_clip)
    opt.step()
    # perplexity: under torchrun, of rank 0's share of the batch (a mean over ranks is not the batch's)
    return dict(fdm_loss=logged[1].item(), commitment=logged[2].item(), perplexity=perplexity.item())


@torch.no_grad()
def latent_actions(cfg, idm, windows, batch=256):
    """The IDM's continuous latent actions (before quantisation: what the latent policy
    imitates and the decoder reads) for uint8 windows (N, 3, 64, 64, 3), on cfg.device."""
    idm.eval()
    la = []
    for i in range(0, len(windows), batch):
        with autocast(cfg):
            la.append(idm(to_input(windows[i : i + batch], cfg.device))[0].float())
    return torch.cat(la)


def stage2_update(cfg, idm, policy, opt, x, step):
    """One step of latent behaviour cloning: the policy, from o_t alone, regresses the frozen
    IDM's continuous (pre-quantisation, as in the authors' code) latent action for
    (o_{t-1}, o_t, o_{t+1}) with MSE."""
    warmup = min(cfg.s2_warmup, cfg.s2_steps // 2)
    set_lr(opt, lr_at(step, [0, warmup, cfg.s2_steps], [0.01 * cfg.s2_lr, cfg.s2_lr, 0]))
    idm.eval()  # in train mode every call would move the EMA codebook
    with torch.no_grad(), autocast(cfg):
        la, _, _, _ = idm(x)
    policy.train()
    with autocast(cfg):
        la_pred, _ = policy(x[:, 3:6])  # o_t alone
    loss = F.mse_loss(la_pred.float(), la.float())
    logged = global_mean(loss)
    check_finite(logged, "stage2 loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return dict(loss=logged.item())


def gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), over a rollout of T steps.
    dones[t] = 1 if obs[t] starts a new episode (so no bootstrapping from t into t-1)."""
    T = len(rewards)
    adv = torch.zeros_like(rewards)
    last = 0
    for t in reversed(range(T)):
        not_done = 1.0 - (next_done if t == T - 1 else dones[t + 1])
        next_v = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v * not_done - values[t]
        adv[t] = last = delta + gamma * lam * not_done * last
    return adv, adv + values


def ppo_update(cfg, agent, opt, batch, ent_coef):
    """PPO's clipped objective (Schulman et al. 2017), epochs x minibatches over one rollout;
    batch holds flat obs, actions, logprobs, advantages, returns, values. Only the optimiser's
    parameters are clipped and stepped. first_kl is the KL between the rollout's policy and
    the one updated, before the first step: 0 unless something changed the policy in between."""
    params, n = trained_params(opt), len(batch["obs"])
    agent.train()
    first_kl = None
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, device=batch["obs"].device).split(n // cfg.minibatches):
            with autocast(cfg):
                logits, value = agent(to_input(batch["obs"][idx], cfg.device))
            pi = torch.distributions.Categorical(logits=logits.float())
            log_ratio = pi.log_prob(batch["actions"][idx]) - batch["logprobs"][idx]
            ratio = log_ratio.exp()
            if first_kl is None:
                first_kl = ((ratio - 1) - log_ratio).mean().item()  # Schulman's estimator, >= 0
            a = batch["advantages"][idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
            value, old, ret = value.float(), batch["values"][idx], batch["returns"][idx]
            v_clipped = old + (value - old).clamp(-cfg.clip, cfg.clip)  # clipped value loss
            v_loss = 0.5 * torch.max((value - ret) ** 2, (v_clipped - ret) ** 2).mean()
            entropy = pi.entropy().mean()
            loss = pg_loss + cfg.vf_coef * v_loss - ent_coef * entropy
            check_finite(loss, "PPO loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
    return dict(pg_loss=pg_loss.item(), v_loss=v_loss.item(), entropy=entropy.item(), first_kl=first_kl)


def label_rollout(cfg, idm, obs, actions, dones):
    """(IDM latent action, action taken) pairs of a rollout: the latent of (o_{t-1}, o_t,
    o_{t+1}) is paired with the action taken at o_t. obs (T, E, 64, 64, 3) uint8, actions
    and dones (T, E), dones[t] = 1 if obs[t] starts an episode; windows that cross an episode
    (or the rollout's ends) are dropped."""
    t = torch.arange(1, len(obs) - 1, device=obs.device)
    windows = torch.stack([obs[t - 1], obs[t], obs[t + 1]], 2).flatten(0, 1)  # ((T-2)*E, 3, ...)
    same_episode = ((dones[t] == 0) & (dones[t + 1] == 0)).flatten()
    return latent_actions(cfg, idm, windows[same_episode]), actions[t].flatten()[same_episode].long()


def fit_decoder(cfg, la, ta):
    """A new decoder latent action -> true action, fitted from scratch on the pairs (la, ta)
    with label smoothing (the SL of RL+SL). Returns it and its last loss."""
    decoder = mlp(cfg.la_dim, *ONLINE_DECODER, NUM_ACTIONS).to(la.device)
    opt = torch.optim.Adam(decoder.parameters())
    for _ in range(cfg.sl_epochs):
        for i in torch.randperm(len(la), device=la.device).split(cfg.sl_batch):
            loss = F.cross_entropy(decoder(la[i]), ta[i], label_smoothing=cfg.sl_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return decoder, loss.item()


class DecoderSL:
    """The SL of RL+SL, run after every PPO update, so the next rollout acts with the new
    decoder: label the rollout's transitions with the IDM and, inside the SL window, re-fit
    the decoder from scratch on every pair so far (after each update until sl_dense frames,
    then every sl_every updates). Its pairs go into the run's checkpoints."""

    def __init__(self, cfg, idm, decoder):
        self.cfg, self.idm, self.decoder = cfg, idm, decoder
        self.la = torch.zeros(0, cfg.la_dim, device=cfg.device)
        self.ta = torch.zeros(0, dtype=torch.long, device=cfg.device)

    def __call__(self, obs, actions, dones, frames):
        cfg, s = self.cfg, self.cfg.ft_schedule_scale
        if frames >= cfg.sl_end * s:  # the window is over: the pairs are no longer needed
            self.la, self.ta = self.la[:0], self.ta[:0]
            return {}
        la, ta = label_rollout(cfg, self.idm, obs, actions, dones)
        self.la, self.ta = torch.cat([self.la, la]), torch.cat([self.ta, ta])
        metrics = dict(sl_pairs=len(self.ta))
        update = frames // (cfg.num_envs * cfg.num_steps)  # PPO updates so far, this one included
        if frames > cfg.sl_start * s and (frames < cfg.sl_dense * s or update % cfg.sl_every == 0):
            decoder, metrics["sl_loss"] = fit_decoder(cfg, self.la, self.ta)
            self.decoder.load_state_dict(decoder.state_dict())
        return metrics

    def state_dict(self):
        return dict(la=self.la, ta=self.ta)

    def load_state_dict(self, d):
        self.la, self.ta = d["la"].to(self.cfg.device), d["ta"].to(self.cfg.device)


# ----------------------------------------------------------------------------------------
# 5. Measurements: the probe and its bars, stage 1's held-out scores, evaluation episodes
# ----------------------------------------------------------------------------------------


def probe_accuracy(x, y, steps):
    """How much of the true action can be read from features x: an MLP (128, 128) fitted on
    the first half, accuracy on the second half. Labels are used for this evaluation only.
    Features are centred and divided by one common scale: a per-feature scale would blow up
    a pixel that happens to be constant in the fitting half (x 1e6), and wreck the score."""
    n = len(x) // 2
    x = (x - x[:n].mean(0)) / (x[:n].std() + 1e-8)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.default_generator.manual_seed(0)  # torch.manual_seed would reset CUDA's too
        net = mlp(x.shape[1], *OFFLINE_DECODER, NUM_ACTIONS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(n, (256,), generator=g)
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (net(x[n:]).argmax(-1) == y[n:]).float().mean().item()


def majority_accuracy(y):
    """The majority class as a probe: its class is the commonest in the fitting half, scored
    on the second half, the windows every probe is scored on."""
    n = len(y) // 2
    return (y[n:] == torch.bincount(y[:n]).argmax()).float().mean().item()


def stage1_bars(cfg, windows, ta):
    """What a latent action must beat to be worth anything: the majority class, and the same
    probe fed the raw frame difference o_{t+1} - o_t (full resolution); each on raw actions
    and on groups of actions that do the same thing (action_groups), with their ceilings
    for the action mix of the scored half."""
    scored = ta[len(ta) // 2 :]
    bars = action_groups(cfg.env, prior=(torch.bincount(scored, minlength=NUM_ACTIONS) / len(scored)).numpy())
    merged = torch.as_tensor(bars["groups"])[ta]
    diff = (torch.as_tensor(windows[:, 2]).float() - torch.as_tensor(windows[:, 1]).float()).flatten(1) / 255
    return dict(bars, majority=majority_accuracy(ta), majority_merged=majority_accuracy(merged),
                probe_frame_diff=probe_accuracy(diff, ta, cfg.probe_steps),
                probe_frame_diff_merged=probe_accuracy(diff, merged, cfg.probe_steps))


@torch.no_grad()
def stage1_eval(cfg, idm, fdm, windows, ta, groups):
    """On held-out windows: the probe on the latent (continuous: raw actions and action groups;
    quantised: raw); the FDM's error against copying o_t, and with latents shuffled across the
    batch (if that is no worse, the FDM ignores the latent); codebook perplexity, live codes;
    the latent's spread across windows (std, mean over dims: 0 once it has collapsed)."""
    la = latent_actions(cfg, idm, windows)
    la_q, perplexity, live_codes = la, math.nan, 0
    if idm.vq is not None:
        la_q, _, perplexity, codes = idm.vq(la)
        # codes in use on the probe windows, in the codebook that uses fewest
        perplexity, live_codes = perplexity.item(), min(len(codes[:, g].unique()) for g in range(cfg.vq_codebooks))
    every = max(1, len(windows) // 512)  # 512-1,023 of the probe windows (all below 512), evenly spaced, for the FDM
    x, la_x = to_input(windows[::every], cfg.device), la_q[::every]
    fdm.eval()
    with autocast(cfg):
        pred = fdm(x[:, :6], la_x).float()
        shuffled = fdm(x[:, :6], la_x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]).float()
    la, la_q = la.cpu(), la_q.cpu()  # the probe fits on the CPU
    return dict(probe_la=probe_accuracy(la, ta, cfg.probe_steps),
                probe_la_merged=probe_accuracy(la, torch.as_tensor(groups)[ta], cfg.probe_steps),
                probe_la_q=probe_accuracy(la_q, ta, cfg.probe_steps),
                test_fdm_mse=F.mse_loss(pred, x[:, 6:]).item(),
                test_fdm_mse_shuffled=F.mse_loss(shuffled, x[:, 6:]).item(),
                test_copy_mse=F.mse_loss(x[:, 3:6], x[:, 6:]).item(),
                test_perplexity=perplexity, live_codes=live_codes, latent_spread=la.std(0).mean().item())


def evaluate(cfg, agent, episodes):
    """Plays exactly `episodes` episodes on the full level distribution (seeds of their own:
    LEVEL_SEEDS), sampling actions from the policy; returns their returns. Each env plays a
    fixed share of the episodes, so short episodes are not favoured."""
    n_envs = min(episodes, 64)
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    seed = LEVEL_SEEDS["eval"] + cfg.seed
    envs = make_env(cfg.env, n_envs, seed)
    torch.manual_seed(seed)
    obs, ep_ret = envs.reset()["rgb"], np.zeros(n_envs)
    returns = [[] for _ in range(n_envs)]
    agent.eval()
    while any(len(r) < q for r, q in zip(returns, quota)):
        with torch.no_grad(), autocast(cfg):
            logits, _ = agent(to_input(obs, cfg.device))
        action = torch.distributions.Categorical(logits=logits.float()).sample()
        obs, reward, done, _ = envs.step(action.cpu().numpy().astype(np.int32))
        obs, ep_ret = obs["rgb"], ep_ret + reward
        for i in np.flatnonzero(done):
            if len(returns[i]) < quota[i]:
                returns[i].append(float(ep_ret[i]))
            ep_ret[i] = 0
    envs.close()
    return [r for env_returns in returns for r in env_returns]


def return_summary(cfg, returns):
    m = float(np.mean(returns))
    return dict(mean=m, std=float(np.std(returns)), episodes=len(returns),
                relative=relative_return(cfg.env, m))


# ----------------------------------------------------------------------------------------
# 6. Stages
# ----------------------------------------------------------------------------------------


def ppo(cfg, name, agent, opt, lr_fn, frames, ent_coef, path, state, after_update=None):
    """PPO after CleanRL's ppo_procgen (collect num_steps in num_envs, GAE, update), with the
    authors' fine-tuning sizes (num_steps 64, where CleanRL's has 256).
    lr_fn(frames) gives each optimiser group's learning rate. after_update(obs, actions,
    dones, frames) sees every rollout after its update (RL+SL fits its decoder there) and is
    checkpointed with the run. state: the unfinished checkpoint to resume (resume_state), or
    None. Returns the frame count reached (resumed runs included)."""
    dev, E, T = cfg.device, cfg.num_envs, cfg.num_steps
    normalize = RewardNormalizer(E, cfg.gamma)
    if state and state["step"] - E * T >= frames:  # it went on past this budget (not just to its end)
        flag = "--expert-frames" if name == "expert" else "--ft-frames"
        raise LapoError(f"{path} is at frame {state['step']}, {flag} is {frames}: raise it or delete the file")
    done_frames = restore(path, state, policy=agent, opt=opt, normalizer=normalize, after_update=after_update)
    returns = state["returns"] if state else []
    seed_everything(cfg.seed + done_frames)  # a resumed run continues on fresh levels
    envs = make_env(cfg.env, E, cfg.seed + done_frames)
    log = Logger(cfg, name, frames, start=done_frames, unit="frame")
    obs = torch.zeros(T, E, 64, 64, 3, dtype=torch.uint8, device=dev)
    actions, logprobs, rewards, dones, values = (torch.zeros(T, E, device=dev) for _ in range(5))
    next_obs, next_done = envs.reset()["rgb"], torch.zeros(E, device=dev)
    ep_ret, ep_len = np.zeros(E), np.zeros(E, dtype=int)
    last_save, t0 = time.time(), start_time(state)
    while done_frames < frames:
        set_lr(opt, *lr_fn(done_frames))
        agent.eval()
        for t in range(T):
            obs[t] = torch.as_tensor(next_obs).to(dev, non_blocking=True)
            dones[t] = next_done  # 1 if obs[t] is an episode's FIRST frame (a chunk's done[t]: its last)
            with torch.no_grad(), autocast(cfg):
                logits, value = agent(to_input(obs[t], dev))
            pi = torch.distributions.Categorical(logits=logits.float())
            action = pi.sample()
            actions[t], logprobs[t], values[t] = action, pi.log_prob(action), value.float()
            next_obs, reward, done, _ = envs.step(action.cpu().numpy().astype(np.int32))
            next_obs = next_obs["rgb"]
            ep_ret, ep_len = ep_ret + reward, ep_len + 1
            for i in np.flatnonzero(done):
                returns.append(float(ep_ret[i]))
                log.log(done_frames + t * E + i + 1, episode_return=float(ep_ret[i]),
                        episode_length=int(ep_len[i]))
            ep_ret[done], ep_len[done] = 0, 0
            rewards[t] = torch.as_tensor(normalize(reward, done), device=dev)
            next_done = torch.as_tensor(done, device=dev, dtype=torch.float32)
        done_frames += T * E
        with torch.no_grad(), autocast(cfg):
            _, next_value = agent(to_input(next_obs, dev))
        adv, ret = gae(rewards, values, dones, next_value.float(), next_done, cfg.gamma, cfg.gae_lambda)
        batch = dict(obs=obs.flatten(0, 1), actions=actions.flatten().long(), logprobs=logprobs.flatten(),
                     advantages=adv.flatten(), returns=ret.flatten(), values=values.flatten())
        metrics = ppo_update(cfg, agent, opt, batch, ent_coef)
        if after_update is not None:
            metrics.update(after_update(obs, actions, dones, done_frames))
        log.log(done_frames, return_100=float(np.mean(returns[-100:])) if returns else float("nan"),
                **metrics)
        if time.time() - last_save > cfg.ckpt_every_s or done_frames >= frames:
            save_checkpoint(path, cfg, policy=agent, opt=opt, normalizer=normalize, after_update=after_update,
                            step=done_frames, returns=returns[-1000:], minutes=(time.time() - t0) / 60)
            last_save = time.time()
    envs.close()
    return done_frames


def evaluate_and_finish(cfg, path, agent, kind, t0, step, **results):
    """The last act of every stage that makes a policy: play it, and save it as finished."""
    results.update(return_summary(cfg, evaluate(cfg, agent, cfg.eval_episodes)),
                   minutes=(time.time() - t0) / 60)
    save_checkpoint(path, cfg, kind=kind, policy=agent, step=step, finished=True, results=results)
    print(f"[{path.stem}] return {results['mean']:.2f} +- {results['std']:.2f} (relative "
          f"{results['relative']:.2f}) over {results['episodes']} episodes")
    return results


def run_expert(cfg, name="expert", frames=None):
    """Stage 0: PPO from scratch on the game for `frames` (default expert_frames). The expert
    that makes the dataset, and (as 'ppo', for ft_frames) the baseline of online decoding."""
    frames = frames or cfg.expert_frames
    path, state = resume_state(cfg, name)
    if state and state.get("finished"):
        return state["results"]
    seed_everything(cfg.seed)
    agent = Policy(cfg.policy_scale, NUM_ACTIONS).to(cfg.device, memory_format=torch.channels_last)
    orthogonal_init(agent.head, 0.01)  # CleanRL's PPO: a near-uniform first policy,
    orthogonal_init(agent.value, 1.0)  # unit-scale values, and Adam's eps 1e-5
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.expert_lr, eps=1e-5)
    t0 = start_time(state)
    done_frames = ppo(cfg, name, agent, opt, lambda f: [cfg.expert_lr * (1 - f / frames)], frames,
                      cfg.expert_ent, path, state)
    return evaluate_and_finish(cfg, path, agent, "policy", t0, done_frames)


def load_policy(cfg, path):
    """The acting policy of a finished checkpoint (expert, decode-N, bc-N, prior-N, finetune, finetune-rl, ppo)."""
    stage = Path(path).stem  # decode-256-seed1, finetune-rl, ...; another name is read as an expert
    ckpt = load_checkpoint(path, stage if stage.split("-")[0] in STAGE_COMMAND else "expert")
    if "kind" not in ckpt:
        raise LapoError(f"{path} holds no acting policy: use expert.pt, decode-N.pt, bc-N.pt, prior-N.pt, "
                        f"finetune.pt, finetune-rl.pt or ppo.pt")
    stage_of_kind = dict(policy="expert", decoded="decode", rlsl="finetune", prior="prior")
    if ckpt["kind"] in stage_of_kind:  # the game and sizes of what it holds, whatever its name says
        check_flags(path, ckpt, stage_of_kind[ckpt["kind"]], cfg)
    agent = make_policy(ckpt["kind"], cfg).to(cfg.device, memory_format=torch.channels_last)
    agent.load_state_dict(ckpt["policy"])
    return agent.eval()


def collect(cfg, random_policy=False, policy_path=None):
    """Rolls out the expert (or another acting checkpoint, or a uniform-random policy) and
    writes the authors' chunk format: <data>/train/0.npz .. and <data>/test/0.npz .., each
    chunk consecutive frames. Test chunks play levels of another seed. Resumes by appending
    new chunks. Returns the frames per split: --train-frames and --test-frames rounded up to
    whole chunks."""
    agent = None if random_policy else load_policy(cfg, policy_path or Path(cfg.run_dir) / "expert.pt")
    check_game(cfg.data, cfg.env)
    if not any(chunk_files(Path(cfg.data) / split) for split in ("train", "test")):  # a new dataset: name its game
        Path(cfg.data).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(cfg.data) / "game.txt", cfg.env + "\n")
    frames_written = {}
    for split, frames, chunk_len in [("train", cfg.train_frames, TRAIN_CHUNK), ("test", cfg.test_frames, TEST_CHUNK)]:
        chunk_len = min(chunk_len, frames)
        n_chunks = math.ceil(frames / chunk_len)
        frames_written[split] = n_chunks * chunk_len
        folder = Path(cfg.data) / split
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob("*.tmp.npz"):  # left by a crash mid-write
            tmp.unlink()
        have = 0  # chunks 0, 1, .. that read; collecting resumes at the first missing or bad one
        for f in chunk_files(folder):
            try:
                if int(f.stem) != have:
                    break
                n = len(read_chunk(f)[0])
            except LapoError as e:
                print(f"rewriting bad chunk: {e}")
                break
            if n != chunk_len:  # collected with other --{split}-frames: the stages would train on n, not frames
                raise LapoError(f"{f} holds {n} frames, --{split}-frames {frames} asks for chunks of {chunk_len}: "
                                f"use another --data folder")
            have += 1
        if have > n_chunks:  # the stages read every chunk: they would train on more than asked
            raise LapoError(f"{folder} holds {have} chunks, more than the {n_chunks} that "
                            f"--{split}-frames {frames} asks for: use another --data folder")
        if have == n_chunks:
            print(f"[collect] {folder} already has {have} chunks")
            continue
        if have:
            print(f"[collect] {folder}: keeping chunks 0..{have - 1}, writing chunks {have}..{n_chunks - 1}")
        need = (n_chunks - have) * chunk_len * FRAME_BYTES
        free = shutil.disk_usage(folder).free
        if need > free * 0.95:
            raise LapoError(f"collect needs {need / 2**30:.2f} GiB in {folder}, only "
                            f"{free / 2**30:.2f} GiB free: free space or lower --train-frames")
        seed = LEVEL_SEEDS[split] + 10_000 * cfg.seed + have  # a resume plays new levels, another --seed others
        collect_split(cfg, agent, folder, have, n_chunks, chunk_len, seed)
    return frames_written


def collect_split(cfg, agent, folder, first, n_chunks, chunk_len, seed):
    """Runs num_envs games in parallel for the same number of steps; an episode joins the
    chunk when it ends, so chunks are episodes laid end to end (an episode may continue into
    the next chunk). The episodes still running at the last step are cut there (done = True)
    and kept: dropping them would drop the long episodes, whose frames are then missing from
    the data. Frames go into preallocated arrays (one running episode per env, one chunk):
    one small array per frame fragments the heap between the policy's temporaries (4x the
    peak memory)."""
    E = cfg.num_envs
    envs = make_env(cfg.env, E, seed)
    rng = seed_everything(seed)
    obs = envs.reset()["rgb"]
    shapes = dict(obs=obs.shape[1:])
    cap = 1024  # longest episode held; doubled when an episode outgrows it
    episode = {k: np.empty((E, cap, *shapes.get(k, ())), t) for k, t in CHUNK_KEYS.items()}
    chunk = {k: np.empty((chunk_len, *shapes.get(k, ())), t) for k, t in CHUNK_KEYS.items()}
    length, filled, n, ep_ret, rows = np.zeros(E, int), 0, first, np.zeros(E), np.arange(E)
    log = Logger(cfg, f"collect-{folder.name}", n_chunks * chunk_len, start=first * chunk_len, unit="frame")
    steps = math.ceil((n_chunks - first) * chunk_len / E)
    for step in range(steps):
        if agent is None:
            action, value = rng.integers(NUM_ACTIONS, size=E), np.zeros(E)
        else:
            with torch.no_grad(), autocast(cfg):
                logits, value = agent(to_input(obs, cfg.device))
            action = torch.distributions.Categorical(logits=logits.float() / cfg.collect_temp).sample().cpu().numpy()
            value = np.zeros(E) if value is None else value.float().cpu().numpy()  # decode-N: no critic
        next_obs, reward, done, _ = envs.step(action.astype(np.int32))
        ep_ret += reward
        if length.max() == cap:
            episode = {k: np.concatenate([v, np.empty_like(v)], 1) for k, v in episode.items()}
            cap *= 2
        for k, v in zip(CHUNK_KEYS, (obs, action, done, reward, ep_ret, value)):
            episode[k][rows, length] = v
        length += 1
        if step == steps - 1:  # the last step cuts every running episode: it ends here
            done = np.ones(E, bool)
            episode["done"][rows, length - 1] = True
        for i in np.flatnonzero(done):  # copy the finished episode into the chunk(s)
            start = 0
            while start < length[i] and n < n_chunks:
                m = min(chunk_len - filled, length[i] - start)
                for k in CHUNK_KEYS:
                    chunk[k][filled:filled + m] = episode[k][i, start:start + m]
                filled, start = filled + m, start + m
                if filled == chunk_len:
                    write_chunk(folder / f"{n}.npz", chunk)
                    n, filled = n + 1, 0
                    log.log(n * chunk_len, force=True, chunk=n)
            length[i], ep_ret[i] = 0, 0
        obs = next_obs["rgb"]
    envs.close()


def stage1(cfg):
    """Trains the latent IDM and the FDM jointly (stage1_update); every probe_every steps,
    measures on held-out windows what the latent knows (stage1_eval)."""
    path, state = resume_state(cfg, "stage1")
    if state and state.get("finished"):
        return state["results"]
    train, test = Dataset(cfg.data, "train", cfg.env), Dataset(cfg.data, "test", cfg.env)
    rank, world = rank_world()
    if rank == 0:
        print(f"[stage1] {train.frames} train frames ({len(train)} transitions), {test.frames} test frames")
    rng = seed_everything(cfg.seed)
    idm = IDM(cfg, GlobalVectorQuantizerEMA if world > 1 else VectorQuantizerEMA)
    fdm = FDM(cfg, GlobalBatchNorm2d if world > 1 else nn.BatchNorm2d)
    idm, fdm = (m.to(cfg.device, memory_format=torch.channels_last) for m in (idm, fdm))
    opt = torch.optim.Adam([dict(params=idm.parameters()), dict(params=fdm.parameters())], lr=cfg.s1_lr)
    step = restore(path, state, idm=idm, fdm=fdm, opt=opt)
    if step >= cfg.s1_steps:  # an unfinished run of more steps
        raise LapoError(f"{path} is at step {step}, --s1-steps is {cfg.s1_steps}: raise it or delete the file")
    if step:  # a resumed run draws fresh batches
        rng = seed_everything(cfg.seed + step)
    idm_ddp, fdm_ddp = (DDP(idm), DDP(fdm)) if world > 1 else (idm, fdm)  # averages gradients
    probe_idx = np.linspace(0, len(test) - 1, min(cfg.probe_frames, len(test))).astype(int)
    probe_windows, probe_ta = test.get(probe_idx)
    probe_ta = torch.as_tensor(probe_ta)
    bars = state["bars"] if state else stage1_bars(cfg, probe_windows, probe_ta)
    log = Logger(cfg, "stage1", cfg.s1_steps, start=step)
    last_save, t0, results = time.time(), start_time(state), {}
    if step == 0:
        results = stage1_eval(cfg, idm, fdm, probe_windows, probe_ta, bars["groups"])
        bars["probe_untrained"] = results["probe_la"]  # the untrained IDM is a bar too
        log.log(step, force=True, **results, **bars)
    while step < cfg.s1_steps:
        windows, _ = train.sample(rng, cfg.s1_batch, rank, world)
        metrics = stage1_update(cfg, idm_ddp, fdm_ddp, opt, to_input(windows, cfg.device), step)
        step += 1
        log.log(step, **metrics)
        finished = step == cfg.s1_steps
        if step % cfg.probe_every == 0 or finished:  # logged before the checkpoint: never redone
            results = stage1_eval(cfg, idm, fdm, probe_windows, probe_ta, bars["groups"])
            log.log(step, force=True, **results, **bars)
            if results["latent_spread"] < 1e-6:  # one latent for every window: no gradient makes it vary again
                rerun = f"Delete {path} (else it resumes this run) and run" if path.exists() else "Run"
                raise LapoError(f"stage 1 collapsed at step {step}: the IDM gives every held-out window the same "
                                f"latent action, for good. {rerun} it again with another --seed or "
                                f"--s1-idm-lr-scale 0.3")
        if time.time() - last_save > cfg.ckpt_every_s or finished:
            if finished:
                results.update(minutes=(time.time() - t0) / 60, **bars)
            save_checkpoint(path, cfg, idm=idm, fdm=fdm, opt=opt, step=step, finished=finished,
                            bars=bars, results=results, minutes=(time.time() - t0) / 60)
            last_save = time.time()
    if rank == 0:
        print(f"[stage1] probe accuracy {results['probe_la']:.3f} (quantised {results['probe_la_q']:.3f}) "
              f"vs majority {bars['majority']:.3f}, frame difference {bars['probe_frame_diff']:.3f}; "
              f"on action groups {results['probe_la_merged']:.3f} vs {bars['majority_merged']:.3f}, "
              f"{bars['probe_frame_diff_merged']:.3f}; perplexity {results['test_perplexity']:.1f}/{cfg.vq_codes}")
        used = results["test_fdm_mse_shuffled"] / max(results["test_fdm_mse"], 1e-12)
        print(f"[stage1] FDM error with shuffled latents: {used:.2f}x its own" + (" -- the FDM barely uses the "
              "latent, so it carries little of the action: try another --seed or more --s1-steps" if used < 1.01 else ""))
    return results


def load_idm(cfg):
    ckpt = load_checkpoint(Path(cfg.run_dir) / "stage1.pt", "stage1", cfg)
    idm = IDM(cfg).to(cfg.device, memory_format=torch.channels_last)
    idm.load_state_dict(ckpt["idm"])
    return idm.eval().requires_grad_(False)


def stage2(cfg):
    """Latent behaviour cloning (stage2_update); the IDM is frozen, its latents are targets."""
    path, state = resume_state(cfg, "stage2")
    if state and state.get("finished"):
        return state["results"]
    idm = load_idm(cfg)
    idm_sum = weight_sum(idm)  # saved with every checkpoint: which IDM this policy imitates
    if state:
        check_same_idm(path, state, idm)
    train, test = Dataset(cfg.data, "train", cfg.env), Dataset(cfg.data, "test", cfg.env)
    rng = seed_everything(cfg.seed)
    policy = Policy(cfg.policy_scale, cfg.la_dim, value=False).to(cfg.device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.s2_lr)
    step = restore(path, state, policy=policy, opt=opt)
    if step >= cfg.s2_steps:  # an unfinished run of more steps
        raise LapoError(f"{path} is at step {step}, --s2-steps is {cfg.s2_steps}: raise it or delete the file")
    if step:  # a resumed run draws fresh batches
        rng = seed_everything(cfg.seed + step)
    rank, world = rank_world()
    policy_ddp = DDP(policy) if world > 1 else policy
    test_windows, _ = test.sample(np.random.default_rng(cfg.seed), 512)
    test_x, test_la = to_input(test_windows, cfg.device), latent_actions(cfg, idm, test_windows)
    # predicting the mean latent is the bar: the policy must beat it
    results = dict(mean_baseline_mse=F.mse_loss(test_la.mean(0).expand_as(test_la), test_la).item())
    log = Logger(cfg, "stage2", cfg.s2_steps, start=step)
    last_save, t0 = time.time(), start_time(state)
    while step < cfg.s2_steps:
        windows, _ = train.sample(rng, cfg.s2_batch, rank, world)
        metrics = stage2_update(cfg, idm, policy_ddp, opt, to_input(windows, cfg.device), step)
        step += 1
        finished = step == cfg.s2_steps
        if step % 100 == 0 or finished:
            policy.eval()
            with torch.no_grad(), autocast(cfg):
                la_pred, _ = policy(test_x[:, 3:6])
            metrics["test_loss"] = F.mse_loss(la_pred.float(), test_la).item()
        log.log(step, **metrics)
        if time.time() - last_save > cfg.ckpt_every_s or finished:
            if finished:
                results.update(test_mse=metrics["test_loss"], minutes=(time.time() - t0) / 60)
            save_checkpoint(path, cfg, policy=policy, opt=opt, step=step, finished=finished, results=results,
                            idm_sum=idm_sum, minutes=(time.time() - t0) / 60)
            last_save = time.time()
    if rank == 0:
        print(f"[stage2] held-out latent MSE {results['test_mse']:.4f} "
              f"(predicting the mean latent: {results['mean_baseline_mse']:.4f})")
    return results


def load_latent_policy(cfg, idm):
    path = Path(cfg.run_dir) / "stage2.pt"
    ckpt = load_checkpoint(path, "stage2", cfg)
    check_same_idm(path, ckpt, idm)
    policy = Policy(cfg.policy_scale, cfg.la_dim, value=False)
    policy.load_state_dict(ckpt["policy"])
    return policy


def decode(cfg, bc=False, prior=False):
    """Offline decoding: fits a decoder latent action -> true action on --labels labelled
    transitions (IDM latents of those transitions), then plays latent policy + decoder.
    Two baselines on the same labelled frames: bc=True, the same policy network trained from
    scratch by behaviour cloning; prior=True, the labels' action mix played blind to the
    screen. Decoder and BC train for a number of passes over the labels (a fixed step count
    would pass over 256 labels 4x as often as over 1,024, and memorise them): decode_epochs
    and bc_epochs, each set by its held-out accuracy in experiments (README). Reported
    beside the fit's accuracy: the acting policy's on held-out windows (from o_t), and the
    decoder's alone (on the IDM's latent)."""
    name = "bc" if bc else "prior" if prior else "decode"
    path, state = resume_state(cfg, f"{name}-{cfg.labels}{seed_suffix(cfg)}")
    if state and state.get("finished"):
        return state["results"]
    t0 = time.time()
    train = Dataset(cfg.data, "train", cfg.env)
    if cfg.labels > len(train):
        raise LapoError(f"--labels {cfg.labels} is more than the {len(train)} transitions in {cfg.data}/train: lower it")
    rng = seed_everything(cfg.seed)
    windows, ta = train.get(rng.choice(len(train), size=cfg.labels, replace=False))
    if prior:
        agent = ActionPrior(np.bincount(ta, minlength=NUM_ACTIONS) / len(ta))
        return evaluate_and_finish(cfg, path, agent, "prior", t0, 0, labels=cfg.labels)
    test = Dataset(cfg.data, "test", cfg.env)
    test_windows, test_ta = test.get(np.arange(0, len(test), max(1, len(test) // 2048)))  # for evaluation only
    if bc:  # o_t -> a_t, every weight learnt from the labelled frames alone
        agent = Policy(cfg.policy_scale, NUM_ACTIONS).to(cfg.device, memory_format=torch.channels_last)
        net = lambda obs: agent(obs)[0]  # Policy.forward, as it acts: its head in fp32
        kind, x = "policy", to_input(windows[:, 1], cfg.device)
    else:  # latent action -> a_t: the rest was learnt without labels
        idm = load_idm(cfg)
        agent = DecodedPolicy(cfg, load_latent_policy(cfg, idm)).to(cfg.device, memory_format=torch.channels_last)
        net, kind, x = agent.decoder, "decoded", latent_actions(cfg, idm, windows)
        test_la = latent_actions(cfg, idm, test_windows)
    ta = torch.as_tensor(ta, device=cfg.device)
    batch = min(256, len(x))
    steps = (cfg.bc_epochs if bc else cfg.decode_epochs) * len(x) // batch
    opt = torch.optim.Adam((agent if bc else agent.decoder).parameters(), lr=cfg.decode_lr, weight_decay=cfg.decode_wd)
    agent.train()
    for _ in range(steps):
        i = torch.randint(len(x), (batch,), device=cfg.device)
        with autocast(cfg):
            loss = F.cross_entropy(net(x[i]).float(), ta[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = lambda logits, y: (logits.argmax(-1).cpu() == torch.as_tensor(y).cpu()).float().mean().item()
    with torch.no_grad(), autocast(cfg):
        results = dict(train_acc=acc(net(x), ta), test_acc=acc(agent(to_input(test_windows[:, 1], cfg.device))[0], test_ta))
        if not bc:
            results["decoder_test_acc"] = acc(net(test_la), test_ta)
    return evaluate_and_finish(cfg, path, agent, kind, t0, steps, labels=cfg.labels, **results)


def finetune(cfg, sl=True, scratch=False):
    """Online decoding: PPO on the RL+SL policy. The conv trunk stays frozen; PPO tunes the
    RL head, the value head and the trunk's linear layer (fc_rl) with the FT_RAMPS learning rates.
    With SL, DecoderSL re-fits the decoder after updates; with sl=False (RL only), PPO trains
    the decoder too. scratch=True is the baseline: PPO from scratch with the same frames."""
    if scratch:
        return run_expert(cfg, "ppo" + seed_suffix(cfg), cfg.ft_frames)
    name = ("finetune" if sl else "finetune-rl") + seed_suffix(cfg)
    path, state = resume_state(cfg, name)
    if state and state.get("finished"):
        return state["results"]
    idm = load_idm(cfg)
    seed_everything(cfg.seed)
    agent = RLSLPolicy(cfg, load_latent_policy(cfg, idm), sl).to(cfg.device, memory_format=torch.channels_last)
    opt, lr_fn = finetune_optimizer(cfg, agent, sl)
    t0 = start_time(state)
    done_frames = ppo(cfg, name, agent, opt, lr_fn, cfg.ft_frames, cfg.ft_ent, path, state,
                      DecoderSL(cfg, idm, agent.decoder) if sl else None)
    return evaluate_and_finish(cfg, path, agent, "rlsl", t0, done_frames)


def finetune_optimizer(cfg, agent, sl):
    """Adam over the parts PPO tunes (the decoder too when sl=False), and their learning
    rates at a frame: FT_RAMPS, stretched by ft_schedule_scale. Adam's eps is the default
    1e-8, as in the authors' fine-tuning."""
    parts = dict(rl_head=[*agent.rl_head.parameters()] + ([] if sl else [*agent.decoder.parameters()]),
                 value=[*agent.value.parameters()], fc_rl=[*agent.fc_rl.parameters()])
    opt = torch.optim.Adam([dict(params=parts[k]) for k in FT_RAMPS], lr=0.0)
    s = cfg.ft_schedule_scale

    def lr_fn(frames):
        return [lr_at(frames, [0, a * s, b * s, cfg.ft_frames], [0, 0, cfg.ft_lr * m, 0])
                for a, b, m in FT_RAMPS.values()]

    return opt, lr_fn


def evaluate_checkpoint(cfg, path):
    agent = ActionPrior() if path == "random" else load_policy(cfg, path)
    r = return_summary(cfg, evaluate(cfg, agent, cfg.eval_episodes))
    print(f"[eval] {path}: return {r['mean']:.2f} +- {r['std']:.2f} over {r['episodes']} episodes; "
          f"relative {r['relative']:.2f} (random {RANDOM_RETURN[cfg.env]}, expert {EXPERT_RETURN[cfg.env]})")
    return r


def pipeline(cfg):
    """expert -> collect -> stage1 -> stage2 -> decode (and its blind baseline) -> finetune,
    then one results table. Every stage skips itself when finished, so a re-run resumes."""
    out, minutes = {}, {}
    for name, fn in [("expert", run_expert), ("collect", collect), ("stage1", stage1), ("stage2", stage2),
                     ("decode", decode), ("prior", lambda c: decode(c, prior=True)), ("finetune", finetune)]:
        t0 = time.time()
        print(f"=== {name} ===", flush=True)
        out[name], minutes[name] = fn(cfg), (time.time() - t0) / 60
    ex, data, s1, s2, dec, pr, ft = (out[k] for k in ("expert", "collect", "stage1", "stage2", "decode", "prior",
                                                      "finetune"))
    rows = [
        ("expert (PPO from scratch)", f"return {ex['mean']:.2f}", f"relative {ex['relative']:.2f}", "expert"),
        ("collect", f"{data['train']} + {data['test']} frames", "", "collect"),
        ("stage1 probe (latent)", f"acc {s1['probe_la']:.3f}",
         f"majority {s1['majority']:.3f}, frame-diff {s1['probe_frame_diff']:.3f}, ceiling {s1['ceiling']:.3f}", "stage1"),
        (f"  on {max(s1['groups']) + 1} action groups", f"acc {s1['probe_la_merged']:.3f}",
         f"majority {s1['majority_merged']:.3f}, frame-diff {s1['probe_frame_diff_merged']:.3f}, "
         f"ceiling {s1['ceiling_merged']:.3f}", ""),
        ("stage1 probe (quantised)", f"acc {s1['probe_la_q']:.3f}",
         f"perplexity {s1['test_perplexity']:.1f}/{cfg.vq_codes}", ""),
        ("stage1 FDM held-out MSE", f"{s1['test_fdm_mse']:.5f}",
         f"copy-last-frame {s1['test_copy_mse']:.5f}, shuffled latents {s1['test_fdm_mse_shuffled']:.5f}", ""),
        ("stage2 latent BC held-out MSE", f"{s2['test_mse']:.3g}", f"mean-latent {s2['mean_baseline_mse']:.3g}", "stage2"),
        (f"decode ({dec['labels']} labels)", f"return {dec['mean']:.2f}", f"relative {dec['relative']:.2f}", "decode"),
        ("  blind: the labels' action mix", f"return {pr['mean']:.2f}", f"relative {pr['relative']:.2f}", "prior"),
        (f"finetune RL+SL ({cfg.ft_frames} frames)", f"return {ft['mean']:.2f}", f"relative {ft['relative']:.2f}", "finetune"),
    ]
    lines = [f"LAPO on {cfg.env}, preset {cfg.preset} (returns: random {RANDOM_RETURN[cfg.env]}, "
             f"paper's expert {EXPERT_RETURN[cfg.env]}; {cfg.eval_episodes} eval episodes each)",
             f"{'stage':<34}{'result':<22}{'reference':<62}minutes"]
    lines += [f"{a:<34}{b:<22}{c:<62}{minutes.get(m, 0):5.1f}" for a, b, c, m in rows]
    table = "\n".join(lines)
    write_atomic(Path(cfg.run_dir) / "results.txt", table + "\n")
    print("\n" + table)
    return table


# ----------------------------------------------------------------------------------------
# 7. Utilities: errors, checkpoints, metrics, torchrun
# ----------------------------------------------------------------------------------------


class LapoError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


STAGE_COMMAND = dict(expert="expert", stage1="stage1", stage2="stage2", decode="decode", bc="decode --bc",
                     prior="decode --prior", finetune="finetune", ppo="finetune --scratch")  # checkpoint -> its command


def save_checkpoint(path, cfg, **state):
    """A plain dict: modules, optimisers (anything with a state_dict) as their state_dicts,
    numbers, and the config as a dict; it loads anywhere with torch.load(weights_only=True).
    Temporary name + rename: never a half-written file. Under torchrun only rank 0 writes."""
    if rank_world()[0] != 0:
        return
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    tmp = Path(f"{path}.tmp")
    torch.save(dict(state, config=dataclasses.asdict(cfg)), tmp)
    os.replace(tmp, path)


def write_atomic(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path, stage, cfg=None, finished=True):
    """Loads a stage's checkpoint, with one clear line for each way it can be wrong."""
    kind = stage.split("-")[0]  # finetune-rl-seed1 -> finetune
    path, command = Path(path), STAGE_COMMAND[kind] + (" --no-sl" if stage.startswith("finetune-rl") else "")
    if not path.exists():
        raise LapoError(f"{path} not found: run `python lapo.py {command}` "
                        f"with the same --run-dir first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["config"], ckpt["step"]
    except Exception as e:
        raise LapoError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); "
                        f"delete it and re-run `python lapo.py {command}`") from None
    if finished and not ckpt.get("finished"):
        raise LapoError(f"{path} is from an unfinished run: re-run `python lapo.py "
                        f"{command}` with the same flags to resume it")
    if cfg is not None:
        check_flags(path, ckpt, kind, cfg)
    return ckpt


def check_flags(path, ckpt, kind, cfg):
    """The game, and the flags that shape the networks a checkpoint of this kind holds, must
    match its own (--env sets what evaluation plays: a policy would play another game silently)."""
    if ckpt["config"].get("env", cfg.env) != cfg.env:
        raise LapoError(f"{path} was made on {ckpt['config']['env']}, the flags say --env {cfg.env}: "
                        f"pass --env {ckpt['config']['env']}")
    fields = dict(expert=("policy_scale",), ppo=("policy_scale",), bc=("policy_scale",), prior=(),
                  stage1=IDM_FDM_FIELDS).get(kind, NET_FIELDS)
    diff = [f"{k}={ckpt['config'].get(k)} (flags say {getattr(cfg, k)})"
            for k in fields if ckpt["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise LapoError(f"{path} was trained with other network sizes: {', '.join(diff)}; "
                        f"use the same --preset/flags")


def weight_sum(module):
    """A fingerprint of a network's weights."""
    return sum(p.double().sum().item() for p in module.parameters())


def check_same_idm(path, ckpt, idm):
    """Stage 2 records the weight sum of the IDM whose latents it imitates: decoding (or
    resuming) it with the latents of a re-trained IDM would give wrong numbers silently."""
    if not math.isclose(ckpt.get("idm_sum", math.nan), weight_sum(idm), rel_tol=1e-6):
        raise LapoError(f"{path} imitates the latents of another stage1.pt than the one beside it: "
                        f"delete it and re-run `python lapo.py stage2`")


def resume_state(cfg, name):
    """<run-dir>/<name>.pt, and the checkpoint of an earlier run there (finished or not) or None;
    says which, with the flags that differ from that run's (a finished run is not redone)."""
    path = Path(cfg.run_dir) / f"{name}.pt"
    if not path.exists():
        return path, None
    ckpt = load_checkpoint(path, name, cfg, finished=False)
    kind = name.split("-")[0]
    fields = ("seed",) + USES[kind if kind in USES else "decode"]  # bc-N, prior-N: decode's flags
    changed = ", ".join(f"{k}={getattr(cfg, k)} (it ran with {ckpt['config'].get(k)})" for k in fields
                        if k != "ckpt_every_s" and ckpt["config"].get(k) != getattr(cfg, k))
    if rank_world()[0] == 0:  # under torchrun, rank 0 alone speaks
        if ckpt.get("finished"):
            print(f"{path} is finished; delete it to run this stage again" + (f" with {changed}" if changed else ""))
        else:
            print(f"resuming {path} from step {ckpt['step']}" + (f", now with {changed}" if changed else ""))
    return path, ckpt


def start_time(state):
    """When a run started, as time.time(): for a resumed run, moved back by the minutes its
    checkpoint records, so that its minutes count every invocation, not only the last."""
    return time.time() - 60 * state.get("minutes", 0) if state else time.time()


def restore(path, state, **parts):
    """Loads each part (module, optimiser, ...) of a resumed run from its checkpoint; returns
    the step the run had reached, 0 for a fresh run."""
    if state is None:
        return 0
    for name, part in parts.items():
        if part is not None:
            try:
                part.load_state_dict(state[name])
            except (KeyError, ValueError, RuntimeError) as e:  # e.g. saved by an older lapo.py
                raise LapoError(f"{path}: its {name} does not fit this lapo.py ({e}); delete it to start "
                                f"the stage again") from None
    return state["step"]


class Logger:
    """Metrics to <run_dir>/<stage>.jsonl, one JSON object per line, and a progress line on
    the console every few seconds: step, rate, ETA and the key numbers."""

    def __init__(self, cfg, stage, total, start=0, unit="step"):
        self.path = Path(cfg.run_dir) / f"{stage}.jsonl"
        self.stage, self.total, self.unit = stage, total, unit
        self.start, self.t0, self.last_print = start, time.time(), 0.0
        self.silent = rank_world()[0] != 0  # under torchrun, rank 0 alone logs
        if self.silent:
            return
        # a resumed run drops the rows logged after its checkpoint (they will be redone),
        # and a row cut short by a crash; a fresh run starts an empty file
        keep = []
        if start > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        keep.append(line + "\n")
                except (ValueError, KeyError):
                    pass
        write_atomic(self.path, "".join(keep))

    def log(self, step, force=False, **metrics):
        if self.silent:
            return
        row = dict(step=int(step), time=round(time.time() - self.t0, 2), **metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")  # default: numpy scalars
        if force or time.time() - self.last_print > 10:
            self.last_print = time.time()
            rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else 0
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in metrics.items())
            print(f"[{self.stage}] {self.unit} {step}/{self.total} {rate:.1f} {self.unit}s/s "
                  f"ETA {eta / 60:.1f} min | {shown}", flush=True)


def check_finite(loss, what):
    if not torch.isfinite(loss):
        raise LapoError(f"{what} became {loss.item()}: stopping; the last checkpoint is intact. "
                        "Try a lower learning rate.")


def seed_everything(seed):
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def autocast(cfg):
    return torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.amp)


def seed_suffix(cfg):
    """'' for seed 0, else '-seedS': decode and finetune runs of other seeds sit beside seed
    0's in the run dir and share its dataset and stages 1 and 2."""
    return f"-seed{cfg.seed}" if cfg.seed else ""


def lr_at(step, points, values):
    """piecewise-linear schedule through (points[i], values[i])"""
    return float(np.interp(step, points, values))


def set_lr(opt, *lrs):
    """One learning rate per optimiser group."""
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr


def trained_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# torchrun: stages 1 and 2 run as N processes that take the step one process would take on
# the global batch. DDP averages the gradients; the two statistics that look at the batch,
# BatchNorm's and the EMA codebook's, are summed over the processes by these two classes.


def rank_world():
    """(rank, number of processes): (0, 1) unless launched by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_distributed(cfg, batch):
    """Under torchrun: join the process group, NCCL on CUDA and gloo on CPU; one GPU a rank."""
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    world = rank_world()[1]
    if batch % world:
        raise LapoError(f"the batch ({batch}) must be divisible by the {world} processes")


def global_mean(x):
    """The mean of a per-rank scalar over all ranks (what one process would have logged)."""
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span all ranks (nn.SyncBatchNorm does this on GPUs only)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        world, dtype, x = dist.get_world_size(), x.dtype, x.float()  # statistics in fp32, as nn.BatchNorm2d
        moments = torch.stack([x.mean((0, 2, 3)), x.pow(2).mean((0, 2, 3))])
        mean, mean_sq = dist_fn.all_reduce(moments) / world
        var = mean_sq - mean.pow(2)
        with torch.no_grad():
            n = x.numel() / x.shape[1] * world
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked.add_(1)
        x = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        return (x * self.weight[:, None, None] + self.bias[:, None, None]).to(dtype)


class GlobalVectorQuantizerEMA(VectorQuantizerEMA):
    """The EMA codebook updated with the global batch's counts and sums, the same on every
    rank. (Dead-code resets draw a vector per rank; DDP then broadcasts rank 0's buffers.)"""

    def statistics(self, onehot, x):
        count, total = super().statistics(onehot, x)
        dist.all_reduce(count)
        dist.all_reduce(total)
        return count, total


# ----------------------------------------------------------------------------------------
# 8. Command line
# ----------------------------------------------------------------------------------------

HELP = dict(
    expert="train a PPO agent from scratch: the expert whose rollouts make the dataset",
    collect="roll out the expert (or --random) into a dataset in the authors' chunk format",
    stage1="train the latent IDM + FDM (no actions used; a probe reports action accuracy)",
    stage2="latent behaviour cloning: a policy imitates the IDM's latent actions",
    decode="offline decoding: fit latent -> action on --labels N frames, play, report return",
    finetune="online decoding with PPO, RL + SL (paper), --no-sl (RL only) or --scratch (baseline)",
    eval="play a saved policy (or 'random') for --eval-episodes episodes and report its return",
    pipeline="expert -> collect -> stage1 -> stage2 -> decode (and --prior) -> finetune, then a results table",
)
# The Config fields each subcommand reads (pipeline: all), besides where-and-how and the
# network sizes its checkpoints must agree on: what its --help lists, and what a resumed run
# compares (ppo: the checkpoint of finetune --scratch, whose flags finetune --help lists too).
PPO_FIELDS = ("num_envs", "num_steps", "minibatches", "epochs", "gamma", "gae_lambda", "clip",
              "vf_coef", "max_grad_norm")
USES = dict(
    expert=PPO_FIELDS + ("expert_frames", "expert_lr", "expert_ent", "eval_episodes", "ckpt_every_s"),
    collect=("num_envs", "train_frames", "test_frames", "collect_temp"),
    stage1=("vq_beta", "vq_decay", "vq_count_init", "vq_reset_after", "s1_steps", "s1_batch",
            "s1_lr", "s1_warmup", "s1_idm_lr_scale", "s1_clip", "probe_every", "probe_frames", "probe_steps",
            "ckpt_every_s"),
    stage2=("s2_steps", "s2_batch", "s2_lr", "s2_warmup", "ckpt_every_s"),
    decode=("labels", "decode_epochs", "bc_epochs", "decode_lr", "decode_wd", "eval_episodes"),
    finetune=PPO_FIELDS + ("ft_frames", "ft_lr", "ft_ent", "ft_schedule_scale",
                           "sl_start", "sl_dense", "sl_end", "sl_every", "sl_epochs", "sl_batch",
                           "sl_smoothing", "eval_episodes", "ckpt_every_s"),
    eval=("eval_episodes",),
    ppo=PPO_FIELDS + ("expert_lr", "expert_ent", "ft_frames", "eval_episodes", "ckpt_every_s"),  # finetune --scratch
)
WHERE_FIELDS = ("env", "run_dir", "data", "device", "seed", "amp")


def build_parser(preset="paper", env="coinrun"):
    """One subcommand per stage. Every Config field is a flag of every subcommand (one flag set
    serves all stages), but --help lists only the fields the subcommand reads, each with the
    value the chosen preset (and game, for the run folder) gives it."""
    defaults = make_config(preset, env=env) if preset in PRESETS and env in GAMES else Config()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start here, a first sign of claim 1 in minutes on 2 CPU cores (README: Quick start):\n"
               "  python lapo.py collect --random --preset tiny --env dodgeball\n"
               "  python lapo.py stage1 --preset tiny --env dodgeball --s1-steps 1000\n"
               "every stage at toy sizes, then a table: python lapo.py pipeline --preset tiny\n"
               "the default preset is paper: the paper's sizes, a GPU job\n"
               "python lapo.py <command> --help: the flags a command reads, with the preset's values")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--preset", choices=list(PRESETS), default="paper",
                       help="sizes and step counts; other flags override it (default: paper)")
        used = WHERE_FIELDS + NET_FIELDS + USES.get(name, tuple(f.name for f in dataclasses.fields(Config)))
        used += USES["ppo"] if name == "finetune" else ()
        for f in dataclasses.fields(Config):
            if f.name == "preset":
                continue
            flag, shown = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
            text = f.metadata["help"] + (f", one of {', '.join(GAMES)}" if f.name == "env" else "")
            text = f"{text} ({preset}: {shown})" if shown != "" else text
            if f.name not in used:  # accepted, so one flag set serves every stage, but not shown
                text = argparse.SUPPRESS
            if f.type is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                p.add_argument(flag, type=f.type, default=None, help=text,
                               metavar={int: "N", float: "X"}.get(f.type, "VALUE"))
        if name == "collect":
            p.add_argument("--random", action="store_true", help="uniform-random actions")
            p.add_argument("--policy", help="checkpoint to roll out (default: <run-dir>/expert.pt)")
        if name == "decode":
            p.add_argument("--bc", action="store_true",
                           help="a baseline: behaviour cloning from scratch on the same labels")
            p.add_argument("--prior", action="store_true",
                           help="a baseline: the same labels' action mix, played blind to the screen")
        if name == "finetune":
            p.add_argument("--no-sl", action="store_true", help="RL only: PPO also trains the decoder")
            p.add_argument("--scratch", action="store_true",
                           help="the baseline: PPO from scratch with the same frame budget")
        if name == "eval":
            p.add_argument("--policy", required=True, help="a checkpoint that acts, or 'random'")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="paper")
    pre.add_argument("--env", default="coinrun")
    known = pre.parse_known_args(argv)[0]
    parser = build_parser(known.preset, known.env)
    if not argv:  # a first try with no command: say where to start, not only what is missing
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    try:
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name != "preset"}
        cfg = make_config(args.preset, **overrides)
        if "RANK" in os.environ:  # launched by torchrun
            if args.command not in ("stage1", "stage2"):
                raise LapoError("only stage1 and stage2 run under torchrun; run the others with python")
            setup_distributed(cfg, cfg.s1_batch if args.command == "stage1" else cfg.s2_batch)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if args.command == "expert":
            run_expert(cfg)
        elif args.command == "collect":
            if args.random and args.policy:
                raise LapoError("--random plays a uniform-random policy, --policy rolls out a checkpoint: pass one")
            collect(cfg, args.random, args.policy)
        elif args.command == "stage1":
            stage1(cfg)
        elif args.command == "stage2":
            stage2(cfg)
        elif args.command == "decode":
            if args.bc and args.prior:
                raise LapoError("--bc and --prior are two baselines: run them one at a time")
            decode(cfg, bc=args.bc, prior=args.prior)
        elif args.command == "finetune":
            if args.scratch and args.no_sl:
                raise LapoError("--scratch trains PPO from scratch; --no-sl applies to fine-tuning only")
            finetune(cfg, sl=not args.no_sl, scratch=args.scratch)
        elif args.command == "eval":
            evaluate_checkpoint(cfg, args.policy)
        elif args.command == "pipeline":
            pipeline(cfg)
    except LapoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact: run the same command to resume (decode and eval start over)",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
