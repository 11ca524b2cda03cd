"""Behaviour tests for lapo.py. The whole suite runs in a few minutes on 2 CPU cores:
python -m pytest -q test_lapo.py"""

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lapo

HERE = Path(__file__).parent
# the smallest sizes that still exercise every code path on a real Procgen game; fp32, as
# bf16 convolutions this small are slower on CPUs that have bf16 (the same speed everywhere).
# bossfight: a uniform-random policy's episodes last about 40 steps (coinrun's 580), so each
# final evaluation takes a fraction of a second, not seconds
GAME = "bossfight"
SMALL = ["--env", GAME, "--preset", "tiny", "--no-amp", "--idm-scale", "0.25", "--policy-scale", "0.25",
         "--fdm-width", "4", "--num-envs", "8", "--num-steps", "16", "--expert-frames", "256",
         "--train-frames", "2048", "--test-frames", "1024", "--s1-steps", "4", "--s1-batch", "16",
         "--probe-every", "2", "--probe-frames", "64", "--probe-steps", "5", "--s2-steps", "4",
         "--s2-batch", "16", "--labels", "32", "--decode-epochs", "5", "--bc-epochs", "3", "--eval-episodes", "2",
         "--ft-frames", "256", "--ft-schedule-scale", "0.001", "--ckpt-every-s", "1"]


