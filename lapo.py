"""LAPO: Latent Action Policies, in one file.

"Learning to Act without Actions" (Schmidt & Jiang, ICLR 2024) learns a policy from videos
of behaviour, with no action labels:
  stage 1  a latent inverse dynamics model (IDM) looks at (o_{t-1}, o_t, o_{t+1}) and emits a
           vector-quantised latent action; a forward dynamics model (FDM) must predict o_{t+1}
           from (o_{t-1}, o_t) and that latent action: the bottleneck makes the latent carry
           what the agent did.
  stage 2  a latent policy imitates the IDM's latent actions from o_t alone.
  stage 3  the latent policy is decoded into real actions: offline with a small decoder
           trained on a few labelled frames, or online with PPO (RL + SL).
It also trains the PPO expert and collects its dataset, so the whole method runs from
nothing: `python lapo.py pipeline --preset tiny`.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as dist_fn  # differentiable; torch names it the successor of dist.nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# 1. Configuration ------------------------------------------------------------------------

def arg(default, help, group):
    """A Config field: help is its --help; group, its section of --help (READS: a command's sections)."""
    return dataclasses.field(default=default, metadata=dict(help=help, group=group))

@dataclasses.dataclass
class Config:
    env: str = arg("coinrun", "Procgen game", "run")
    run_dir: str = arg("", "checkpoints, metrics and the dataset (default runs/<env>-<preset>)", "run")
    data: str = arg("", "dataset folder holding train/ and test/ (default <run-dir>/data)", "run")
    preset: str = arg("paper", "which preset filled in the defaults", "run")
    device: str = arg("", "cuda or cpu (default: cuda when available)", "run")
    seed: int = arg(0, "random seed; for decode and finetune, S > 0 writes files with -seedS", "run")
    amp: bool = arg(None, "bf16 autocast (default: on with CUDA and on CPUs with bf16 instructions)", "run")
    ckpt_every_s: float = arg(300, "seconds between checkpoints: the most work a crash can cost", "run")
    # stage 1's networks (a later stage builds them as saved in stage1.pt)
    idm_scale: float = arg(4, "IDM width: IMPALA channels (16, 32, 32) x scale", "idm")
    fdm_width: int = arg(24, "FDM U-Net base width b: channels b .. 32b", "idm")
    fdm_residual: bool = arg(False, "FDM predicts o_{t+1} - o_t, starting from 0 (copying o_t is then free)", "idm")
    la_dim: int = arg(128, "latent action size", "idm")
    vq: bool = arg(True, "quantise the latent action (--no-vq: the paper's no-VQ ablation)", "idm")
    vq_codebooks: int = arg(2, "codebooks of the vector quantiser", "idm")
    vq_codes: int = arg(64, "codes per codebook", "idm")
    vq_dim: int = arg(16, "code size; la_dim / (codebooks x vq_dim) positions per codebook", "idm")
    vq_beta: float = arg(0.05, "commitment cost", "idm")
    vq_decay: float = arg(0.999, "EMA decay of the codebook statistics", "idm")
    vq_reset_after: int = arg(0, "re-seed a code unused for this many steps (0: never)", "idm")
    policy_scale: float = arg(4, "width of the latent policy and the PPO agents, as --idm-scale", "policy")
    # PPO: the expert (= PPO from scratch) and online fine-tuning
    num_envs: int = arg(64, "parallel games", "ppo collect")
    num_steps: int = arg(64, "rollout length: one update sees num_envs x num_steps frames", "ppo")
    minibatches: int = arg(8, "minibatches per PPO epoch", "ppo")
    epochs: int = arg(3, "PPO epochs per rollout", "ppo")
    gamma: float = arg(0.999, "discount", "ppo")
    gae_lambda: float = arg(0.95, "GAE lambda", "ppo")
    clip: float = arg(0.2, "PPO ratio and value clip", "ppo")
    vf_coef: float = arg(0.5, "value loss weight", "ppo")
    max_grad_norm: float = arg(0.5, "PPO gradient-norm clip", "ppo")
    expert_frames: int = arg(50_000_000, "frames of PPO for the expert", "expert")
    expert_lr: float = arg(5e-4, "expert (and PPO from scratch) learning rate, decayed linearly to 0", "expert")
    expert_ent: float = arg(0.01, "expert (and PPO from scratch) entropy bonus", "expert")
    train_frames: int = arg(8_000_000, "frames collected for training", "collect")
    test_frames: int = arg(131_072, "frames collected on other levels, for held-out scores", "collect")
    # stage 1: IDM + FDM
    s1_steps: int = arg(50_000, "stage-1 training steps", "stage1")
    s1_batch: int = arg(128, "stage-1 batch", "stage1")
    s1_lr: float = arg(3e-4, "stage-1 learning rate: from 0.1x over the warm-up, to 0.01x", "stage1")
    s1_warmup: int = arg(50, "stage-1 warm-up steps (at most half of --s1-steps)", "stage1")
    s1_clip: float = arg(2.0, "stage-1 gradient-norm clip", "stage1")
    probe_every: int = arg(5_000, "stage-1 steps between probes (latent -> true action)", "stage1")
    probe_frames: int = arg(16_384, "held-out windows for the probe, half to fit, half to score", "stage1")
    probe_steps: int = arg(500, "training steps of the probe", "stage1")
    # stage 2: latent behaviour cloning
    s2_steps: int = arg(60_000, "stage-2 training steps", "stage2")
    s2_batch: int = arg(128, "stage-2 batch", "stage2")
    s2_lr: float = arg(2e-4, "stage-2 learning rate: from 0.01x over the warm-up, to 0", "stage2")
    s2_warmup: int = arg(1_000, "stage-2 warm-up steps (at most half of --s2-steps)", "stage2")
    # stage 3 offline: a decoder fitted on a few labelled frames
    labels: int = arg(256, "labelled frames for decode", "decode")
    decode_epochs: int = arg(100, "passes of the decoder over the labelled frames", "decode")
    bc_epochs: int = arg(25, "passes of BC over them (it overfits sooner than the decoder)", "decode")
    decode_lr: float = arg(1e-3, "decoder (or BC) learning rate", "decode")
    decode_wd: float = arg(1e-4, "decoder (or BC) weight decay", "decode")
    eval_episodes: int = arg(100, "episodes of the final evaluation of every policy", "eval")
    # stage 3 online: PPO fine-tuning, RL + SL
    ft_frames: int = arg(4_000_000, "frames of fine-tuning (and of PPO from scratch, its baseline)", "finetune")
    ft_lr: float = arg(1e-2, "fine-tuning base learning rate: each part peaks at ft_lr x its FT_RAMPS factor", "finetune")
    ft_ent: float = arg(0.0025, "fine-tuning entropy bonus", "finetune")
    ft_schedule_scale: float = arg(1.0, "stretches FT_RAMPS and the SL window (in frames)", "finetune")
    sl_start: int = arg(10_000, "frame at which the decoder's SL starts", "finetune")
    sl_dense: int = arg(50_000, "until this frame SL re-fits after every update, then every --sl-every", "finetune")
    sl_end: int = arg(400_000, "frame at which the decoder's SL stops", "finetune")
    sl_every: int = arg(20, "PPO updates between decoder re-fits after --sl-dense", "finetune")
    sl_epochs: int = arg(3, "epochs of each decoder re-fit", "finetune")
    sl_batch: int = arg(512, "batch of the decoder re-fit", "finetune")
    sl_smoothing: float = arg(0.05, "label smoothing of the decoder re-fit", "finetune")

GROUPS = dict(run="where and how", idm="stage-1 networks", policy="policy network", ppo="PPO",
              expert="the expert (PPO from scratch)", collect="the dataset", stage1="stage 1", stage2="stage 2",
              decode="offline decoding", eval="evaluation", finetune="online fine-tuning (RL + SL)")
READS = dict(expert="run policy ppo expert eval", collect="run collect", stage1="run idm stage1",
             stage2="run policy stage2", decode="run decode policy eval", finetune="run ppo expert policy finetune eval",
             eval="run eval", pipeline=" ".join(GROUPS))
# Fine-tuning trains three parts of the RL+SL policy, each at a learning rate that is 0 until
# frame a, ramps linearly to ft_lr x f at frame b, then decays to 0 at ft_frames; a and b are
# stretched by ft_schedule_scale. The paper's schedule.
FT_RAMPS = dict(rl_head=(35_000, 50_000, 1 / 4), value=(25_000, 50_000, 1 / 4), fc_rl=(50_000, 200_000, 1 / 10))
ONLINE_DECODER = (192, 128, 64)  # hidden widths of the RL+SL decoder (paper)
PRESETS = {
    "paper": {},
    # laptop scale: tuned by experiment (docs/)
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
                 s2_lr=1e-3, eval_episodes=32, ft_frames=65_536, ft_schedule_scale=0.05, ckpt_every_s=60),
}

