"""Behaviour tests for tools/diagnose.py and tools/plot.py, on a small run of their own (a
random-play dataset, 20 stage-1 steps, a 256-frame expert; about a minute on 2 CPU cores):
python -m pytest -q tools/test_tools.py"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lapo  # noqa: E402


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


diagnose, plot = load_tool("diagnose"), load_tool("plot")

# test_lapo.py's smallest sizes, on coinrun (whose action groups these tests check)
SMALL = ["--preset", "tiny", "--idm-scale", "0.25", "--policy-scale", "0.25", "--fdm-width", "4",
         "--num-envs", "8", "--num-steps", "16", "--expert-frames", "256",
         "--train-frames", "2048", "--test-frames", "1024", "--s1-steps", "4", "--s1-batch", "16",
         "--probe-every", "2", "--probe-frames", "64", "--probe-steps", "5", "--s2-steps", "4",
         "--s2-batch", "16", "--labels", "32", "--decode-epochs", "5", "--bc-epochs", "3", "--eval-episodes", "2",
         "--ft-frames", "256", "--ft-schedule-scale", "0.001", "--ckpt-every-s", "1"]


def run(script, *args, cwd):
    """python <script> ... in a subprocess, as a user would run it, on the CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def small_cfg(**kw):
    return lapo.make_config("tiny", idm_scale=0.25, policy_scale=0.25, fdm_width=4, device="cpu", amp=False, **kw)


