"""Why is a latent action weak? python tools/diagnose.py --run-dir runs/coinrun-cpu [--windows N]

Loads a stage-1 run (stage1.pt, finished or not, its config and its dataset) and prints, first,
  baselines    what a latent action must beat, on stage 1's own probe windows (the first
               --probe-frames of the test split, evenly spaced) with the run's own --probe-steps,
               the numbers stage 1 logged beside its probe until lapo.py left them to this tool:
               the majority class, the probe (lapo.probe_accuracy) on the frame difference
               o_t+1 - o_t, the next-frame ceilings (what the game's o_t+1 alone tells of the
               action, asked of the game itself: action_groups; actions drawn from the scored
               half's action mix, whatever the state) and the probe on an untrained IDM's latent
               (stage 1's IDM at step 0: stage1.jsonl's first probe_la), each on the raw action
               and, but the untrained IDM, on action groups (actions that give the same o_t+1:
               coinrun's LEFT and LEFT-DOWN); and the trained latent's probe, raw (stage1.jsonl's
               probe_la at this step, on the same CPU) and on groups. Written to
               <run-dir>/diagnose.json (groups, ceiling, ceiling_merged, majority,
               majority_merged, probe_frame_diff, probe_frame_diff_merged, probe_untrained,
               probe_la, probe_la_merged, step), which tools/plot.py draws as claim 1's bars.
               Stage 1 run on a GPU gives its probes to within rounding, not to the digit.
then, on N held-out windows (--windows; default: all of the test split):
  probes       the same probe on raw actions and on action groups, for the trained latent, the
               untrained IDM's latent and the frame difference, with more windows and steps
               (--probe-steps) than stage 1 uses (is the probe short of data?)
  information  how many bits each token of the quantised latent carries, and how many of
               them are about the action group taken at t-1, t, t+1 (o_{t+1} shows the
               action at t)
  dead units   how many of the IDM's 256 features are 0 on every one of ~1,024 windows, and
               how much the latent varies across windows (one that does not has collapsed)
  momentum     the probe on the latent of the window before beside this one's: if the latent
               held the scene's motion (velocity x action), not the action, the pair would
               read the action where one alone cannot
  motion       the frame's global shift from o_t to o_t+1 (sub-pixel, least squares): how well
               the latent and the frame difference read it (3 x 3 bins), and how well that
               shift and the one before read the action's group; and the frame difference of
               the central 16 x 16 alone on groups (where a game whose camera follows the agent
               shows it). A latent that reads the shift far better than the action codes the
               camera's move, and the action only as far as the move shows it
  action size  asked of the game (next_frames): from 256 states of random play,
               how much o_{t+1} varies with the action (across one action of each group), against
               how much it differs from o_t; compare with the FDM's error with shuffled latents,
               which stage 1 logs (test_fdm_mse_shuffled): what the latent has to explain
  where used   the FDM's extra error with the latents shuffled, by region of the frame: the
               border (where new scene scrolls in) and the centre
  expert       with --expert PATH, the policy that collected the data, on o_t of the same windows:
               how often its most likely action is the one taken, raw and on groups, and its
               entropy. What any policy acting from o_t alone (decode's latent policy, BC) can
               expect to read: an expert sampled at high entropy leaves little to imitate; and the
               next-frame ceiling on --expert-states of the expert's own states, beside the
               baselines' on random play's (are the data's actions harder to tell from o_t+1?)
  supervised   with --supervised-steps N, the IDM's network trained N steps on the action labels
               (stage 1's batch and schedule): what it can read of the action at all, beside
               what its latent, learnt without labels, reads
--baselines-only stops after the baselines (2 min for the tiny preset's 4,096 probe windows on
2 busy CPU cores; the rest of the report, on all windows of a cpu-preset run, takes longer).
Memory: all windows of the cpu preset's test split and their frame differences, ~6 GB.

--prior-labels N plays decode's blind baseline (what `lapo.py decode --prior` was): the action
mix of the N labels decode draws (the same ones: --seed, the run's --data), played blind to
the screen for the run's --eval-episodes, saved as <run-dir>/prior-N.pt (prior-N-seedS.pt for
--seed S > 0), whose results tools/plot.py draws in claim 2. Its config is the run's: that of
stage1.pt, else of expert.pt, else of any other checkpoint in --run-dir; with none there, the
--preset and --env given (lapo.py's defaults otherwise). --seed (default: the config's) applies
to it alone. Without a stage1.pt in --run-dir, diagnose does only this; with one, the report
above follows (add --baselines-only to keep it short).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lapo  # noqa: E402


# --- what the game itself says each action does -----------------------------------------


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
            act = rng.integers(lapo.NUM_ACTIONS, size=E) if policy is None else policy(env.observe()[1]["rgb"])
            env.act(np.asarray(act, np.int32))
        now, saved, frames = env.observe()[1]["rgb"].copy(), env.get_state(), []
        for a in range(lapo.NUM_ACTIONS):
            env.set_state(saved)
            env.act(np.full(E, a, np.int32))
            frames.append(env.observe()[1]["rgb"].copy())
        env.set_state(saved)
        yield now, np.stack(frames, 1)
    env.close()


def same_next_frame(frames):
    """(64, 15, 64, 64, 3) next frames -> (64, 15, 15): actions a and b give the same frame."""
    frames = frames.reshape(*frames.shape[:2], -1)  # (64, 15, pixels)
    return np.stack([(frames == frames[:, [a]]).all(-1) for a in range(lapo.NUM_ACTIONS)], 1)


def action_groups(game, prior=None, states=512):
    """Which of the 15 actions do the same thing, asked of the game itself (next_frames).
    Actions whose next frames are identical in 95% of the states are joined, and
    joined actions form a group (coinrun: LEFT = LEFT-DOWN; most games: the last six do
    nothing). From o_{t+1} alone an action can be told only up to the actions that give the
    same frame, so the ceilings are the accuracy of the best guess from the next frame, raw
    and on groups, if actions were drawn from `prior` (15 probabilities, default uniform)
    whatever the state. A probe can beat them where the policy's choice shows in o_t."""
    same = np.concatenate([same_next_frame(frames) for _, frames in next_frames(game, states)])  # (states, 15, 15)
    group = np.arange(lapo.NUM_ACTIONS)
    for a, b in zip(*np.nonzero(same.mean(0) >= 0.95)):
        group[group == group[a]] = group[b]
    group = np.unique(group, return_inverse=True)[1]
    p = np.full(lapo.NUM_ACTIONS, 1 / lapo.NUM_ACTIONS) if prior is None else np.asarray(prior, dtype=float)
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