def make_config(preset="paper", **overrides):
    cfg = Config(preset=preset, **{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.env}-{preset}"
    cfg.data = cfg.data or str(Path(cfg.run_dir) / "data")
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.amp is None:  # bf16 pays on GPUs and on CPUs with AVX512-BF16 or AMX; elsewhere it is slower
        flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
        cfg.amp = cfg.device.startswith("cuda") or "avx512_bf16" in flags or "amx_bf16" in flags
    check_config(cfg)
    return cfg

def check_config(cfg):
    """A bad number stops here, naming its flag, rather than as a wrong result hours later."""
    if cfg.env not in GAMES:
        raise LapoError(f"unknown game {cfg.env!r}; choose one of: {', '.join(GAMES)}")
    may_be_0 = ("seed", "vq_reset_after", "sl_smoothing", "expert_ent", "ft_ent", "decode_wd", "sl_start",
                "s1_warmup", "s2_warmup")
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.type in (int, float) and not (math.isfinite(v) and (v > 0 or v == 0 and f.name in may_be_0)):
            raise LapoError(f"{flag} must be a {'non-negative' if f.name in may_be_0 else 'positive'} number, got {v}")
    ramps_end = max(b for _, b, _ in FT_RAMPS.values()) * cfg.ft_schedule_scale
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for wrong, why in [
        (max(cfg.gamma, cfg.gae_lambda, cfg.clip, cfg.vq_decay, cfg.vq_beta, cfg.sl_smoothing) > 1,
         "--gamma, --gae-lambda, --clip, --vq-decay, --vq-beta and --sl-smoothing must be at most 1"),
        (cfg.seed >= 10_000, "--seed must be below 10,000 (collect gives each seed 10,000 chunks' levels)"),
        (cfg.vq and cfg.la_dim % (cfg.vq_codebooks * cfg.vq_dim), f"--la-dim {cfg.la_dim} must be a multiple of "
                                                                   "--vq-codebooks x --vq-dim"),
        ((cfg.num_envs * cfg.num_steps) % cfg.minibatches, "--num-envs x --num-steps must be divisible by --minibatches"),
        (cfg.num_steps < 3, "--num-steps must be at least 3: fine-tuning labels windows of 3 frames"),
        (cfg.probe_frames < 32, "--probe-frames must be at least 32: the probe fits on half, scores on half"),
        (ramps_end >= cfg.ft_frames, f"--ft-frames {cfg.ft_frames} ends before the fine-tuning ramps (frame "
                                     f"{ramps_end:g}): raise it or lower --ft-schedule-scale"),
        (cfg.device not in devices, f"--device {cfg.device}: this machine's devices are {', '.join(devices)}")]:
        if wrong:
            raise LapoError(why)


# 2. Environment and data -----------------------------------------------------------------

GAMES = ["bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot", "heist",
         "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot"]
NUM_ACTIONS = 15  # every Procgen game: LEFT-DOWN, LEFT, LEFT-UP, DOWN, NOOP, UP, ..., Q, E
# mean episode return (easy mode) of a uniform-random policy and of the authors' experts
RANDOM_RETURN = dict(zip(GAMES, [0.874, 0.046, 2.597, 0.663, 2.224, 2.705, 0.613, -2.533,
                                 3.076, 3.411, 2.511, 4.273, 1.251, 2.560, 4.321, 1.525]))
EXPERT_RETURN = dict(zip(GAMES, [36.34, 11.63, 9.184, 9.956, 10.23, 9.933, 13.49, 29.93,
                                 9.685, 8.460, 7.408, 9.969, 11.89, 9.475, 11.46, 66.99]))
# Procgen draws every episode's level (one of 2^31) from the seed given to make_env, so each
# use of the game seeds its own: PPO runs seed + frames done, the dataset (+ 10,000 per
# --seed) and evaluation (+ seed) far above, so they meet only by the chance that two draws
# from 2^31 do.
LEVEL_SEEDS = dict(train=1_000_000_000, test=1_100_000_000, eval=1_200_000_000)

def relative_return(game, ret):
    """0 = uniform-random policy, 1 = the paper's expert."""
    return (ret - RANDOM_RETURN[game]) / (EXPERT_RETURN[game] - RANDOM_RETURN[game])

def make_env(game, num_envs, seed):
    """Procgen, easy mode, every level; finished episodes restart by themselves."""
    from procgen import ProcgenEnv  # imported here: the networks need no game installed
    return ProcgenEnv(num_envs=num_envs, env_name=game, num_levels=0, start_level=0,
                      distribution_mode="easy", rand_seed=seed)

def to_input(obs, device):
    """uint8 (B, [T,] H, W, 3) -> float (B, T*3, H, W) in [-0.5, 0.5], channels-last. Frames
    stay uint8 until they are on the device (4x less to copy) and are stacked on channels."""
    x = torch.as_tensor(obs).to(device, non_blocking=True)
    if x.ndim == 5:
        x = x.permute(0, 2, 3, 1, 4).flatten(3)  # (B, H, W, T*C)
    x = x.permute(0, 3, 1, 2).float() / 255 - 0.5
    return x.contiguous(memory_format=torch.channels_last)

# The dataset is the authors' format: <data>/{train,test}/<i>.npz, chunks of 32,768 (test:
# 4,096) consecutive frames with keys obs (N,64,64,3) uint8, ta (N,) true action, done (N,)
# bool, rewards, ep_returns, values (N,) float32. done[t]: the episode ended with action ta[t]
# (or collect cut it there), so obs[t+1] starts the next. collect names the game in game.txt.
CHUNK_KEYS = dict(obs=np.uint8, ta=np.int64, done=np.bool_, rewards=np.float32, ep_returns=np.float32,
                  values=np.float32)
TRAIN_CHUNK, TEST_CHUNK, FRAME_BYTES = 32_768, 4_096, 64 * 64 * 3

def write_chunk(path, chunk):
    """Uncompressed, so obs can be memory-mapped; to a temporary name then renamed, so a crash
    never leaves a half-written chunk."""
    np.savez(f"{path}.tmp.npz", **{k: np.asarray(chunk[k], dtype=t) for k, t in CHUNK_KEYS.items()})
    os.replace(f"{path}.tmp.npz", path)

def chunk_files(folder):  # 0.npz, 1.npz, ... (not a .tmp.npz a crash left behind)
    return sorted((p for p in Path(folder).glob("*.npz") if p.stem.isdigit()), key=lambda p: int(p.stem))

def check_game(folder, game):  # another game's frames would train a stage silently
    made_on = (Path(folder) / "game.txt").read_text().strip() if (Path(folder) / "game.txt").exists() else game
    if made_on != game:
        raise LapoError(f"{folder} holds frames of {made_on}, the flags say --env {game}: pass --env {made_on}, "
                        f"or another --data")

def read_chunk(path):
    """obs, memory-mapped unless the chunk is compressed (then read), and the per-frame arrays;
    a chunk with a missing key, a bad shape or an action outside 0..14 raises one line."""
    try:
        with np.load(path) as z, zipfile.ZipFile(path) as zf:
            small, info = {k: z[k] for k in CHUNK_KEYS if k != "obs"}, zf.getinfo("obs.npy")
            obs = z["obs"] if info.compress_type != zipfile.ZIP_STORED else None
        if obs is None:  # find obs's bytes: past the zip entry's header and the .npy header
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(f)
                obs = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
    except Exception as e:  # zipfile.BadZipFile, KeyError (a missing key), EOFError, ValueError, ...
        raise LapoError(f"{path}: corrupt or not a chunk ({type(e).__name__}: {e}); keys {list(CHUNK_KEYS)} "
                        "expected; delete it and re-run `python lapo.py collect`") from None
    if obs.shape[1:] != (64, 64, 3) or obs.dtype != np.uint8:
        raise LapoError(f"{path}: obs is {obs.dtype} {obs.shape}, expected uint8 (N, 64, 64, 3)")
    for k, v in small.items():
        if v.shape != (len(obs),) or (k == "ta" and not np.isin(v, np.arange(NUM_ACTIONS)).all()):
            raise LapoError(f"{path}: {k} has shape {v.shape} (want ({len(obs)},)) or values out of range")
    return obs, small

class Dataset:
    """Windows (o_{t-1}, o_t, o_{t+1}) from a folder of chunks, never across a chunk or an
    episode. Frames of uncompressed chunks stay on disk, a window one read of 3 frames, so
    memory grows with the dataset by its index alone (about 24 bytes a frame)."""

    def __init__(self, folder, split, game=None):
        if game:
            check_game(folder, game)
        files = chunk_files(Path(folder, split))
        if not files:
            raise LapoError(f"no dataset chunks in {Path(folder, split)}: run `python lapo.py collect` "
                            "(or point --data at a dataset)")
        self.obs, self.ta, index = [], [], []
        for i, path in enumerate(files):
            obs, small = read_chunk(path)
            t, done = np.arange(1, len(obs) - 1), small["done"].astype(bool)
            t = t[~done[t - 1] & ~done[t]]  # no episode ends between t-1 and t+1
            self.obs.append((path, obs.offset) if isinstance(obs, np.memmap) else obs)
            self.ta.append(small["ta"].astype(np.int64))
            index.append(np.stack([np.full_like(t, i), t], 1))
        self.index, self.frames = np.concatenate(index), sum(len(ta) for ta in self.ta)
        if len(self.index) == 0:
            raise LapoError(f"{Path(folder, split)}: no complete transitions in the dataset")

    def __len__(self):
        return len(self.index)

    def get(self, idx):
        """windows (B, 3, 64, 64, 3) uint8 and the true action taken at o_t, (B,)"""
        return (np.stack([self.window(c, t) for c, t in self.index[idx]]),
                np.array([self.ta[c][t] for c, t in self.index[idx]]))

    def window(self, c, t):
        if isinstance(self.obs[c], np.ndarray):  # a compressed chunk, held in memory
            return self.obs[c][t - 1 : t + 2]
        path, offset = self.obs[c]
        with open(path, "rb") as f:
            f.seek(offset + (t - 1) * FRAME_BYTES)
            return np.frombuffer(f.read(3 * FRAME_BYTES), np.uint8).reshape(3, 64, 64, 3)

    def sample(self, rng, batch, rank=0, world=1):
        """A random batch; under torchrun every rank draws the same one and keeps its share."""
        return self.get(rng.integers(len(self), size=batch)[rank::world])


# 3. Networks -----------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

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
    gradients, each code moves to the running mean of the vectors that pick it. A latent of
    G*P*D numbers is read as G codebooks x P positions x D dims; each D-vector snaps to the
    nearest of its codebook's K codes; gradients pass straight through. The EMA counts start
    at 1: the authors' start at 0, so a code not picked on the first step is divided by ~1e-5
    and flung far away (on coinrun at the cpu sizes perplexity 2.5 of 64 against 39.9 with 1;
    on random inputs it depends on their scale, docs/differences.md)."""

    def __init__(self, codebooks, codes, dim, beta, decay, reset_after=0, eps=1e-5):
        super().__init__()
        self.beta, self.decay, self.reset_after, self.eps = beta, decay, reset_after, eps
        codebook = torch.empty(codebooks, codes, dim).uniform_(-5 / codes, 5 / codes)
        self.register_buffer("codebook", codebook)  # (G, K, D)
        self.register_buffer("ema_count", torch.ones(codebooks, codes))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("idle_steps", torch.zeros(codebooks, codes))

    @torch.autocast("cuda", enabled=False)  # distances and EMA statistics in fp32: bf16's 8 bits would
    @torch.autocast("cpu", enabled=False)  # pick codes by rounding error
    def forward(self, z):
        """z (B, G*P*D) -> z_q (B, G*P*D), commitment loss, perplexity, codes (B, G, P)"""
        (G, K, D), B = self.codebook.shape, z.shape[0]
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
        return q.view(G, B, -1, D).transpose(0, 1).reshape(B, -1), commitment, perplexity, idx.view(G, B, -1).transpose(0, 1)

    @torch.no_grad()
    def update_codebook(self, onehot, x):
        K = onehot.shape[-1]
        count, total = onehot.sum(1), onehot.transpose(1, 2) @ x  # (G, K), (G, K, D)
        if dist.is_initialized():  # torchrun: the global batch's, so every rank keeps one codebook
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        if self.reset_after:  # codebook collapse: a code nobody picks never moves toward the
            # data again, so one idle for reset_after steps restarts at a random vector of this batch
            self.idle_steps.add_(1).mul_(count == 0)
            dead = (self.idle_steps >= self.reset_after).unsqueeze(-1)
            sample = x[:, torch.randint(x.shape[1], (K,), device=x.device)]  # torchrun: rank 0's, DDP broadcasts
            self.ema_sum.copy_(torch.where(dead, sample, self.ema_sum))
            self.ema_count.copy_(torch.where(dead[..., 0], 1.0, self.ema_count))
            self.idle_steps.mul_(~dead[..., 0])
        # Laplace smoothing (no division by 0), kept in the counts as the authors do: an idle
        # code's count then settles near eps / (1 - decay) rather than decaying to 0
        n = self.ema_count.sum(-1, keepdim=True)
        self.ema_count.copy_((self.ema_count + self.eps) / (n + K * self.eps) * n)
        self.codebook.copy_(self.ema_sum / self.ema_count.unsqueeze(-1))

class IDM(nn.Module):
    """Latent inverse dynamics: (o_{t-1}, o_t, o_{t+1}) stacked on channels -> a latent action
    of la_dim numbers, quantised by VectorQuantizerEMA(**vq) (vq=None: the no-VQ ablation)."""

    def __init__(self, la_dim, scale, vq=None, channels=3, size=64):
        super().__init__()
        self.cnn, self.head = ImpalaCNN(3 * channels, scale, size), nn.Linear(256, la_dim)
        self.vq = VectorQuantizerEMA(**vq) if vq else None

    def forward(self, x):
        """x (B, 9, 64, 64) -> la (continuous), la_q (quantised), commitment loss, perplexity"""
        la = self.head(self.cnn(x))
        if self.vq is None:
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
    """conv3x3(cat[x, la tiled over the image]) without building the tiled tensor: a 3x3 conv
    of a constant map is, at each pixel, the sum of W_tap @ la over the taps inside the image
    (zero padding drops the others). Same function and parameters as the plain conv; its
    latent part costs ~la_dim x less (it was most of the FDM's compute)."""

    def __init__(self, c_x, c_la, c_out):
        super().__init__()
        self.c_x, self.conv = c_x, nn.Conv2d(c_x + c_la, c_out, 3, padding=1)

    def forward(self, x, la):
        w, (H, W) = self.conv.weight, x.shape[2:]
        inside = F.pad(x.new_ones(1, 1, H, W), (1, 1, 1, 1))
        taps = inside.unfold(2, H, 1).unfold(3, W, 1)[0, 0]  # (3, 3, H, W): is tap (k, l) inside?
        per_tap = torch.einsum("bc,ockl->bokl", la, w[:, self.c_x :])
        return F.conv2d(x, w[:, : self.c_x], self.conv.bias, padding=1) + torch.einsum("bokl,klhw->bohw", per_tap, taps)

def down_block(c_in, c_out, conv=True):  # halves the resolution
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1) if conv else nn.Identity(),
                         nn.BatchNorm2d(c_out), ResLayer(c_out), nn.MaxPool2d(2), nn.ReLU())

