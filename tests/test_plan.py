"""The memory planner (`lorafleet plan`, lorafleet.train.plan) and the check `train`, `sweep` and `compare`
run before any worker starts. Fast: models are built on the meta device from the published Llama-3.1 8B
and 70B config.json files (tests/data/models/, as the model cards ship them); no weights, no Ray except
the last test.

The planner's parameters + gradients + optimizer state per rank are checked against bytes counted from
real shards in tests/test_fsdp.py (slow: it trains); here against the figures it printed.
"""

from __future__ import annotations

import os
import re

import pytest

from helpers import REPO
from lorafleet.cli import main
from lorafleet.config import load_config, parse_config

MODELS = REPO / "tests" / "data" / "models"
LLAMA_8B, LLAMA_70B = MODELS / "llama-3.1-8b", MODELS / "llama-3.1-70b"
GPU_PRESETS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _restore_home(monkeypatch):
    """`main(["...", "--home", H])` sets LORAFLEET_HOME for the whole process: undo it after each test."""
    monkeypatch.setenv("LORAFLEET_HOME", os.environ.get("LORAFLEET_HOME", str(REPO / ".lorafleet")))


def test_the_planners_parameter_counts_are_the_meta_models():
    """Exact counts, from the model built on the meta device: 8,030,261,248 and 70,553,706,496 (the
    published sizes of Llama-3.1-8B and -70B)."""
    from lorafleet.base_model import model_skeleton
    from lorafleet.train.memory import model_shape

    for folder, published in ((LLAMA_8B, 8_030_261_248), (LLAMA_70B, 70_553_706_496)):
        cfg = parse_config({"model": {"name_or_path": str(folder), "dtype": "bfloat16"}})
        meta = sum(p.numel() for p in model_skeleton(str(folder), "bfloat16").parameters())
        shape = model_shape(cfg, method=False)
        assert shape.params == meta == published
        lora = model_shape(cfg)  # r=8 on q, k, v, o: r x (in + out) per projection and layer
        h, kv = shape.hidden, shape.kv
        assert lora.trainable == shape.layers * 8 * (2 * (h + h) + 2 * (h + kv))
    shape = model_shape(parse_config({"model": {"name_or_path": str(LLAMA_8B)}}), method=False)
    assert (shape.hidden, shape.layers, shape.intermediate, shape.kv, shape.vocab) == (4096, 32, 14336, 1024, 128256)


@pytest.mark.parametrize("method,ranks,measured", [
    # bytes of parameters + gradients + AdamW state per rank that tests/test_fsdp.py counted from the local
    # shards after one step of SmolLM2-135M (its printout of 2026-12-07, docs/SCALING.md)
    ("full", 1, 2_152_241_216), ("full", 2, 1_076_121_152), ("lora", 1, 552_806_592), ("lora", 2, 276_403_776),
])
def test_planned_state_bytes_are_the_measured_ones(method, ranks, measured, tmp_path):
    from lorafleet.train.memory import model_shape, training_parts

    smollm2 = REPO / ".lorafleet" / "models" / "smollm2-135m-instruct"
    if not (smollm2 / "config.json").is_file():
        pytest.skip("SmolLM2 not converted (make smollm2)")
    cfg = parse_config({"model": {"name_or_path": str(smollm2)}, "method": {"name": method},
                        "scaling": {"strategy": "fsdp" if ranks > 1 else "ddp", "num_workers": ranks}}, home=tmp_path)
    parts = {p.name: p.bytes for p in training_parts(cfg, model_shape(cfg), on_gpu=False)}
    planned = parts["weights"] + parts["gradients"] + parts["optimizer state"]
    assert abs(planned - measured) <= 0.02 * measured, (planned, measured)


def _preset_clusters() -> list[tuple[str, str]]:
    """(preset, cluster file) of every `lorafleet plan PRESET --cluster FILE` line in the presets' headers."""
    found = []
    for path in GPU_PRESETS:
        lines = re.findall(r"^#\s+lorafleet plan (\S+) --cluster (\S+)\s*$", path.read_text(), flags=re.M)
        assert lines, f"{path.name} names no cluster: add '#   lorafleet plan configs/gpu/{path.name} --cluster FILE'"
        assert all(preset == f"configs/gpu/{path.name}" for preset, _ in lines), lines
        found += lines
    return found


