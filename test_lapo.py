"""Behaviour tests for lapo.py. The whole suite runs in a few minutes on 2 CPU cores:
python -m pytest -q test_lapo.py"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lapo

HERE = Path(__file__).parent
# the smallest sizes that still exercise every code path on a real Procgen game
SMALL = ["--preset", "tiny", "--idm-scale", "0.25", "--policy-scale", "0.25", "--fdm-width", "4",
         "--num-envs", "8", "--num-steps", "16", "--expert-frames", "256",
         "--train-frames", "2048", "--test-frames", "1024", "--s1-steps", "4", "--s1-batch", "16",
         "--probe-every", "2", "--probe-frames", "64", "--probe-steps", "5", "--s2-steps", "4",
         "--s2-batch", "16", "--decode-steps", "5", "--labels", "32", "--eval-episodes", "2",
         "--ft-frames", "256", "--ft-schedule-scale", "0.001", "--ckpt-every-s", "1"]


def run(*args, cwd):
    """python lapo.py ... in a subprocess, as a user would run it."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(HERE / "lapo.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def small_cfg(**kw):
    return lapo.make_config("tiny", idm_scale=0.25, policy_scale=0.25, fdm_width=4, device="cpu",
                            amp=False, **kw)


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


# --- networks ---------------------------------------------------------------------------


def test_idm_fdm_shapes():
    cfg = small_cfg()
    idm, fdm = lapo.IDM(cfg), lapo.FDM(cfg)
    x = torch.rand(3, 9, 64, 64) - 0.5
    la, la_q, commitment, perplexity = idm(x)
    assert la.shape == la_q.shape == (3, cfg.la_dim)
    assert fdm(x[:, :6], la_q).shape == (3, 3, 64, 64)
    assert lapo.Policy(cfg.policy_scale, cfg.la_dim)(x[:, :3])[0].shape == (3, cfg.la_dim)


def colour_windows(n, rng):
    """Synthetic transitions: o_{t+1} is filled with one of 4 colours, chosen by the action a
    (independent of o_{t-1}, o_t, which are random), so only the latent can tell the FDM."""
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    obs = rng.integers(0, 256, (n, 3, 1, 1, 3)).astype(np.uint8).repeat(64, 2).repeat(64, 3)
    a = rng.integers(4, size=n)
    obs[:, 2] = palette[a][:, None, None]
    return obs, a


def test_fdm_uses_the_latent_action_of_its_transition():
    """A known pitfall: an FDM fed the wrong transition's latent (off by one, or shuffled) can
    still learn to copy frames. After short training, shuffling the latents must hurt."""
    cfg = small_cfg(la_dim=32, vq_dim=4, vq_codes=16, vq_reset_after=5)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    idm, fdm = lapo.IDM(cfg), lapo.FDM(cfg)
    opt = torch.optim.Adam([*idm.parameters(), *fdm.parameters()], lr=1e-3)
    for _ in range(30):
        fdm_loss, commitment, _ = lapo.idm_fdm_loss(idm, fdm, lapo.to_input(colour_windows(32, rng)[0], "cpu"))
        opt.zero_grad()
        (fdm_loss + commitment).backward()
        opt.step()
    idm.eval(), fdm.eval()
    x = lapo.to_input(colour_windows(256, rng)[0], "cpu")
    with torch.no_grad():
        la_q = idm(x)[1]
        right = F.mse_loss(fdm(x[:, :6], la_q), x[:, 6:]).item()
        shuffled = F.mse_loss(fdm(x[:, :6], la_q[torch.randperm(256)]), x[:, 6:]).item()
    assert right < 0.8 * shuffled, (right, shuffled)