def run(*args, cwd):
    """python lapo.py ... in a subprocess, as a user would run it."""
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")  # the CPU, also on a GPU machine
    return subprocess.run([sys.executable, str(HERE / "lapo.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def small_cfg(**kw):
    return lapo.make_config("tiny", **{"env": GAME, **kw}, idm_scale=0.25, policy_scale=0.25, fdm_width=4,
                            device="cpu", amp=False)


# --- the quantiser ----------------------------------------------------------------------


def make_vq():
    torch.manual_seed(0)
    return lapo.VectorQuantizerEMA(codebooks=2, codes=8, dim=4, beta=0.05, decay=0.9)


def test_vq_snaps_to_nearest_code():
    vq = make_vq().eval()
    G, K, D = vq.codebook.shape
    want = torch.randint(K, (5, G, 3))  # 5 latents, 3 positions per codebook
    codes = torch.stack([vq.codebook[g, want[:, g]] for g in range(G)], 1)  # (5, G, 3, D)
    z = (codes + 1e-3 * torch.randn_like(codes)).reshape(5, -1)
    z_q, _, _, idx = vq(z)
    assert torch.equal(idx, want)
    assert torch.allclose(z_q, codes.reshape(5, -1))


def test_vq_gradient_is_straight_through():
    vq = make_vq().eval()
    z = torch.randn(4, 2 * 3 * 4, requires_grad=True)
    z_q, commitment, _, _ = vq(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)  # the quantiser is identity for gradients
    assert commitment.item() > 0


def test_vq_ema_moves_used_codes_toward_inputs():
    vq = make_vq().train()
    before = vq.codebook.clone()
    target = before[0, 3] + 0.5  # inputs near code 3 of codebook 0 (and its snap in codebook 1)
    z = target.repeat(16, 2 * 3)  # every piece of every latent is `target`
    for _ in range(20):
        vq(z)
    used = vq(z)[3][0, 0, 0]
    assert (vq.codebook[0, used] - target).norm() < (before[0, used] - target).norm() / 2
    unused = [k for k in range(8) if k != used]  # untouched codes keep their direction
    cos = F.cosine_similarity(vq.codebook[0, unused], before[0, unused], dim=-1)
    assert (cos > 0.99).all()


def test_vq_restarts_a_code_idle_for_reset_after_steps_at_an_input():
    torch.manual_seed(0)
    vq = lapo.VectorQuantizerEMA(codebooks=2, codes=8, dim=4, beta=0.05, decay=0.9, reset_after=3).train()
    before = vq.codebook.clone()
    target = before[:, 3:4] + 0.01  # (G, 1, D): every input sits by code 3 of each codebook
    z = target[None].expand(16, 2, 6, 4).reshape(16, -1)  # (B, G, P, D): 6 positions per codebook
    for _ in range(2):
        vq(z)
    idle = [k for k in range(8) if k != 3]
    assert torch.allclose(vq.codebook[:, idle], before[:, idle], atol=1e-3)  # idle for 2 steps: not yet
    vq(z)
    assert torch.allclose(vq.codebook[:, idle], target.expand(-1, 7, -1), atol=1e-4)  # restarted at an input
    assert (vq.codebook[:, 3] - target[:, 0]).norm() < (before[:, 3] - target[:, 0]).norm()  # the used one: EMA


def test_vq_ema_counts_are_laplace_smoothed_as_the_authors():
    """Two steps by hand: decay, add this batch's counts, smooth, and keep the smoothed
    counts, as in the authors' quantiser."""
    torch.manual_seed(0)
    vq = lapo.VectorQuantizerEMA(codebooks=2, codes=8, dim=4, beta=0.05, decay=0.9).train()
    want, want_sum = vq.ema_count.double(), vq.ema_sum.double()
    for _ in range(2):
        z = torch.randn(16, 2 * 3 * 4)
        codes = vq(z)[3]  # (16, G, 3)
        x = z.view(16, 2, 3, 4).double()
        picked = torch.stack([torch.bincount(codes[:, g].flatten(), minlength=8) for g in range(2)])
        total = torch.stack([torch.stack([x[:, g][codes[:, g] == k].sum(0) for k in range(8)]) for g in range(2)])
        want, want_sum = 0.9 * want + 0.1 * picked.double(), 0.9 * want_sum + 0.1 * total
        n = want.sum(-1, keepdim=True)
        want = (want + vq.eps) / (n + 8 * vq.eps) * n
    assert (want > 0).all() and torch.allclose(vq.ema_count.double(), want, rtol=1e-5, atol=0)
    assert torch.allclose(vq.codebook.double(), want_sum / want[..., None], rtol=1e-4, atol=1e-6)  # each code: its EMA mean


# --- networks ---------------------------------------------------------------------------


def test_idm_fdm_shapes():
    cfg = small_cfg()
    idm, fdm = lapo.make_idm_fdm(cfg)
    x = torch.rand(3, 9, 64, 64) - 0.5
    la, la_q, commitment, perplexity = idm(x)
    assert la.shape == la_q.shape == (3, cfg.la_dim)
    assert fdm(x[:, :6], la_q).shape == (3, 3, 64, 64)
    assert lapo.Policy(cfg.policy_scale, cfg.la_dim)(x[:, :3])[0].shape == (3, cfg.la_dim)
    la, la_q, commitment, _ = lapo.make_idm_fdm(small_cfg(vq=False))[0](x)  # the no-VQ ablation
    assert torch.equal(la, la_q) and commitment == 0


def test_residual_fdm_starts_as_copying_o_t():
    fdm, x = lapo.FDM(la_dim=128, width=4, residual=True).eval(), torch.rand(2, 6, 64, 64) - 0.5
    assert torch.equal(fdm(x, torch.randn(2, 128)), x[:, 3:])


@pytest.mark.parametrize("size", [64, 84, 96])
def test_impala_cnn_takes_any_image_size(size):
    assert lapo.ImpalaCNN(3, 0.25, size=size)(torch.rand(2, 3, size, size)).shape == (2, 256)


@pytest.mark.parametrize("size, channels", [(64, 3), (32, 1), (128, 3)])
def test_networks_take_plain_sizes(size, channels):
    """Each network copies out with its sizes alone: image size, channels, latent size."""
    x = torch.rand(2, 3 * channels, size, size) - 0.5
    vq = dict(codebooks=2, codes=8, dim=4, beta=0.05, decay=0.99)
    la, la_q, _, _ = lapo.IDM(16, 0.25, vq, channels=channels, size=size)(x)
    assert la.shape == la_q.shape == (2, 16)
    assert lapo.FDM(16, 4, channels=channels, size=size)(x[:, : 2 * channels], la_q).shape == (2, channels, size, size)
    logits, value = lapo.Policy(0.25, 7, channels=channels, size=size)(x[:, :channels])
    assert logits.shape == (2, 7) and value.shape == (2,)


def test_fdm_gets_the_latent_action_of_its_own_transition():
    """A known pitfall: an FDM fed another transition's latent (off by one, shuffled) still
    learns to copy frames, so training curves hide it. Here the latent is o_{t+1}'s mean
    brightness, different for every window: the FDM must get exactly its own."""
    class BrightnessIDM(torch.nn.Module):
        def forward(self, x):
            la = x[:, 6:].mean((1, 2, 3))[:, None].repeat(1, 4)
            return la, la + 10, torch.zeros(()), torch.ones(())  # la_q apart from la: the bottleneck's

    seen = {}

    class RecordingFDM(torch.nn.Module):
        def forward(self, x, la):
            seen.update(x=x, la=la)
            return torch.zeros(len(x), 3, *x.shape[2:])

    x = torch.rand(8, 9, 64, 64) - 0.5
    fdm_loss, _, _ = lapo.idm_fdm_loss(BrightnessIDM(), RecordingFDM(), x)
    assert torch.equal(seen["x"], x[:, :6])  # o_{t+1} is not an input
    assert torch.allclose(seen["la"][:, 0], x[:, 6:].mean((1, 2, 3)) + 10)  # the quantised latent
    assert torch.allclose(fdm_loss, x[:, 6:].pow(2).mean())  # the target is o_{t+1}


def test_fdm_error_trains_the_idm_through_the_quantiser():
    """The IDM learns what the FDM needs from the FDM's error: its gradient must pass the
    quantiser straight through to the IDM (the commitment loss alone would not teach that)."""
    cfg = small_cfg(fdm_residual=False)  # the residual FDM's zero last layer passes no gradient at first
    torch.manual_seed(0)
    idm, fdm = lapo.make_idm_fdm(cfg)
    fdm_loss, _, _ = lapo.idm_fdm_loss(idm, fdm, torch.rand(4, 9, 64, 64) - 0.5)
    fdm_loss.backward()
    assert idm.head.weight.grad.abs().max() > 0


def test_rlsl_logits_are_the_mean_of_both_heads():
    cfg = small_cfg()
    latent_policy = lapo.Policy(cfg.policy_scale, cfg.la_dim)
    agent = lapo.RLSLPolicy(latent_policy, cfg.la_dim, lapo.NUM_ACTIONS)
    torch.nn.init.normal_(agent.rl_head.weight)  # zero at init; make it count
    x = torch.rand(4, 3, 64, 64) - 0.5
    h = agent.conv(x)
    rl = agent.rl_head(F.relu(agent.fc_rl(h)))
    sl = agent.decoder(latent_policy(x)[0])  # the frozen copy equals the latent policy at start
    assert torch.allclose(agent(x)[0], (rl + sl) / 2, atol=1e-5)
    trainable = {n.split(".")[0] for n, p in agent.named_parameters() if p.requires_grad}
    assert trainable == {"fc_rl", "rl_head", "value"}  # SL alone fits the decoder


def test_ppo_heads_compute_in_fp32_under_bf16_autocast():
    """bf16 keeps 8 bits: values rounded to it would make GAE's advantages mostly noise."""
    cfg = dataclasses.replace(small_cfg(), amp=True)
    x = torch.rand(4, 3, 64, 64) - 0.5
    for agent in (lapo.Policy(cfg.policy_scale, lapo.NUM_ACTIONS), lapo.make_policy("rlsl", cfg)):
        with lapo.autocast(cfg):
            logits, value = agent(x)
        assert logits.dtype == value.dtype == torch.float32


def test_rlsl_sl_path_keeps_the_latent_policy_while_rl_tunes_its_layer():
    cfg = small_cfg()
    latent_policy = lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False)
    original = copy.deepcopy(latent_policy)
    agent = lapo.RLSLPolicy(latent_policy, cfg.la_dim, lapo.NUM_ACTIONS)
    torch.nn.init.normal_(agent.fc_rl.weight)  # as if PPO had tuned the RL path's linear layer
    x = torch.rand(2, 3, 64, 64) - 0.5
    assert torch.allclose(agent(x)[0], agent.decoder(original(x)[0]) / 2, atol=1e-5)  # RL head still 0


def test_rlsl_starts_as_the_decoded_latent_policy():
    cfg = small_cfg()
    latent_policy = lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False)
    agent = lapo.RLSLPolicy(latent_policy, cfg.la_dim, lapo.NUM_ACTIONS)
    x = torch.rand(2, 3, 64, 64) - 0.5
    decoded = agent.decoder(latent_policy(x)[0])
    assert torch.allclose(agent(x)[0], decoded / 2, atol=1e-6)  # the mean with the RL head's zeros


def ppo_batch(agent, n=32, seed=0):
    """A rollout-shaped batch whose log-probs are the agent's own."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        logits, _ = agent(lapo.to_input(obs, "cpu"))
    pi = torch.distributions.Categorical(logits=logits)
    actions = pi.sample()
    return dict(obs=obs, actions=actions, logprobs=pi.log_prob(actions),
                advantages=torch.randn(n, generator=g), returns=torch.randn(n, generator=g),
                values=torch.zeros(n))


@pytest.mark.parametrize("sl", [True, False])
def test_ppo_update_trains_the_decoder_only_without_sl(sl):
    """RL+SL: the decoder belongs to SL; PPO must neither move it nor count its gradients in
    the clip (nor the frozen trunk's). RL only (--no-sl): PPO trains the decoder."""
    cfg = small_cfg(epochs=2, minibatches=2)
    torch.manual_seed(0)
    agent = lapo.RLSLPolicy(lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False), cfg.la_dim, lapo.NUM_ACTIONS, sl=sl)
    torch.nn.init.normal_(agent.rl_head.weight, std=0.1)  # zero at init; make the RL path count
    opt, _ = lapo.finetune_optimizer(cfg, agent, sl)
    lapo.set_lr(opt, 1e-3, 1e-3, 1e-3)  # its three parts
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = lapo.ppo_update(cfg, agent, opt, ppo_batch(agent), ent_coef=0.01)
    assert metrics["first_kl"] < 1e-6  # the batch's log-probs are this very policy's
    moved = {k.split(".")[0] for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == ({"rl_head", "value", "fc_rl"} | (set() if sl else {"decoder"}))
    trained = {id(p) for p in lapo.trained_params(opt)}
    untrained_grads = [n for n, p in agent.named_parameters() if id(p) not in trained and p.grad is not None]
    assert untrained_grads == []  # nothing accumulates where the clip or the optimiser cannot see


def test_ppo_update_makes_advantaged_actions_likelier_and_values_nearer_the_returns():
    cfg = small_cfg(epochs=1, minibatches=1)
    torch.manual_seed(0)
    agent = lapo.Policy(cfg.policy_scale, lapo.NUM_ACTIONS)
    batch = ppo_batch(agent, n=64)
    with torch.no_grad():
        batch["values"] = agent(lapo.to_input(batch["obs"], "cpu"))[1]  # the rollout's own
    lapo.ppo_update(cfg, agent, torch.optim.Adam(agent.parameters(), lr=1e-3), batch, ent_coef=0.0)
    with torch.no_grad():
        logits, value = agent(lapo.to_input(batch["obs"], "cpu"))
    change = torch.distributions.Categorical(logits=logits).log_prob(batch["actions"]) - batch["logprobs"]
    a = batch["advantages"]
    assert change[a > 0].mean() > 0 > change[a < 0].mean()
    assert (value - batch["returns"]).pow(2).mean() < (batch["values"] - batch["returns"]).pow(2).mean()


def test_learning_rates_follow_the_schedules():
    """Stage 1: from 0.1x, warmed up to s1_lr, down to 0.01x at the last step (the paper's).
    Fine-tuning: each part 0 until its ramp starts, its peak where the ramp ends, 0 at the
    end; the ramps stretched by ft_schedule_scale."""
    cfg = small_cfg(s1_steps=100, s1_warmup=10)
    idm, fdm = lapo.make_idm_fdm(cfg)
    opt = torch.optim.Adam([*idm.parameters(), *fdm.parameters()])
    for step, want in [(0, 0.1), (10, 1), (55, 0.505), (100, 0.01)]:
        lapo.stage1_update(cfg, idm, fdm, opt, torch.rand(2, 9, 64, 64) - 0.5, step)
        assert opt.param_groups[0]["lr"] == pytest.approx(want * cfg.s1_lr)
    cfg = small_cfg(ft_schedule_scale=0.5, ft_frames=400_000, ft_lr=1.0)
    agent = lapo.RLSLPolicy(lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False), cfg.la_dim, lapo.NUM_ACTIONS)
    _, lr_fn = lapo.finetune_optimizer(cfg, agent, sl=True)
    assert lr_fn(12_500) == [0, 0, 0]  # rl_head, value, fc_rl
    assert lr_fn(25_000) == pytest.approx([1 / 4, 1 / 4, 0])
    assert lr_fn(100_000) == pytest.approx([1 / 4 * 300 / 375, 1 / 4 * 300 / 375, 1 / 10])  # decaying, at peak
    assert lr_fn(400_000) == [0, 0, 0]


def test_stage2_policy_sees_o_t_alone_and_regresses_the_continuous_latent():
    class FixedIDM(torch.nn.Module):
        def forward(self, x):
            la = x[:, 6:].mean((1, 2, 3))[:, None].repeat(1, 4)  # from o_{t+1}: the policy cannot see it
            return la, la + 10, torch.zeros(()), torch.ones(())

    seen = {}

    class RecordingPolicy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

        def forward(self, x):
            seen["x"] = x
            return self.w.expand(len(x), 4), None

    cfg, x = small_cfg(), torch.rand(8, 9, 64, 64) - 0.5
    policy = RecordingPolicy()
    loss = lapo.stage2_update(cfg, FixedIDM(), policy, torch.optim.SGD(policy.parameters()), x, step=0)["loss"].item()
    assert torch.equal(seen["x"], x[:, 3:6])
    assert loss == pytest.approx(x[:, 6:].mean((1, 2, 3)).pow(2).mean().item(), rel=1e-5)


def test_stage2_update_leaves_the_idm_alone():
    cfg = small_cfg(vq_reset_after=1)
    torch.manual_seed(0)
    idm, policy = lapo.make_idm_fdm(cfg)[0].train(), lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False)
    before = {k: v.clone() for k, v in idm.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters())
    lapo.stage2_update(cfg, idm, policy, opt, torch.rand(4, 9, 64, 64) - 0.5, step=0)
    assert all(torch.equal(before[k], v) for k, v in idm.state_dict().items())  # codebook included