# --- the baselines a latent action must beat ----------------------------------------------

BASELINE_KEYS = ("groups", "ceiling", "ceiling_merged", "majority", "majority_merged", "probe_frame_diff",
                 "probe_frame_diff_merged", "probe_untrained", "probe_la", "probe_la_merged", "step")


def frame_difference(windows):
    """o_{t+1} - o_t of uint8 windows (N, 3, 64, 64, 3), full resolution, flat, in [-1, 1]."""
    return (torch.as_tensor(windows[:, 2]).float() - torch.as_tensor(windows[:, 1]).float()).flatten(1) / 255


def probe_windows(cfg):
    """Stage 1's probe windows: cfg.probe_frames of the test split, evenly spaced, and their
    actions (a tensor)."""
    test = lapo.Dataset(cfg.data, "test", cfg.env)
    idx = np.linspace(0, len(test) - 1, min(cfg.probe_frames, len(test))).astype(int)
    windows, ta = test.get(idx)
    return windows, torch.as_tensor(ta)


def baselines(cfg, windows, ta, idm_untrained=None, idm=None):
    """What a latent action must beat on windows (N, 3, 64, 64, 3) with actions ta (N,), the
    probe at cfg.probe_steps: the majority class, and the same probe fed the raw frame
    difference o_{t+1} - o_t; each on raw actions and on groups of actions that do the same
    thing (action_groups), with their ceilings for the action mix of the scored half. With
    idm_untrained, the probe on its latent (raw); with idm, on the trained latent (raw, groups),
    continuous, as lapo.latent_actions gives it."""
    scored = ta[len(ta) // 2 :]
    bars = action_groups(cfg.env, prior=(torch.bincount(scored, minlength=lapo.NUM_ACTIONS) / len(scored)).numpy())
    merged = torch.as_tensor(bars["groups"])[ta]
    diff = frame_difference(windows)
    bars.update(majority=lapo.majority_accuracy(ta), majority_merged=lapo.majority_accuracy(merged),
                probe_frame_diff=lapo.probe_accuracy(diff, ta, cfg.probe_steps),
                probe_frame_diff_merged=lapo.probe_accuracy(diff, merged, cfg.probe_steps))
    if idm_untrained is not None:
        la = lapo.latent_actions(cfg, idm_untrained, windows).cpu()
        bars["probe_untrained"] = lapo.probe_accuracy(la, ta, cfg.probe_steps)
    if idm is not None:
        la = lapo.latent_actions(cfg, idm, windows).cpu()
        bars.update(probe_la=lapo.probe_accuracy(la, ta, cfg.probe_steps),
                    probe_la_merged=lapo.probe_accuracy(la, merged, cfg.probe_steps))
    return bars


def stage1_networks(cfg, ckpt):
    """The IDM as stage 1 started it (seeded, untrained) and the trained IDM and FDM of ckpt,
    on cfg.device in eval mode, channels-last as stage 1 runs them."""
    lapo.seed_everything(cfg.seed)
    untrained, _ = lapo.make_idm_fdm(cfg)
    idm, fdm = lapo.make_idm_fdm(cfg)
    idm.load_state_dict(ckpt["idm"])
    fdm.load_state_dict(ckpt["fdm"])
    return [m.to(cfg.device, memory_format=torch.channels_last).eval() for m in (untrained, idm, fdm)]


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def report_baselines(cfg, run, step, untrained, idm):
    """The baselines on stage 1's probe windows: printed, beside what stage1.jsonl logged of the
    same probes, and written to <run>/diagnose.json. Returns them."""
    windows, ta = probe_windows(cfg)
    bars = dict(baselines(cfg, windows, ta, untrained, idm), step=step)
    write_json(run / "diagnose.json", {k: bars[k] for k in BASELINE_KEYS})
    groups = bars["groups"]
    logged = [r for r in read_jsonl(run / "stage1.jsonl") if "probe_la" in r]
    first = f"; stage1.jsonl's step 0: {logged[0]['probe_la']:.4f}" if logged and logged[0]["step"] == 0 else ""
    last = next((f"; stage1.jsonl's at step {step}: {r['probe_la']:.4f}" for r in logged[::-1] if r["step"] == step), "")
    print(f"baselines: {cfg.env}, step {step}, stage 1's {len(ta)} probe windows, probe fitted on half and scored on "
          f"the other, {cfg.probe_steps} steps; written to {run / 'diagnose.json'}")
    print(f"  {max(groups) + 1} action groups (action -> group): {' '.join(map(str, groups))}")
    print(f"  {'':<26}{'raw':>8}{'groups':>8}")
    for name, key, note in [("majority class", "majority", ""),
                            ("frame difference", "probe_frame_diff", ""),
                            ("next-frame ceiling", "ceiling", "  (the scored half's action mix, whatever the state)"),
                            ("untrained IDM", "probe_untrained", first),
                            ("trained latent", "probe_la", last)]:
        merged = f"{bars[key + '_merged']:>8.4f}" if key + "_merged" in bars else f"{'-':>8}"
        print(f"  {name:<26}{bars[key]:>8.4f}{merged}{note}")
    return bars


def read_jsonl(path):
    rows = []
    for line in open(path) if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a row cut short by a crash
            pass
    return rows


# --- decode's blind baseline --------------------------------------------------------------


class ActionPrior(nn.Module):
    """A policy blind to the screen, drawing actions from fixed probabilities: uniform (the
    random reference) or the action mix of a few labels (decode's blind baseline: on a game
    where one direction mostly wins, a bar well above random)."""

    def __init__(self, probs=None):
        super().__init__()
        probs = torch.full((lapo.NUM_ACTIONS,), 1 / lapo.NUM_ACTIONS) if probs is None else torch.as_tensor(probs)
        self.register_buffer("logits", probs.float().log())

    def forward(self, x):
        return self.logits.to(x.device).expand(len(x), -1), None


def prior_config(run, args):
    """The config --prior-labels plays with: the run's (stage1.pt, else expert.pt, else any
    checkpoint in run), else --preset and --env; with --seed and --labels N."""
    overrides = dict(labels=args.prior_labels, device="cpu")
    if args.seed is not None:
        overrides["seed"] = args.seed
    for path in [run / "stage1.pt", run / "expert.pt", *sorted(run.glob("*.pt"))]:
        if path.exists():
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
                ckpt["config"]
            except Exception:  # not a readable checkpoint: try the next
                continue
            return run_config(run, ckpt, args.data, **overrides)
    return lapo.make_config(args.preset, env=args.env, run_dir=str(run), data=args.data, **overrides)


def play_prior(cfg):
    """The action mix of the cfg.labels labels decode draws, played blind to the screen for
    cfg.eval_episodes; saved as <run-dir>/prior-N[-seedS].pt. Returns its results."""
    t0 = time.time()
    train = lapo.Dataset(cfg.data, "train", cfg.env)
    if cfg.labels > len(train):
        raise lapo.LapoError(f"--prior-labels {cfg.labels} is more than the {len(train)} transitions in "
                             f"{cfg.data}/train: lower it")
    rng = lapo.seed_everything(cfg.seed)
    _, ta = train.get(rng.choice(len(train), size=cfg.labels, replace=False))
    agent = ActionPrior(np.bincount(ta, minlength=lapo.NUM_ACTIONS) / len(ta))
    results = dict(labels=cfg.labels, **lapo.return_summary(cfg, lapo.evaluate(cfg, agent, cfg.eval_episodes)),
                   minutes=(time.time() - t0) / 60)
    path = Path(cfg.run_dir) / f"prior-{cfg.labels}{f'-seed{cfg.seed}' if cfg.seed else ''}.pt"
    lapo.save_checkpoint(path, cfg, policy=agent, step=0, finished=True, results=results)
    print(f"[{path.stem}] return {results['mean']:.2f} +- {results['std']:.2f} (relative "
          f"{results['relative']:.2f}) over {results['episodes']} episodes")
    return results


def run_config(run, ckpt, data="", **overrides):
    """The config a checkpoint of run was made with, on the CPU, with its dataset: data, else
    the one it was made with, else <run>/data (the saved path is relative to where it ran)."""
    if not data:
        data = ckpt["config"].get("data", "")
        if not data or not Path(data).exists():
            data = str(run / "data")
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(lapo.Config)}}
    return lapo.Config(**{**saved, "run_dir": str(run), "data": data, "device": "cpu", **overrides})