def up_block(c_in, c_out):  # doubles the resolution
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2), nn.BatchNorm2d(c_out), ResLayer(c_out), nn.ReLU())

class FDM(nn.Module):
    """Forward dynamics: a U-Net from (o_{t-1}, o_t) and the latent action to o_{t+1}, for
    size x size images (a power of 2). Channels b, 2b, 4b, .. down to 2x2, twice that at 1x1,
    then back up with skips. The latent is tiled over the image at the input and fed again at
    the 1x1 bottleneck, so the upsampling half cannot ignore it. residual: predict the change
    from o_t, starting from 0, so copying o_t is free and only motion needs explaining."""

    def __init__(self, la_dim, width, residual=False, channels=3, size=64):
        super().__init__()
        b, self.residual, self.channels = width, residual, channels
        widths = [b * 2**i for i in range(int(math.log2(size)) - 1)]  # at size/2, size/4, .., 2
        self.inp = TiledLatentConv(2 * channels, la_dim, b)  # the first down block's conv
        self.down = nn.ModuleList([down_block(b, b, conv=False)] + [down_block(i, o) for i, o in zip(widths, widths[1:])])
        self.mid = nn.Conv2d(widths[-1], 2 * widths[-1], 2)  # 2x2 -> 1x1
        # up[0]: the 1x1 bottleneck + latent -> 2x2; then each takes cat(h, skip) and doubles
        self.up = nn.ModuleList([up_block(2 * widths[-1] + la_dim, widths[-1])] + [
            up_block(2 * c, c_out) for c, c_out in zip(widths[::-1], widths[::-1][1:] + [b])])
        self.out = nn.Sequential(nn.Conv2d(b + 2 * channels, b, 3, padding=1), ResLayer(b), nn.ReLU(),
                                 nn.Conv2d(b, channels, 1))
        if residual:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, la):
        """x (B, 6, 64, 64) = (o_{t-1}, o_t); la (B, la_dim) -> o_{t+1} prediction (B, 3, 64, 64)"""
        h, skips = self.inp(x, la), []
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = self.up[0](torch.cat([self.mid(h), la[:, :, None, None]], 1))
        for block, skip in zip(self.up[1:], reversed(skips)):
            h = block(torch.cat([h, skip], 1))
        out = self.out(torch.cat([h, x], 1))
        return x[:, self.channels :] + torch.tanh(out) if self.residual else torch.tanh(out) / 2  # frames: [-0.5, 0.5]

class Policy(nn.Module):
    """IMPALA-CNN policy from o_t: action logits and a value (the PPO agents, BC) or, with
    value=False, a latent action (stage 2's latent policy)."""

    def __init__(self, scale, out_dim, value=True, channels=3, size=64):
        super().__init__()
        self.cnn, self.head = ImpalaCNN(channels, scale, size), nn.Linear(256, out_dim)
        self.value = nn.Linear(256, 1) if value else None

    def forward(self, x):
        h = self.cnn(x)
        # the heads run in fp32 even under bf16 autocast: bf16 keeps 8 bits of a value, and
        # GAE's r + gamma V' - V would then be mostly rounding error where rewards are sparse
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()  # one cast: the heads' gradients meet in fp32
            return self.head(h), (None if self.value is None else self.value(h).squeeze(-1))

def orthogonal_init(layer, std):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)

def mlp(*sizes):
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])

class DecodedPolicy(nn.Module):
    """Offline decoding: the latent policy, then a decoder latent action -> action logits."""

    def __init__(self, latent_policy, la_dim, num_actions, hidden=(128, 128)):
        super().__init__()
        self.latent_policy, self.decoder = latent_policy, mlp(la_dim, *hidden, num_actions)

    def forward(self, x):
        return self.decoder(self.latent_policy(x)[0]), None

class RLSLPolicy(nn.Module):
    """Online decoding (paper, section 3.3). Two paths share the latent policy's conv trunk,
    frozen. SL: a frozen copy of its linear layer, its latent head (frozen), then a decoder
    fitted by supervised learning on (IDM latent, action) pairs. RL: its linear layer (tuned
    by PPO), a zero-initialised action head and a value head. The logits are the mean of both
    paths, so the agent starts as the latent policy through the decoder at temperature 2 (as
    in the authors' code) and RL only has to correct it. sl=False: PPO trains the decoder.
    The decoder's widths are ONLINE_DECODER's, as fit_decoder's, which replaces it."""

    def __init__(self, latent_policy, la_dim, num_actions, sl=True):
        super().__init__()
        self.conv, self.fc_rl, self.la_head = latent_policy.cnn.conv, latent_policy.cnn.fc, latent_policy.head
        self.fc_sl = copy.deepcopy(latent_policy.cnn.fc)
        self.decoder, self.rl_head = mlp(la_dim, *ONLINE_DECODER, num_actions), nn.Linear(256, num_actions)
        nn.init.zeros_(self.rl_head.weight)
        nn.init.zeros_(self.rl_head.bias)
        self.value = nn.Linear(256, 1)
        orthogonal_init(self.value, 1.0)
        for module in [self.conv, self.fc_sl, self.la_head] + ([self.decoder] if sl else []):
            module.requires_grad_(False)  # no gradient reaches them, so PPO can neither move nor clip them

    def forward(self, x):
        h = self.conv(x)
        with torch.autocast(h.device.type, enabled=False):  # fp32 heads, as in Policy
            h = h.float()
            h_rl, h_sl = F.relu(self.fc_rl(h)), F.relu(self.fc_sl(h))
            return (self.rl_head(h_rl) + self.decoder(self.la_head(h_sl))) / 2, self.value(h_rl).squeeze(-1)

def make_idm(cfg):
    vq = dict(codebooks=cfg.vq_codebooks, codes=cfg.vq_codes, dim=cfg.vq_dim, beta=cfg.vq_beta,
              decay=cfg.vq_decay, reset_after=cfg.vq_reset_after)
    return IDM(cfg.la_dim, cfg.idm_scale, vq if cfg.vq else None)