def test_latent_actions_are_the_idms_latent_before_quantisation():
    """What the latent policy imitates and the decoders read, batch by batch as one pass would."""
    cfg = small_cfg()
    torch.manual_seed(0)
    idm = lapo.make_idm_fdm(cfg)[0].eval()
    windows = torch.randint(0, 256, (5, 3, 64, 64, 3), dtype=torch.uint8)
    la = lapo.latent_actions(cfg, idm, windows, batch=2)
    with torch.no_grad():
        continuous, quantised, _, _ = idm(lapo.to_input(windows, "cpu"))
    assert torch.allclose(la, continuous, atol=1e-5)
    assert not torch.allclose(la, quantised, atol=1e-3)


def test_decoder_pairs_the_latent_of_a_window_with_the_action_taken_at_o_t():
    """Frame (t, e) is one grey level that encodes t and e; a fake IDM reads the three grey
    levels of its window back. Every pair must be (o_{t-1}, o_t, o_{t+1}) of one env and one
    episode, labelled with the action taken at o_t."""
    T, E = 12, 3
    ids = torch.arange(T * E).view(T, E)
    obs = (ids * 5).to(torch.uint8)[..., None, None, None].expand(T, E, 64, 64, 3).contiguous()
    actions = (ids * 7 % 15).float()
    dones = torch.zeros(T, E)
    dones[5, 1] = 1  # obs[5] of env 1 starts a new episode

    class GreyLevels(torch.nn.Module):
        def forward(self, x):
            la = x.mean((2, 3))  # (B, 9): the 3 frames' grey levels, 3 channels each
            return la, la, torch.zeros(()), torch.ones(())

    la, ta = lapo.label_rollout(small_cfg(), GreyLevels(), obs, actions, dones)
    prev, cur, nxt = (((la[:, c] + 0.5) * 255 / 5).round().long() for c in (0, 3, 6))
    assert len(ta) == (T - 2) * E - 2  # env 1 loses the two windows around its new episode
    assert torch.equal(prev, cur - E) and torch.equal(nxt, cur + E)  # consecutive, same env
    assert torch.equal(ta, (cur * 7 % 15))  # the action taken at o_t
    t, e = cur // E, cur % E
    assert not ((e == 1) & ((t == 4) | (t == 5))).any()


def test_bc_learns_and_is_scored_from_o_t(tmp_path, monkeypatch):
    """decode --bc's baseline, like the latent policy it is held against, acts from o_t alone.
    Here every frame lights one 16 x 16 square, the action taken at it, so a policy that reads
    o_t can be right every time, one that reads o_{t-1} or o_{t+1} 1 time in 15."""
    g = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        ta = g.integers(15, size=1024)
        obs = np.zeros((1024, 4, 16, 4, 16, 3), np.uint8)
        obs[np.arange(1024), ta // 4, :, ta % 4] = 255
        lapo.write_chunk(tmp_path / "data" / split / "0.npz", dict(
            obs=obs.reshape(1024, 64, 64, 3), ta=ta, done=np.zeros(1024, bool), rewards=np.zeros(1024),
            ep_returns=np.zeros(1024), values=np.zeros(1024)))
    cfg = small_cfg(run_dir=str(tmp_path), labels=256, bc_epochs=30)
    monkeypatch.setattr(lapo, "evaluate", lambda cfg, agent, episodes: [0.0])  # the game plays no part here
    results = lapo.decode(cfg, bc=True)
    assert results["train_acc"] > 0.95 and results["test_acc"] > 0.95


def test_decoder_sl_refits_in_its_window():
    """8 frames an update; SL re-fits after each update past sl_start (8) up to sl_dense (24),
    then after every sl_every-th (2) update, and from sl_end (56) drops its pairs."""
    cfg = small_cfg(num_envs=2, num_steps=4, minibatches=1, sl_start=8, sl_dense=24, sl_every=2, sl_end=56,
                    ft_schedule_scale=1.0, ft_frames=10**6)

    class ZeroIDM(torch.nn.Module):
        def forward(self, x):
            la = torch.zeros(len(x), cfg.la_dim)
            return la, la, torch.zeros(()), torch.ones(())

    sl = lapo.DecoderSL(cfg, ZeroIDM(), lapo.mlp(cfg.la_dim, *lapo.ONLINE_DECODER, lapo.NUM_ACTIONS))
    obs, actions, dones = torch.zeros(4, 2, 64, 64, 3, dtype=torch.uint8), torch.zeros(4, 2), torch.zeros(4, 2)
    metrics = [sl(obs, actions, dones, frames) for frames in range(8, 72, 8)]
    assert [u + 1 for u, m in enumerate(metrics) if "sl_loss" in m] == [2, 4, 6]
    assert [m.get("sl_pairs") for m in metrics] == [4, 8, 12, 16, 20, 24, None, None]
    assert len(sl.state_dict()["la"]) == 0


def copy_out(names, **given):
    """exec the source of lapo's `names`, in order, with torch imports and `given` only."""
    import copy as copy_module
    import inspect

    source = "\n\n".join(inspect.getsource(getattr(lapo, n)) for n in names)
    namespace = dict(torch=torch, nn=torch.nn, F=F, dist=torch.distributed, np=np, math=math,
                     copy=copy_module, **given)
    exec(compile(source, "copied.py", "exec"), namespace)
    return namespace


def test_pieces_copy_out_on_their_own():
    """What a reader would lift into a project, with the pieces each names and torch imports
    only, sized by plain numbers: (a) the quantiser; (b) IDM + FDM + the stage-1 update;
    (c) the RL+SL policy with its decoder fit and optimiser."""
    import types

    vq = copy_out(["VectorQuantizerEMA"])["VectorQuantizerEMA"](2, 8, 4, beta=0.05, decay=0.99)
    z_q, commitment, perplexity, codes = vq(torch.randn(5, 2 * 3 * 4))
    assert z_q.shape == (5, 24) and codes.shape == (5, 2, 3)

    ns = copy_out(["ResidualBlock", "ImpalaCNN", "VectorQuantizerEMA", "IDM", "ResLayer", "TiledLatentConv",
                   "down_block", "up_block", "FDM", "idm_fdm_loss", "stage1_update", "set_lr",
                   "autocast", "global_mean", "trained_params"])
    idm = ns["IDM"](32, 0.25, vq=dict(codebooks=2, codes=8, dim=4, beta=0.05, decay=0.99))
    fdm = ns["FDM"](32, 4, residual=True)
    cfg = types.SimpleNamespace(s1_steps=10, s1_warmup=2, s1_lr=1e-3, s1_clip=2.0, device="cpu", amp=False)
    opt = torch.optim.Adam([*idm.parameters(), *fdm.parameters()])
    metrics = ns["stage1_update"](cfg, idm, fdm, opt, torch.rand(4, 9, 64, 64) - 0.5, step=0)
    assert math.isfinite(metrics["fdm_loss"].item())

    ns = copy_out(["ResidualBlock", "ImpalaCNN", "Policy", "orthogonal_init", "mlp", "RLSLPolicy", "fit_decoder",
                   "finetune_optimizer"], ONLINE_DECODER=(192, 128, 64), NUM_ACTIONS=15,
                  FT_RAMPS=lapo.FT_RAMPS)
    agent = ns["RLSLPolicy"](ns["Policy"](0.25, 32, value=False), la_dim=32, num_actions=15)
    logits, value = agent(torch.rand(4, 3, 64, 64) - 0.5)
    assert logits.shape == (4, 15) and value.shape == (4,)
    cfg = types.SimpleNamespace(sl_epochs=2, sl_batch=64, sl_smoothing=0.05, ft_schedule_scale=1.0,
                                ft_frames=10**6, ft_lr=1e-2)
    decoder, loss = ns["fit_decoder"](cfg, torch.randn(256, 32), torch.randint(15, (256,)))
    agent.decoder.load_state_dict(decoder.state_dict())
    assert math.isfinite(loss)
    opt, lr_fn = ns["finetune_optimizer"](cfg, agent, sl=True)
    assert len(opt.param_groups) == 3 and lr_fn(200_000)[2] > 0


# --- PPO --------------------------------------------------------------------------------


def test_gae_matches_hand_computation():
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])  # obs[2] starts a new episode
    next_value, next_done = torch.tensor([2.0]), torch.tensor([0.0])
    adv, ret = lapo.gae(rewards, values, dones, next_value, next_done, g, lam)
    d2 = 2.0 + g * 2.0 - 1.5  # bootstraps from the value after the rollout
    d1 = 0.0 + 0.0 - 1.0  # obs[2] is a new episode: no bootstrap across it
    d0 = 1.0 + g * 1.0 - 0.5
    a2, a1 = d2, d1
    a0 = d0 + g * lam * a1
    assert torch.allclose(adv.flatten(), torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret, adv + values)
    adv, _ = lapo.gae(rewards, values, dones, next_value, torch.tensor([1.0]), g, lam)  # a new episode after it
    assert adv[2].item() == pytest.approx(2.0 - 1.5)  # no bootstrap from the next episode's value