# --- the rest of the report -----------------------------------------------------------------


def bits(x):
    p = np.bincount(x) / len(x)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(x, y):
    """I(x; y) = H(x) + H(y) - H(x, y), in bits, of two integer arrays."""
    return bits(x) + bits(y) - bits(x * (y.max() + 1) + y)


def scene_shift(a, b):
    """(N, 2) global (dy, dx) in pixels with b(p) ~ a(p - d), for grey frames (N, 64, 64): the
    least-squares solution of b - a = -grad(a) . d (small shifts, sub-pixel)."""
    gy, gx = np.gradient((a + b) / 2, axis=(1, 2))
    e = b - a
    A = np.stack([np.stack([(gy * gy).sum((1, 2)), (gy * gx).sum((1, 2))], -1),
                  np.stack([(gx * gy).sum((1, 2)), (gx * gx).sum((1, 2))], -1)], -2)  # (N, 2, 2)
    r = -np.stack([(gy * e).sum((1, 2)), (gx * e).sum((1, 2))], -1)  # (N, 2)
    return np.linalg.solve(A + 1e-3 * np.eye(2), r[..., None])[..., 0]


def thirds(d):
    """(N, 2) shifts -> 9 classes: each coordinate in its lower, middle or upper third."""
    q = [np.searchsorted(np.quantile(v, [1 / 3, 2 / 3]), v) for v in d.T]
    return torch.as_tensor(q[0] * 3 + q[1])


