"""Why is a latent action weak? python tools/diagnose.py --run-dir runs/coinrun-cpu [--windows N]

Loads a stage-1 run (stage1.pt, finished or not, and its dataset) and, on N held-out windows (default:
all of the test split), prints:
  probes       the stage-1 probe (lapo.probe_accuracy) on raw actions and on action groups,
               for the trained latent, an untrained IDM's latent and the frame difference,
               with more windows and steps than stage 1 uses (is the probe short of data?)
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
  action size  asked of the game (lapo.next_frames): from 256 states of random play,
               how much o_{t+1} varies with the action (across one action of each group), against
               how much it differs from o_t; compare with the FDM's error with shuffled latents,
               which stage 1 logs (test_fdm_mse_shuffled): what the latent has to explain
  where used   the FDM's extra error with the latents shuffled, by region of the frame: the
               border (where new scene scrolls in) and the centre
  expert       with --expert PATH, the policy that collected the data, on o_t of the same windows:
               how often its most likely action is the one taken, raw and on groups, and its
               entropy. What any policy acting from o_t alone (decode's latent policy, BC) can
               expect to read: an expert sampled at high entropy leaves little to imitate; and the
               next-frame ceiling on the expert's own states, where stage 1 measures it on random
               play's (are the data's actions harder to tell from o_t+1?)
  supervised   with --supervised-steps N, the IDM's network trained N steps on the action labels
               (stage 1's batch and schedule): what it can read of the action at all, beside
               what its latent, learnt without labels, reads
Memory: all windows of the cpu preset's test split and their frame differences, ~6 GB.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lapo  # noqa: E402


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


def action_size(game, states=256):
    """Mean squared pixel difference (frames in [0, 1]) of o_{t+1} from its mean over one action
    per group (the variance the action alone explains), and of o_{t+1} from o_t."""
    groups = lapo.action_groups(game)["groups"]
    actions = [groups.index(g) for g in range(max(groups) + 1)]
    variance, change = [], []
    for now, frames in lapo.next_frames(game, states):
        frames, now = frames[:, actions] / 255, now[:, None] / 255  # (64, groups, 64, 64, 3)
        variance.append(((frames - frames.mean(1, keepdims=True)) ** 2).mean())
        change.append(((frames - now) ** 2).mean())
    return float(np.mean(variance)), float(np.mean(change))


def expert_ceiling(game, expert, groups, states=2048):
    """The next-frame ceiling of lapo.action_groups (raw, groups) on the expert's own states
    (it plays at temperature 1, as collect does by default), where stage 1 measures it on
    random play's: with the expert's action mix over these states (a reader of o_t+1 alone),
    and with its probabilities at each state. The second bounds a reader that also knows what
    the expert would do at o_t, because the expert acts from o_t alone, a step from a saved
    state is deterministic, and only pixel-identical frames count as look-alikes."""
    g = torch.Generator().manual_seed(0)

    def probs(obs):
        with torch.no_grad():
            return torch.softmax(expert(lapo.to_input(obs, "cpu"))[0].float(), -1)

    same, p = [], []
    for now, frames in lapo.next_frames(game, states, policy=lambda obs: probs(obs).multinomial(1, generator=g)[:, 0].numpy()):
        frames = frames.reshape(*frames.shape[:2], -1)  # (64, 15, pixels)
        same.append(np.stack([(frames == frames[:, [a]]).all(-1) for a in range(lapo.NUM_ACTIONS)], 1))
        p.append(probs(now).double().numpy())
    same, p = np.concatenate(same), np.concatenate(p)  # (states, a, b): a and b give the same frame
    return lapo.next_frame_ceiling(same, p.mean(0), groups) + lapo.next_frame_ceiling(same, p, groups)


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
        lapo.set_lr(opt, lapo.lr_at(step, [0, warmup, steps], [0.1 * cfg.s1_lr, cfg.s1_lr, 0.01 * cfg.s1_lr]))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--windows", type=int, default=0, help="held-out windows (default: all)")
    parser.add_argument("--probe-steps", type=int, default=1000)
    parser.add_argument("--data", default="", help="its dataset (default: the one it was trained on)")
    parser.add_argument("--expert", default="", help="the policy that collected the data (expert.pt)")
    parser.add_argument("--supervised-steps", type=int, default=0,
                        help="train the IDM's network on the action labels for N steps (0: skip; minutes)")
    args = parser.parse_args()
    ckpt = lapo.load_checkpoint(Path(args.run_dir) / "stage1.pt", "stage1", finished=False)
    saved = ckpt["config"]
    data = args.data or saved["data"]
    if not Path(data).exists():  # the saved path is relative to where stage 1 ran
        data = str(Path(args.run_dir) / "data")
    fields = lapo.NET_FIELDS + ("env", "amp", "seed", "s1_batch", "s1_lr", "s1_warmup", "s1_clip")  # the run's own
    cfg = lapo.make_config(saved["preset"], **{k: saved[k] for k in fields},
                           run_dir=args.run_dir, data=data, device="cpu")
    test = lapo.Dataset(cfg.data, "test", cfg.env)
    n = min(args.windows or len(test), len(test))
    idx = np.linspace(0, len(test) - 1, n).astype(int)
    windows, ta = test.get(idx)
    groups = np.array(ckpt["bars"]["groups"])
    idm = lapo.IDM(cfg)
    idm.load_state_dict(ckpt["idm"])
    la = lapo.latent_actions(cfg, idm, windows)
    torch.manual_seed(cfg.seed)
    la_untrained = lapo.latent_actions(cfg, lapo.IDM(cfg), windows)
    diff = (torch.as_tensor(windows[:, 2]).float() - torch.as_tensor(windows[:, 1]).float()).flatten(1) / 255
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
    variance, change = action_size(cfg.env)
    print(f"  action size: o_t+1 varies with the action by {variance:.5f} (mean squared, pixels in [0, 1]); "
          f"it differs from o_t by {change:.5f} (random play, 256 states)")
    every = max(1, n // 1024)
    spread = lapo.to_input(windows[::every], "cpu")  # about 1,024 windows over the whole test split
    with torch.no_grad():
        h = idm.cnn(spread)
    print(f"  IDM features alive on some of {len(spread)} windows: {int((h > 0).any(0).sum())} of {h.shape[1]}; latent spread "
          f"across windows (std, mean over dims) {la.std(0).mean():.2e}, its size (norm) {la.norm(dim=1).mean():.2f}")
    fdm = lapo.FDM(cfg)
    fdm.load_state_dict(ckpt["fdm"])
    fdm.eval()
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
        expert = lapo.load_policy(cfg, args.expert)
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
        ceilings = expert_ceiling(cfg.env, expert, groups)
        print("  next-frame ceiling on 2,048 of the expert's own states: raw {:.3f}, groups {:.3f} with its action "
              "mix; {:.3f}, {:.3f} with its probabilities at each state (stage 1's, on random play's states: "
              "{:.3f}, {:.3f})".format(*ceilings, ckpt["bars"]["ceiling"], ckpt["bars"]["ceiling_merged"]))

    if args.supervised_steps:
        train = lapo.Dataset(cfg.data, "train", cfg.env)
        raw, grouped = supervised_idm(cfg, train, windows[n // 2:], ta[n // 2:], groups, args.supervised_steps)
        print(f"  supervised: the IDM's network, trained {args.supervised_steps} steps on the action labels, reads "
              f"the action on the probes' scored half at raw {raw:.3f}, groups {grouped:.3f}")


if __name__ == "__main__":
    main()
