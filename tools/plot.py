"""Figures of a lapo run: python tools/plot.py --run-dir runs/coinrun-cpu

Writes PNGs to <run-dir>/plots and prints the numbers behind them:
  claim1_probe.png     probe accuracy of the latent action over stage 1 (stage1.jsonl), and
                       whether the FDM uses the latent (its error with shuffled latents); the
                       bars it must beat and the panel on action groups come from
                       <run-dir>/diagnose.json (python tools/diagnose.py --run-dir R
                       --baselines-only): without it, only the majority class
  claim2_offline.png   offline decoding vs behaviour cloning and the blind action mix (prior-N.pt:
                       tools/diagnose.py --prior-labels N), by labels
  claim3_online.png    online fine-tuning (RL+SL, RL only) vs PPO from scratch
  fdm_predictions.png  the FDM's o_{t+1} next to the true one, on held-out windows
  latent_pca.png       latent actions of held-out windows (PCA), coloured by the true action
Curves and bars over seeds run from the worst seed to the best (min-max, not std).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lapo  # noqa: E402


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


def seed_checkpoints(run, name):
    """Every seed's checkpoint of `name`: <name>.pt, then <name>-seedS.pt."""
    return sorted(run.glob(f"{name}.pt")) + sorted(run.glob(f"{name}-seed*.pt"))


def results(path):
    return torch.load(path, weights_only=True).get("results", {})


def save(fig, out, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    print(f"[plot] {out / name}")


def claim1(run, out, game):
    rows = [r for r in read_jsonl(run / "stage1.jsonl") if "probe_la" in r]
    if not rows:
        return
    steps, last = [r["step"] for r in rows], rows[-1]
    bars = json.loads((run / "diagnose.json").read_text()) if (run / "diagnose.json").exists() else None
    fig, axes = plt.subplots(1, 3 if bars else 2, figsize=(16 if bars else 11, 4))
    ax, ax2 = axes[0], axes[-1]
    ax.plot(steps, [r["probe_la"] for r in rows], "o-", label="latent action")
    ax.plot(steps, [r["probe_la_q"] for r in rows], "s-", label="quantised latent action")
    ax.axhline(last["majority"], color="gray", ls=":", label="majority class")
    panels = [(ax, "", "the true action (15 classes)")]
    if bars:  # tools/diagnose.py's, on the same windows
        ax.axhline(bars["probe_untrained"], color="gray", ls="-.", label="untrained IDM")
        axes[1].plot([bars["step"]], [bars["probe_la_merged"]], "o", label=f"latent action (step {bars['step']})")
        axes[1].axhline(bars["majority_merged"], color="gray", ls=":", label="majority class")
        axes[1].set_xlim(ax.get_xlim())  # beside the curves: the step diagnose.py was run at
        panels.append((axes[1], "_merged", f"its group ({max(bars['groups']) + 1} groups)"))
    for axis, suffix, what in panels:
        if bars:
            for key, style, label in [("ceiling", "-", "next-frame ceiling (actions independent of the state)"),
                                      ("probe_frame_diff", "--", "frame difference o_t+1 - o_t")]:
                axis.axhline(bars[key + suffix], color="gray", ls=style, label=label)
        axis.set(xlabel="stage-1 step", ylabel="held-out accuracy of the probe",
                 title=f"Claim 1: the latent knows {what}", ylim=(0, 1))
        axis.legend(fontsize=8)
    for key, label in [("test_fdm_mse", "FDM, own latent"), ("test_fdm_mse_shuffled", "FDM, shuffled latents"),
                       ("test_copy_mse", "copying o_t")]:
        ax2.plot(steps, [r[key] for r in rows], "o-", label=label)
    ax2.set(xlabel="stage-1 step", ylabel="held-out MSE", yscale="log", title=f"Does the FDM use the latent? ({game})")
    ax2.legend(fontsize=8)
    if not bars:
        print(f"[plot] claim 1: no {run / 'diagnose.json'}, so no bars but the majority class, and no groups panel: "
              f"run `python tools/diagnose.py --run-dir {run} --baselines-only` first")
    save(fig, out, "claim1_probe.png")


def claim2(run, out, game):
    ns = sorted({int(p.stem.split("-")[1]) for p in run.glob("*-*.pt") if p.stem.split("-")[0] in ("decode", "bc", "prior")})
    if not ns:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("decode", "LAPO: latent policy + decoder"), ("bc", "behaviour cloning from scratch"),
                        ("prior", "the labels' action mix, blind to the screen")):
        pts = []
        for n in ns:
            seeds = [results(p)["relative"] for p in seed_checkpoints(run, f"{name}-{n}")]
            if seeds:
                pts.append((n, np.mean(seeds), np.min(seeds), np.max(seeds)))
                print(f"[plot] claim 2, {label}, {n} labels: relative return {np.mean(seeds):.2f} +- "
                      f"{np.std(seeds):.2f} over {len(seeds)} seeds ({', '.join(f'{x:.2f}' for x in seeds)})")
        if pts:
            n, m, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(n, m, yerr=np.stack([m - lo, hi - m]), fmt="o-", capsize=3, label=label)
    ax.axhline(0, color="gray", ls=":", label="uniform-random policy")
    if (run / "expert.pt").exists() and "relative" in results(run / "expert.pt"):
        ax.axhline(results(run / "expert.pt")["relative"], color="gray", ls="--", label="the data's expert")
    ax.set(xscale="log", xlabel="labelled frames", ylabel="relative return (mean; bars: min-max over seeds)",
           title=f"Claim 2: offline decoding ({game})")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=8)
    save(fig, out, "claim2_offline.png")