def action_size(game, groups, states=256):
    """Mean squared pixel difference (frames in [0, 1]) of o_{t+1} from its mean over one action
    per group (the variance the action alone explains), and of o_{t+1} from o_t. groups: the
    game's action groups (action_groups)."""
    groups = list(groups)
    actions = [groups.index(g) for g in range(max(groups) + 1)]
    variance, change = [], []
    for now, frames in next_frames(game, states):
        frames, now = frames[:, actions] / 255, now[:, None] / 255  # (64, groups, 64, 64, 3)
        variance.append(((frames - frames.mean(1, keepdims=True)) ** 2).mean())
        change.append(((frames - now) ** 2).mean())
    return float(np.mean(variance)), float(np.mean(change))


def expert_ceiling(game, expert, groups, states=2048):
    """The next-frame ceiling of action_groups (raw, groups) on the expert's own states (it
    plays at temperature 1, as collect does), where the baselines measure it on random play's:
    with the expert's action mix over these states (a reader of o_t+1 alone), and with its
    probabilities at each state. The second bounds a reader that also knows what
    the expert would do at o_t, because the expert acts from o_t alone, a step from a saved
    state is deterministic, and only pixel-identical frames count as look-alikes."""
    g = torch.Generator().manual_seed(0)

    def probs(obs):
        with torch.no_grad():
            return torch.softmax(expert(lapo.to_input(obs, "cpu"))[0].float(), -1)

    same, p = [], []
    for now, frames in next_frames(game, states, policy=lambda obs: probs(obs).multinomial(1, generator=g)[:, 0].numpy()):
        same.append(same_next_frame(frames))
        p.append(probs(now).double().numpy())
    same, p = np.concatenate(same), np.concatenate(p)  # (states, a, b): a and b give the same frame
    return next_frame_ceiling(same, p.mean(0), groups) + next_frame_ceiling(same, p, groups)