def test_rlsl_logits_are_the_mean_of_both_heads():
    cfg = small_cfg()
    latent_policy = lapo.Policy(cfg.policy_scale, cfg.la_dim)
    agent = lapo.RLSLPolicy(cfg, latent_policy)
    torch.nn.init.normal_(agent.rl_head.weight)  # zero at init; make it count
    x = torch.rand(4, 3, 64, 64) - 0.5
    h = agent.conv(x)
    rl = agent.rl_head(F.relu(agent.fc_rl(h)))
    sl = agent.decoder(latent_policy(x)[0])  # the frozen copy equals the latent policy at start
    assert torch.allclose(agent(x)[0], (rl + sl) / 2, atol=1e-5)
    trainable = {n.split(".")[0] for n, p in agent.named_parameters() if p.requires_grad}
    assert trainable == {"fc_rl", "rl_head", "value", "decoder"}


def test_rlsl_starts_as_the_decoded_latent_policy():
    agent = lapo.RLSLPolicy(small_cfg())
    x = torch.rand(2, 3, 64, 64) - 0.5
    sl = agent.decoder(agent.la_head(F.relu(agent.fc_sl(agent.conv(x)))))
    assert torch.allclose(agent(x)[0], sl / 2, atol=1e-6)  # zero-initialised RL head


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


def test_reward_normalizer_scales_and_clips():
    norm = lapo.RewardNormalizer(4, gamma=0.99)
    for _ in range(200):
        r = norm(np.full(4, 5.0), np.zeros(4, bool))
    assert np.all(np.abs(r) <= 10) and np.all(r < 5.0)


# --- data -------------------------------------------------------------------------------