def claim3(run, out, game):
    methods = {"finetune": "LAPO RL+SL", "finetune-rl": "LAPO RL only", "ppo": "PPO from scratch"}
    curves, finals, frames = {}, {}, None
    for name, label in methods.items():
        for ckpt in seed_checkpoints(run, name):
            state = torch.load(ckpt, weights_only=True)
            if not state.get("finished"):  # its curve would stop short, and interp would hold it flat
                print(f"[plot] claim 3: {ckpt.name} is unfinished, left out")
                continue
            frames = state["config"]["ft_frames"]
            eps = [r for r in read_jsonl(ckpt.with_suffix(".jsonl")) if "episode_return" in r]
            if eps:  # the mean of the last (up to) 100 training episodes, on a common frame grid
                c = np.cumsum([0] + [e["episode_return"] for e in eps])
                k = np.arange(1, len(eps) + 1)
                ret = (c[k] - c[np.maximum(k - 100, 0)]) / np.minimum(k, 100)
                grid = np.linspace(0, frames, 101)[1:]
                curves.setdefault(label, []).append(np.interp(grid, [e["step"] for e in eps], lapo.relative_return(game, ret)))
            finals.setdefault(label, []).append(state["results"]["relative"])
    if not curves:
        return
    grid = np.linspace(0, frames, 101)[1:]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[2, 1]))
    for label, seeds in curves.items():
        ax.plot(grid, np.mean(seeds, 0), label=f"{label} ({len(seeds)} seeds)")
        ax.fill_between(grid, np.min(seeds, 0), np.max(seeds, 0), alpha=0.2)
        at = ", ".join(f"{np.mean(seeds, 0)[round(100 * f) - 1]:.2f} at {f * frames:,.0f}" for f in (0.2, 0.5, 1.0))
        print(f"[plot] claim 3, {label}: training curve {at}")
    rlsl, ppo = curves.get("LAPO RL+SL"), curves.get("PPO from scratch")
    if rlsl and ppo:  # claim 3's test: RL+SL above PPO from scratch after the first 10% of frames
        later = slice(len(grid) // 10, None)
        above = np.mean(rlsl, 0)[later] > np.mean(ppo, 0)[later]
        apart = np.min(rlsl, 0)[later] > np.max(ppo, 0)[later]
        print(f"[plot] claim 3: after 10% of the frames, RL+SL's mean curve is above PPO from scratch's at "
              f"{above.mean():.0%} of {above.size} points; its worst seed above PPO's best seed at {apart.mean():.0%}")
    ax.set(xlabel="environment frames", ylabel="relative return (last 100 episodes)",
           title=f"Claim 3: online fine-tuning vs PPO from scratch ({game})")
    ax.legend(fontsize=8)
    for i, (label, f) in enumerate(finals.items()):
        ax2.errorbar([i], [np.mean(f)], yerr=[[np.mean(f) - min(f)], [max(f) - np.mean(f)]], fmt="o", capsize=4)
        print(f"[plot] claim 3, {label}: final relative return {np.mean(f):.2f} +- {np.std(f):.2f} "
              f"over {len(f)} seeds ({', '.join(f'{x:.2f}' for x in f)})")
    ax2.set_xticks(range(len(finals)), list(finals), fontsize=8)
    ax2.set(ylabel="relative return (final evaluation)", title="After the last frame")
    save(fig, out, "claim3_online.png")


def pictures(run, out, cfg):
    """What the FDM predicts, and what the latent actions encode."""
    ckpt = lapo.load_checkpoint(run / "stage1.pt", "stage1")
    idm, fdm = lapo.make_idm_fdm(cfg)
    idm.load_state_dict(ckpt["idm"])
    fdm.load_state_dict(ckpt["fdm"])
    idm, fdm = (m.to(cfg.device, memory_format=torch.channels_last).eval() for m in (idm, fdm))
    test = lapo.Dataset(cfg.data, "test", cfg.env)
    obs, ta = test.get(np.linspace(0, len(test) - 1, 2048).astype(int))
    with torch.no_grad():
        x = lapo.to_input(obs[:6], cfg.device)
        _, la_q, _, _ = idm(x)
        pred = (fdm(x[:, :6], la_q).float().clamp(-0.5, 0.5) + 0.5).permute(0, 2, 3, 1).cpu()
    fig, axes = plt.subplots(3, 6, figsize=(12, 6.5))
    for j in range(6):
        for i, (img, title) in enumerate([(obs[j, 1], "o_t"), (obs[j, 2], "true o_t+1"), (pred[j].numpy(), "FDM's o_t+1")]):
            axes[i, j].imshow(img)
            axes[i, j].set_title(title, fontsize=8)
            axes[i, j].axis("off")
    save(fig, out, "fdm_predictions.png")
    la = lapo.latent_actions(cfg, idm, obs).cpu()
    la = la - la.mean(0)
    xy = la @ torch.linalg.svd(la, full_matrices=False)[2][:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=ta, cmap="tab20", s=6, vmin=0, vmax=lapo.NUM_ACTIONS - 1)
    fig.colorbar(sc, label="true action (never seen by the IDM)")
    ax.set(title=f"Latent actions of held-out transitions, PCA ({cfg.env})")
    save(fig, out, "latent_pca.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a lapo run directory")
    p.add_argument("--data", default="", help="its dataset (default: the one it was trained on)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    run = Path(args.run_dir)
    checkpoints = sorted(run.glob("*.pt"))
    if not checkpoints:
        sys.exit(f"error: no checkpoints in {run}: run the stages first")
    first = run / "stage1.pt" if (run / "stage1.pt").exists() else checkpoints[0]
    saved = torch.load(first, map_location="cpu", weights_only=True)["config"]
    data = args.data or saved["data"]
    if not Path(data).exists():  # the saved path is relative to where the run was made
        data = str(run / "data")
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(lapo.Config)}}
    cfg = lapo.Config(**{**saved, "run_dir": str(run), "data": data, "device": args.device})
    out = run / "plots"
    out.mkdir(exist_ok=True)
    claim1(run, out, cfg.env)
    claim2(run, out, cfg.env)
    claim3(run, out, cfg.env)
    if (run / "stage1.pt").exists() and torch.load(run / "stage1.pt", weights_only=True).get("finished"):
        pictures(run, out, cfg)


if __name__ == "__main__":
    main()