def supervised_idm(cfg, train, windows, ta, groups, steps):
    """The IDM's network told the action: an ImpalaCNN of --idm-scale on (o_t-1, o_t, o_t+1),
    with a head for the action and one for its group, trained on the labels of the training
    split with stage 1's batch, learning rate and schedule. Its held-out accuracy (raw,
    groups) is what this network can read of the action in these steps, from every label of
    the training split (the probes fit on half the held-out windows): a latent that reads far
    less has likely spent its bits on something else."""
    rng = lapo.seed_everything(cfg.seed)
    groups = torch.as_tensor(groups)
    cnn, head, group_head = lapo.ImpalaCNN(9, cfg.idm_scale), torch.nn.Linear(256, lapo.NUM_ACTIONS), \
        torch.nn.Linear(256, int(groups.max()) + 1)
    net = torch.nn.ModuleList([cnn, head, group_head]).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters())
    warmup = min(cfg.s1_warmup, steps // 2)
    for step in range(steps):
        lapo.set_lr(opt, float(np.interp(step, [0, warmup, steps], [0.1 * cfg.s1_lr, cfg.s1_lr, 0.01 * cfg.s1_lr])))
        w, y = train.sample(rng, cfg.s1_batch)
        y = torch.as_tensor(y)
        with lapo.autocast(cfg):
            h = cnn(lapo.to_input(w, "cpu")).float()
        loss = torch.nn.functional.cross_entropy(head(h), y) + torch.nn.functional.cross_entropy(group_head(h), groups[y])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.s1_clip)
        opt.step()
    with torch.no_grad():
        with lapo.autocast(cfg):
            h = torch.cat([cnn(lapo.to_input(windows[i:i + 256], "cpu")).float() for i in range(0, len(windows), 256)])
        ta = torch.as_tensor(ta)
        return ((head(h).argmax(-1) == ta).float().mean().item(),
                (group_head(h).argmax(-1) == groups[ta]).float().mean().item())


