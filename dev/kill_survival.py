"""
Kill -9 survival of base_train: a tiny run that checkpoints every step is killed with SIGKILL at random
moments (inside steps and inside saves) N times, each time resumed from the newest complete checkpoint.
After every kill the newest checkpoint must load (model, optimizer, meta); at the end the run's final weights
must equal those of an uninterrupted run (exact resume), and no temp file of a dead writer may remain.

    python -m dev.kill_survival --kills 10
"""

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--device-type=cpu", "--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=2",
         "--total-batch-size=256", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
         "--window-pattern=L", "--save-every=1"]


def prepare(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, NANOCHAT_OFFLINE="1", NANOCHAT_COMPILE="0",
               NANOCHAT_DTYPE="float32", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "nanochat.dataset", "--sample"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size=512", "--max-chars=2000000"],
                   env=env, cwd=REPO, check=True, capture_output=True)
    return env


def train(env, tag, steps, resume_step=None, kill_after=None):
    """Run base_train; with kill_after, SIGKILL it that many seconds after its first step line."""
    cmd = [sys.executable, "-m", "scripts.base_train", *FLAGS, f"--num-iterations={steps}",
           f"--model-tag={tag}"]
    if resume_step is not None:
        cmd.append(f"--resume-from-step={resume_step}")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if kill_after is None:
        out = proc.communicate()[0]
        assert proc.returncode == 0, out
        return True
    for line in proc.stdout:
        if line.startswith("step "):
            break
    time.sleep(kill_after)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return finished


def newest_loads(checkpoint_dir):
    """The newest complete step, loaded whole (model, optimizer, meta); None if there is none yet."""
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint
    try:
        step = find_last_step(checkpoint_dir)
    except FileNotFoundError:
        return None
    load_checkpoint(checkpoint_dir, step, "cpu", load_optimizer=True)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # two runs' checkpoints of every step: about 5 MB a step, gigabytes at the defaults
    with tempfile.TemporaryDirectory(prefix="nanochat_kill_") as base_dir:
        return survive(args, base_dir)


def survive(args, base_dir):
    """main's exit status: 0 when every kill was survived and the resumed run ends as the straight one."""
    rng = random.Random(args.seed)
    env = prepare(base_dir)
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    train(env, "straight", args.steps)
    ckpt = os.path.join(base_dir, "base_checkpoints", "killed")
    survived, step = 0, None
    for kill in range(args.kills):
        train(env, "killed", args.steps, step, kill_after=rng.uniform(0.05, 1.5))
        step = newest_loads(ckpt)  # raises if the newest complete checkpoint does not load
        survived += 1
        print(f"kill {kill + 1}: newest complete step {step}, loads")
    train(env, "killed", args.steps, step)
    final = f"model_{args.steps:06d}.pt"
    straight = torch.load(os.path.join(base_dir, "base_checkpoints", "straight", final))
    resumed = torch.load(os.path.join(ckpt, final))
    equal = all(torch.equal(straight[k], resumed[k]) for k in straight)
    leftovers = glob.glob(os.path.join(ckpt, "*.tmp.*"))
    print(f"kills survived: {survived}/{args.kills}; final weights equal to the uninterrupted run: {equal}; "
          f"temp files left: {len(leftovers)}")
    return 0 if survived == args.kills and equal and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