def test_reward_normalizer_matches_gyms_normalize_reward():
    import gym

    rng = np.random.default_rng(0)
    rewards = rng.choice([0.0, 0.0, 1.0, 10.0], size=(300, 4))
    dones = rng.random((300, 4)) < 0.02

    class Scripted(gym.Env):  # a 4-env vector env that replays the rewards and dones above
        num_envs, is_vector_env, t = 4, True, 0

        def step(self, action):
            self.t += 1
            return None, rewards[self.t - 1], dones[self.t - 1], np.zeros(4, bool), {}

    theirs = gym.wrappers.NormalizeReward(Scripted(), gamma=0.99)
    ours = lapo.RewardNormalizer(4, gamma=0.99)
    for t in range(300):
        want = np.clip(theirs.step(None)[1], -10, 10)
        assert np.allclose(ours(rewards[t], dones[t]), want, rtol=1e-6), t


def test_relative_return_is_0_at_random_and_1_at_the_expert():
    for game in lapo.GAMES:
        assert lapo.relative_return(game, lapo.RANDOM_RETURN[game]) == 0
        assert abs(lapo.relative_return(game, lapo.EXPERT_RETURN[game]) - 1) < 1e-12


class Uniform(nn.Module):
    """A policy that plays uniformly at random, whatever the screen."""

    def forward(self, x):
        return torch.zeros(len(x), lapo.NUM_ACTIONS), None


@pytest.mark.parametrize("episodes", [3, 70])
def test_evaluate_plays_exactly_the_episodes_asked(episodes):
    returns = lapo.evaluate(small_cfg(), Uniform(), episodes)  # short episodes
    assert len(returns) == episodes


def test_evaluate_returns_each_episodes_own_reward_sum(monkeypatch):
    class OneRewardPerStep(FakeGames):  # game i's episodes last i % 3 + 1 steps
        def step(self, action):
            self.t += 1
            return self.reset(), np.ones(self.n), self.t % (np.arange(self.n) % 3 + 1) == 0, {}

    monkeypatch.setattr(lapo, "make_env", OneRewardPerStep)
    returns = lapo.evaluate(small_cfg(), Uniform(), 130)  # 64 games, 2 or 3 episodes each
    quota = [3, 3] + [2] * 62
    assert sorted(returns) == sorted(float(i % 3 + 1) for i in range(64) for _ in range(quota[i]))