@pytest.mark.parametrize("preset,cluster", _preset_clusters())
def test_every_gpu_preset_passes_the_planner_on_its_cluster(preset, cluster, tmp_path, capsys):
    assert main(["plan", preset, "--cluster", cluster, "--model-config", str(LLAMA_8B), "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fits and can be placed on " + cluster in out and "problem" not in out
    assert "total on one GPU" in out and "not known" not in out  # the cluster file says its GPUs' memory


def test_the_cluster_files_say_what_their_nodes_hold():
    from lorafleet.train.clusters import GPU_MEMORY, read_cluster

    launcher = {n.name: n for n in read_cluster(REPO / "cluster.yaml").node_types}
    g5, p5 = launcher["gpu_worker (g5.2xlarge)"], launcher["gpu_worker_h100 (p5.48xlarge)"]
    assert (g5.cpus, g5.gpus, g5.gpu_type, g5.gpu_memory, g5.max_nodes) == (8, 1, "A10G", GPU_MEMORY["A10G"], 4)
    assert (p5.cpus, p5.gpus, p5.gpu_type, p5.max_nodes) == (192, 8, "H100", 1)
    assert launcher["head (m5.4xlarge)"].cpus == 0
    for name in ("raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml"):
        head, gpu = read_cluster(REPO / "configs" / "k8s" / name).node_types
        assert head.cpus == 0 and (gpu.cpus, gpu.gpus, gpu.gpu_type, gpu.max_nodes) == (7, 1, "A10G", 4), name


def test_the_8b_ladder_is_refused_on_kuberay_with_the_numbers_and_the_fix(tmp_path, capsys):
    """KubeRay's GPU worker has 7 CPUs and an A10G; the ladder asks 8 CPUs and an H100 a worker."""
    argv = ["plan", "configs/gpu/compare-classification-8b.yaml", "--cluster", "configs/k8s/raycluster.yaml",
            "--model-config", str(LLAMA_8B), "--set", "rungs=[lora]", "--set", "base.scaling.accelerator_type=null",
            "--home", str(tmp_path)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "no node of configs/k8s/raycluster.yaml can hold one {CPU: 8, GPU: 1}" in err
    assert "--set scaling.cpus_per_worker=7" in err
    assert re.search(r"memory: 31\.\d GiB a GPU needed, gpu group has 22\.5 GiB \(A10G\)", err)
    assert "--set train.batch_size=2 --set train.grad_accum=8" in err  # a smaller micro-batch, the same global batch
    assert "total on one GPU" in out  # the table went to stdout
    assert main(argv[:-4] + ["--home", str(tmp_path)]) == 2  # as shipped: H100 only, which KubeRay lacks
    assert "scaling.accelerator_type=<one of ['A10G']>" in capsys.readouterr().err


def test_too_many_workers_or_too_little_memory_is_refused(tmp_path, capsys):
    preset = "configs/gpu/classification-lora-8b.yaml"
    model = ["--model-config", str(LLAMA_8B), "--home", str(tmp_path)]
    assert main(["plan", preset, "--gpus", "2", "--gpu-memory", "80GiB", *model]) == 2
    assert "4 x {CPU: 7, GPU: 1} asked, --gpus 2 --gpu-memory 80GiB holds at most 2" in capsys.readouterr().err
    assert main(["plan", preset, "--gpus", "4", "--gpu-memory", "16GiB", *model]) == 2
    err = capsys.readouterr().err
    assert "memory: 20.0 GiB a GPU needed" in err and "GPUs with at least 20.0 GiB" in err
    assert "scaling.strategy=fsdp --set scaling.num_workers=4 (" in err  # the frozen base sharded over the 4
    assert main(["plan", preset, "--gpus", "4", "--gpu-memory", "24GB", *model]) == 0


def test_serving_8b_leaves_room_for_the_kv_cache_or_is_refused(tmp_path, capsys):
    argv = ["plan", "configs/gpu/serve-8b.yaml", "--model-config", str(LLAMA_8B), "--home", str(tmp_path)]
    assert main([*argv, "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    # 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes = 131,072 bytes a token
    assert "4096 tokens x 131,072 B" in out and "8 slots x" in out
    assert main([*argv, "--gpus", "1", "--gpu-memory", "16GiB"]) == 2
    assert "vLLM would not start" in capsys.readouterr().err


def test_train_sweep_and_compare_refuse_before_anything_starts(base_model, tmp_path, capsys):
    """With --gpus, the check runs before Ray, the run folder or the ladder's folder: nothing is left behind."""
    import ray

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(base_model)
    ray_before = ray.is_initialized()
    h = ["--home", str(tmp_path)]
    gpu = ["--set", "scaling.use_gpu=true", "--gpus", "1"]
    assert main(["train", "configs/tiny/classification-lora.yaml", *gpu, *h]) == 2
    assert "2 x {CPU: 1, GPU: 1} asked, --gpus 1 holds at most 1" in capsys.readouterr().err
    assert main(["sweep", "configs/tiny/sweep-classification.yaml", "--set", "resources.use_gpu=true",
                 "--gpu-memory", "512MiB", *h]) == 2
    err = capsys.readouterr().err
    assert "sweep" in err and "a GPU needed" in err and "runtime" in err  # the numbers come with the refusal
    assert main(["compare", "configs/tiny/compare-classification.yaml", "--set", "base.scaling.use_gpu=true",
                 "--gpus", "1", *h]) == 2
    assert "rung lora" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no run, sweep or ladder folder


def test_the_what_fits_table_in_scaling_md_is_the_planners():
    from lorafleet.train.plan_table import fits_table

    cfg = load_config(REPO / "configs" / "gpu" / "classification-lora-8b.yaml")
    table = fits_table(cfg, [LLAMA_8B, LLAMA_70B])
    assert table in (REPO / "docs" / "SCALING.md").read_text(), f"docs/SCALING.md's table is out of date:\n{table}"


@pytest.mark.slow
def test_a_local_ray_refuses_what_it_can_never_place(ray_local):
    """Joined to a private local Ray (4 CPUs, no GPU), its nodes are all there is: a run asking more is refused."""
    from lorafleet.train.clusters import running_cluster
    from lorafleet.train.plan import PlanError, refuse_misfits

    cluster = running_cluster()
    cfg = parse_config({"scaling": {"num_workers": 2}})
    refuse_misfits({"fits": cfg}, cluster, "run")  # the test suite's CPU runs pass
    for sets, says in (({"num_workers": 5}, "5 x {CPU: 1, GPU: 0} asked"), ({"cpus_per_worker": 8}, "no node"),
                       ({"use_gpu": True}, "no node")):
        with pytest.raises(PlanError, match=re.escape(says)):
            refuse_misfits({"x": parse_config({"scaling": sets})}, cluster, "run")
