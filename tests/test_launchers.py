"""Sweeps: the launcher configs compose, and a joblib sweep writes one folder per job."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_configs_compose():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        local = compose("default", overrides=["hydra/launcher=local"], return_hydra_config=True)
        slurm = compose("default", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1 and slurm.hydra.launcher.partition == "gpu"


def test_joblib_sweep_writes_a_folder_per_job(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), "-m", "hydra/launcher=local",
                        "+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps",
                        "data.end_id=1", "show_progress=false", "gpu=-1", "eval_fn_list=[psnr]",
                        "sampler.diffusion_scheduler_config.num_steps=1", f"save_dir={tmp_path}", "name=sweep",
                        "task.pixel.mcmc_sampler_config.lr=1e-5,2e-5", "sampler.annealing_scheduler_config.num_steps=2,3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("run*"))
    assert [p.name for p in runs] == ["run000", "run001", "run002", "run003"]
    seen = set()
    for p in runs:
        assert json.loads((p / "metrics.json").read_text())["status"] == "complete"
        cfg = (p / "config.yaml").read_text()
        lr = "1.0e-05" if "lr: 1.0e-05" in cfg else "2.0e-05"
        levels = json.loads((p / "timing.json").read_text())["anneal_steps_cfg"]
        seen.add((lr, levels))
    assert seen == {("1.0e-05", 2), ("1.0e-05", 3), ("2.0e-05", 2), ("2.0e-05", 3)}