def report(cfg, args, ckpt, untrained, idm, fdm, bars):
    """The heavier rows, on args.windows held-out windows."""
    test = lapo.Dataset(cfg.data, "test", cfg.env)
    n = min(args.windows or len(test), len(test))
    idx = np.linspace(0, len(test) - 1, n).astype(int)
    windows, ta = test.get(idx)
    groups = np.array(bars["groups"])
    la = lapo.latent_actions(cfg, idm, windows)
    la_untrained = lapo.latent_actions(cfg, untrained, windows)
    diff = frame_difference(windows)
    ta_t, group_t = torch.as_tensor(ta), torch.as_tensor(groups[ta])
    print(f"{cfg.env}, step {ckpt['step']}, {n} held-out windows: probe fitted on half, scored on the "
          f"other, {args.probe_steps} steps; majority group {lapo.majority_accuracy(group_t):.3f}")
    for name, x in [("trained latent", la), ("untrained IDM", la_untrained), ("frame difference", diff)]:
        print(f"  probe on {name:<17} raw {lapo.probe_accuracy(x, ta_t, args.probe_steps):.3f}  "
              f"groups {lapo.probe_accuracy(x, group_t, args.probe_steps):.3f}")
    if idm.vq is not None:  # each (codebook, position) of the latent is one token of vq_codes values
        with torch.no_grad():
            _, _, _, codes = idm.vq(la)
        tokens = codes.flatten(1).numpy()  # (N, codebooks x positions)
        print(f"  the quantised latent: {tokens.shape[1]} tokens carrying "
              f"{np.mean([bits(tok) for tok in tokens.T]):.2f} bits each (mean); about the action group "
              f"taken at (bits per token, mean and max over tokens; the same with the groups shuffled, "
              f"which an estimate from finitely many windows does not give as 0)")
        rng = np.random.default_rng(0)
        for lag in (-1, 0, 1):  # windows never touch a chunk's ends, so t-1 and t+1 exist
            group = groups[[test.ta[c][t + lag] for c, t in test.index[idx]]]
            mi = [mutual_information(tok, group) for tok in tokens.T]
            mi_shuffled = [mutual_information(tok, rng.permutation(group)) for tok in tokens.T]
            print(f"    t{lag:+d}: {np.mean(mi):.3f}, {np.max(mi):.3f} (of {bits(group):.2f}); "
                  f"shuffled {np.mean(mi_shuffled):.3f}, {np.max(mi_shuffled):.3f}")
    pos = {tuple(ct): i for i, ct in enumerate(test.index.tolist())}
    has_prev = [i for i, (c, t) in enumerate(test.index[idx]) if (c, t - 1) in pos]
    prev_windows, _ = test.get(np.array([pos[(c, t - 1)] for c, t in test.index[idx[has_prev]]]))
    la_prev = lapo.latent_actions(cfg, idm, prev_windows)
    y = group_t[has_prev]
    print(f"  momentum: on the {len(has_prev)} windows with one before them, the probe on groups reads "
          f"{lapo.probe_accuracy(la[has_prev], y, args.probe_steps):.3f} from the latent, "
          f"{lapo.probe_accuracy(torch.cat([la_prev, la[has_prev]], 1), y, args.probe_steps):.3f} "
          f"from it and the one before")
    shifts = []  # the shift o_t -> o_t+1 and the one before, (n, 4); in slices: all at once takes GBs
    for i in range(0, n, 4096):
        grey = windows[i:i + 4096].astype(np.float32).mean(-1)  # (., 3, 64, 64)
        shifts.append(np.concatenate([scene_shift(grey[:, 1], grey[:, 2]), scene_shift(grey[:, 0], grey[:, 1])], 1))
    shifts = np.concatenate(shifts)
    moved = thirds(shifts[:, :2])
    diff_centre = diff.view(n, 64, 64, 3)[:, 24:40, 24:40].flatten(1)
    print(f"  motion: the frame's shift o_t -> o_t+1 (3 x 3 bins; majority {lapo.majority_accuracy(moved):.3f}) is read "
          f"at {lapo.probe_accuracy(la, moved, args.probe_steps):.3f} from the latent, "
          f"{lapo.probe_accuracy(diff, moved, args.probe_steps):.3f} from the frame difference; it and the shift before "
          f"read groups at {lapo.probe_accuracy(torch.as_tensor(shifts).float(), group_t, args.probe_steps):.3f}; "
          f"the frame difference's central 16 x 16 alone at {lapo.probe_accuracy(diff_centre, group_t, args.probe_steps):.3f}")
    variance, change = action_size(cfg.env, bars["groups"])
    print(f"  action size: o_t+1 varies with the action by {variance:.5f} (mean squared, pixels in [0, 1]); "
          f"it differs from o_t by {change:.5f} (random play, 256 states)")
    every = max(1, n // 1024)
    spread = lapo.to_input(windows[::every], "cpu")  # about 1,024 windows over the whole test split
    with torch.no_grad():
        h = idm.cnn(spread)
    print(f"  IDM features alive on some of {len(spread)} windows: {int((h > 0).any(0).sum())} of {h.shape[1]}; latent spread "
          f"across windows (std, mean over dims) {la.std(0).mean():.2e}, its size (norm) {la.norm(dim=1).mean():.2f}")
    la_q = la[::every] if idm.vq is None else idm.vq(la[::every])[0]  # idm is in eval mode: the codebook stays
    la_shuffled = la_q[torch.randperm(len(la_q), generator=torch.Generator().manual_seed(0))]
    own, shuffled = torch.zeros(64, 64), torch.zeros(64, 64)
    with torch.no_grad():
        for i in range(0, len(spread), 256):
            x = spread[i:i + 256]
            own += (fdm(x[:, :6], la_q[i:i + 256]) - x[:, 6:]).pow(2).sum((0, 1))
            shuffled += (fdm(x[:, :6], la_shuffled[i:i + 256]) - x[:, 6:]).pow(2).sum((0, 1))
    extra = shuffled - own  # (64, 64): where another window's latent hurts the prediction
    border, centre = torch.ones(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    border[8:-8, 8:-8], centre[24:40, 24:40] = False, True
    used = shuffled.sum() / own.sum()
    print(f"  where the FDM uses the latent: of its extra error with shuffled latents ({used:.2f}x its own), "
          f"{extra[border].sum() / extra.sum():.0%} falls in the frame's outer 8 pixels ({border.float().mean():.0%} "
          f"of it), {extra[centre].sum() / extra.sum():.0%} in its central 16 x 16 ({centre.float().mean():.0%}; "
          f"where a game whose camera follows the agent shows it)" + (": noise, the FDM barely uses it" if used < 1.1 else ""))
    if args.expert:
        expert = lapo.load_policy(cfg, args.expert, command="expert")
        with torch.no_grad():
            logits = torch.cat([expert(lapo.to_input(windows[i:i + 256, 1], "cpu"))[0] for i in range(0, n, 256)])
        pi = torch.distributions.Categorical(logits=logits.float())
        p = pi.probs
        p_group = torch.zeros(n, groups.max() + 1).index_add_(1, torch.as_tensor(groups), p)
        print(f"  the expert on o_t: its most likely action is the one taken in "
              f"{(p.argmax(-1) == ta_t).float().mean():.3f} of the windows (groups "
              f"{(p_group.argmax(-1) == group_t).float().mean():.3f}; majority {lapo.majority_accuracy(ta_t):.3f}, "
              f"{lapo.majority_accuracy(group_t):.3f}); entropy {pi.entropy().mean():.2f} "
              f"nats (uniform {np.log(lapo.NUM_ACTIONS):.2f})")
        ceilings = expert_ceiling(cfg.env, expert, groups, args.expert_states)
        print(f"  next-frame ceiling on {max(64, args.expert_states // 64 * 64):,} of the expert's own states: raw "
              "{:.3f}, groups {:.3f} with its action mix; {:.3f}, {:.3f} with its probabilities at each state (the "
              "baselines', on random play's states: {:.3f}, {:.3f})".format(*ceilings, bars["ceiling"], bars["ceiling_merged"]))

    if args.supervised_steps:
        train = lapo.Dataset(cfg.data, "train", cfg.env)
        raw, grouped = supervised_idm(cfg, train, windows[n // 2:], ta[n // 2:], groups, args.supervised_steps)
        print(f"  supervised: the IDM's network, trained {args.supervised_steps} steps on the action labels, reads "
              f"the action on the probes' scored half at raw {raw:.3f}, groups {grouped:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--windows", type=int, default=0, help="held-out windows of the report (default: all)")
    parser.add_argument("--probe-steps", type=int, default=1000, help="the report's probe steps (the baselines: the run's)")
    parser.add_argument("--data", default="", help="its dataset (default: the one it was trained on)")
    parser.add_argument("--expert", default="", help="the policy that collected the data (expert.pt)")
    parser.add_argument("--expert-states", type=int, default=2048, help="states of the expert's own play for its ceiling")
    parser.add_argument("--supervised-steps", type=int, default=0,
                        help="train the IDM's network on the action labels for N steps (0: skip; minutes)")
    parser.add_argument("--baselines-only", action="store_true", help="print (and write) the baselines alone")
    parser.add_argument("--prior-labels", type=int, default=0,
                        help="play the action mix of decode's N labels blind to the screen; save prior-N.pt")
    parser.add_argument("--seed", type=int, default=None, help="--prior-labels' seed (default: the run's)")
    parser.add_argument("--preset", default="paper", help="--prior-labels' config where --run-dir has no checkpoint")
    parser.add_argument("--env", default="coinrun", help="--prior-labels' game where --run-dir has no checkpoint")
    args = parser.parse_args()
    run = Path(args.run_dir)
    try:
        if args.prior_labels:
            play_prior(prior_config(run, args))
            if not (run / "stage1.pt").exists():
                return
        ckpt = lapo.load_checkpoint(run / "stage1.pt", "stage1", finished=False)
        cfg = run_config(run, ckpt, args.data)
        untrained, idm, fdm = stage1_networks(cfg, ckpt)
        bars = report_baselines(cfg, run, ckpt["step"], untrained, idm)
        if not args.baselines_only:
            report(cfg, args, ckpt, untrained, idm, fdm, bars)
    except lapo.LapoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