def test_collect_writes_the_authors_format_and_reads_back(tmp_path):
    r = run("collect", "--random", "--env", "coinrun", "--run-dir", str(tmp_path), *SMALL,
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
    ep = np.cumsum(z["rewards"])
    starts = np.flatnonzero(z["done"][:-1]) + 1
    assert np.allclose(z["ep_returns"][: (starts[0] if len(starts) else None)],
                       ep[: (starts[0] if len(starts) else None)])
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


# --- the command line, end to end on a real Procgen game ---------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    r = run("pipeline", "--env", "coinrun", "--run-dir", str(d), *SMALL, cwd=d)
    return d, r


def test_pipeline_runs_every_stage_and_prints_the_table(pipeline_run):
    d, r = pipeline_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    table = (d / "results.txt").read_text()
    for row in ["expert", "stage1 probe", "majority", "stage2", "decode (32 labels)", "finetune RL+SL"]:
        assert row in table
    for stage in ["expert", "stage1", "stage2", "finetune"]:
        ckpt = torch.load(d / f"{stage}.pt", weights_only=True)  # plain data, loads anywhere
        assert ckpt["finished"] and ckpt["config"]["env"] == "coinrun"
        assert (d / f"{stage}.jsonl").read_text().count("\n") >= 2


def test_stages_run_alone_on_a_finished_run(pipeline_run):
    d, _ = pipeline_run
    r = run("finetune", "--no-sl", "--run-dir", str(d), *SMALL, cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finetune-rl" in r.stdout
    r = run("finetune", "--scratch", "--seed", "1", "--run-dir", str(d), *SMALL, cwd=d)  # claim 3's baseline
    assert r.returncode == 0 and "[ppo-seed1] return" in r.stdout, r.stderr[-3000:]
    assert torch.load(d / "ppo-seed1.pt", weights_only=True)["finished"]
    r = run("decode", "--bc", "--run-dir", str(d), *SMALL, cwd=d)  # the baseline of claim 2
    assert r.returncode == 0 and "[bc-32] return" in r.stdout, r.stderr[-3000:]
    r = run("decode", "--seed", "1", "--run-dir", str(d), *SMALL, cwd=d)  # another seed, beside seed 0's
    assert r.returncode == 0 and "[decode-32-seed1] return" in r.stdout, r.stderr[-3000:]
    for policy in ["expert.pt", "decode-32.pt", "bc-32.pt", "finetune.pt", "finetune-rl.pt", "ppo-seed1.pt", "random"]:
        r = run("eval", "--policy", policy if policy == "random" else str(d / policy),
                "--episodes", "2", "--run-dir", str(d), *SMALL, cwd=d)
        assert r.returncode == 0 and "relative" in r.stdout, (policy, r.stderr[-2000:])
    r = run("stage1", "--run-dir", str(d), *SMALL, cwd=d)  # finished: says so, changes nothing
    assert r.returncode == 0 and "finished" in r.stdout


# --- bad input: one clear line, non-zero exit --------------------------------------------


def error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_unknown_game(tmp_path):
    assert "unknown game 'pong'" in error_line(run("stage1", "--env", "pong", cwd=tmp_path))


def test_non_positive_flag(tmp_path):
    assert "--s1-steps must be a positive" in error_line(
        run("stage1", "--s1-steps", "0", "--run-dir", str(tmp_path), cwd=tmp_path))


def test_stage_out_of_order_names_the_command_to_run(tmp_path):
    line = error_line(run("stage2", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "stage1.pt not found" in line and "python lapo.py stage1" in line
    line = error_line(run("stage1", "--run-dir", str(tmp_path), *SMALL, cwd=tmp_path))
    assert "no dataset chunks" in line and "collect" in line


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
    assert "stage1.pt" in line and "corrupt" in line


def test_checkpoint_from_other_network_sizes(pipeline_run):
    d, _ = pipeline_run
    line = error_line(run("stage2", "--run-dir", str(d), *SMALL, "--idm-scale", "0.5", cwd=d))
    assert "idm_scale=0.25 (flags say 0.5)" in line


def test_dataset_with_wrong_shapes(tmp_path):
    (tmp_path / "train").mkdir()
    np.savez(tmp_path / "train" / "0.npz", obs=np.zeros((10, 32, 32, 3), np.uint8),
             ta=np.zeros(10), done=np.zeros(10, bool), rewards=np.zeros(10),
             ep_returns=np.zeros(10), values=np.zeros(10))
    with pytest.raises(lapo.LapoError, match=r"0.npz: obs is uint8 \(10, 32, 32, 3\)"):
        lapo.Dataset(tmp_path, "train")


# --- never lose work -------------------------------------------------------------------------


def jsonl(path, key, column=None):
    """column (default: key) of the metric rows that have key"""
    return [row[column or key] for row in map(json.loads, open(path)) if key in row]


def kill_and_resume(args, ckpt, cwd, seed):
    """Starts a real run, SIGKILLs it at a random moment after its first checkpoint, then runs
    the same command again to the end."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.Popen([sys.executable, str(HERE / "lapo.py"), *args], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(np.random.default_rng(seed).uniform(0, 1.0))
    killed = p.poll() is None
    p.kill()
    p.wait()
    return killed, run(*args, cwd=cwd)


@pytest.mark.parametrize("stage", ["stage1", "expert"])
def test_killed_run_resumes_from_its_checkpoint(pipeline_run, tmp_path, stage):
    d, _ = pipeline_run
    args = [stage, "--run-dir", str(tmp_path), *SMALL, "--data", str(d / "data"),
            "--s1-steps", "60", "--expert-frames", "4096", "--ckpt-every-s", "0.2"]
    killed, r = kill_and_resume(args, tmp_path / f"{stage}.pt", tmp_path, seed=len(stage))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not killed or "resuming" in r.stdout
    ckpt = torch.load(tmp_path / f"{stage}.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == (60 if stage == "stage1" else 4096)
    steps = jsonl(tmp_path / f"{stage}.jsonl", "fdm_loss" if stage == "stage1" else "pg_loss", "step")
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no lost or doubled rows


def test_killed_collect_resumes_without_duplicating_chunks(tmp_path):
    args = ["collect", "--random", "--run-dir", str(tmp_path), *SMALL, "--train-frames", "1000",
            "--test-frames", "16384"]
    killed, r = kill_and_resume(args, tmp_path / "data" / "test" / "0.npz", tmp_path, seed=1)
    assert r.returncode == 0, r.stderr[-3000:]
    test = sorted(p.name for p in (tmp_path / "data" / "test").iterdir())
    assert test == ["0.npz", "1.npz", "2.npz", "3.npz"]
    for name in test:
        lapo.read_chunk(tmp_path / "data" / "test" / name)
    first = np.load(tmp_path / "data" / "test" / "0.npz")["obs"]
    assert not any(np.array_equal(first, np.load(tmp_path / "data" / "test" / n)["obs"]) for n in test[1:])


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


def test_collect_refuses_early_when_the_disk_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(lapo.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    cfg = small_cfg(run_dir=str(tmp_path), data=str(tmp_path / "data"), train_frames=2048)
    with pytest.raises(lapo.LapoError, match=r"collect needs 0.02 GiB .* only 0.00 GiB free"):
        lapo.collect(cfg, random_policy=True)
    assert not list((tmp_path / "data" / "train").glob("*.npz"))




def test_same_seed_same_numbers(pipeline_run, tmp_path):
    d, _ = pipeline_run
    for stage, key in [("stage1", "fdm_loss"), ("stage2", "loss"), ("expert", "pg_loss")]:
        runs = []
        for i in range(2):
            rd = tmp_path / f"{stage}{i}"
            rd.mkdir()
            shutil.copy(d / "stage1.pt", rd)  # stage 2's input
            if stage == "stage1":
                (rd / "stage1.pt").unlink()
            r = run(stage, "--run-dir", str(rd), *SMALL, "--data", str(d / "data"),
                    "--expert-frames", "512", cwd=rd)
            assert r.returncode == 0, r.stderr[-2000:]
            runs.append(jsonl(rd / f"{stage}.jsonl", key))
        assert len(runs[0]) >= 2 and runs[0] == runs[1], (stage, runs)


def test_tiled_latent_conv_equals_conv_of_the_tiled_input():
    conv = lapo.TiledLatentConv(6, 10, 5)
    x, la = torch.randn(2, 6, 9, 7), torch.randn(2, 10)
    tiled = torch.cat([x, la[:, :, None, None].expand(-1, -1, 9, 7)], 1)
    assert torch.allclose(conv(x, la), conv.conv(tiled), atol=1e-5)


# --- torchrun: 2 processes train as 1 ------------------------------------------------------


def test_two_processes_match_one_at_the_same_global_batch(pipeline_run, tmp_path):
    """gloo on CPU; BatchNorm and the EMA codebook use the global batch's statistics, so the
    losses match up to float rounding (dead-code resets draw per rank, so they are off)."""
    d, _ = pipeline_run
    args = [*SMALL, "--data", str(d / "data"), "--no-amp", "--vq-reset-after", "0",
            "--s1-steps", "5", "--s2-steps", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    losses = {}
    for n in (1, 2):
        rd = tmp_path / f"procs{n}"
        for stage in ("stage1", "stage2"):
            if n == 2 and stage == "stage2":  # the same IDM for both, to compare stage 2 alone
                shutil.copy(tmp_path / "procs1" / "stage1.pt", rd / "stage1.pt")
            launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if n == 2 else []
            r = subprocess.run([sys.executable, *launch, str(HERE / "lapo.py"), stage, "--run-dir", str(rd),
                                *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        losses[n] = jsonl(rd / "stage1.jsonl", "fdm_loss"), jsonl(rd / "stage2.jsonl", "loss")
    assert len(losses[1][0]) == 5 and np.allclose(losses[1][0], losses[2][0], rtol=1e-3)
    assert len(losses[1][1]) == 5 and np.allclose(losses[1][1], losses[2][1], rtol=1e-4)
    lines = [(tmp_path / f"procs{n}" / "stage1.jsonl").read_text().count("\n") for n in (1, 2)]
    assert lines[0] == lines[1]  # rank 0 alone logs


def test_plot_makes_the_pngs(pipeline_run):
    pytest.importorskip("matplotlib")
    d, _ = pipeline_run
    r = run("plot", "--run-dir", str(d), *SMALL, cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ["claim1_probe", "claim2_offline", "fdm_predictions", "latent_pca"]:  # no episode ends in 256 frames
        assert (d / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
