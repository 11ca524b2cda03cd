"""Throughput of lapo on this machine: python tools/bench.py [--device cuda] [--no-amp]

Times the very functions the stages train with (lapo.stage1_update, lapo.stage2_update,
lapo.ppo) at the cpu and paper sizes, on random frames: medians of 5 steps after a warm-up.
PPO is 2 iterations of 64 envs x 64 steps, 3 epochs x 8 minibatches (the paper's PPO), end
to end. Also raw Procgen frames/s, dataset batches/s and peak memory. Name the CPU or GPU
whenever you quote a figure: the same step runs 2.5x slower on some x86 CPUs than others.
"""

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lapo  # noqa: E402


def median_s(fn, device, repeats=5):
    fn()  # warm-up
    if device.startswith("cuda"):  # the steps return tensors, not floats: wait for the warm-up's work
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--env", default="coinrun")
    args = p.parse_args()
    rng, rows = np.random.default_rng(0), []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("cpu", "paper"):
            cfg = lapo.make_config(preset, env=args.env, device=args.device, amp=args.amp, run_dir=tmp,
                                   ckpt_every_s=1e9, num_envs=64, num_steps=64, epochs=3, minibatches=8)
            lapo.seed_everything(0)
            idm, fdm = (m.to(cfg.device, memory_format=torch.channels_last) for m in lapo.make_idm_fdm(cfg))
            policy = lapo.Policy(cfg.policy_scale, cfg.la_dim, value=False).to(cfg.device, memory_format=torch.channels_last)
            opt1 = torch.optim.Adam([*idm.parameters(), *fdm.parameters()])  # stage 1's: one group
            opt2 = torch.optim.Adam(policy.parameters())
            x = lapo.to_input(rng.integers(0, 256, (cfg.s1_batch, 3, 64, 64, 3), dtype=np.uint8), cfg.device)
            s1 = median_s(lambda: lapo.stage1_update(cfg, idm, fdm, opt1, x, step=100), cfg.device)
            idm.eval()
            s2 = median_s(lambda: lapo.stage2_update(cfg, idm, policy, opt2, x, step=100), cfg.device)
            agent = lapo.Policy(cfg.policy_scale, lapo.NUM_ACTIONS).to(cfg.device, memory_format=torch.channels_last)
            frames = 2 * cfg.num_envs * cfg.num_steps
            t = time.perf_counter()
            lapo.ppo(cfg, "bench", agent, torch.optim.Adam(agent.parameters()), lambda f: [cfg.expert_lr],
                     frames, cfg.expert_ent, Path(tmp) / f"ppo-{preset}.pt")
            fps = frames / (time.perf_counter() - t)
            rows.append((preset, s1, s2, fps, cfg))
            print(f"[bench] {preset}: stage1 {s1:.3f} s/step, stage2 {s2:.3f} s/step, PPO {fps:.0f} frames/s", flush=True)
        envs = lapo.make_env(args.env, 64, 0)
        envs.reset()
        env_fps = 64 * 100 / median_s(lambda: [envs.step(rng.integers(15, size=64, dtype=np.int32))
                                                for _ in range(100)], "cpu")
        envs.close()
        data = Path(tmp) / "data" / "train"
        data.mkdir(parents=True)
        n = 4096
        lapo.write_chunk(data / "0.npz", dict(obs=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                                              ta=rng.integers(15, size=n), done=np.zeros(n, bool),
                                              rewards=np.zeros(n), ep_returns=np.zeros(n), values=np.zeros(n)))
        dataset = lapo.Dataset(data.parent, "train")
        batch_s = median_s(lambda: lapo.to_input(dataset.sample(rng, 128)[0], args.device), args.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"\nbench on {args.device} ({where}, {torch.get_num_threads()} threads), amp={args.amp}, torch {torch.__version__}")
    print(f"{'sizes':<7}{'stage1 s/step':>15}{'stage2 s/step':>15}{'PPO frames/s':>14}  network")
    for preset, s1, s2, fps, c in rows:
        print(f"{preset:<7}{s1:>15.3f}{s2:>15.3f}{fps:>14.0f}  IDM x{c.idm_scale}, FDM {c.fdm_width}, "
              f"policy x{c.policy_scale}, batch {c.s1_batch}, PPO {c.num_envs}x{c.num_steps} "
              f"{c.epochs} epochs x {c.minibatches} minibatches")
    gpu = f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device.startswith("cuda") else ""
    print(f"Procgen {env_fps:.0f} frames/s; dataset {1 / batch_s:.0f} batches of 128 windows/s; "
          f"peak memory {peak:.2f} GiB{gpu}")


if __name__ == "__main__":
    main()
