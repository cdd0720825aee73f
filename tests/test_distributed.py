"""torchrun: images sharded over 2 gloo processes give exactly the results of 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["+data=gmm-toy", "+model=gmm_toy", "+task=phase_retrieval", "+sampler=edm_daps", "task_group=pixel_hmc",
        "data.end_id=4", "batch_size=1", "num_samples=2", "sampler.annealing_scheduler_config.num_steps=6",
        "show_progress=false", "gpu=-1", "eval_fn_list=[psnr,ssim]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "posterior_sample.py"), *ARGS, f"save_dir={tmp_path}", "name=one"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "posterior_sample.py"), *ARGS,
                          f"save_dir={tmp_path}", "name=two"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one", tmp_path / "two"
    for i in range(4):
        ra, rb = (json.loads((r / "per_image" / f"{i:05d}.json").read_text()) for r in (a, b))
        assert ra["particles"] == rb["particles"], i
    assert sorted(p.name for p in (a / "samples").iterdir()) == sorted(p.name for p in (b / "samples").iterdir())
    for p in (a / "samples").iterdir():
        assert p.read_bytes() == (b / "samples" / p.name).read_bytes(), p.name
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["status"] == mb["status"] == "complete" and ma["num_images_done"] == mb["num_images_done"] == 4
    assert ma["aggregate"] == mb["aggregate"]
    timing = json.loads((b / "timing.json").read_text())
    assert timing["world_size"] == 2 and [r["images_done"] for r in timing["ranks"]] == [2, 2]
    assert (b / "events.jsonl").is_file() and (b / "events.rank1.jsonl").is_file()
    assert "INFO posterior_sample: complete" in two.stderr and two.stderr.count("complete: 4 image(s)") == 1