# stage 1 a little longer than test_lapo.py's, and probed on more windows for longer: enough
# for its probe on the latent to move from the untrained IDM's (the baselines must match each)
STAGE1 = ["--s1-steps", "20", "--probe-every", "10", "--probe-frames", "256", "--probe-steps", "100"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A random-play dataset, stage 1 on it and an expert, on coinrun."""
    d = tmp_path_factory.mktemp("run")
    for command, flags in (("collect", ["--random"]), ("stage1", STAGE1), ("expert", [])):
        r = run(ROOT / "lapo.py", command, "--env", "coinrun", "--run-dir", str(d), *SMALL, *flags, cwd=d)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def diagnosed(small_run):
    """tools/diagnose.py's whole report on the small run: its output."""
    d = small_run
    r = run(ROOT / "tools" / "diagnose.py", "--run-dir", str(d), "--windows", "256", "--probe-steps", "5",
            "--expert", str(d / "expert.pt"), "--expert-states", "64", "--supervised-steps", "2", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return d, r.stdout


# --- what the game says each action does ------------------------------------------------


def test_action_groups_are_read_from_the_game():
    # coinrun: LEFT-DOWN, LEFT | LEFT-UP | DOWN, NOOP and the six buttons | UP | RIGHT-DOWN, RIGHT | RIGHT-UP
    g = diagnose.action_groups("coinrun", states=128)
    assert [[a for a in range(15) if g["groups"][a] == k] for k in sorted(set(g["groups"]), key=g["groups"].index)] == \
        [[0, 1], [2], [3, 4, 9, 10, 11, 12, 13, 14], [5], [6, 7], [8]]
    # in the air UP does what NOOP does, so even a perfect predictor misses: 0 < raw < groups < 1
    assert 0.1 < g["ceiling"] < g["ceiling_merged"] < 0.95
    assert diagnose.action_groups("coinrun", prior=np.eye(15)[7], states=64)["ceiling"] == pytest.approx(1)  # always RIGHT
    g = diagnose.action_groups("bigfish", states=128)  # swims in all 8 directions; the buttons do nothing
    assert len(set(g["groups"])) == 9 and len(set(g["groups"][9:] + [g["groups"][4]])) == 1


def test_expert_ceiling_is_the_next_frame_ceiling_on_the_policys_own_states():
    """A uniform policy's is random play's; one whose action is a function of the screen is
    told every time by a reader that knows it, and not by one that knows its action mix alone."""
    groups = diagnose.action_groups("coinrun", states=256)
    uniform = diagnose.expert_ceiling("coinrun", diagnose.ActionPrior(), np.array(groups["groups"]), states=256)
    assert uniform[0] == pytest.approx(groups["ceiling"], abs=0.03)
    assert uniform[1] == pytest.approx(groups["ceiling_merged"], abs=0.03)

    class ScreenPicks(nn.Module):  # a near-certain action that varies with the screen
        def forward(self, x):
            return 20 * F.one_hot((x.sum((1, 2, 3)) * 100).long() % lapo.NUM_ACTIONS, lapo.NUM_ACTIONS).float(), None

    picks = diagnose.expert_ceiling("coinrun", ScreenPicks(), np.array(groups["groups"]), states=64)
    assert picks[2] > 0.99 and picks[0] < picks[2] - 0.1


# --- the baselines ------------------------------------------------------------------------


def test_frame_difference_bar_reads_the_change_from_o_t_to_o_t_plus_1(monkeypatch):
    """The bar a latent must beat sees what the IDM sees of the action: o_{t+1} - o_t. Here
    the action lights one pixel of o_{t+1} (its column), and o_{t-1} -> o_t is noise."""
    g = np.random.default_rng(0)
    ta = g.integers(15, size=512)
    windows = g.integers(0, 100, size=(512, 3, 64, 64, 3), dtype=np.uint8)
    windows[:, 2] = windows[:, 1]
    windows[np.arange(512), 2, 0, 4 * ta] = 255
    monkeypatch.setattr(diagnose, "action_groups", lambda game, prior: dict(groups=list(range(15))))  # no game
    bars = diagnose.baselines(small_cfg(probe_steps=100), windows, torch.as_tensor(ta))
    assert bars["probe_frame_diff"] > 0.9 and bars["majority"] < 0.2


def test_baselines_are_what_stage1_logged_on_its_probe_windows(diagnosed):
    """diagnose.json holds the old bars; the probes on the untrained IDM and on the trained
    latent are, to the digit, stage 1's own at step 0 and at its last step (same CPU, same
    windows, same probe), and so is the majority class."""
    d, out = diagnosed
    bars = json.loads((d / "diagnose.json").read_text())
    assert set(bars) == {"groups", "ceiling", "ceiling_merged", "majority", "majority_merged", "probe_frame_diff",
                         "probe_frame_diff_merged", "probe_untrained", "probe_la", "probe_la_merged", "step"}
    rows = [r for r in diagnose.read_jsonl(d / "stage1.jsonl") if "probe_la" in r]
    assert rows[0]["step"] == 0 and bars["step"] == rows[-1]["step"] == 20
    assert rows[0]["probe_la"] != rows[-1]["probe_la"]  # else the next two could not tell the IDMs apart
    assert bars["probe_untrained"] == rows[0]["probe_la"]
    assert bars["probe_la"] == rows[-1]["probe_la"]
    assert bars["majority"] == rows[-1]["majority"]
    assert len(bars["groups"]) == 15 and max(bars["groups"]) == 5  # coinrun's 6 groups
    assert 0 < bars["ceiling"] < bars["ceiling_merged"] <= 1 and bars["majority"] <= bars["majority_merged"]
    assert f"trained latent            {bars['probe_la']:>8.4f}{bars['probe_la_merged']:>8.4f}" in out
    assert f"next-frame ceiling        {bars['ceiling']:>8.4f}{bars['ceiling_merged']:>8.4f}" in out
    assert out.index("baselines:") < out.index("probe on frame difference")


def test_stage1s_networks_are_rebuilt_as_it_had_them(small_run):
    """The untrained IDM is stage 1's at step 0, the trained one its last: their latents'
    spread on the probe windows is the one stage 1 logged (a number no other IDM gives)."""
    ckpt = torch.load(small_run / "stage1.pt", weights_only=True)
    cfg = diagnose.run_config(small_run, ckpt)
    assert (cfg.probe_frames, cfg.probe_steps, cfg.s1_steps, cfg.device) == (256, 100, 20, "cpu")
    untrained, idm, _ = diagnose.stage1_networks(cfg, ckpt)
    windows, _ = diagnose.probe_windows(cfg)
    rows = [r for r in diagnose.read_jsonl(small_run / "stage1.jsonl") if "latent_spread" in r]
    for net, row in [(untrained, rows[0]), (idm, rows[-1])]:
        assert lapo.latent_actions(cfg, net, windows).std(0).mean().item() == pytest.approx(row["latent_spread"], rel=1e-4)


def test_diagnose_reports_on_a_stage1_run(diagnosed):
    _, out = diagnosed
    assert all(s in out for s in ("probe on frame difference", "t+0:", "features alive", "momentum:", "motion:",
                                  "action size:", "where the FDM uses the latent", "the expert on o_t",
                                  "next-frame ceiling on 64 of the expert's own states: raw", "supervised:"))


def test_baselines_only_stops_after_them(small_run, tmp_path, monkeypatch, capsys):
    """--baselines-only: the baselines (stage 1's probe windows, the run's probe steps),
    nothing more; without a stage1.pt, one line that says what to run."""
    monkeypatch.setattr(sys, "argv", ["diagnose.py", "--run-dir", str(tmp_path), "--baselines-only"])
    with pytest.raises(SystemExit) as e:
        diagnose.main()
    assert e.value.code == 2 and "stage1.pt not found: run `python lapo.py stage1`" in capsys.readouterr().err
    for name in ("stage1.pt", "stage1.jsonl"):
        shutil.copy(small_run / name, tmp_path / name)
    monkeypatch.setattr(diagnose, "action_groups", lambda game, prior: dict(groups=list(range(15)), ceiling=0.5,
                                                                            ceiling_merged=0.75))  # no game
    monkeypatch.setattr(diagnose, "report", lambda *args: print("the rest of the report"))
    monkeypatch.setattr(sys, "argv", ["diagnose.py", "--run-dir", str(tmp_path), "--data", str(small_run / "data"),
                                      "--baselines-only"])
    diagnose.main()
    out = capsys.readouterr().out
    assert "stage 1's 256 probe windows" in out and "100 steps" in out
    assert "next-frame ceiling          0.5000  0.7500" in out and "the rest of the report" not in out
    assert json.loads((tmp_path / "diagnose.json").read_text())["ceiling_merged"] == 0.75


def test_mutual_information_in_bits():
    x = np.arange(1000) % 4
    assert diagnose.mutual_information(x, x) == pytest.approx(2.0)  # 4 equally likely values
    assert diagnose.mutual_information(x, np.arange(1000) // 250) == pytest.approx(0.0, abs=1e-3)


def test_supervised_idm_reads_an_action_it_is_told():
    """Told the action, the IDM's network reads it where o_{t+1} lights one square per action."""
    ta = np.random.default_rng(0).integers(15, size=2048)
    obs = np.zeros((2048, 4, 16, 4, 16, 3), np.uint8)
    obs[np.arange(2048), ta // 4, :, ta % 4] = 255
    obs = obs.reshape(2048, 64, 64, 3)

    class Shifted:  # windows (o_{t-1}, o_t, o_{t+1}) whose o_{t+1} shows the action taken at o_t
        def sample(self, rng, batch):
            i = rng.integers(1, 2047, size=batch)
            return np.stack([obs[i - 1], obs[i - 1], obs[i]], 1), ta[i]

    windows, y = Shifted().sample(np.random.default_rng(1), 512)
    cfg = small_cfg(s1_batch=64, s1_lr=1e-3)
    raw, grouped = diagnose.supervised_idm(cfg, Shifted(), windows, y, np.arange(15) // 3, steps=60)
    assert raw > 0.9 and grouped > 0.9


# --- decode's blind baseline --------------------------------------------------------------


def test_action_prior_draws_from_its_probabilities_whatever_the_screen():
    probs = np.zeros(15)
    probs[[3, 7]] = 0.25, 0.75
    logits, _ = diagnose.ActionPrior(probs)(torch.zeros(4000, 1))  # it reads only how many screens
    torch.manual_seed(0)
    a = torch.distributions.Categorical(logits=logits).sample()
    assert set(a.tolist()) == {3, 7} and abs((a == 7).float().mean().item() - 0.75) < 0.03
    uniform = diagnose.ActionPrior()(torch.zeros(2, 1))[0]
    assert torch.allclose(uniform.softmax(-1), torch.full((2, 15), 1 / 15))


def test_prior_labels_plays_the_action_mix_of_decodes_labels(small_run, tmp_path, capsys):
    """Without a stage1.pt it plays the prior alone, with the config of the checkpoint it finds
    (expert.pt's: its game, dataset and --eval-episodes); the saved prior's probabilities are
    the action mix of the very labels decode draws for that seed, and claim 2 finds it."""
    shutil.copy(small_run / "expert.pt", tmp_path / "expert.pt")
    r = run(ROOT / "tools" / "diagnose.py", "--run-dir", str(tmp_path), "--prior-labels", "32", "--seed", "1",
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[prior-32-seed1] return " in r.stdout and "over 2 episodes" in r.stdout
    assert not (tmp_path / "diagnose.json").exists()  # no stage 1 here: the prior alone
    ckpt = torch.load(tmp_path / "prior-32-seed1.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 0
    rng = np.random.default_rng(1)  # decode's draw for --seed 1
    train = lapo.Dataset(small_run / "data", "train", "coinrun")
    _, ta = train.get(rng.choice(len(train), size=32, replace=False))
    assert torch.allclose(ckpt["policy"]["logits"].exp(), torch.as_tensor(np.bincount(ta, minlength=15) / 32).float())
    assert ckpt["results"]["labels"] == 32 and ckpt["results"]["episodes"] == 2
    assert ckpt["config"]["seed"] == 1 and ckpt["config"]["labels"] == 32
    plot.claim2(tmp_path, tmp_path, "coinrun")
    assert "blind to the screen, 32 labels: relative return" in capsys.readouterr().out
    assert (tmp_path / "claim2_offline.png").read_bytes()[:4] == b"\x89PNG"


# --- figures ------------------------------------------------------------------------------


def test_claim1_draws_diagnoses_bars_when_there_are_some(tmp_path, monkeypatch):
    """The curves come from stage1.jsonl; the bars and the panel on action groups from
    diagnose.json, when it is there (else the majority class alone)."""
    rows = [row for s in (0, 2, 4) for row in (dict(step=s, loss=0.1), dict(  # a training row, a probe row
        step=s, probe_la=0.2 + s / 100, probe_la_q=0.1 + s / 100, majority=0.125, test_fdm_mse=0.01,
        test_fdm_mse_shuffled=0.02, test_copy_mse=0.03))]
    (tmp_path / "stage1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, out, name: figures.append(fig))
    plot.claim1(tmp_path, tmp_path, "coinrun")
    bars = dict(groups=[0, 0, 1, 2, 2, 3, 4, 4, 5] + [2] * 6, ceiling=0.31, ceiling_merged=0.83, majority=0.12,
                majority_merged=0.44, probe_frame_diff=0.27, probe_frame_diff_merged=0.55, probe_untrained=0.21,
                probe_la=0.3, probe_la_merged=0.6, step=4)
    (tmp_path / "diagnose.json").write_text(json.dumps(bars))
    plot.claim1(tmp_path, tmp_path, "coinrun")
    def levels(ax):  # the horizontal lines' heights (axhline: x from 0 to 1 of the axes)
        return sorted(round(line.get_ydata()[0], 4) for line in ax.lines if list(line.get_xdata()) == [0, 1])

    without, with_bars = figures
    assert len(without.axes) == 2 and levels(without.axes[0]) == [0.125]  # stage1.jsonl's majority class
    assert np.allclose([line.get_ydata() for line in without.axes[0].lines[:2]], [[0.2, 0.22, 0.24], [0.1, 0.12, 0.14]])
    assert len(with_bars.axes) == 3
    assert levels(with_bars.axes[0]) == [0.125, 0.21, 0.27, 0.31]
    assert levels(with_bars.axes[1]) == [0.44, 0.55, 0.83]
    assert "6 groups" in with_bars.axes[1].get_title()


def test_plot_draws_a_stage1_runs_pictures(diagnosed):
    d, _ = diagnosed
    r = run(ROOT / "tools" / "plot.py", "--run-dir", str(d), cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ["claim1_probe", "fdm_predictions", "latent_pca"]:
        assert (d / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
