"""Training survives SIGKILL at any moment: killed at 10 seeded random moments (half of them while
a checkpoint is being written, slowed down by a test hook), with TMPDIR on another filesystem
(/dev/shm) for half the runs, every re-run resumes from the last good checkpoint, loses at most
one checkpoint interval, and the run ends with no temporary files left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prepared_data import make_prepared_dataset

INTERVAL = 2          # checkpoint_every_n_steps
WRITE_DELAY = 0.3     # seconds the test hook pauses halfway through each checkpoint write
ROOT = Path(__file__).resolve().parents[1]

# Runs `medlsdm` with the write hook and a callback appending "global_step" after every step
# (before that step's checkpoint is written: Lightning runs checkpoint callbacks last).
DRIVER = textwrap.dedent("""
    import os, sys
    from medlsdm.training import runner

    runner.AtomicCheckpointIO.write_delay = float(os.environ["KILL_TEST_WRITE_DELAY"])
    build_trainer = runner.build_trainer

    class StepLog(runner.Callback):
        def on_train_batch_end(self, trainer, *args):
            with open(os.environ["KILL_TEST_STEPS"], "a") as fh:
                fh.write(f"{trainer.global_step}\\n")

    def build(run_dir, tcfg, callbacks=(), **kwargs):
        return build_trainer(run_dir, tcfg, callbacks=[*callbacks, StepLog()], **kwargs)

    runner.build_trainer = build
    from medlsdm.cli import main
    sys.exit(main(sys.argv[1:]))
""")

PIXEL_TINY = ["space=pixel", "denoiser.kind=concat", "denoiser.base_channels=8", "denoiser.channel_mult=[1,2]",
              "denoiser.attention_levels=[]", "diffusion.timesteps=20", "trainer.progress_bar=false",
              f"trainer.checkpoint_every_n_steps={INTERVAL}", "trainer.log_every_n_steps=1000",
              "trainer.preview_every_n_steps=100000", "ema.decay=null"]


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def _last_step(steps: Path) -> int:
    lines = steps.read_text().split() if steps.exists() else []
    return int(lines[-1]) if lines else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_from_the_last_good_checkpoint(tmp_path):
    data = make_prepared_dataset(tmp_path / "data", n_train=2, n_val=0, shape=(8, 8, 8))
    run = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    steps = tmp_path / "steps.txt"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    other_tmp = Path(os.path.realpath(shm)) / f"medlsdm-kill-test-{os.getpid()}"
    other_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "KILL_TEST_WRITE_DELAY": str(WRITE_DELAY), "KILL_TEST_STEPS": str(steps), "OMP_NUM_THREADS": "1"}

    def start(max_steps: int, i: int):
        steps.unlink(missing_ok=True)
        run_env = {**env, "TMPDIR": str(other_tmp)} if i % 2 == 0 else env
        argv = [sys.executable, str(driver), "train", "diffusion", "--data", str(data), "--out", str(run)]
        for item in [*PIXEL_TINY, f"trainer.max_steps={max_steps}"]:
            argv += ["--set", item]
        return subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace")

    def resumed_step(output: str) -> int | None:
        match = re.search(r"resuming from \S+ \(step (\d+)\)", output)
        return int(match.group(1)) if match else None

    rng = np.random.default_rng(2024)
    reached, temps_left, during_write = None, 0, 0
    try:
        for i in range(11):
            final = i == 10
            proc = start(reached + 2 * INTERVAL if final else 100_000, i)
            if final:
                output, _ = proc.communicate(timeout=600)
                assert proc.returncode == 0, output
            else:
                # First wait until this run trains (startup is no interesting moment), then kill:
                # on even runs while a checkpoint is being written, on odd runs at a random time.
                deadline = time.time() + 300
                while _last_step(steps) < 1 and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                assert proc.poll() is None, proc.communicate()[0]
                if i % 2 == 0:
                    while not list((run / "checkpoints").glob(".tmp-*")) and time.time() < deadline:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0.0, WRITE_DELAY))
                    during_write += bool(list((run / "checkpoints").glob(".tmp-*")))
                else:
                    time.sleep(rng.uniform(0.0, 2.0))
                os.kill(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate(timeout=60)
                temps_left += bool(_temps(run))
            # What this run resumed from, against what the previous run had reached.
            step = resumed_step(output)
            if reached is not None:
                # At most one interval lost: the checkpoint of the last logged step may have been
                # in flight (Lightning runs checkpoint callbacks last), the one before is complete.
                assert reached - INTERVAL <= (step or 0) <= reached, (i, reached, step, output)
                if reached > INTERVAL:
                    assert step is not None, f"run {i} restarted from step 0 after step {reached}:\n{output}"
            if not final:
                reached = max(_last_step(steps), step or 0)
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == reached + 2 * INTERVAL
        previous = torch.load(run / "checkpoints" / "previous.ckpt", map_location="cpu", weights_only=True)
        # the periodic checkpoint before the final step (the last run may have been killed at an odd step)
        final_step = reached + 2 * INTERVAL
        assert previous["global_step"] == (final_step - 1) // INTERVAL * INTERVAL
        assert _temps(run) == [] and not (run / ".medlsdm.lock").exists()
        assert not [p for p in other_tmp.rglob("*") if "ckpt" in p.name]  # no checkpoint goes through TMPDIR
        assert during_write >= 3 and temps_left >= 1  # the hard moments were hit, and cleaned up
    finally:
        shutil.rmtree(other_tmp, ignore_errors=True)