def test_probe_survives_features_constant_where_it_is_fitted():
    """A pixel that never changes in the probe's fitting half but does in its scoring half
    must not swamp the score (a per-feature std of ~0 would scale it by 1e6)."""
    g = torch.Generator().manual_seed(0)
    n, classes = 2000, 4
    y = torch.randint(classes, (n,), generator=g)
    signal = F.one_hot(y, 15).float()[:, :classes] + 0.3 * torch.randn(n, classes, generator=g)
    junk = torch.randn(n, 32, generator=g) * 0.1
    junk[: n // 2] = 0  # constant in the fitting half
    clean = lapo.probe_accuracy(signal, y, steps=100)
    assert clean > 0.9
    assert lapo.probe_accuracy(torch.cat([signal, junk], 1), y, steps=100) > clean - 0.05


def test_majority_bar_is_fitted_and_scored_like_the_probe():
    """Its class comes from the fitting half, its score from the scored half: scoring the
    commonest class of all windows on all windows would flatter the bar."""
    y = torch.tensor([0, 0, 0, 1] + [1, 1, 1, 1])  # commonest overall: 1; in the fitting half: 0
    assert lapo.majority_accuracy(y) == 0


# --- data -------------------------------------------------------------------------------


def test_collect_writes_the_authors_format_and_reads_back(tmp_path):
    r = run("collect", "--random", "--run-dir", str(tmp_path), *SMALL, "--env", "fruitbot",  # rewards often
            "--train-frames", "3000", "--test-frames", "5000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    train = sorted((tmp_path / "data" / "train").iterdir())
    test = sorted((tmp_path / "data" / "test").iterdir())
    assert [p.name for p in train] == ["0.npz"]  # chunks of min(32768, frames) frames
    assert [p.name for p in test] == ["0.npz", "1.npz"]  # test chunks hold 4096 frames
    assert len(np.load(test[1])["ta"]) == 4096
    z = np.load(train[0])
    assert set(z.files) == set(lapo.CHUNK_KEYS)
    assert z["obs"].shape == (3000, 64, 64, 3) and z["obs"].dtype == np.uint8
    assert z["ta"].shape == z["done"].shape == z["rewards"].shape == (3000,)
    assert z["done"].dtype == bool and z["rewards"].dtype == np.float32
    assert z["obs"].std() > 0 and len(np.unique(z["ta"])) > 5
    # episode returns accumulate rewards and restart after done
    starts = np.flatnonzero(z["done"][:-1]) + 1
    assert len(starts) > 1 and z["rewards"][starts[0]:].any()  # more than one episode has rewards to add
    assert np.allclose(z["ep_returns"], np.concatenate([np.cumsum(r) for r in np.split(z["rewards"], starts)]))
    # the memory-mapped read gives the same frames, and windows keep to one episode
    obs, small = lapo.read_chunk(train[0])
    assert isinstance(obs, np.memmap) and np.array_equal(obs, z["obs"])
    data = lapo.Dataset(tmp_path / "data", "train")
    w, ta = data.get(np.arange(len(data)))
    c, t = data.index[:, 0], data.index[:, 1]
    done0 = z["done"]
    assert not (done0[t[c == 0] - 1] | done0[t[c == 0]]).any()
    first = data.index[0]
    assert np.array_equal(w[0], np.load(train[first[0]])["obs"][first[1] - 1 : first[1] + 2])


class FakeGames:
    """num_envs games whose frames are filled with the game's number: game 0's one episode
    never ends, the others' episodes last 5 steps."""

    def __init__(self, game, num_envs, seed):
        self.n, self.t = num_envs, 0

    def reset(self):
        return {"rgb": np.arange(self.n, dtype=np.uint8)[:, None, None, None].repeat(64, 1).repeat(64, 2).repeat(3, 3)}

    def step(self, action):
        self.t += 1
        return self.reset(), np.zeros(self.n), (np.arange(self.n) > 0) & (self.t % 5 == 0), {}

    def close(self):
        pass


def test_collect_keeps_episodes_still_running_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(lapo, "make_env", FakeGames)
    cfg = small_cfg(run_dir=str(tmp_path), num_envs=4, train_frames=400, test_frames=5000)
    assert lapo.collect(cfg, random_policy=True) == dict(train=400, test=8192)  # whole chunks of 4,096
    z = np.load(tmp_path / "data" / "train" / "0.npz")
    game = z["obs"][:, 0, 0, 0]
    assert [(game == i).sum() for i in range(4)] == [100] * 4  # every game's 100 steps, the longest too
    assert z["done"][game == 0].tolist() == [False] * 99 + [True]  # cut at the last step
    with pytest.raises(lapo.LapoError, match="test holds other chunks than the 1 of 4096 frames that --test-frames 4096"):
        lapo.collect(dataclasses.replace(cfg, test_frames=4096), random_policy=True)
    with pytest.raises(lapo.LapoError, match="train holds other chunks than the 1 of 200 frames"):
        lapo.collect(dataclasses.replace(cfg, train_frames=200), random_policy=True)  # not trained on 400


def test_each_use_of_the_game_has_levels_of_its_own(tmp_path, monkeypatch):
    """Procgen draws every episode's level from make_env's seed: fine-tuning must not replay
    the levels of the dataset, nor evaluation a level of training, whatever the run's seed."""
    seeds, make_env = [], lapo.make_env
    monkeypatch.setattr(lapo, "make_env", lambda game, n, seed: seeds.append(seed) or make_env(game, n, seed))
    used = {}
    for seed in (0, 1):
        cfg = small_cfg(run_dir=str(tmp_path / str(seed)), seed=seed, num_envs=4, num_steps=8,
                        train_frames=400, test_frames=400, expert_frames=64, eval_episodes=4)
        lapo.collect(cfg, random_policy=True)
        used.setdefault("train", []).append(seeds[-2])
        used.setdefault("test", []).append(seeds[-1])
        lapo.run_expert(cfg)  # PPO, as fine-tuning and PPO from scratch run it
        used.setdefault("ppo", []).append(seeds[-2])
        used.setdefault("eval", []).append(seeds[-1])
    assert len(seeds) == 8 and len(set(seeds)) == 8, used


def test_reads_compressed_chunks_written_by_others(tmp_path):
    n = 50
    rng = np.random.default_rng(0)
    chunk = dict(obs=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
                 ta=rng.integers(15, size=n), done=np.zeros(n, bool),
                 rewards=np.zeros(n, np.float32), ep_returns=np.zeros(n, np.float32),
                 values=np.zeros(n, np.float32))
    (tmp_path / "train").mkdir()
    np.savez_compressed(tmp_path / "train" / "0.npz", **chunk)
    data = lapo.Dataset(tmp_path, "train")
    assert len(data) == n - 2
    w, ta = data.get(np.array([0, 10]))
    assert np.array_equal(w[1], chunk["obs"][10:13]) and ta[1] == chunk["ta"][11]


def test_windows_never_cross_an_episode(tmp_path):
    """done[t]: the episode ends with action ta[t], obs[t+1] starts the next one."""
    n = 10
    done = np.zeros(n, bool)
    done[3] = True  # episodes are frames 0-3 and 4-9
    (tmp_path / "train").mkdir()
    lapo.write_chunk(tmp_path / "train" / "0.npz", dict(
        obs=np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(64, 1).repeat(64, 2).repeat(3, 3),
        ta=np.arange(n) % 15, done=done, rewards=np.zeros(n), ep_returns=np.zeros(n), values=np.zeros(n)))
    data = lapo.Dataset(tmp_path, "train")
    windows, ta = data.get(np.arange(len(data)))
    middles = windows[:, 1, 0, 0, 0].tolist()
    assert middles == [1, 2, 5, 6, 7, 8]  # by hand: t = 3 and t = 4 would span frames 3 and 4
    assert ta.tolist() == middles
    assert (windows[:, 0, 0, 0, 0] == windows[:, 1, 0, 0, 0] - 1).all()


# --- the command line, end to end on a real Procgen game ---------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    r = run("pipeline", "--run-dir", str(d), *SMALL, cwd=d)
    return d, r


def test_pipeline_runs_every_stage_and_prints_the_table(pipeline_run):
    d, r = pipeline_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    table = (d / "results.txt").read_text()
    for row in ["expert", "stage1 probe", "majority", "stage2", "decode (32 labels)", "finetune RL+SL"]:
        assert row in table
    for stage in ["expert", "stage1", "stage2", "finetune"]:
        ckpt = torch.load(d / f"{stage}.pt", weights_only=True)  # plain data, loads anywhere
        assert ckpt["finished"] and ckpt["config"]["env"] == GAME
        assert (d / f"{stage}.jsonl").read_text().count("\n") >= 2


def test_stages_run_alone_on_a_finished_run(pipeline_run, capsys):
    d, _ = pipeline_run

    def main(command, *flags):  # in-process: the CLI itself is tested by pipeline_run and below
        lapo.main([command, "--run-dir", str(d), *SMALL, *flags])
        return capsys.readouterr().out

    assert "finetune-rl" in main("finetune", "--no-sl")
    assert "[ppo-seed1] return" in main("finetune", "--scratch", "--seed", "1")  # claim 3's baseline
    assert torch.load(d / "ppo-seed1.pt", weights_only=True)["finished"]
    assert "[bc-32] return" in main("decode", "--bc")  # the baseline of claim 2
    assert torch.load(d / "bc-32.pt", weights_only=True)["step"] == 3  # --bc-epochs 3 passes over 32 labels
    assert "ppo-seed1.pt is finished" in main("finetune", "--scratch", "--seed", "1")
    assert "[decode-32-seed1] return" in main("decode", "--seed", "1")  # another seed, beside seed 0's
    main("decode", "--labels", "512", "--decode-epochs", "2")
    with pytest.raises(SystemExit, match="2"):  # more labels than the data holds: not silently fewer
        main("decode", "--labels", "4096")
    assert re.search(r"--labels 4096 is more than the \d+ transitions in .*train: lower it", capsys.readouterr().err)
    ckpt = torch.load(d / "decode-512.pt", weights_only=True)  # 2 passes over 512 labels, in batches of 256
    assert ckpt["step"] == 4 and 0 <= ckpt["results"]["test_acc"] <= 1 and 0 <= ckpt["results"]["decoder_test_acc"] <= 1
    main("collect", "--policy", str(d / "decode-32.pt"), "--data", str(d / "decoded"))  # a policy without a critic
    assert lapo.Dataset(d / "decoded", "test").frames > 0  # can make a dataset too
    for policy in ["expert.pt", "decode-32.pt", "finetune-rl.pt"]:  # each kind: a PPO agent, decoded, RLSLPolicy
        assert "relative" in main("eval", "--policy", str(d / policy)), policy
    r = run("stage1", "--run-dir", str(d), *SMALL, "--s1-lr", "0.002", cwd=d)  # finished: says so, changes nothing
    assert r.returncode == 0 and "stage1.pt is finished" in r.stdout


def test_later_stages_build_the_networks_their_checkpoints_were_made_with(pipeline_run, tmp_path, capsys):
    """Network-size flags cannot disagree with a checkpoint: a later stage builds what it loads
    at the sizes saved in it, and stage2.pt carries the IDM its policy imitates, so decoding
    needs no stage1.pt (one trained again since would give other latents, silently)."""
    d, _ = pipeline_run
    for name in ("stage2.pt", "expert.pt"):
        shutil.copy(d / name, tmp_path)
    other_sizes = ["--idm-scale", "0.5", "--policy-scale", "0.5", "--la-dim", "64", "--fdm-width", "8"]
    lapo.main(["decode", "--run-dir", str(tmp_path), "--data", str(d / "data"), *SMALL, *other_sizes])
    assert "[decode-32] return" in capsys.readouterr().out
    saved = torch.load(tmp_path / "decode-32.pt", weights_only=True)["config"]
    assert (saved["idm_scale"], saved["policy_scale"], saved["la_dim"]) == (0.25, 0.25, 128)
    stage1 = torch.load(d / "stage1.pt", weights_only=True)["idm"]
    stage2 = torch.load(d / "stage2.pt", weights_only=True)["idm"]
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    lapo.load_policy(dataclasses.replace(small_cfg(), policy_scale=1.0), tmp_path / "expert.pt")  # at its own sizes


# --- bad input: one clear line, non-zero exit --------------------------------------------


def error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_help_lists_the_flags_a_subcommand_reads_with_the_presets_values(capsys):
    helps = {}
    for command in ("stage1", "eval"):
        with pytest.raises(SystemExit):
            lapo.main([command, "--preset", "tiny", "--env", "dodgeball", "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "--s1-lr X stage-1 learning rate" in helps["stage1"] and "(tiny: 0.001)" in helps["stage1"]
    assert "(tiny: runs/dodgeball-tiny)" in helps["stage1"]
    assert "stage-1 networks: --idm-scale X" in helps["stage1"] and "stage 1: --s1-steps N" in helps["stage1"]
    assert "--s1-lr" not in helps["eval"] and "--eval-episodes N" in helps["eval"] and "(tiny: 32)" in helps["eval"]
    assert lapo.build_parser().parse_args(["eval", "--policy", "p.pt", "--s1-lr", "1"]).s1_lr == 1  # still accepted
    with pytest.raises(SystemExit, match="2"):  # no command at all: the whole help, with where to start
        lapo.main([])
    err = capsys.readouterr().err
    assert "python lapo.py collect --random --preset tiny --env dodgeball" in err and "pipeline --preset tiny" in err


def test_unknown_game(tmp_path):
    assert "unknown game 'pong'" in error_line(run("stage1", "--env", "pong", cwd=tmp_path))


def test_bare_pipeline_on_a_cpu_says_the_paper_preset_needs_a_gpu(tmp_path):
    line = error_line(run("pipeline", "--run-dir", str(tmp_path), cwd=tmp_path))
    assert "the paper preset is a GPU job" in line and "--preset tiny" in line
    assert not (tmp_path / "expert.jsonl").exists()  # nothing started


def test_flag_values_are_checked(tmp_path):
    assert "--s1-steps must be a positive number" in error_line(
        run("stage1", "--s1-steps", "0", "--run-dir", str(tmp_path), cwd=tmp_path))
    assert "--ckpt-every-s must be a positive number, got -1.0" in error_line(
        run("stage1", "--ckpt-every-s", "-1", "--run-dir", str(tmp_path), cwd=tmp_path))
    with pytest.raises(lapo.LapoError, match="--device gpu: this machine's devices are cpu"):
        lapo.make_config("tiny", device="gpu")
    with pytest.raises(lapo.LapoError, match="--la-dim 7 must be a multiple of --vq-codebooks x --vq-dim"):
        lapo.make_config("tiny", la_dim=7)
    lapo.make_config("tiny", vq=False, la_dim=7)  # no codebooks to split the latent into
    lapo.make_config("tiny", expert_ent=0.0, ft_ent=0.0, decode_wd=0.0, sl_start=0, s1_warmup=0, s2_warmup=0)
    with pytest.raises(lapo.LapoError, match="--ft-frames 5000 ends before the fine-tuning ramps"):
        lapo.make_config("tiny", ft_frames=5000)  # the ramps end at 200,000 x 0.05
    with pytest.raises(lapo.LapoError, match="--num-steps must be at least 3"):
        lapo.make_config("tiny", num_steps=2)
    with pytest.raises(lapo.LapoError, match="--probe-frames must be at least 32"):
        lapo.make_config("tiny", probe_frames=3)  # a probe on 1 window would score nothing
    with pytest.raises(lapo.LapoError, match="--gamma, --gae-lambda, .* must be at most 1"):
        lapo.make_config("tiny", gamma=1.5)
    with pytest.raises(lapo.LapoError, match="--seed must be below 10,000"):
        lapo.make_config("tiny", seed=10_000)  # its levels would be another seed's


def test_stage_out_of_order_names_the_command_to_run(tmp_path):
    line = error_line(run("stage2", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "stage1.pt not found" in line and "python lapo.py stage1" in line
    line = error_line(run("stage1", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "no dataset chunks" in line and "collect" in line
    line = error_line(run("collect", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "expert.pt not found" in line and "python lapo.py expert" in line
    line = error_line(run("collect", "--policy", "bc-9.pt", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert line.endswith("bc-9.pt not found"), line  # not "run expert": that would not make it
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    for command in ("decode", "finetune"):
        line = error_line(run(command, "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
        assert "stage2.pt not found" in line and "python lapo.py stage2" in line, command
    line = error_line(run("collect", "--random", "--policy", "x.pt", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "pass one" in line


def test_corrupt_chunk_and_checkpoint_are_named(pipeline_run, tmp_path):
    d, _ = pipeline_run
    chunk = (d / "data" / "train" / "0.npz").read_bytes()
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    (tmp_path / "data" / "train" / "0.npz").write_bytes(chunk[: len(chunk) // 2])
    (tmp_path / "data" / "test" / "0.npz").write_bytes(chunk)
    line = error_line(run("stage1", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "train/0.npz" in line and "corrupt" in line
    ckpt = (d / "stage1.pt").read_bytes()
    (tmp_path / "stage1.pt").write_bytes(ckpt[: len(ckpt) // 3])
    line = error_line(run("stage2", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "stage1.pt" in line and "corrupt" in line and "python lapo.py stage1" in line


def test_checkpoint_or_data_from_another_game(pipeline_run, tmp_path):
    d, _ = pipeline_run
    other_game = f"was made on {GAME}, the flags say --env fruitbot: pass --env {GAME}"
    with pytest.raises(lapo.LapoError, match=f"finetune.pt {other_game}"):  # eval would play it on fruitbot
        lapo.load_policy(small_cfg(env="fruitbot"), d / "finetune.pt")
    with pytest.raises(lapo.LapoError, match=f"stage1.pt {other_game}"):
        lapo.load_checkpoint(d / "stage1.pt", "stage1", small_cfg(env="fruitbot"))
    assert (d / "data" / "game.txt").read_text() == f"{GAME}\n"  # collect names the game beside the chunks
    with pytest.raises(lapo.LapoError, match=f"data holds frames of {GAME}, the flags say --env fruitbot"):
        lapo.Dataset(d / "data", "train", "fruitbot")
    (tmp_path / "data").mkdir()
    shutil.copy(d / "data" / "game.txt", tmp_path / "data")
    with pytest.raises(lapo.LapoError, match=f"data holds frames of {GAME}, the flags say --env fruitbot"):
        lapo.collect(small_cfg(env="fruitbot", data=str(tmp_path / "data"), run_dir=str(tmp_path)), random_policy=True)
    (tmp_path / "old" / "train").mkdir(parents=True)  # data from before game.txt: not labelled by a collect
    shutil.copy(d / "data" / "train" / "0.npz", tmp_path / "old" / "train")
    with pytest.raises(lapo.LapoError, match="other chunks than"):  # chunks of another size than the tiny preset's
        lapo.collect(small_cfg(env="fruitbot", data=str(tmp_path / "old"), run_dir=str(tmp_path)), random_policy=True)
    assert not (tmp_path / "old" / "game.txt").exists()


def test_a_checkpoint_that_cannot_act_is_named(pipeline_run, tmp_path):
    d, _ = pipeline_run
    for command, ckpt in [("collect", "stage1.pt"), ("eval", "stage2.pt")]:
        line = error_line(run(command, "--policy", str(d / ckpt), "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
        assert f"{ckpt} holds no acting policy" in line, command
    old = {k: v for k, v in torch.load(d / "stage2.pt", weights_only=True).items() if k != "idm"}
    torch.save(old, tmp_path / "stage2.pt")  # as an older lapo.py wrote it
    with pytest.raises(lapo.LapoError, match="holds no IDM: run `python lapo.py stage2` again"):
        lapo.finetune(small_cfg(run_dir=str(tmp_path)))


def test_committed_expert_loads_with_the_cpu_preset():
    cfg = lapo.make_config("cpu", device="cpu", amp=False)
    agent = lapo.load_policy(cfg, HERE / "experts" / "coinrun-cpu.pt")
    logits, value = agent(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, lapo.NUM_ACTIONS) and value.shape == (2,)


def test_resuming_past_the_end_names_the_flag(pipeline_run, tmp_path):
    d, _ = pipeline_run
    ckpt = torch.load(d / "stage1.pt", weights_only=True)
    torch.save(dict(ckpt, finished=False), tmp_path / "stage1.pt")  # as if killed at its last step
    line = error_line(run("stage1", "--run-dir", str(tmp_path), *SMALL, "--data", str(d / "data"),
                          "--s1-steps", "3", cwd=tmp_path))
    assert "stage1.pt is at step 4 of this run's 3" in line
    ckpt = torch.load(d / "expert.pt", weights_only=True)
    torch.save(dict(ckpt, finished=False), tmp_path / "expert.pt")
    line = error_line(run("expert", "--run-dir", str(tmp_path), *SMALL, "--expert-frames", "128", cwd=tmp_path))
    assert "expert.pt is at step 256 of this run's 128" in line


def test_resuming_a_checkpoint_that_does_not_fit_is_named(pipeline_run, tmp_path):
    d, _ = pipeline_run
    ckpt = torch.load(d / "stage1.pt", weights_only=True)
    torch.save(dict(ckpt, finished=False, step=2), tmp_path / "stage1.pt")
    line = error_line(run("stage1", "--run-dir", str(tmp_path), *SMALL, "--data", str(d / "data"),
                          "--idm-scale", "0.5", cwd=tmp_path))
    assert "stage1.pt does not fit these flags" in line and "delete it" in line


def test_run_killed_in_its_final_evaluation_resumes_there(tmp_path, monkeypatch):
    cfg = small_cfg(run_dir=str(tmp_path), num_envs=8, num_steps=16, expert_frames=256, eval_episodes=2)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lapo, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        lapo.run_expert(cfg)
    assert not torch.load(tmp_path / "expert.pt", weights_only=True).get("finished")
    monkeypatch.undo()
    assert lapo.run_expert(cfg)["episodes"] == 2
    ckpt = torch.load(tmp_path / "expert.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 256


def test_dataset_with_wrong_shapes(tmp_path):
    (tmp_path / "train").mkdir()
    np.savez(tmp_path / "train" / "0.npz", obs=np.zeros((10, 32, 32, 3), np.uint8),
             ta=np.zeros(10), done=np.zeros(10, bool), rewards=np.zeros(10),
             ep_returns=np.zeros(10), values=np.zeros(10))
    with pytest.raises(lapo.LapoError, match=r"0.npz: obs is uint8 \(10, 32, 32, 3\)"):
        lapo.Dataset(tmp_path, "train")
    np.savez(tmp_path / "train" / "0.npz", obs=np.zeros((10, 64, 64, 3), np.uint8),
             ta=np.full(10, 2.7), done=np.zeros(10, bool), rewards=np.zeros(10),
             ep_returns=np.zeros(10), values=np.zeros(10))
    with pytest.raises(lapo.LapoError, match="0.npz: ta has shape .* or values out of range"):
        lapo.Dataset(tmp_path, "train")  # not silently truncated to action 2
    np.savez(tmp_path / "train" / "0.npz", obs=np.zeros((10, 64, 64, 3), np.uint8), ta=np.zeros(10))
    with pytest.raises(lapo.LapoError, match="0.npz: corrupt or not a chunk .*keys"):
        lapo.Dataset(tmp_path, "train")  # keys missing


# --- never lose work -------------------------------------------------------------------------


def jsonl(path, key, column=None):
    """column (default: key) of the metric rows that have key"""
    return [row[column or key] for row in map(json.loads, open(path)) if key in row]


def kill_and_resume(args, ckpt, cwd, seed):
    """Starts a real run, SIGKILLs it at a random moment soon after its first checkpoint (the
    runs are sized to last many seconds longer, so the kill always lands mid-run), then runs
    the same command again to the end."""
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    p = subprocess.Popen([sys.executable, str(HERE / "lapo.py"), *args], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(np.random.default_rng(seed).uniform(0, 0.3))
    assert p.poll() is None, "the run ended before it could be killed: make it longer"
    p.kill()
    p.wait()
    return run(*args, cwd=cwd)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "expert", "finetune"])
def test_killed_run_resumes_as_if_uninterrupted(pipeline_run, tmp_path, stage):
    """Killed and resumed, a run loses no row and doubles none; stages 1 and 2 (whose random
    state is saved with the checkpoint) end with exactly the numbers of a run never stopped."""
    d, _ = pipeline_run
    args = [stage, *SMALL, "--data", str(d / "data"), "--s1-steps", "80", "--probe-every", "40",
            "--s2-steps", "150", "--expert-frames", "4096", "--ft-frames", "4096", "--sl-start", "1",
            "--sl-dense", "1000000000", "--sl-end", "1000000000", "--ckpt-every-s", "0.2"]
    runs = {}
    for name in ("killed", "whole") if stage in ("stage1", "stage2") else ("killed",):
        rd = tmp_path / name
        rd.mkdir()
        for earlier in {"stage2": ["stage1.pt"], "finetune": ["stage2.pt"]}.get(stage, []):
            shutil.copy(d / earlier, rd)
        if name == "whole":
            r = run(*args, "--run-dir", str(rd), cwd=rd)
        else:  # fine-tuning: the decoder is re-fitted after every update, so its pairs must all survive
            r = kill_and_resume([*args, "--run-dir", str(rd)], rd / f"{stage}.pt", rd, seed=len(stage))
            assert r.returncode == 0 and r.stdout.count("resuming") == 1, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = [{k: v for k, v in row.items() if k != "time"} for row in map(json.loads, open(rd / f"{stage}.jsonl"))]
    if "whole" in runs:
        assert runs["killed"] == runs["whole"]
    total = dict(stage1=80, stage2=150, expert=4096, finetune=4096)[stage]
    rd = tmp_path / "killed"
    ckpt = torch.load(rd / f"{stage}.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == total
    log = rd / f"{stage}.jsonl"
    steps = jsonl(log, "loss" if stage.startswith("stage") else "pg_loss", "step")
    every = 1 if stage.startswith("stage") else 8 * 16  # a row per step, or per update of 8 games x 16 steps
    assert steps == list(range(every, total + 1, every))  # no lost or doubled rows
    if stage == "stage1":
        assert jsonl(log, "probe_la", "step") == [0, 40, 80]
    if stage == "finetune":
        frames_per_update = 8 * 16
        assert jsonl(log, "sl_loss", "step") == steps  # a re-fit after every update, resumed or not
        pairs = jsonl(log, "sl_pairs")
        # every update adds its own windows, at most (16 - 2) x 8, to all the pairs before: none twice
        assert all(0 < b - a <= (16 - 2) * 8 for a, b in zip([0] + pairs, pairs))
        windows, episodes = (total // frames_per_update) * (16 - 2) * 8, len(jsonl(log, "episode_return"))
        assert windows - 2 * episodes <= pairs[-1] <= windows
        assert max(jsonl(log, "first_kl")) < 1e-5  # the decoder is re-fitted after the update, not before


def test_killed_collect_resumes_without_duplicating_chunks(tmp_path):
    args = ["collect", "--random", "--run-dir", str(tmp_path), *SMALL, "--train-frames", "1000",
            "--test-frames", "16384"]
    r = kill_and_resume(args, tmp_path / "data" / "test" / "0.npz", tmp_path, seed=1)
    assert r.returncode == 0, r.stderr[-3000:]
    test = sorted(p.name for p in (tmp_path / "data" / "test").iterdir())
    assert test == ["0.npz", "1.npz", "2.npz", "3.npz"]
    for name in test:
        lapo.read_chunk(tmp_path / "data" / "test" / name)
    first = np.load(tmp_path / "data" / "test" / "0.npz")["obs"]
    assert not any(np.array_equal(first, np.load(tmp_path / "data" / "test" / n)["obs"]) for n in test[1:])
    kept = [(tmp_path / "data" / "test" / n).read_bytes() for n in ("0.npz", "1.npz", "3.npz")]
    (tmp_path / "data" / "test" / "2.npz").unlink()  # as the error for a bad chunk suggests
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0 and "collect-test" in r.stdout, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "data" / "test").iterdir()) == test
    assert kept == [(tmp_path / "data" / "test" / n).read_bytes() for n in ("0.npz", "1.npz", "3.npz")]  # 2 alone replayed
    lapo.read_chunk(tmp_path / "data" / "test" / "2.npz")
    # another --seed plays other levels than this run did when it resumed at chunk 1 (for 3 chunks)
    r = run(*args[:-1], "12288", "--seed", "1", "--data", str(tmp_path / "seed1"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    other = np.load(tmp_path / "seed1" / "test" / "0.npz")["obs"]
    assert not any(np.array_equal(other, np.load(tmp_path / "data" / "test" / n)["obs"]) for n in test)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(pipeline_run, tmp_path, monkeypatch):
    d, _ = pipeline_run
    calls, real = [0], lapo.idm_fdm_loss

    def poisoned(*args):  # the 4th training step's loss turns NaN
        out = real(*args)
        calls[0] += torch.is_grad_enabled()
        return (out[0] * float("nan"), *out[1:]) if calls[0] == 4 else out

    monkeypatch.setattr(lapo, "idm_fdm_loss", poisoned)
    cfg = small_cfg(run_dir=str(tmp_path), data=str(d / "data"), s1_steps=10, s1_batch=16,
                    probe_frames=64, probe_steps=5, probe_every=100, ckpt_every_s=1e-9)
    with pytest.raises(lapo.LapoError, match="stage1 loss became nan"):
        lapo.stage1(cfg)
    ckpt = lapo.load_checkpoint(tmp_path / "stage1.pt", "stage1", cfg, finished=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["idm"].values())


def test_collapsed_latent_stops_stage1_with_what_to_run(pipeline_run, tmp_path, monkeypatch):
    d, _ = pipeline_run
    real = lapo.stage1_update

    def dead_features(cfg, idm, fdm, opt, x, step):  # from the 3rd step the IDM's fc outputs its bias alone
        out = real(cfg, idm, fdm, opt, x, step)
        if step >= 2:
            idm.cnn.fc.weight.data.zero_()
        return out

    monkeypatch.setattr(lapo, "stage1_update", dead_features)
    cfg = small_cfg(run_dir=str(tmp_path), data=str(d / "data"), s1_steps=10, s1_batch=16,
                    probe_frames=64, probe_steps=5, probe_every=2, ckpt_every_s=1e-9)
    with pytest.raises(lapo.LapoError, match=r"collapsed at step 4: .* Delete .*stage1.pt .* another --seed"):
        lapo.stage1(cfg)
    spreads = jsonl(tmp_path / "stage1.jsonl", "latent_spread")
    assert spreads[0] > 1e-4 and spreads[-1] < 1e-6  # healthy before, logged when it collapsed


def test_same_seed_same_numbers(tmp_path):
    """PPO from the same seed logs the same numbers (stages 1 and 2: the kill-and-resume test)."""
    runs = []
    for i in range(2):
        r = run("expert", "--run-dir", str(tmp_path / str(i)), *SMALL, "--expert-frames", "512", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(jsonl(tmp_path / str(i) / "expert.jsonl", "pg_loss"))
    assert len(runs[0]) >= 2 and runs[0] == runs[1], runs


def test_tiled_latent_conv_equals_conv_of_the_tiled_input():
    conv = lapo.TiledLatentConv(6, 10, 5)
    x, la = torch.randn(2, 6, 9, 7), torch.randn(2, 10)
    tiled = torch.cat([x, la[:, :, None, None].expand(-1, -1, 9, 7)], 1)
    assert torch.allclose(conv(x, la), conv.conv(tiled), atol=1e-5)


# --- torchrun: 2 processes train as 1 ------------------------------------------------------


def test_global_batchnorm_keeps_fp32_statistics_under_bf16_autocast(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        x = (torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 0.05 + 20).bfloat16()
        ref, ours = nn.BatchNorm2d(4, momentum=1.0), lapo.GlobalBatchNorm2d(4, momentum=1.0)  # running = batch stats
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref, y = ref(x), ours(x)
        assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-2)
        assert torch.allclose(ours.running_mean, ref.running_mean)
        assert y.dtype == y_ref.dtype and torch.allclose(y.float(), y_ref.float(), atol=0.05)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_at_the_same_global_batch(pipeline_run, tmp_path):
    """gloo on CPU; BatchNorm and the EMA codebook use the global batch's statistics, so the
    losses match up to float rounding (dead-code resets draw per rank, so they are off)."""
    d, _ = pipeline_run
    args = [*SMALL, "--data", str(d / "data"), "--vq-reset-after", "0",
            "--s1-steps", "5", "--s2-steps", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU
    losses, fdm = {}, []
    for n in (1, 2):
        rd = tmp_path / f"procs{n}"
        for stage in ("stage1", "stage2"):
            if n == 2 and stage == "stage2":  # the same IDM for both, to compare stage 2 alone
                shutil.copy(tmp_path / "procs1" / "stage1.pt", rd / "stage1.pt")
            launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if n == 2 else []
            r = subprocess.run([sys.executable, *launch, str(HERE / "lapo.py"), stage, "--run-dir", str(rd),
                                *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            if stage == "stage1":
                assert r.stdout.count("train frames") == 1  # rank 0 alone prints
                fdm.append(torch.load(rd / "stage1.pt", weights_only=True)["fdm"])
        losses[n] = jsonl(rd / "stage1.jsonl", "fdm_loss"), jsonl(rd / "stage2.jsonl", "loss")
    assert len(losses[1][0]) == 5 and np.allclose(losses[1][0], losses[2][0], rtol=1e-3)
    assert len(losses[1][1]) == 5 and np.allclose(losses[1][1], losses[2][1], rtol=1e-4)
    for k in [k.replace("running_mean", "weight") for k in fdm[0] if k.endswith("running_mean")]:  # BatchNorm's
        moved = [(f[k] - 1).abs().max().item() for f in fdm]  # scale trains in 2 processes as in 1
        assert moved[1] > moved[0] / 2 > 0, (k, moved)
    lines = [(tmp_path / f"procs{n}" / "stage1.jsonl").read_text().count("\n") for n in (1, 2)]
    assert lines[0] == lines[1]  # rank 0 alone logs
    r = subprocess.run([sys.executable, *launch, str(HERE / "lapo.py"), "stage1", "--run-dir", str(rd), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("stage1.pt is finished") == 1, r.stderr[-3000:]  # ... and speaks


def test_plot_makes_the_pngs(pipeline_run):
    d, _ = pipeline_run
    r = subprocess.run([sys.executable, str(HERE / "tools" / "plot.py"), "--run-dir", str(d)], cwd=d,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ["claim1_probe", "claim2_offline", "fdm_predictions", "latent_pca"]:  # claim 3's: the next test
        assert (d / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_compares_fine_tuning_with_ppo_from_scratch(pipeline_run, tmp_path):
    d, _ = pipeline_run
    ckpt = torch.load(d / "finetune.pt", weights_only=True)
    frames = ckpt["config"]["ft_frames"]
    for name, ret in [("finetune", 9.0), ("finetune-seed1", 8.0), ("ppo", 5.0), ("ppo-seed1", 6.0)]:
        torch.save(ckpt, tmp_path / f"{name}.pt")
        rows = [dict(step=s, episode_return=ret) for s in range(8, frames + 1, 8)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save(dict(ckpt, finished=False), tmp_path / "ppo-seed2.pt")  # a run still going: left out
    (tmp_path / "ppo-seed2.jsonl").write_text(json.dumps(dict(step=8, episode_return=10.0)) + "\n")

    def plot():
        return subprocess.run([sys.executable, str(HERE / "tools" / "plot.py"), "--run-dir", str(tmp_path),
                               "--data", str(d / "data")], cwd=d, capture_output=True, text=True, timeout=600)

    r = plot()
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "plots" / "claim3_online.png").read_bytes()[:4] == b"\x89PNG"
    assert "above PPO from scratch's at 100% of 90 points; its worst seed above PPO's best seed at 100%" in r.stdout
    assert "ppo-seed2.pt is unfinished, left out" in r.stdout
    (tmp_path / "ppo-seed1.jsonl").write_text((tmp_path / "ppo-seed1.jsonl").read_text().replace(": 6.0", ": 8.5"))
    r = plot()
    assert "at 100% of 90 points; its worst seed above PPO's best seed at 0%" in r.stdout


# --- on a GPU: the README's test command checks the CUDA path where there is one ---------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")


@cuda
def test_every_update_runs_on_cuda():
    cfg = dataclasses.replace(small_cfg(), device="cuda", amp=True)
    torch.manual_seed(0)
    idm, fdm = (m.cuda().to(memory_format=torch.channels_last) for m in lapo.make_idm_fdm(cfg))
    x = torch.rand(8, 9, 64, 64, device="cuda") - 0.5
    metrics = lapo.stage1_update(cfg, idm, fdm, torch.optim.Adam([*idm.parameters(), *fdm.parameters()]), x, step=0)
    assert all(v.is_cuda and torch.isfinite(v) for v in metrics.values())
    policy = lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False).cuda()
    assert torch.isfinite(lapo.stage2_update(cfg, idm, policy, torch.optim.Adam(policy.parameters()), x, step=0)["loss"])
    agent = lapo.RLSLPolicy(policy, cfg.la_dim, lapo.NUM_ACTIONS).cuda()
    opt, _ = lapo.finetune_optimizer(cfg, agent, sl=True)
    lapo.set_lr(opt, 1e-3, 1e-3, 1e-3)
    batch = {k: v.cuda() for k, v in ppo_batch(agent.cpu(), n=32).items()}
    assert math.isfinite(lapo.ppo_update(cfg, agent.cuda(), opt, batch, ent_coef=0.01)["pg_loss"])
    obs = torch.randint(0, 256, (6, 4, 64, 64, 3), dtype=torch.uint8, device="cuda")
    zeros = torch.zeros(6, 4, device="cuda")
    metrics = lapo.DecoderSL(cfg, idm, agent.decoder)(obs, zeros, zeros, frames=1000)  # inside the SL window
    assert metrics["sl_pairs"] == 16 and math.isfinite(metrics["sl_loss"])


@cuda
def test_tiny_pipeline_runs_on_cuda(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "lapo.py"), "pipeline", "--device", "cuda", "--run-dir", str(tmp_path),
                        *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "finetune.pt", weights_only=True)["config"]["device"] == "cuda"



# --- the README ---------------------------------------------------------------------------


def test_readme_snippets_run_as_printed():
    """The README's snippets that lift a piece into another project run as printed: they cannot rot."""
    blocks = re.findall(r"<!-- snippet -->\n```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