def make_idm_fdm(cfg):
    return make_idm(cfg), FDM(cfg.la_dim, cfg.fdm_width, cfg.fdm_residual)

def make_policy(kind, cfg):
    """A new acting policy of a checkpoint's kind (policy, decoded, rlsl) at cfg's sizes."""
    if kind == "policy":
        return Policy(cfg.policy_scale, NUM_ACTIONS)
    latent_policy = Policy(cfg.policy_scale, cfg.la_dim, value=False)
    return (DecodedPolicy if kind == "decoded" else RLSLPolicy)(latent_policy, cfg.la_dim, NUM_ACTIONS)


# 4. The method, one update at a time -----------------------------------------------------

def idm_fdm_loss(idm, fdm, x):
    """x (B, 9, 64, 64) = (o_{t-1}, o_t, o_{t+1}). The IDM sees all three frames; the FDM sees
    the first two and the quantised latent action of this very transition."""
    _, la_q, commitment, perplexity = idm(x)
    return F.mse_loss(fdm(x[:, :6], la_q).float(), x[:, 6:]), commitment, perplexity

def stage1_update(cfg, idm, fdm, opt, x, step):
    """One step of stage 1 on windows x: FDM error + commitment, no action labels. The learning
    rate warms up from 0.1x and decays linearly to 0.01x (the paper's schedule). Returns the
    step's numbers as tensors: reading them here would make the host wait for the device."""
    warmup = min(cfg.s1_warmup, cfg.s1_steps // 2)
    set_lr(opt, float(np.interp(step, [0, warmup, cfg.s1_steps], [0.1 * cfg.s1_lr, cfg.s1_lr, 0.01 * cfg.s1_lr])))
    idm.train(), fdm.train()
    with autocast(cfg):
        fdm_loss, commitment, perplexity = idm_fdm_loss(idm, fdm, x)
    loss = fdm_loss + commitment
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(trained_params(opt), cfg.s1_clip)
    opt.step()
    loss, fdm_loss, commitment = global_mean(torch.stack([loss, fdm_loss, commitment]))
    # perplexity: under torchrun, of rank 0's share of the batch (a mean over ranks is not the batch's)
    return dict(loss=loss, fdm_loss=fdm_loss, commitment=commitment, perplexity=perplexity.detach())

@torch.no_grad()
def latent_actions(cfg, idm, windows, batch=256):
    """The IDM's continuous latent actions (before quantisation: what the latent policy
    imitates and the decoder reads) of uint8 windows (N, 3, 64, 64, 3), on cfg.device."""
    idm.eval()
    with autocast(cfg):
        return torch.cat([idm(to_input(windows[i : i + batch], cfg.device))[0].float()
                          for i in range(0, len(windows), batch)])

def stage2_update(cfg, idm, policy, opt, x, step):
    """One step of latent behaviour cloning: the policy, from o_t alone, regresses the frozen
    IDM's continuous latent action of (o_{t-1}, o_t, o_{t+1}) (pre-quantisation, as in the
    authors' code) with MSE. The rate warms up from 0.01x, then decays to 0."""
    warmup = min(cfg.s2_warmup, cfg.s2_steps // 2)
    set_lr(opt, float(np.interp(step, [0, warmup, cfg.s2_steps], [0.01 * cfg.s2_lr, cfg.s2_lr, 0])))
    idm.eval()  # in train mode every call would move the EMA codebook
    with torch.no_grad(), autocast(cfg):
        la, _, _, _ = idm(x)
    policy.train()
    with autocast(cfg):
        la_pred, _ = policy(x[:, 3:6])  # o_t alone
    loss = F.mse_loss(la_pred.float(), la.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return dict(loss=global_mean(loss))

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

def gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over a rollout of T steps.
    dones[t] = 1 if obs[t] starts a new episode (so no bootstrapping from t into t-1)."""
    T, adv, last = len(rewards), torch.zeros_like(rewards), 0
    for t in reversed(range(T)):
        not_done = 1.0 - (next_done if t == T - 1 else dones[t + 1])
        next_v = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v * not_done - values[t]
        adv[t] = last = delta + gamma * lam * not_done * last
    return adv, adv + values

def ppo_update(cfg, agent, opt, batch, ent_coef):
    """PPO's clipped objective (Schulman et al. 2017), epochs x minibatches over one rollout's
    flat obs, actions, logprobs, advantages, returns, values. Only the optimiser's parameters
    are clipped and stepped. first_kl: the KL between the rollout's policy and the one
    updated, before the first step (0 unless something changed the policy in between)."""
    params, n, first_kl = trained_params(opt), len(batch["obs"]), None
    agent.train()
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
    if not math.isfinite(loss.item()):
        raise LapoError(f"the PPO loss became {loss.item()}: stopping; the last checkpoint is intact. Try a lower "
                        "learning rate.")
    return dict(pg_loss=pg_loss.item(), v_loss=v_loss.item(), entropy=entropy.item(), first_kl=first_kl)

def label_rollout(cfg, idm, obs, actions, dones):
    """(IDM latent action, action taken) pairs of a rollout: the latent of (o_{t-1}, o_t,
    o_{t+1}) with the action taken at o_t. obs (T, E, 64, 64, 3) uint8, actions and dones
    (T, E); windows across an episode start (or the rollout's ends) are dropped."""
    t = torch.arange(1, len(obs) - 1, device=obs.device)
    windows = torch.stack([obs[t - 1], obs[t], obs[t + 1]], 2).flatten(0, 1)  # ((T-2)*E, 3, ...)
    same_episode = ((dones[t] == 0) & (dones[t + 1] == 0)).flatten()
    return latent_actions(cfg, idm, windows[same_episode]), actions[t].flatten()[same_episode].long()

def fit_decoder(cfg, la, ta):
    """The SL of RL+SL: a new decoder latent action -> action, fitted from scratch on the pairs (la, ta)."""
    decoder = mlp(la.shape[1], *ONLINE_DECODER, NUM_ACTIONS).to(la.device)
    opt = torch.optim.Adam(decoder.parameters())
    for _ in range(cfg.sl_epochs):
        for i in torch.randperm(len(la), device=la.device).split(cfg.sl_batch):
            loss = F.cross_entropy(decoder(la[i]), ta[i], label_smoothing=cfg.sl_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return decoder, loss.item()

class DecoderSL:
    """Run after every PPO update, so the next rollout acts with the new decoder: labels the
    rollout's windows with the IDM and, inside the SL window, re-fits the decoder from
    scratch on every pair so far (after each update until sl_dense frames, then every
    sl_every updates). Its pairs and IDM are saved with the run's checkpoints."""

    def __init__(self, cfg, idm, decoder):
        self.cfg, self.idm, self.decoder = cfg, idm, decoder
        self.la, self.ta = torch.zeros(0, cfg.la_dim, device=cfg.device), torch.zeros(0, dtype=torch.long, device=cfg.device)

    def __call__(self, obs, actions, dones, frames):
        cfg, s = self.cfg, self.cfg.ft_schedule_scale
        if frames >= cfg.sl_end * s:  # the window is over: the pairs are no longer needed
            self.la, self.ta = self.la[:0], self.ta[:0]
            return {}
        la, ta = label_rollout(cfg, self.idm, obs, actions, dones)
        self.la, self.ta = torch.cat([self.la, la]), torch.cat([self.ta, ta])
        metrics, update = dict(sl_pairs=len(self.ta)), frames // (cfg.num_envs * cfg.num_steps)  # this one included
        if frames > cfg.sl_start * s and (frames < cfg.sl_dense * s or update % cfg.sl_every == 0):
            decoder, metrics["sl_loss"] = fit_decoder(cfg, self.la, self.ta)
            self.decoder.load_state_dict(decoder.state_dict())
        return metrics

    def state_dict(self):  # the IDM too: resumed, the run labels with the IDM it began with
        return dict(la=self.la, ta=self.ta, idm=self.idm.state_dict())

    def load_state_dict(self, d):
        self.la, self.ta = d["la"].to(self.cfg.device), d["ta"].to(self.cfg.device)
        self.idm.load_state_dict(d["idm"])

def finetune_optimizer(cfg, agent, sl):
    """Adam over the parts PPO tunes (the decoder too when sl=False), and their learning rates
    at a frame: FT_RAMPS, stretched by ft_schedule_scale."""
    parts = dict(rl_head=[*agent.rl_head.parameters()] + ([] if sl else [*agent.decoder.parameters()]),
                 value=[*agent.value.parameters()], fc_rl=[*agent.fc_rl.parameters()])
    s = cfg.ft_schedule_scale
    return (torch.optim.Adam([dict(params=parts[k]) for k in FT_RAMPS], lr=0.0),
            lambda frames: [float(np.interp(frames, [0, a * s, b * s, cfg.ft_frames], [0, 0, cfg.ft_lr * m, 0]))
                            for a, b, m in FT_RAMPS.values()])


# 5. Measurements: the latent probe, stage 1's held-out scores, evaluation episodes -------

def probe_accuracy(x, y, steps):
    """How much of the true action can be read from features x: an MLP (128, 128) fitted on
    the first half, accuracy on the second (labels serve this evaluation only). Features are
    centred and divided by one common scale: a per-feature scale would blow up a pixel that
    happens to be constant in the fitting half (x 1e6), and wreck the score."""
    n = len(x) // 2
    x = (x - x[:n].mean(0)) / (x[:n].std() + 1e-8)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.default_generator.manual_seed(0)  # torch.manual_seed would reset CUDA's too
        net = mlp(x.shape[1], 128, 128, NUM_ACTIONS)
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
    """The probe's baseline: the commonest class of the fitting half, scored on the second."""
    n = len(y) // 2
    return (y[n:] == torch.bincount(y[:n]).argmax()).float().mean().item()

@torch.no_grad()
def stage1_eval(cfg, idm, fdm, windows, ta):
    """On held-out windows: the probe on the latent (continuous and quantised) against the
    majority class; the FDM's error against copying o_t, and with latents shuffled across
    windows (no worse: the FDM ignores the latent); perplexity and the codes in use (of the
    codebook that uses fewest); the latent's spread across windows (0: it has collapsed)."""
    la = latent_actions(cfg, idm, windows)
    la_q, perplexity, live_codes = la, math.nan, 0
    if idm.vq is not None:
        la_q, _, perplexity, codes = idm.vq(la)
        perplexity, live_codes = perplexity.item(), min(len(codes[:, g].unique()) for g in range(codes.shape[1]))
    every = max(1, len(windows) // 512)  # at most 1,023 of the windows, evenly spaced, for the FDM
    x, la_x = to_input(windows[::every], cfg.device), la_q[::every]
    fdm.eval()
    with autocast(cfg):
        pred = fdm(x[:, :6], la_x).float()
        shuffled = fdm(x[:, :6], la_x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]).float()
    la, la_q = la.cpu(), la_q.cpu()  # the probe fits on the CPU
    return dict(probe_la=probe_accuracy(la, ta, cfg.probe_steps), probe_la_q=probe_accuracy(la_q, ta, cfg.probe_steps),
                majority=majority_accuracy(ta), test_fdm_mse=F.mse_loss(pred, x[:, 6:]).item(),
                test_fdm_mse_shuffled=F.mse_loss(shuffled, x[:, 6:]).item(),
                test_copy_mse=F.mse_loss(x[:, 3:6], x[:, 6:]).item(), test_perplexity=perplexity,
                live_codes=live_codes, latent_spread=la.std(0).mean().item())

def evaluate(cfg, agent, episodes):
    """Returns of exactly `episodes` episodes on levels of their own (LEVEL_SEEDS), acting by
    sampling from the policy (seeded: it resets torch's seed). Each game plays a fixed share,
    so short episodes are not favoured."""
    n_envs, seed = min(episodes, 64), LEVEL_SEEDS["eval"] + cfg.seed
    quota = [episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)]
    envs, returns = make_env(cfg.env, n_envs, seed), [[] for _ in range(n_envs)]
    torch.manual_seed(seed)
    obs, ep_ret = envs.reset()["rgb"], np.zeros(n_envs)
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
    return dict(mean=m, std=float(np.std(returns)), episodes=len(returns), relative=relative_return(cfg.env, m))


# 6. Stages -------------------------------------------------------------------------------

def ppo(cfg, name, agent, opt, lr_fn, frames, ent_coef, path, state=None, after_update=None):
    """PPO after CleanRL's ppo_procgen (a rollout of num_steps in num_envs games, GAE, update),
    with the authors' fine-tuning sizes (num_steps 64, CleanRL's 256). lr_fn(frames): each
    optimiser group's learning rate. after_update(obs, actions, dones, frames) sees every
    rollout after its update (RL+SL fits its decoder there) and is saved with the run.
    state: an unfinished checkpoint to resume. Returns the frames done."""
    E, T = cfg.num_envs, cfg.num_steps
    normalize = RewardNormalizer(E, cfg.gamma)
    done_frames = restore(path, state, math.ceil(frames / (E * T)) * E * T, at_end=True, policy=agent, opt=opt,
                          normalizer=normalize, after_update=after_update)
    returns = state["returns"] if state else []
    seed_everything(cfg.seed + done_frames)  # a resumed run goes on in fresh levels
    envs = make_env(cfg.env, E, cfg.seed + done_frames)
    games = dict(obs=envs.reset()["rgb"], done=torch.zeros(E, device=cfg.device), ret=np.zeros(E), len=np.zeros(E, int))
    log, last_save = Logger(cfg, name, frames, start=done_frames, unit="frame"), time.time()
    while done_frames < frames:
        set_lr(opt, *lr_fn(done_frames))
        batch, (obs, actions, dones) = rollout(cfg, agent, envs, games, normalize, returns, log, done_frames)
        done_frames += E * T
        metrics = ppo_update(cfg, agent, opt, batch, ent_coef)
        metrics.update(after_update(obs, actions, dones, done_frames) if after_update else {})
        log.log(done_frames, return_100=float(np.mean(returns[-100:])) if returns else math.nan, **metrics)
        if time.time() - last_save > cfg.ckpt_every_s or done_frames >= frames:
            save_checkpoint(path, cfg, policy=agent, opt=opt, normalizer=normalize, after_update=after_update,
                            step=done_frames, returns=returns[-1000:])
            last_save = time.time()
    envs.close()
    return done_frames

def rollout(cfg, agent, envs, games, normalize, returns, log, frames):
    """num_steps steps of the games, sampling the agent's actions, then GAE: one PPO update's
    batch, and the rollout's (obs, actions, dones). games: each game's last frame, done flag,
    return and length, carried from one rollout to the next."""
    dev, E, T = cfg.device, cfg.num_envs, cfg.num_steps
    obs = torch.empty(T, E, 64, 64, 3, dtype=torch.uint8, device=dev)  # every entry is written below
    actions, logprobs, rewards, dones, values = (torch.empty(T, E, device=dev) for _ in range(5))
    agent.eval()
    for t in range(T):
        obs[t] = torch.as_tensor(games["obs"]).to(dev, non_blocking=True)
        dones[t] = games["done"]  # 1 if obs[t] is an episode's FIRST frame (a chunk's done[t]: its last)
        with torch.no_grad(), autocast(cfg):
            logits, value = agent(to_input(obs[t], dev))
        pi = torch.distributions.Categorical(logits=logits.float())
        action = pi.sample()
        actions[t], logprobs[t], values[t] = action, pi.log_prob(action), value.float()
        next_obs, reward, done, _ = envs.step(action.cpu().numpy().astype(np.int32))
        games.update(obs=next_obs["rgb"], ret=games["ret"] + reward, len=games["len"] + 1)
        for i in np.flatnonzero(done):
            returns.append(float(games["ret"][i]))
            log.log(frames + t * E + i + 1, episode_return=returns[-1], episode_length=int(games["len"][i]))
        games["ret"][done], games["len"][done] = 0, 0
        rewards[t] = torch.as_tensor(normalize(reward, done), device=dev)
        games["done"] = torch.as_tensor(done, device=dev, dtype=torch.float32)
    with torch.no_grad(), autocast(cfg):
        _, next_value = agent(to_input(games["obs"], dev))
    adv, ret = gae(rewards, values, dones, next_value.float(), games["done"], cfg.gamma, cfg.gae_lambda)
    return (dict(obs=obs.flatten(0, 1), actions=actions.flatten().long(), logprobs=logprobs.flatten(),
                 advantages=adv.flatten(), returns=ret.flatten(), values=values.flatten()), (obs, actions, dones))

def evaluate_and_finish(cfg, path, agent, kind, step, **results):
    """The last act of every stage that makes a policy: play it, and save it as finished."""
    results.update(return_summary(cfg, evaluate(cfg, agent, cfg.eval_episodes)))
    save_checkpoint(path, cfg, kind=kind, policy=agent, step=step, finished=True, results=results)
    print(f"[{path.stem}] return {results['mean']:.2f} +- {results['std']:.2f} (relative "
          f"{results['relative']:.2f}) over {results['episodes']} episodes")
    return results

def run_expert(cfg, name="expert", frames=None):
    """Stage 0: PPO from scratch for `frames` (default expert_frames): the expert whose rollouts
    make the dataset, and (as ppo.pt, for ft_frames) the baseline of online decoding."""
    path, state = resume(cfg, name, "expert" if name == "expert" else "finetune --scratch")
    if state and state.get("finished"):
        return state["results"]
    frames = frames or cfg.expert_frames
    seed_everything(cfg.seed)
    agent = make_policy("policy", cfg).to(cfg.device, memory_format=torch.channels_last)
    orthogonal_init(agent.head, 0.01)  # CleanRL's PPO: a near-uniform first policy,
    orthogonal_init(agent.value, 1.0)  # unit-scale values, and Adam's eps 1e-5
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.expert_lr, eps=1e-5)
    done_frames = ppo(cfg, name, agent, opt, lambda f: [cfg.expert_lr * (1 - f / frames)], frames,
                      cfg.expert_ent, path, state)
    return evaluate_and_finish(cfg, path, agent, "policy", done_frames)

def load_policy(cfg, path, command=None):
    """The acting policy of a finished checkpoint, built at the sizes it was made with."""
    ckpt = load_checkpoint(path, command, cfg)
    if ckpt.get("kind") not in ("policy", "decoded", "rlsl"):
        raise LapoError(f"{path} holds no acting policy: use expert.pt, decode-N.pt, bc-N.pt, finetune.pt, "
                        f"finetune-rl.pt or ppo.pt")
    agent = make_policy(ckpt["kind"], sized_as(cfg, ckpt, "idm", "policy"))
    agent.load_state_dict(ckpt["policy"])
    return agent.to(cfg.device, memory_format=torch.channels_last).eval()

def collect(cfg, random_policy=False, policy_path=None):
    """Rolls out the expert (or another acting checkpoint, or uniform-random play) into the
    authors' chunk format, <data>/train/0.npz, .. and <data>/test/0.npz, .. (other levels),
    playing only the chunks missing there. Returns the frames per split: --train-frames
    and --test-frames rounded up to whole chunks."""
    if random_policy and policy_path:
        raise LapoError("--random plays a uniform-random policy, --policy rolls out a checkpoint: pass one")
    agent = None if random_policy else load_policy(cfg, policy_path or Path(cfg.run_dir) / "expert.pt",
                                                   None if policy_path else "expert")
    check_game(cfg.data, cfg.env)
    written = {}
    for split, frames, chunk_len in [("train", cfg.train_frames, TRAIN_CHUNK), ("test", cfg.test_frames, TEST_CHUNK)]:
        chunk_len, folder = min(chunk_len, frames), Path(cfg.data, split)
        n_chunks, have = math.ceil(frames / chunk_len), chunk_files(folder)
        if any(int(p.stem) >= n_chunks for p in have) or have and len(read_chunk(have[0])[0]) != chunk_len:
            raise LapoError(f"{folder} holds other chunks than the {n_chunks} of {chunk_len} frames that --{split}-frames "
                            f"{frames} asks for: use another --data folder")
        folder.mkdir(parents=True, exist_ok=True)
        missing = sorted(set(range(n_chunks)) - {int(p.stem) for p in have})
        for first in [i for i in missing if i - 1 not in missing]:  # each run of missing chunks, on new levels
            write_atomic(Path(cfg.data) / "game.txt", cfg.env + "\n")
            end = next((i for i in range(first, n_chunks) if i not in missing), n_chunks)
            collect_split(cfg, agent, folder, first, end, chunk_len, LEVEL_SEEDS[split] + 10_000 * cfg.seed + first)
        written[split] = n_chunks * chunk_len
    return written

def collect_split(cfg, agent, folder, first, end, chunk_len, seed):
    """Plays chunks first .. end - 1: num_envs games for the same number of steps; an episode
    joins the chunk when it ends, so chunks are whole episodes end to end (the last may run on
    into the next chunk). The episodes still running at the last step are cut there (done =
    True) and kept: dropping them would drop the long ones. Frames go into arrays made once (an episode per
    game, a chunk): an array per frame would fragment the heap (4x the peak memory)."""
    E, rows = cfg.num_envs, np.arange(cfg.num_envs)
    envs, rng = make_env(cfg.env, E, seed), seed_everything(seed)
    obs, cap = envs.reset()["rgb"], 1024  # cap: the longest episode held; doubled when outgrown
    episode = {k: np.empty((E, cap, *(obs.shape[1:] if k == "obs" else ())), t) for k, t in CHUNK_KEYS.items()}
    chunk = {k: np.empty((chunk_len, *v.shape[2:]), v.dtype) for k, v in episode.items()}
    length, filled, n, ep_ret = np.zeros(E, int), 0, first, np.zeros(E)
    log, steps = Logger(cfg, f"collect-{folder.name}", end * chunk_len, first * chunk_len, "frame"), 0
    last_step = math.ceil((end - first) * chunk_len / E)  # it cuts every running episode
    while n < end:
        if agent is None:
            action, value = rng.integers(NUM_ACTIONS, size=E), np.zeros(E)
        else:
            with torch.no_grad(), autocast(cfg):
                logits, value = agent(to_input(obs, cfg.device))
            action = torch.distributions.Categorical(logits=logits.float()).sample().cpu().numpy()
            value = np.zeros(E) if value is None else value.float().cpu().numpy()  # decode-N: no critic
        next_obs, reward, done, _ = envs.step(action.astype(np.int32))
        ep_ret, steps = ep_ret + reward, steps + 1
        if length.max() == cap:
            episode, cap = {k: np.concatenate([v, np.empty_like(v)], 1) for k, v in episode.items()}, 2 * cap
        for k, v in zip(CHUNK_KEYS, (obs, action, done, reward, ep_ret, value)):
            episode[k][rows, length] = v
        length += 1
        if steps == last_step:
            done = episode["done"][rows, length - 1] = np.ones(E, bool)
        for i in np.flatnonzero(done):  # copy the finished episode into the chunk(s)
            start = 0
            while start < length[i] and n < end:
                m = min(chunk_len - filled, length[i] - start)
                for k in CHUNK_KEYS:
                    chunk[k][filled : filled + m] = episode[k][i, start : start + m]
                filled, start = filled + m, start + m
                if filled == chunk_len:
                    write_chunk(folder / f"{n}.npz", chunk)
                    n, filled = n + 1, 0
                    log.log(n * chunk_len, force=True, chunk=n)
            length[i], ep_ret[i] = 0, 0
        obs = next_obs["rgb"]
    envs.close()

def stage1(cfg):
    """Trains the IDM and the FDM together on windows of the dataset (stage1_update), no action
    labels; every probe_every steps, measures what the latent knows on held-out windows."""
    path, state = resume(cfg, "stage1")
    if state and state.get("finished"):
        return state["results"]
    train, test = Dataset(cfg.data, "train", cfg.env), Dataset(cfg.data, "test", cfg.env)
    print(f"[stage1] {train.frames} train frames ({len(train)} windows), {test.frames} test frames")
    rng = seed_everything(cfg.seed)
    idm, fdm = (m.to(cfg.device, memory_format=torch.channels_last) for m in make_idm_fdm(cfg))
    opt = torch.optim.Adam([*idm.parameters(), *fdm.parameters()], lr=cfg.s1_lr)
    step = restore(path, state, cfg.s1_steps, idm=idm, fdm=fdm, opt=opt, rng=rng, device=cfg.device)
    idm_ddp, fdm_ddp = data_parallel(idm), data_parallel(fdm)
    windows, ta = test.get(np.linspace(0, len(test) - 1, min(cfg.probe_frames, len(test))).astype(int))
    probe = windows, torch.as_tensor(ta)
    log, last_save = Logger(cfg, "stage1", cfg.s1_steps, start=step), time.time()
    results = state["results"] if state else stage1_probe(cfg, idm, fdm, probe, log, 0, path)
    while step < cfg.s1_steps:
        windows, _ = train.sample(rng, cfg.s1_batch, *rank_world())
        metrics = stage1_update(cfg, idm_ddp, fdm_ddp, opt, to_input(windows, cfg.device), step)
        step += 1
        finished, save = step == cfg.s1_steps, time.time() - last_save > cfg.ckpt_every_s
        log.add(step, metrics, flush=finished or save or step % cfg.probe_every == 0)
        if finished or step % cfg.probe_every == 0:
            results = stage1_probe(cfg, idm, fdm, probe, log, step, path)
        if finished or save:
            save_checkpoint(path, cfg, idm=idm, fdm=fdm, opt=opt, step=step, finished=finished, results=results,
                            random=random_state(rng, cfg.device))
            last_save = time.time()
    used = results["test_fdm_mse_shuffled"] / max(results["test_fdm_mse"], 1e-12)
    print(f"[stage1] probe accuracy {results['probe_la']:.3f} (quantised {results['probe_la_q']:.3f}), majority "
          f"class {results['majority']:.3f}; perplexity {results['test_perplexity']:.1f}/{cfg.vq_codes}; FDM error "
          f"with shuffled latents {used:.2f}x its own" + (f" -- the FDM barely uses the latent: delete {path} "
                                                          "and run it again with another --seed" if used < 1.01 else ""))
    return results

def stage1_probe(cfg, idm, fdm, probe, log, step, path):
    results = stage1_eval(cfg, idm, fdm, *probe)
    log.log(step, force=True, **results)
    if results["latent_spread"] < 1e-6:  # one latent for every window: no gradient makes it vary again
        raise LapoError(f"stage 1 collapsed at step {step}: the IDM gives every held-out window the same latent "
                        f"action, for good. Delete {path} (else it resumes this run) and run it again with another --seed")
    return results

def load_stage2(cfg):
    """stage2.pt (the latent policy and the IDM it imitates), and cfg at their sizes."""
    ckpt = load_checkpoint(Path(cfg.run_dir) / "stage2.pt", "stage2", cfg)
    if "idm" not in ckpt:  # made before stage2.pt carried its IDM
        raise LapoError("stage2.pt was made by an older lapo.py and holds no IDM: run `python lapo.py stage2` again")
    return ckpt, sized_as(cfg, ckpt, "idm", "policy")

def load_idm(cfg, ckpt):
    idm = make_idm(cfg)
    idm.load_state_dict(ckpt["idm"])
    return idm.to(cfg.device, memory_format=torch.channels_last).eval().requires_grad_(False)

def stage2(cfg):
    """Latent behaviour cloning (stage2_update): the frozen IDM of stage1.pt gives the targets.
    stage2.pt keeps that IDM, so decoding and fine-tuning use the IDM this policy imitates."""
    path, state = resume(cfg, "stage2")
    if state and state.get("finished"):
        return state["results"]
    s1 = state or load_checkpoint(Path(cfg.run_dir) / "stage1.pt", "stage1", cfg)  # a resumed run: its own IDM
    cfg = sized_as(cfg, s1, "idm")
    idm = load_idm(cfg, s1)
    train, test = Dataset(cfg.data, "train", cfg.env), Dataset(cfg.data, "test", cfg.env)
    rng = seed_everything(cfg.seed)
    policy = Policy(cfg.policy_scale, cfg.la_dim, value=False).to(cfg.device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.s2_lr)
    step = restore(path, state, cfg.s2_steps, policy=policy, opt=opt, rng=rng, device=cfg.device)
    policy_ddp = data_parallel(policy)
    test_windows, _ = test.sample(np.random.default_rng(cfg.seed), 512)
    test_x, test_la = to_input(test_windows, cfg.device), latent_actions(cfg, idm, test_windows)
    results = dict(mean_baseline_mse=F.mse_loss(test_la.mean(0).expand_as(test_la), test_la).item())
    log, last_save = Logger(cfg, "stage2", cfg.s2_steps, start=step), time.time()
    while step < cfg.s2_steps:
        windows, _ = train.sample(rng, cfg.s2_batch, *rank_world())
        metrics = stage2_update(cfg, idm, policy_ddp, opt, to_input(windows, cfg.device), step)
        step += 1
        finished, save = step == cfg.s2_steps, time.time() - last_save > cfg.ckpt_every_s
        if step % 100 == 0 or finished:
            policy.eval()
            with torch.no_grad(), autocast(cfg):
                metrics["test_loss"] = F.mse_loss(policy(test_x[:, 3:6])[0].float(), test_la)
        log.add(step, metrics, flush=finished or save)
        if finished or save:
            results["test_mse"] = metrics["test_loss"].item() if finished else math.nan
            save_checkpoint(path, cfg, policy=policy, idm=idm, opt=opt, step=step, finished=finished,
                            results=results, random=random_state(rng, cfg.device))
            last_save = time.time()
    print(f"[stage2] held-out latent MSE {results['test_mse']:.4f} (predicting the mean latent: "
          f"{results['mean_baseline_mse']:.4f})")
    return results

def decode(cfg, bc=False):
    """Offline decoding: fits a decoder latent action -> action on --labels labelled windows
    (the IDM's latents of them), then plays latent policy + decoder. bc=True, the baseline:
    the policy network trained from scratch by behaviour cloning on the same labels. Both fit
    for passes over the labels (decode_epochs, bc_epochs, each set by its held-out accuracy,
    docs/): a fixed step count would pass over 256 labels 4x as often as over 1,024, and
    memorise them. Reported: the fit's accuracy, the acting policy's on held-out windows
    (from o_t), and the decoder's alone (from the IDM's latent)."""
    path, state = resume(cfg, f"{'bc' if bc else 'decode'}-{cfg.labels}{seed_suffix(cfg)}",
                         "decode --bc" if bc else "decode")
    if state and state.get("finished"):
        return state["results"]
    if not bc:
        ckpt, cfg = load_stage2(cfg)
    train = Dataset(cfg.data, "train", cfg.env)
    if cfg.labels > len(train):
        raise LapoError(f"--labels {cfg.labels} is more than the {len(train)} transitions in {cfg.data}/train: lower it")
    rng = seed_everything(cfg.seed)
    windows, ta = train.get(rng.choice(len(train), size=cfg.labels, replace=False))
    test = Dataset(cfg.data, "test", cfg.env)
    test_windows, test_ta = test.get(np.arange(0, len(test), max(1, len(test) // 2048)))  # for evaluation only
    if bc:  # o_t -> a_t, every weight learnt from the labelled frames alone
        agent = make_policy("policy", cfg).to(cfg.device, memory_format=torch.channels_last)
        net, x = (lambda obs: agent(obs)[0]), to_input(windows[:, 1], cfg.device)
    else:  # latent action -> a_t: the rest was learnt without labels
        idm, agent = load_idm(cfg, ckpt), make_policy("decoded", cfg).to(cfg.device, memory_format=torch.channels_last)
        agent.latent_policy.load_state_dict(ckpt["policy"])
        net, x, test_la = agent.decoder, latent_actions(cfg, idm, windows), latent_actions(cfg, idm, test_windows)
    ta, batch = torch.as_tensor(ta, device=cfg.device), min(256, len(x))
    steps = (cfg.bc_epochs if bc else cfg.decode_epochs) * len(x) // batch
    opt = torch.optim.Adam((agent if bc else agent.decoder).parameters(), lr=cfg.decode_lr, weight_decay=cfg.decode_wd)
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
        results.update({} if bc else dict(decoder_test_acc=acc(net(test_la), test_ta)))
    return evaluate_and_finish(cfg, path, agent, "policy" if bc else "decoded", steps, labels=cfg.labels, **results)

def finetune(cfg, sl=True, scratch=False):
    """Online decoding: PPO on the RL+SL policy, its trunk frozen; PPO tunes the RL head, the
    value head and the trunk's linear layer (fc_rl) at the FT_RAMPS learning rates (Adam's eps
    the default 1e-8, as in the authors' code). With SL, DecoderSL re-fits the decoder after
    updates; sl=False (RL only): PPO trains the decoder. scratch: the baseline, PPO from
    scratch for the same frames."""
    if scratch and not sl:
        raise LapoError("--scratch trains PPO from scratch; --no-sl applies to fine-tuning only")
    if scratch:
        return run_expert(cfg, "ppo" + seed_suffix(cfg), cfg.ft_frames)
    name = ("finetune" if sl else "finetune-rl") + seed_suffix(cfg)
    path, state = resume(cfg, name, "finetune" if sl else "finetune --no-sl")
    if state and state.get("finished"):
        return state["results"]
    ckpt, cfg = load_stage2(cfg)
    idm = load_idm(cfg, ckpt)
    seed_everything(cfg.seed)
    latent_policy = Policy(cfg.policy_scale, cfg.la_dim, value=False)
    latent_policy.load_state_dict(ckpt["policy"])
    agent = RLSLPolicy(latent_policy, cfg.la_dim, NUM_ACTIONS, sl).to(cfg.device, memory_format=torch.channels_last)
    opt, lr_fn = finetune_optimizer(cfg, agent, sl)
    done_frames = ppo(cfg, name, agent, opt, lr_fn, cfg.ft_frames, cfg.ft_ent, path, state,
                      DecoderSL(cfg, idm, agent.decoder) if sl else None)
    return evaluate_and_finish(cfg, path, agent, "rlsl", done_frames)

def pipeline(cfg):
    """expert -> collect -> stage1 -> stage2 -> decode -> finetune, then one results table.
    Every stage skips itself when finished, so a re-run resumes."""
    out, minutes = {}, {}
    for name, fn in [("expert", run_expert), ("collect", collect), ("stage1", stage1), ("stage2", stage2),
                     ("decode", decode), ("finetune", finetune)]:
        t0 = time.time()
        print(f"=== {name} ===", flush=True)
        out[name], minutes[name] = fn(cfg), (time.time() - t0) / 60
    ex, data, s1, s2, dec, ft = out.values()
    rows = [("expert (PPO from scratch)", f"return {ex['mean']:.2f}", f"relative {ex['relative']:.2f}", "expert"),
            ("collect", f"{data['train']} + {data['test']} frames", "", "collect"),
            ("stage1 probe (latent)", f"acc {s1['probe_la']:.3f}", f"majority class {s1['majority']:.3f}", "stage1"),
            ("  quantised latent", f"acc {s1['probe_la_q']:.3f}", f"perplexity {s1['test_perplexity']:.1f}/{cfg.vq_codes}", ""),
            ("  FDM held-out MSE", f"{s1['test_fdm_mse']:.5f}",
             f"copy o_t {s1['test_copy_mse']:.5f}, shuffled latents {s1['test_fdm_mse_shuffled']:.5f}", ""),
            ("stage2 latent BC held-out MSE", f"{s2['test_mse']:.3g}", f"mean latent {s2['mean_baseline_mse']:.3g}", "stage2"),
            (f"decode ({dec['labels']} labels)", f"return {dec['mean']:.2f}", f"relative {dec['relative']:.2f}", "decode"),
            (f"finetune RL+SL ({cfg.ft_frames} frames)", f"return {ft['mean']:.2f}", f"relative {ft['relative']:.2f}", "finetune")]
    table = "\n".join([f"LAPO on {cfg.env}, preset {cfg.preset} (returns: random {RANDOM_RETURN[cfg.env]}, paper's expert "
                       f"{EXPERT_RETURN[cfg.env]}; {cfg.eval_episodes} eval episodes each)",
                       f"{'stage':<34}{'result':<22}{'baseline':<50}minutes"] +
                      [f"{a:<34}{b:<22}{c:<50}" + (f"{minutes[m]:7.1f}" if m else "") for a, b, c, m in rows])
    write_atomic(Path(cfg.run_dir) / "results.txt", table + "\n")
    print("\n" + table)
    return table


# 7. Checkpoints, logging, torchrun -------------------------------------------------------

class LapoError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""

def save_checkpoint(path, cfg, **state):
    """A plain dict: state_dicts (of anything that has one), numbers and the config, which
    torch.load(weights_only=True) loads anywhere. Written to a temporary name, then renamed:
    never a half-written file. Under torchrun rank 0 alone writes."""
    if rank_world()[0] == 0:
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        torch.save(dict(state, config=dataclasses.asdict(cfg)), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)

def load_checkpoint(path, command=None, cfg=None, finished=True):
    """A checkpoint, or one line saying why it cannot be used and what to run. command: the
    one that makes it; cfg: its game must be --env (else evaluation plays another game)."""
    path, run = Path(path), f"`python lapo.py {command}`" if command else "the stage that made it"
    if not path.exists():
        raise LapoError(f"{path} not found" + (f": run {run} with the same --run-dir first" if command else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        made_on, _ = ckpt["config"]["env"], ckpt["step"]
    except Exception as e:
        raise LapoError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); delete it and run {run} again") from None
    if finished and not ckpt.get("finished"):
        raise LapoError(f"{path} is from an unfinished run: run {run} again with the same flags to finish it")
    if cfg is not None and made_on != cfg.env:
        raise LapoError(f"{path} was made on {made_on}, the flags say --env {cfg.env}: pass --env {made_on}")
    return ckpt

def sized_as(cfg, ckpt, *groups):
    """cfg with the fields of these groups (the networks' sizes and settings) as ckpt was made
    with: a later stage builds what it loads as it was built, so no flag can disagree with it."""
    return dataclasses.replace(cfg, **{f.name: ckpt["config"].get(f.name, getattr(cfg, f.name))
                                       for f in dataclasses.fields(Config) if set(f.metadata["group"].split()) & set(groups)})

def resume(cfg, name, command=None):
    """<run-dir>/<name>.pt, and the checkpoint of an earlier run there (None: a fresh run)."""
    path = Path(cfg.run_dir) / f"{name}.pt"
    state = load_checkpoint(path, command or name, cfg, finished=False) if path.exists() else None
    if state:
        print(f"{path} is finished; delete it to run this stage again" if state.get("finished")
              else f"resuming {path} from step {state['step']}")
    return path, state

def restore(path, state, total, rng=None, device="cpu", at_end=False, **parts):
    """Loads each part (module, optimiser, ...) of a resumed run and, with rng, the random
    state (on a cuda device, CUDA's too), so it goes on as if never stopped; returns the step
    it had reached (0: none). at_end: it may stand at its last step (PPO, killed in its final
    evaluation)."""
    if state is None:
        return 0
    if state["step"] > total or state["step"] == total and not at_end:
        raise LapoError(f"{path} is at step {state['step']} of this run's {total}: raise --s1-steps, --s2-steps, "
                        "--expert-frames or --ft-frames (the one this stage reads), or delete the file")
    try:
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(state[name])
        if rng is not None:
            rng.bit_generator.state = state["random"]["numpy"]
            torch.set_rng_state(state["random"]["torch"])
            if state["random"]["cuda"] is not None and device.startswith("cuda"):  # the codebook resets' draws
                torch.cuda.set_rng_state(state["random"]["cuda"], device)
    except (KeyError, ValueError, RuntimeError) as e:  # other sizes, or an older lapo.py
        raise LapoError(f"{path} does not fit these flags ({str(e).splitlines()[0][:200]}): pass the flags it "
                        "was made with, or delete it to start again") from None
    return state["step"]

def random_state(rng, device):
    return dict(numpy=rng.bit_generator.state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)

def write_atomic(path, text):
    Path(f"{path}.tmp").write_text(text)
    os.replace(f"{path}.tmp", path)

READ_EVERY = 50  # training steps between reading the losses back from the device

class Logger:
    """Metrics to <run_dir>/<stage>.jsonl, a JSON object a line, and a progress line on the
    console every few seconds: step, rate, ETA and the latest numbers. Under torchrun rank 0
    alone logs. Resumed, it drops the rows logged after the checkpoint (they are redone)."""

    def __init__(self, cfg, stage, total, start=0, unit="step"):
        self.path, self.stage, self.total, self.unit = Path(cfg.run_dir) / f"{stage}.jsonl", stage, total, unit
        self.start, self.t0, self.last_print, self.silent = start, time.time(), 0.0, rank_world()[0] != 0
        self.pending = []  # (step, metrics as tensors) not yet read back
        if not self.silent:  # a row a crash cut short does not end in "}"
            rows = self.path.read_text().splitlines() if start and self.path.exists() else []
            write_atomic(self.path, "".join(r + "\n" for r in rows if r.endswith("}") and json.loads(r)["step"] <= start))

    def log(self, step, force=False, **metrics):
        if self.silent:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=int(step), time=round(time.time() - self.t0, 2), **metrics)) + "\n")
        if force or time.time() - self.last_print > 10:
            self.last_print, rate = time.time(), (step - self.start) / max(time.time() - self.t0, 1e-9)
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            eta = (self.total - step) / rate / 60 if rate > 0 else 0
            print(f"[{self.stage}] {self.unit} {step}/{self.total} {rate:.1f} {self.unit}s/s ETA {eta:.1f} min | {shown}",
                  flush=True)

    def add(self, step, metrics, flush=False):
        """A training step's metrics, tensors, read back from the device READ_EVERY steps at a
        time (or now, with flush): the host does not wait for the device every step. Stops at
        a loss that is not finite, before a checkpoint can keep it (on every rank)."""
        self.pending.append((step, metrics))
        if not (flush or len(self.pending) == READ_EVERY):
            return
        values = iter(torch.stack([v.float() for _, m in self.pending for v in m.values()]).tolist())
        for s, m in self.pending:
            row = {k: next(values) for k in m}
            if not math.isfinite(row["loss"]):
                raise LapoError(f"{self.stage} loss became {row['loss']} at step {s}: stopping; the last checkpoint "
                                "is intact. Try a lower learning rate.")
            self.log(s, **row)
        self.pending.clear()

def seed_everything(seed):
    torch.manual_seed(seed)
    return np.random.default_rng(seed)

def autocast(cfg):
    return torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.amp)

def seed_suffix(cfg):
    """'' for seed 0, else '-seedS': runs of other seeds sit beside seed 0's, sharing its data and stages 1-2."""
    return f"-seed{cfg.seed}" if cfg.seed else ""

def set_lr(opt, *lrs):  # one per optimiser group
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr

def trained_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]

# torchrun: stages 1 and 2 run as N processes that take the step one process would take on
# the global batch. DDP averages the gradients; the two statistics of the batch are summed
# over the processes: the EMA codebook's (VectorQuantizerEMA.update_codebook) and
# BatchNorm's (data_parallel swaps in GlobalBatchNorm2d).

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def setup_distributed(cfg, command):
    if command not in ("stage1", "stage2"):
        raise LapoError("only stage1 and stage2 run under torchrun; run the others with python")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if rank_world()[0]:  # rank 0 alone speaks
        sys.stdout = open(os.devnull, "w")
    batch, flag = (cfg.s1_batch, "--s1-batch") if command == "stage1" else (cfg.s2_batch, "--s2-batch")
    if batch % dist.get_world_size():
        raise LapoError(f"{flag} {batch} must be divisible by the {dist.get_world_size()} processes")

def global_mean(x):
    """x detached, averaged over the torchrun processes (what one process would have logged)."""
    x = x.detach()
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x

def data_parallel(module):
    """Under torchrun, the module wrapped by DDP, each BatchNorm layer replaced by a
    GlobalBatchNorm2d with its state and its very parameters, which the optimiser holds (as
    nn.SyncBatchNorm.convert_sync_batchnorm does; nn.SyncBatchNorm refuses to run on a CPU)."""
    if not dist.is_initialized():
        return module
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
                synced.load_state_dict(child.state_dict())
                synced.weight, synced.bias = child.weight, child.bias
                setattr(parent, name, synced)
    return DDP(module)

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span all ranks."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        world, dtype, x = dist.get_world_size(), x.dtype, x.float()  # statistics in fp32, as nn.BatchNorm2d
        stats = torch.stack([x.mean((0, 2, 3)), x.pow(2).mean((0, 2, 3))])
        mean, mean_sq = dist_fn.all_reduce(stats, "sum", dist.group.WORLD) / world
        var = mean_sq - mean.pow(2)
        with torch.no_grad():
            n = x.numel() / x.shape[1] * world
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked.add_(1)
        x = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        return (x * self.weight[:, None, None] + self.bias[:, None, None]).to(dtype)


# 8. Command line -------------------------------------------------------------------------

HELP = dict(
    expert="train a PPO agent from scratch: the expert whose rollouts make the dataset",
    collect="roll out the expert (or --random, or --policy) into a dataset in the authors' chunk format",
    stage1="train the latent IDM + FDM (no actions used; a probe reports action accuracy)",
    stage2="latent behaviour cloning: a policy imitates the IDM's latent actions",
    decode="offline decoding: fit latent -> action on --labels N frames (--bc: the baseline), play",
    finetune="online decoding with PPO: RL + SL (paper), --no-sl (RL only) or --scratch (the baseline)",
    eval="play a saved policy for --eval-episodes episodes and report its return",
    pipeline="expert -> collect -> stage1 -> stage2 -> decode -> finetune, then a results table",
)
SWITCHES = [("collect", "--random", "uniform-random actions"),
            ("decode", "--bc", "the baseline: behaviour cloning from scratch on the same labels"),
            ("finetune", "--no-sl", "RL only: PPO also trains the decoder"),
            ("finetune", "--scratch", "the baseline: PPO from scratch for the same frames")]
EPILOG = """start here, a first sign of stage 1 working in minutes on 2 CPU cores:
  python lapo.py collect --random --preset tiny --env dodgeball
  python lapo.py stage1 --preset tiny --env dodgeball --s1-steps 1000
every stage at toy sizes, then a table: python lapo.py pipeline --preset tiny
the default preset, paper, has the paper's sizes: a GPU job
python lapo.py <command> --help: the flags a command reads, with the preset's values"""

def build_parser(preset="paper", env="coinrun"):
    """A subcommand per stage. Every Config field is a flag of every subcommand (one set of
    flags serves all stages), but --help lists only the groups it reads (READS), each flag
    with the value the preset (and game, for the run folder) gives it."""
    defaults = make_config(preset, env=env) if preset in PRESETS and env in GAMES else Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in HELP.items():
        p = sub.add_parser(command, help=text, description=text)
        groups = {g: p.add_argument_group(GROUPS[g]) for g in READS[command].split()}
        groups["run"].add_argument("--preset", choices=list(PRESETS), default="paper",
                                   help="sizes and step counts; other flags override it (default: paper)")
        for f in [f for f in dataclasses.fields(Config) if f.name != "preset"]:
            shown = [g for g in f.metadata["group"].split() if g in groups]
            kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool
                    else dict(type=f.type, metavar={int: "N", float: "X"}.get(f.type, "VALUE")))
            (groups[shown[0]] if shown else p).add_argument(
                "--" + f.name.replace("_", "-"), default=None, **kind,
                help=f"{f.metadata['help']} ({preset}: {getattr(defaults, f.name)})" if shown else argparse.SUPPRESS)
        if command in ("collect", "eval"):
            p.add_argument("--policy", required=command == "eval",
                           help="a checkpoint that acts" + (" (default: <run-dir>/expert.pt)" if command == "collect" else ""))
        for flag, text in [(flag, text) for c, flag, text in SWITCHES if c == command]:
            p.add_argument(flag, action="store_true", help=text)
    return parser

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)  # the preset and game whose values --help shows
    pre.add_argument("--preset", default="paper")
    pre.add_argument("--env", default="coinrun")
    parser = build_parser(**vars(pre.parse_known_args(argv)[0]))
    if not argv:  # a first try with no command: say where to start, not only what is missing
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    try:
        cfg = make_config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
        if args.command == "pipeline" and cfg.preset == "paper" and cfg.device == "cpu" and not args.device:
            raise LapoError("the paper preset is a GPU job, days on a CPU: pass --preset tiny (minutes) or cpu "
                            "(hours), or --device cpu to run it here anyway")
        if "RANK" in os.environ:  # launched by torchrun
            setup_distributed(cfg, args.command)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if args.command == "eval":
            r = return_summary(cfg, evaluate(cfg, load_policy(cfg, args.policy), cfg.eval_episodes))
            print(f"[eval] {args.policy}: return {r['mean']:.2f} +- {r['std']:.2f} over {r['episodes']} episodes; "
                  f"relative {r['relative']:.2f}")
        else:
            dict(expert=lambda: run_expert(cfg), collect=lambda: collect(cfg, args.random, args.policy),
                 stage1=lambda: stage1(cfg), stage2=lambda: stage2(cfg), decode=lambda: decode(cfg, args.bc),
                 finetune=lambda: finetune(cfg, not args.no_sl, args.scratch), pipeline=lambda: pipeline(cfg))[args.command]()
    except LapoError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact: run the same command to resume (decode and eval start "
              "over)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
